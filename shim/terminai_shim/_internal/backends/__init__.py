"""VM backends: one interface (``base.Backend``), one file per VMM."""

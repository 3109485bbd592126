"""Actions: each returns a JSON-serialisable dict, with ``error`` on failure."""

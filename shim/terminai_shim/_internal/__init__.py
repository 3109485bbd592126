"""Implementation detail of the shim; not a public interface."""

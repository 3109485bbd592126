"""Signing releases with sigstore: keyless in CI, a local development stack
on a developer's machine and in the tests (the real, unmodified sigstore
library signs and verifies against both)."""

"""What the shim trusts by default: Sigstore's public-good trust root and
the identity of the release workflow, per channel (policy.json).

The trust root was copied from sigstore-python 4.5.1's embedded copy of the
public-good TUF repository; refresh it with the library when Sigstore
rotates keys. Anything else (the local development stack included) must be
named explicitly on the command line.
"""

"""TerminAI survival kit: small, dependable file actions for the agent.

The version always equals the TerminAI runtime release version; the release
pipeline refuses to build an image where they differ.
"""

__version__ = "0.1.0"

from . import model

__all__ = ["__version__", "model"]

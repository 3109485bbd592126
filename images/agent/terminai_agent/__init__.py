"""The TerminAI guest agent: runs the host's commands inside the isolation tier.

Standard library only. ``protocol`` is shared with the host shim.
"""

__version__ = "0.1.0"

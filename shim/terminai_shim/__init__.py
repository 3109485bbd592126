"""The TerminAI runtime shim: boots the isolation tier and runs commands in it.

Public surface: ``models`` (configuration and results), ``errors``,
``session`` (a running VM and its agent), ``cli`` (the ``terminai-shim``
command). Protocol and VMM detail lives under ``_internal``.
"""

__version__ = "0.1.0"

"""The TerminAI runtime shim: boots the isolation tier and runs commands in it.

Public surface: ``launch`` (the front door: a request in, a verified,
resolved launch out), ``verify`` (signatures and trust), ``probes`` (what
this host can run), ``layout`` (release file names), ``manifest``,
``models``, ``errors``, ``session`` (a running VM and its agent), ``parts``
(single pieces, for the benchmark), ``options`` (every launch option, once),
``fileio``, ``pool``, ``run``, ``doctor``, ``buildinfo``, ``windows``, ``cli``
and ``serve``; each lists its exports in ``__all__``. Protocol, VMM and
fetching detail lives under ``_internal``, which nothing outside the
package imports.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

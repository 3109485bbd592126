"""The Windows isolation tier: the AppContainer brain and the broker it talks to.

Public surface: ``broker`` (the platform-neutral pipe server), ``bundle``
(verify and unpack a signed brain bundle), ``launch`` (start the brain and
wait for its handshake). ``win32`` holds the ctypes calls into the Win32 API
and the pure helpers they need (SDDL, command lines, environment blocks),
which are tested everywhere.
"""

"""The TerminAI build and release pipeline.

Each artifact has its own subpackage (``kernel``, ``rootfs``, ...) that turns
pinned inputs into cached outputs. ``tasks.py`` at the repository root only
parses arguments and calls in here, so everything a task does can also be
driven from tests with the same code path.
"""

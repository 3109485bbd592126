"""Labels the kit attaches to files it classifies."""

from enum import Enum


class ObjectTableLabels(str, Enum):
    """What should happen to a file: a plain ``str`` so it serialises as itself."""

    TRANSIT = "TRANSIT"  # used once and done with: installers, packages, disk images
    KEEP = "KEEP"  # the user's own documents and media
    DELETE = "DELETE"  # broken or partial downloads
    ARCHIVE = "ARCHIVE"  # bundles worth keeping compressed but out of the way
    UNKNOWN = "UNKNOWN"  # unreadable, missing, or nothing to go by

    def __str__(self) -> str:
        return self.value

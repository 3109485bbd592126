"""SOURCE_DATE_EPOCH: every timestamp in a build comes from git, never the clock.

Each artifact takes the time of the last commit that touched its own inputs,
so an unrelated commit (say, to the agent) does not change the kernel's key.
An explicit ``SOURCE_DATE_EPOCH`` in the environment overrides this.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .errors import BuildError


def source_date_epoch(repo: Path, *paths: str) -> int:
    explicit = os.environ.get("SOURCE_DATE_EPOCH")
    if explicit:
        try:
            return int(explicit)
        except ValueError:
            raise BuildError(
                f"SOURCE_DATE_EPOCH={explicit!r} is not an integer", hint="unset it or set seconds since 1970"
            ) from None
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "log", "-1", "--format=%ct", "--", *paths],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(
            f"cannot read the commit time from git in {repo}: {exc}",
            hint="build from a git checkout, or set SOURCE_DATE_EPOCH",
        ) from None
    if not out:
        raise BuildError(
            f"no commit touches {', '.join(paths) or repo} yet",
            hint="commit the inputs first, or set SOURCE_DATE_EPOCH",
        )
    return int(out)

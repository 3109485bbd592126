"""Running build tools: output to a log file, a count of progress on screen."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import BuildError
from .progress import Reporter


def run_logged(
    argv: Sequence[str],
    *,
    log: Path,
    reporter: Reporter,
    step: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    progress_re: re.Pattern[str] | None = None,
    expected: int | None = None,
    hint: str | None = None,
) -> None:
    """Run ``argv``; append its output to ``log``; raise a BuildError on failure.

    Lines matching ``progress_re`` advance the progress count (for make, the
    ``CC``/``LD`` lines), so a long compile shows it is moving.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
        except FileNotFoundError:
            raise BuildError(f"{argv[0]} is not installed", hint="run ./bootstrap.sh") from None
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if progress_re is not None and progress_re.search(line):
                count += 1
                reporter.progress(step, count, expected, line.strip()[-60:])
        rc = proc.wait()
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise BuildError(
            f"{step}: `{' '.join(argv[:3])} ...` failed with exit code {rc}; last lines:\n  " + "\n  ".join(tail),
            log=str(log),
            hint=hint,
        )


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return "missing"
    return out.splitlines()[0].strip() if out else "unknown"

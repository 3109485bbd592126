"""From the full tree mkosi installs to the tree that ships.

mkosi leaves a complete Debian system, package database included, because
a layer is installed with apt on top of it. What ships is smaller: whole
packages the guest never runs (the package managers, Perl, debconf) are
removed by their own file lists, the base's path patterns go (documents,
locales, unused parts of the standard library), every script whose
interpreter is gone goes with it, and the package state goes last. The
SBOM then lists exactly the packages that still have a file in the tree.

The base and every stack of layers are finished by these same rules, with
the removals a stack's layers ``restore`` taken out, so a layer's delta is
the difference of two finished trees and means what it says.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError
from ..proc import run_logged
from ..progress import Reporter

# The package manager's state: never shipped, whatever a layer restores.
PACKAGE_STATE = (
    "/var/lib/dpkg", "/var/lib/apt", "/var/cache/apt", "/var/cache/debconf", "/var/log/*",
    "/var/cache/ldconfig/aux-cache",
)  # fmt: skip
PY_DIRS = ("/usr/lib/python3.11", "/usr/lib/python3/dist-packages", "/usr/lib/terminai")


@dataclass(frozen=True)
class Removals:
    packages: tuple[str, ...]  # removed by their dpkg file lists
    files: tuple[str, ...]  # glob patterns relative to the root

    def without(self, restored: Iterable[str]) -> Removals:
        back = set(restored)
        return Removals(tuple(p for p in self.packages if p not in back), tuple(f for f in self.files if f not in back))


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    architecture: str
    files: tuple[str, ...]  # what dpkg lists for it, directories included

    def as_sbom(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "architecture": self.architecture}


def installed_packages(tree: Path) -> list[Package]:
    """The packages dpkg records as installed in ``tree``, sorted by name."""
    status = tree / "var/lib/dpkg/status"
    if not status.is_file():
        raise BuildError(f"{tree} has no dpkg database", hint="the full tree must keep its package metadata")
    found = []
    for stanza in status.read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Status") != "install ok installed":
            continue
        name, arch = fields["Package"], fields.get("Architecture", "all")
        info = tree / "var/lib/dpkg/info"
        listing = next((p for p in (info / f"{name}:{arch}.list", info / f"{name}.list") if p.is_file()), None)
        files = tuple(listing.read_text().splitlines()) if listing else ()
        found.append(Package(name, fields["Version"], arch, files))
    return sorted(found, key=lambda p: p.name)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _inside(tree: Path, rel: str) -> Path:
    """``rel`` under ``tree``, refusing a path that climbs out (``..``)."""
    path = tree / rel.lstrip("/")
    if ".." in Path(rel).parts:
        raise BuildError(f"refusing to remove {rel!r}: it leaves the tree")
    return path


def prune(tree: Path, removals: Removals, packages: list[Package]) -> None:
    """Apply ``removals`` and the package-state removal to ``tree`` in place."""
    by_name = {p.name: p for p in packages}
    unknown = [p for p in removals.packages if p not in by_name]
    if unknown:
        raise BuildError(f"cannot remove packages that are not installed: {unknown}",
                         hint="fix remove_packages in images/rootfs/base/layer.toml")  # fmt: skip
    interpreters = _interpreters(tree)
    dirs = []
    for name in removals.packages:
        for rel in by_name[name].files:
            path = _inside(tree, rel)
            if path.is_dir():  # a directory, or a link to one (``/sbin`` in a merged /usr): shared, kept
                dirs.append(path)
            elif path.is_symlink() or path.exists():
                path.unlink()
    _drop_empty(tree, dirs)
    for pattern in (*removals.files, *PACKAGE_STATE):
        for path in sorted(tree.glob(pattern.lstrip("/")), reverse=True):
            _remove(path)
    for script, interp in interpreters.items():
        if not _exists_in(tree, interp):
            script.unlink(missing_ok=True)


def _interpreter(path: Path) -> str | None:
    """The interpreter a script names on its ``#!`` line, if it names one
    (through ``env``: the program, taken to be in /usr/bin)."""
    try:
        with path.open("rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = [w.decode(errors="replace") for w in head[2:].split(b"\n", 1)[0].split()]
    if words and words[0].endswith("/env"):  # `#!/usr/bin/env [-S] perl`: the program env runs
        named = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        return f"/usr/bin/{named[0]}" if named and "/" not in named[0] else (named[0] if named else words[0])
    return words[0] if words else None


def _exists_in(tree: Path, guest_path: str) -> bool:
    """Whether ``guest_path`` resolves to a file inside ``tree``, following
    the tree's own links as the guest would (absolute ones inside it)."""
    path = guest_path
    for _ in range(40):
        host = tree / path.lstrip("/")
        if host.is_symlink():
            target = os.readlink(host)
            path = target if target.startswith("/") else os.path.normpath(os.path.join(os.path.dirname(path), target))
            continue
        return host.is_file()
    return False


def _drop_empty(tree: Path, dirs: list[Path]) -> None:
    """After every removed package's files: its directories that are now
    empty, and its links to directories that now point nowhere (Perl's
    ``5.36 -> 5.36.0``), until nothing more goes."""
    pending = sorted(set(dirs) - {tree}, key=lambda p: len(p.parts), reverse=True)
    changed = True
    while changed:
        changed = False
        for d in list(pending):
            if d.is_symlink() and not d.exists():
                d.unlink()
            elif not d.is_symlink() and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
            else:
                continue
            pending.remove(d)
            changed = True


def _interpreters(tree: Path) -> dict[Path, str]:
    """Every script in ``tree`` whose ``#!`` interpreter is there now. One
    whose interpreter the removals take (the Perl helpers of
    init-system-helpers and openssl) is dead weight that still looks
    runnable, and goes too; one that never had its interpreter here
    (``cgi.py`` names ``/usr/local/bin/python``) is left alone."""
    found = {}
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            path = Path(dirpath) / name
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
                continue
            interp = _interpreter(path)
            if interp and interp.startswith("/") and _exists_in(tree, interp):
                found[path] = interp
    return found


def shipped_packages(tree: Path, packages: list[Package]) -> list[Package]:
    """The packages that still have a file (not only a directory) in the finished tree."""
    kept = []
    for p in packages:
        for rel in p.files:
            path = tree / rel.lstrip("/")
            if (path.is_symlink() or path.is_file()) and not path.is_dir():  # ``/sbin`` is everyone's
                kept.append(p)
                break
    return kept


def compile_python(tree: Path, targets: list[str], *, sde: int, log: Path, reporter: Reporter, step: str) -> None:
    """Byte-compile for the guest's own Python, in the tree (a chroot), as
    unchecked-hash ``.pyc``: the image is read-only, so nothing would ever
    write them at run time, and the hash mode keeps them free of mtimes.
    ``targets``: compileall's arguments (paths in the guest, or ``-i LIST``)."""
    run_logged(
        ["/usr/sbin/chroot", str(tree), "/usr/bin/python3", "-m", "compileall", "-q", "-f",
         "--invalidation-mode", "unchecked-hash", *targets],
        log=log, reporter=reporter, step=step,
        env={"PATH": "/usr/bin:/bin", "SOURCE_DATE_EPOCH": str(sde)},
    )  # fmt: skip


def clamp_times(tree: Path, sde: int) -> None:
    """Every file gets the source date: an image must not record build time."""
    for dirpath, dirs, files in os.walk(tree):
        for name in dirs + files:
            os.utime(os.path.join(dirpath, name), (sde, sde), follow_symlinks=False)
    os.utime(tree, (sde, sde))

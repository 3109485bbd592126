"""The difference of two trees, as an overlayfs layer.

mkosi's own overlay output cannot be used: it drops every file whose path
exists below without comparing contents (the dpkg status, ``ld.so.cache``,
alternatives) and deletes whiteouts. So the layer is computed here, by
content: a path new or changed in ``upper`` (type, mode, owner, bytes or
link target) is copied; a path only in ``lower`` becomes a whiteout (a
character device 0/0, which overlayfs hides the lower path with, in any
lower layer); a directory in both is merged and appears only to carry what
changed beneath it, or its own changed mode.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DeltaStats:
    copied: int = 0
    whiteouts: list[str] = field(default_factory=list)
    links: dict[tuple[int, int], Path] = field(default_factory=dict)  # the first copy of each hard-linked file


def _same(u: os.stat_result, lo: os.stat_result, upath: Path, lpath: Path) -> bool:
    if stat.S_IFMT(u.st_mode) != stat.S_IFMT(lo.st_mode):
        return False
    if (u.st_mode, u.st_uid, u.st_gid) != (lo.st_mode, lo.st_uid, lo.st_gid):
        return False
    if stat.S_ISLNK(u.st_mode):
        return os.readlink(upath) == os.readlink(lpath)
    if stat.S_ISREG(u.st_mode):
        return u.st_size == lo.st_size and filecmp.cmp(upath, lpath, shallow=False)
    if stat.S_ISCHR(u.st_mode) or stat.S_ISBLK(u.st_mode):
        return u.st_rdev == lo.st_rdev
    return True  # directories (compared by their entries), FIFOs, sockets


def _copy_meta(src_st: os.stat_result, dst: Path) -> None:
    os.chown(dst, src_st.st_uid, src_st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(src_st.st_mode):
        os.chmod(dst, stat.S_IMODE(src_st.st_mode))


def _copy_entry(src: Path, dst: Path, st: os.stat_result, stats: DeltaStats) -> None:
    """``src`` (a whole subtree if a directory) to ``dst``, owners and modes
    kept, hard links kept as links (git's 150 commands are one program)."""
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        dst.mkdir()
        for child in sorted(os.listdir(src)):
            _copy_entry(src / child, dst / child, os.lstat(src / child), stats)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(mode) and st.st_nlink > 1 and (st.st_dev, st.st_ino) in stats.links:
        os.link(stats.links[(st.st_dev, st.st_ino)], dst)
        stats.copied += 1
        return
    elif stat.S_ISREG(mode):
        shutil.copyfile(src, dst, follow_symlinks=False)
        if st.st_nlink > 1:
            stats.links[(st.st_dev, st.st_ino)] = dst
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
        os.mknod(dst, mode, st.st_rdev)
    else:
        return  # sockets are not shipped
    _copy_meta(st, dst)
    stats.copied += 1


def _ensure_dir(upper: Path, out: Path, rel: Path) -> None:
    """``out/rel`` and its parents as directories with ``upper``'s metadata."""
    current = Path()
    for part in rel.parts:
        current = current / part
        target = out / current
        if not target.exists():
            target.mkdir()
            _copy_meta(os.lstat(upper / current), target)


def write_delta(upper: Path, lower: Path, out: Path) -> DeltaStats:
    """Fill the empty directory ``out`` with what turns ``lower`` into ``upper``."""
    stats = DeltaStats()
    _copy_meta(os.lstat(upper), out)
    _walk(upper, lower, out, Path(), stats)
    return stats


def _walk(upper: Path, lower: Path, out: Path, rel: Path, stats: DeltaStats) -> None:
    up_names = sorted(os.listdir(upper / rel))
    low_names = set(os.listdir(lower / rel))
    for name in up_names:
        child = rel / name
        u = os.lstat(upper / child)
        try:
            lo: os.stat_result | None = os.lstat(lower / child)
        except FileNotFoundError:
            lo = None
        if lo is not None and stat.S_ISDIR(u.st_mode) and stat.S_ISDIR(lo.st_mode):
            if (u.st_mode, u.st_uid, u.st_gid) != (lo.st_mode, lo.st_uid, lo.st_gid):
                _ensure_dir(upper, out, child)
            _walk(upper, lower, out, child, stats)
        elif lo is None or not _same(u, lo, upper / child, lower / child):
            _ensure_dir(upper, out, rel)
            _copy_entry(upper / child, out / child, u, stats)
    for name in sorted(low_names - set(up_names)):
        _ensure_dir(upper, out, rel)
        os.mknod(out / rel / name, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        stats.whiteouts.append("/" + (rel / name).as_posix())

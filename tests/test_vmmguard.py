"""The workspace and network decisions (pure), and the guard's mechanism on a
real process: a child under the guard's seccomp filter, the guard answering
its calls from this process, as it does for QEMU (no VM needed for that)."""

from __future__ import annotations

import errno
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


def test_git_metadata_is_read_only_at_any_depth_and_case():
    from terminai_shim._internal.wspolicy import ALLOW, Deny, WorkspacePolicy

    p = WorkspacePolicy("/w")
    for path in ("/w/.git", "/w/.git/config", "/w/a/b/.git", "/w/a/.GIT/hooks/x", "/w/lib/.git"):
        d = p.change(path, creates=True)
        assert isinstance(d, Deny) and d.errno == errno.EROFS, path
    for path in ("/w/src/x.py", "/w/.github/workflows/ci.yml", "/w/.gitignore", "/elsewhere/.git/config"):
        assert p.change(path, creates=True) == ALLOW, path
    assert WorkspacePolicy("/w", protect_git=False).change("/w/.git/config") == ALLOW
    hooks = WorkspacePolicy("/w", protected=(".husky/_",))
    assert isinstance(hooks.change("/w/.husky/_/pre-commit", creates=True), Deny)
    assert hooks.change("/w/.husky/pre-commit", creates=True) == ALLOW
    assert isinstance(p.change("/w/x/HEAD", creates=True, bare_shape=True), Deny)
    assert p.change("/w/x/HEAD", creates=True, bare_shape=False) == ALLOW


def test_hard_links_are_broken_and_the_floor_refuses_new_names():
    from terminai_shim._internal.wspolicy import ALLOW, BreakLink, Deny, WorkspacePolicy

    p = WorkspacePolicy("/w")
    assert p.write("/w/f", nlink=2, regular=True, creates=False, below_floor=False) == BreakLink("/w/f")
    assert p.write("/w/f", nlink=1, regular=True, creates=False, below_floor=True) == ALLOW
    assert isinstance(p.write("/w/f", nlink=2, regular=True, creates=False, below_floor=True), Deny)
    new = p.write("/w/new", nlink=0, regular=True, creates=True, below_floor=True)
    assert isinstance(new, Deny) and new.errno == errno.ENOSPC
    assert p.write("/other/f", nlink=5, regular=True, creates=True, below_floor=True) == ALLOW


def test_hooks_path_inside_the_worktree_is_found_by_reading_the_config(tmp_path):
    from terminai_shim._internal.wspolicy import hooks_paths

    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text('[core]\n\thooksPath = ".husky/_" ; husky\n[other]\n\thookspath = x\n')
    assert hooks_paths(str(tmp_path)) == (".husky/_",)
    (tmp_path / ".git" / "config").write_text("[core]\n\thooksPath = /etc/hooks\n\thooksPath = ../up\n")
    assert hooks_paths(str(tmp_path)) == ()


def test_open_mode_reaches_public_addresses_only():
    from terminai_shim._internal.netpolicy import OpenPolicy

    never_local = lambda a: False  # noqa: E731
    p = OpenPolicy.from_allow((), ("127.0.0.53", "10.1.2.3"))
    addr = ipaddress.ip_address
    assert p.decide(addr("93.184.216.34"), 443, never_local).allowed
    for a in ("127.0.0.1", "10.0.0.1", "169.254.169.254", "192.168.1.1", "::1", "fe80::1", "::ffff:127.0.0.1",
              "100.64.0.1", "0.0.0.0", "224.0.0.1"):  # fmt: skip
        assert not p.decide(addr(a), 80, never_local).allowed, a
    assert not p.decide(addr("93.184.216.34"), 80, lambda a: True).allowed, "the host's own public address"
    assert p.decide(addr("127.0.0.53"), 53, never_local).allowed, "this host's resolver, for DNS only"
    assert not p.decide(addr("127.0.0.53"), 80, never_local).allowed
    lifted = OpenPolicy.from_allow(("127.0.0.1",))
    assert lifted.decide(addr("127.0.0.1"), 8080, never_local).allowed
    assert not lifted.decide(addr("127.0.0.2"), 1, never_local).allowed


def test_disk_floor_settings():
    from terminai_shim._internal.diskfloor import DiskFloor
    from terminai_shim.errors import ConfigError

    st = os.statvfs("/")
    gib = 1 << 30
    assert DiskFloor.parse("2G,5%", st).bytes == max(2 * gib, int(st.f_blocks * st.f_frsize * 0.05))
    assert DiskFloor.parse("300M", st).bytes == 300 << 20
    for bad in ("lots", "150%", "-1G"):
        with pytest.raises(ConfigError):
            DiskFloor.parse(bad, st)


# The child names files the way QEMU's 9p server does: one entry of a directory it holds open.
CHILD = r"""
import os, sys
ws = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
sub = os.open("sub", os.O_RDONLY | os.O_DIRECTORY, dir_fd=ws)
git = os.open(".git", os.O_RDONLY | os.O_DIRECTORY, dir_fd=ws)
def attempt(what, fn):
    try:
        fn(); print(what, "ok")
    except OSError as e:
        print(what, "errno", e.errno)
attempt("mkdir-git", lambda: os.mkdir(".git", dir_fd=sub))
attempt("mkdir-ok", lambda: os.mkdir("ok", dir_fd=ws))
attempt("write-config", lambda: os.open("config", os.O_WRONLY | os.O_APPEND, dir_fd=git))
attempt("rename-git", lambda: os.rename(".git", "moved", src_dir_fd=ws, dst_dir_fd=ws))
attempt("write-linked", lambda: os.write(os.open("linked", os.O_WRONLY | os.O_APPEND, dir_fd=ws), b"more\n"))
attempt("walk", lambda: os.open("sub/../x", os.O_WRONLY | os.O_CREAT, dir_fd=ws))
attempt("bare-shape", lambda: [os.mkdir(n, dir_fd=sub) for n in ("objects", "refs")])
attempt("outside", lambda: os.open(sys.argv[1] + "-outside", os.O_WRONLY | os.O_CREAT))
"""


def _under_guard(ws: Path, tmp: Path, serve: bool, protect_git: bool = True) -> subprocess.CompletedProcess:
    from terminai_shim._internal.notifyfilter import filter_program, host_arch, installer, receive_listener
    from terminai_shim._internal.process import no_new_privileges
    from terminai_shim._internal.vmmguard import VmmGuard
    from terminai_shim._internal.wspolicy import WorkspacePolicy

    arch = host_arch()
    install, ours = installer(arch, filter_program(arch, files=True, network=False))

    def preexec() -> None:
        no_new_privileges()
        install()

    proc = subprocess.Popen([sys.executable, "-I", "-c", CHILD, str(ws)], preexec_fn=preexec, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    listener = receive_listener(ours)
    policy = WorkspacePolicy(str(ws), protect_git=protect_git)
    guard = VmmGuard(listener, proc.pid, arch, policy, None, None) if serve else None
    if not serve:
        os.close(listener)  # the shim is gone: nothing may pass unchecked
    out, err = proc.communicate(timeout=60)
    if guard is not None:
        guard.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / ".git").mkdir(parents=True)
    (ws / "sub").mkdir()
    (ws / ".git" / "config").write_text("[core]\n")
    (tmp_path / "twin").write_text("shared\n")
    os.link(tmp_path / "twin", ws / "linked")
    return ws


def test_the_guard_decides_every_call_of_a_real_process(tmp_path):
    ws = _workspace(tmp_path)
    done = _under_guard(ws, tmp_path, serve=True)
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert said == {"mkdir-git": "errno 30", "mkdir-ok": "ok", "write-config": "errno 30", "rename-git": "errno 30",
                    "write-linked": "ok", "walk": "errno 1", "bare-shape": "errno 30",
                    "outside": "ok"}, done.stderr  # fmt: skip
    assert (tmp_path / "twin").read_text() == "shared\n" and (ws / "linked").read_text() == "shared\nmore\n"


def test_without_the_shim_every_checked_call_fails(tmp_path):
    ws = _workspace(tmp_path)
    done = _under_guard(ws, tmp_path, serve=False)
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert said["mkdir-ok"] == f"errno {errno.ENOSYS}" and said["write-linked"] == f"errno {errno.ENOSYS}", said
    assert (tmp_path / "twin").read_text() == "shared\n" and not (ws / "ok").exists()


def test_with_a_writable_git_the_guard_lets_git_metadata_be_written(tmp_path):
    """--writable-git: a guest that commits may make and write repositories (and the shapes git makes)."""
    ws = _workspace(tmp_path)
    done = _under_guard(ws, tmp_path, serve=True, protect_git=False)
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert said["mkdir-git"] == said["write-config"] == said["bare-shape"] == "ok", said
    assert (tmp_path / "twin").read_text() == "shared\n", "hard links are still copied before a write"

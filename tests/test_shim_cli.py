"""terminai-shim's command line: doctor, run, and a light --version."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shimproc import SHIM


@pytest.mark.unit
def test_version_imports_nothing_heavy():
    code = (
        "import sys\nfrom terminai_shim.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "names = ('terminai_shim.session', 'threading', 'socket', 'json', 'subprocess', 'sigstore')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    version, heavy = out.split("\n")[:2]
    assert version.startswith("terminai-shim ")
    assert heavy == "", f"--version imported {heavy}"


@pytest.mark.unit
def test_version_json_says_which_build_runs():
    """--version --json: the package says it is the package; a standalone build
    reports the digest of its own folder (recomputed here, not taken on trust)
    and the sigstore frozen into it."""
    from terminai_release.standalone import folder_digest
    from terminai_shim import __version__

    report = json.loads(subprocess.run([SHIM, "--version", "--json"], capture_output=True, text=True,
                                       check=True).stdout)  # fmt: skip
    assert report["version"] == __version__ and report["sigstore"]
    if report["standalone"]:
        folder = Path(report["executable"]).parent
        assert report["build"]["digest"] == folder_digest(folder)
        assert report["build"]["sigstore"] == report["sigstore"] and report["build"]["version"] == __version__
    else:
        assert report["build"] is None and Path(SHIM).parent == Path(sys.executable).parent


def _fake_build(root: Path, corrupt: bool = False) -> None:
    for kind, name in (("kernel", "vmlinux-1.0-tai1"), ("rootfs", "rootfs-0.1.0.squashfs")):
        d = root / kind
        d.mkdir(parents=True)
        data = os.urandom(1000)
        (d / name).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        (d / "build-record.json").write_text(
            json.dumps({"outputs": {"x": {"file": name, "sha256": digest, "size": 1000}}})
        )
        if corrupt and kind == "rootfs":
            (d / name).write_bytes(bytes([data[0] ^ 1]) + data[1:])  # always a different byte


@pytest.mark.unit
@pytest.mark.parametrize("corrupt", [False, True])
def test_doctor_checks_artifacts(tmp_path, corrupt):
    _fake_build(tmp_path / "build", corrupt)
    env = dict(os.environ, TERMINAI_BUILD_DIR=str(tmp_path / "build"))
    proc = subprocess.run([SHIM, "doctor", "--json"], env=env, capture_output=True, text=True)
    info = json.loads(proc.stdout)
    assert info["accelerator"]["choice"] in ("kvm", "tcg") and info["accelerator"]["reason"]
    assert info["backend"] in ("qemu", "firecracker")
    assert info["artifacts"]["kernel_status"].startswith("valid")
    if corrupt:
        assert info["artifacts"]["rootfs_status"].startswith("INVALID") and proc.returncode == 1
    else:
        assert info["artifacts"]["rootfs_status"].startswith("valid") and proc.returncode == 0
    empty = dict(os.environ, TERMINAI_BUILD_DIR=str(tmp_path / "none"))
    assert subprocess.run([SHIM, "doctor"], env=empty, capture_output=True).returncode == 1


@pytest.mark.vm
def test_run_streams_and_exits_with_the_command_code(boot_config, tmp_path):
    base = [SHIM, "run", "--kernel", str(boot_config.kernel), "--rootfs", str(boot_config.rootfs)]
    proc = subprocess.run([*base, "--workspace", str(tmp_path), "--", "sh", "-c",
                           "cat; echo err >&2; echo made > /workspace/out.txt; exit 3"],
                          input=b"from stdin\n", capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == 3
    assert proc.stdout == b"from stdin\n" and proc.stderr == b"err\n"
    assert (tmp_path / "out.txt").read_text() == "made\n"
    proc = subprocess.run([*base, "--timeout", "1", "--", "sleep", "100"], capture_output=True, timeout=300)
    assert proc.returncode == 124 and b"timed out" in proc.stderr
    proc = subprocess.run([*base, "--", "/no/such/program"], capture_output=True, timeout=300)
    assert proc.returncode == 125 and b"cannot run '/no/such/program'" in proc.stderr
    proc = subprocess.run([*base, "--workspace", str(tmp_path / "missing"), "--", "true"], capture_output=True)
    assert proc.returncode == 125 and b"not a directory" in proc.stderr

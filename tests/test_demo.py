"""The README's main job, end to end: build, sign a release, verify it, boot it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO
from shimproc import SHIM

pytestmark = pytest.mark.vm


def test_inv_demo(kernel, rootfs):
    proc = subprocess.run([sys.executable, "-m", "invoke", "demo"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Hello from MicroVM: 6.1." in proc.stdout and "TRANSIT" in proc.stdout
    assert "signed manifest.json" in proc.stderr


@pytest.mark.parametrize("backend, kind", [("qemu", "rootfs"), ("container", "container-image")])
def test_run_boots_only_a_verified_release_fetched_over_http(ctx, kernel, rootfs, tmp_path, backend, kind,
                                                             docker_engine):  # fmt: skip
    import functools
    import os
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from terminai_release.release import build_release, sign_release

    rel = build_release(ctx, out=tmp_path / "dist")
    sign_release(ctx, rel)
    trusted = tmp_path / "trusted-root.json"
    trusted.write_bytes((rel.directory / "dev-trusted-root.json").read_bytes())

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(rel.directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    shim = SHIM
    env = dict(os.environ, TERMINAI_CACHE=str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        base = [shim, "run", "--backend", backend, "--manifest", url, "--allow-http", "--dev", "--trusted-root",
                str(trusted)]  # fmt: skip
        ok = subprocess.run([*base, "--", "cat", "/etc/terminai-release"], env=env, capture_output=True, timeout=600)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout == b"TERMINAI_VERSION=0.1.0\n"
        # Tamper with the served root image (or OCI archive): the shim refuses before booting.
        blob = rel.directory / rel.manifest.artifact(kind).location
        data = bytearray(blob.read_bytes())
        data[-1] ^= 1
        blob.write_bytes(bytes(data))
        env["TERMINAI_CACHE"] = str(tmp_path / "cache2")
        bad = subprocess.run([*base, "--", "true"], env=env, capture_output=True, timeout=600)
        assert bad.returncode == 125 and b"the manifest says" in bad.stderr
        assert not list((tmp_path / "cache2").glob("snapshots/*")), "nothing was booted"
    finally:
        httpd.shutdown()

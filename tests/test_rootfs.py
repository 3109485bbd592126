"""The root image: contents, size, SBOM, and what a change rebuilds."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO
from terminai_release.context import BuildContext
from terminai_release.digest import sha256_file
from terminai_release.errors import BuildError
from terminai_release.progress import Reporter
from terminai_release.rootfs import aptsources
from terminai_release.rootfs.base import plan_base
from terminai_release.rootfs.kit import KitOverride, build_kit_wheel


@pytest.mark.build
def test_image_record_size_and_sbom(rootfs):
    out = rootfs.record["outputs"]
    assert sha256_file(rootfs.image) == out["image"]["sha256"]
    assert out["image"]["size"] <= 30 * 1024 * 1024, "root image over the 30 MB target"
    sbom = json.loads(rootfs.sbom.read_text())
    names = {p["name"]: p["versionInfo"] for p in sbom["packages"]}
    assert sbom["spdxVersion"] == "SPDX-2.3"
    assert "python3" in names and "libc6" in names
    assert names["terminai-apts"] == "0.1.0" and names["terminai-agent"] == "0.1.0"


@pytest.mark.build
def test_image_contents(rootfs, tmp_path):
    listing = subprocess.run(
        ["unsquashfs", "-l", "-d", "", str(rootfs.image)], capture_output=True, text=True, check=True
    ).stdout
    paths = set(listing.split())
    for needed in ("/usr/bin/python3.11", "/usr/lib/terminai/init", "/usr/lib/terminai/terminai_agent/server.py",
                   "/usr/lib/python3/dist-packages/terminai_apts/__init__.py", "/workspace"):  # fmt: skip
        assert needed in paths, needed
    assert any(p.startswith("/usr/lib/terminai/terminai_agent/__pycache__/server.cpython-311") for p in paths)
    for gone in (
        "/usr/bin/apt-get",
        "/usr/bin/dpkg",
        "/usr/share/doc",
        "/usr/share/locale",
        "/usr/bin/perl",
        "/var/lib/dpkg",
    ):
        assert gone not in paths, f"{gone} should not be in the image"


@pytest.mark.build
def test_agent_change_keeps_base_key(tmp_path):
    """Changing only the agent changes the project layer's inputs, never the base's."""
    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    ctx = BuildContext(repo=clone, reporter=Reporter("plain"))
    base_before = plan_base(ctx).key
    agent = clone / "images/agent/terminai_agent/__init__.py"
    agent.write_text(agent.read_text() + "\n# a change\n")
    subprocess.run(["git", "-C", str(clone), "commit", "-qam", "agent change"], check=True)
    assert plan_base(ctx).key == base_before


@pytest.mark.build
def test_kit_override_is_pinned(ctx, tmp_path):
    wheel = build_kit_wheel(ctx)
    digest = sha256_file(wheel)
    assert build_kit_wheel(ctx, KitOverride(wheel, digest)) == wheel
    with pytest.raises(BuildError, match="was pinned"):
        build_kit_wheel(ctx, KitOverride(wheel, "0" * 64))
    odd = tmp_path / "terminai_apts-9.9.9-py3-none-any.whl"
    odd.write_bytes(wheel.read_bytes())
    with pytest.raises(BuildError, match="differs from the release version"):
        build_kit_wheel(ctx, KitOverride(odd, sha256_file(odd)))


@pytest.mark.unit
def test_mirrors_come_from_apt_config(tmp_path):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text("deb [signed-by=/k.gpg] http://mirror.invalid/debian bookworm main\n")
    (etc / "sources.list.d/sec.sources").write_text(
        "Types: deb\nURIs: http://sec.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    m = aptsources.host_mirrors(etc)
    assert m.debian == "http://mirror.invalid/debian" and m.security == "http://sec.invalid/debian-security"
    text = m.sources("bookworm")
    assert "Suites: bookworm bookworm-updates" in text and "Suites: bookworm-security" in text
    (etc / "sources.list").write_text("# nothing\n")
    (etc / "sources.list.d/sec.sources").unlink()
    with pytest.raises(BuildError, match="no Debian bookworm mirror"):
        aptsources.host_mirrors(etc)

"""Kernel inputs: fragments, the config version, the source pin."""

from __future__ import annotations

import hashlib
import shutil
import tarfile

import pytest
from conftest import REPO
from terminai_release.cache import StepCache
from terminai_release.errors import BuildError
from terminai_release.kernel import fragments as F
from terminai_release.kernel import versions as V
from terminai_release.kernel.source import KernelSource, fetch_source, load_source

pytestmark = pytest.mark.unit


def test_repo_fragments_parse_and_match_recorded_version():
    frags = F.load_fragments(REPO / "kernel-config", "x86_64")
    assert [f.name for f in frags][-1] == "arch/x86_64.conf"
    symbols = {s.symbol for f in frags for s in f.settings}
    assert {"PVH", "VIRTIO_CONSOLE", "NET_9P_VIRTIO", "EROFS_FS", "SQUASHFS_ZSTD", "VIRTIO_VSOCKETS"} <= symbols
    # Changing a fragment without `inv kernel-config-bump` fails here.
    assert V.current_version(REPO / "kernel-config") >= 1


def test_versions_history_is_append_only_and_unique():
    entries = V.load_versions(REPO / "kernel-config/versions.toml")
    assert [e.version for e in entries] == sorted({e.version for e in entries})
    digests = [tuple(sorted(e.fragments.items())) for e in entries]
    assert len(digests) == len(set(digests)), "two config versions record the same fragments"


def _config_dir(tmp_path):
    d = tmp_path / "kernel-config"
    shutil.copytree(REPO / "kernel-config", d)
    return d


def test_changed_fragment_needs_a_bump(tmp_path):
    d = _config_dir(tmp_path)
    before = V.current_version(d)
    with (d / "fragments/40-security.conf").open("a") as f:
        f.write("CONFIG_HARDENED_USERCOPY=y\n")
    with pytest.raises(BuildError, match=r"40-security.conf.*changed|changed.*40-security.conf"):
        V.current_version(d)
    assert V.bump_version(d) == before + 1
    assert V.current_version(d) == before + 1
    assert V.bump_version(d) == before + 1  # nothing changed: no new version


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("CONFIG_FOO", "malformed"),
        ("CONFIG_FOO=maybe", "malformed"),
        ("FOO=y", "malformed"),
        ("# CONFIG_FOO is off", "malformed"),
        ("CONFIG_FOO=m", "module"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    p = tmp_path / "x.conf"
    p.write_text("# a comment\n\nCONFIG_OK=y\n" + line + "\n")
    with pytest.raises(BuildError, match=rf"x.conf:4: .*{message}"):
        F.parse_fragment(p, "x.conf")


def test_values_parse():
    import pathlib
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        p = pathlib.Path(t) / "v.conf"
        p.write_text('CONFIG_A=y\nCONFIG_B=64\nCONFIG_C="x y"\nCONFIG_D=0x10\n# CONFIG_E is not set\n')
        f = F.parse_fragment(p, "v.conf")
    assert [(s.symbol, s.value) for s in f.settings] == [
        ("A", "y"),
        ("B", "64"),
        ("C", '"x y"'),
        ("D", "0x10"),
        ("E", "n"),
    ]


def test_duplicate_symbols_are_refused(tmp_path):
    d = _config_dir(tmp_path)
    with (d / "fragments/30-net-vsock.conf").open("a") as f:
        f.write("CONFIG_PVH=y\n")
    with pytest.raises(BuildError, match=r"arch/x86_64.conf:6: CONFIG_PVH is also set in fragments/30-net-vsock.conf"):
        F.load_fragments(d, "x86_64")
    p = tmp_path / "dup.conf"
    p.write_text("CONFIG_A=y\nCONFIG_A=y\n")
    with pytest.raises(BuildError, match=r"dup.conf:2"):
        F.parse_fragment(p, "dup.conf")


def test_unknown_symbols_are_named(tmp_path):
    (tmp_path / "src/fs").mkdir(parents=True)
    (tmp_path / "src/Kconfig").write_text("config VIRTIO\n\tbool\nmenuconfig NET\n\tbool\n")
    (tmp_path / "src/fs/Kconfig.x").write_text("  config EROFS_FS\n")
    p = tmp_path / "f.conf"
    p.write_text("CONFIG_VIRTIO=y\nCONFIG_NET=y\nCONFIG_EROFS_FS=y\nCONFIG_VIRTIO_CONSLOE=y\n")
    frag = F.parse_fragment(p, "f.conf")
    symbols = F.known_symbols(tmp_path / "src")
    with pytest.raises(BuildError, match=r"f.conf:4: CONFIG_VIRTIO_CONSLOE"):
        F.check_known([frag], symbols)


def test_dropped_settings_are_reported(tmp_path):
    p = tmp_path / "f.conf"
    p.write_text("CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_N=64\n")
    frag = F.parse_fragment(p, "f.conf")
    final = tmp_path / ".config"
    final.write_text("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_N=2\n")
    dropped = F.dropped_settings([frag], F.read_config(final))
    assert [(s.symbol, s.line, v) for s, v in dropped] == [("B", 2, "n"), ("C", 3, "y"), ("N", 4, "2")]


def test_source_pin_validation(tmp_path):
    src = load_source(REPO / "kernel-config/source.toml")
    assert src.kind == "debian-package" and len(src.sha256) == 64
    bad = tmp_path / "s.toml"
    bad.write_text('kind = "tarball"\nkernel_version = "6.1"\nsha256 = "abc"\nurl = "file:///x"\n')
    with pytest.raises(BuildError, match="64 hex digits"):
        load_source(bad)
    bad.write_text('kind = "git"\n')
    with pytest.raises(BuildError, match="kind must be one of"):
        load_source(bad)
    bad.write_text('kind = "debian-package"\nkernel_version = "6.1"\nsha256 = "' + "0" * 64 + '"\n')
    with pytest.raises(BuildError, match="'package' is required"):
        load_source(bad)


def test_tarball_source_verified_before_use(tmp_path):
    payload = tmp_path / "linux-9.9"
    payload.mkdir()
    (payload / "Makefile").write_text("all:\n")
    tarball = tmp_path / "linux-9.9.tar.xz"
    with tarfile.open(tarball, "w:xz") as tf:
        tf.add(payload, arcname="linux-9.9")
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    cache = StepCache(tmp_path / "cache")
    good = KernelSource(kind="tarball", kernel_version="9.9", sha256=digest, url=tarball.as_uri())
    assert fetch_source(good, cache).read_bytes() == tarball.read_bytes()
    wrong = KernelSource(kind="tarball", kernel_version="9.9", sha256="1" * 64, url=tarball.as_uri())
    with pytest.raises(BuildError, match=r"has sha256 .* pins 1111"):
        fetch_source(wrong, cache)
    leftovers = [p.name for p in (cache.root / "sources").iterdir()]
    assert leftovers == [digest], "a rejected download must leave nothing behind"
    missing = KernelSource(kind="debian-package", kernel_version="9.9", sha256="2" * 64, package="linux-source-9.9",
                           version="9.9-1", path=str(tmp_path / "nope.tar.xz"))  # fmt: skip
    with pytest.raises(BuildError, match=r"apt-get install linux-source-9.9=9.9-1"):
        fetch_source(missing, cache)

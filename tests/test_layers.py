"""Root filesystem layers: the declarative stack, the delta by content
(checked by mounting it as overlayfs on this host), the finished base, and
layers booted in a real VM, verified on the descriptor QEMU gets."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from terminai_release.errors import BuildError

REPO = Path(__file__).resolve().parents[1]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# -- the stack ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_stack_is_read_from_one_file_and_refuses_what_cannot_be_a_chain(tmp_path):
    from terminai_release.rootfs.stack import LAYERS_FILE, load_stack

    stack = load_stack(REPO)
    assert stack.profiles["minimal"] == () and stack.default_profile == "standard"
    assert stack.order(["node"]) == ("tools", "build", "node") == stack.profiles["full"]
    assert stack.below("build") == ("tools",)

    def loaded(text: str) -> None:
        (tmp_path / LAYERS_FILE).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / LAYERS_FILE).write_text(text)
        load_stack(tmp_path)

    good = 'default_profile = "m"\n[layers.a]\npackages = ["x"]\n[layers.b]\ndepends = ["a"]\npackages = ["y"]\n'
    loaded(good + '[profiles]\nm = []\nall = ["a", "b"]\n')
    for bad, said in [
        ('[layers.a]\ndepends = ["b"]\npackages = ["x"]\n[layers.b]\npackages = ["y"]\n', "not a layer above"),
        (good + '[layers.c]\ndepends = ["a", "b"]\npackages = ["z"]\n', "more than one layer"),
        (good + '[profiles]\nm = []\nhalf = ["b"]\n', "lacks ['a']"),
        (good.replace('"m"', '"nope"') + "[profiles]\nm = []\n", "not a profile"),
        ('default_profile = "m"\n[layers.a]\npackages = []\n[profiles]\nm = []\n', "installs no packages"),
    ]:
        with pytest.raises(BuildError, match=said.replace("[", r"\[").replace("]", r"\]")):
            loaded(bad)


@pytest.mark.unit
def test_the_manifest_resolves_profiles_and_refuses_layers_that_do_not_add_up():
    from terminai_shim.manifest import Manifest, ManifestError, RootfsLayers

    profiles = {"minimal": (), "standard": ("tools",), "full": ("tools", "build", "node")}
    layers = RootfsLayers({"tools": (), "build": ("tools",), "node": ("build",)}, profiles, "standard")
    assert layers.order(["node"]) == ("tools", "build", "node")
    assert layers.order(["build", "tools"]) == ("tools", "build")
    assert layers.profile(None) == ("tools",)
    with pytest.raises(ManifestError, match="no profile 'huge'"):
        layers.profile("huge")
    with pytest.raises(ManifestError, match="no root filesystem layer 'gpu'"):
        layers.order(["gpu"])

    def doc(rootfs: dict, artifacts: list[dict]) -> bytes:
        import json

        base = {"mediaType": "application/vnd.terminai.manifest.v1+json", "schemaVersion": 1, "release": "1.0.0",
                "channel": "dev", "serial": 1, "created": "2026-01-01T00:00:00Z", "expires": "2027-01-01T00:00:00Z",
                "gitCommit": "abcdef1", "compatibility": {"minShimVersion": "0.1.0", "agentProtocol": 1},
                "boot": {"kernelArgs": [], "memoryMib": 512, "cpus": 1}}  # fmt: skip
        return json.dumps({**base, "artifacts": artifacts, "rootfs": rootfs}).encode()

    def art(name: str, kind: str, variant: str | None) -> dict:
        digest = hashlib.sha256(name.encode()).hexdigest()
        out = {"name": name, "kind": kind, "platform": "linux/amd64", "size": 1, "sha256": digest,
               "mediaType": "x", "location": f"blobs/sha256/{digest}", "build": {}}  # fmt: skip
        return out | ({"variant": variant} if variant else {})

    rootfs = {"layers": [{"name": "tools", "depends": []}], "profiles": {"minimal": [], "standard": ["tools"]},
              "defaultProfile": "standard"}  # fmt: skip
    both = [art("t.squashfs", "rootfs-layer", "tools"), art("t.spdx.json", "layer-sbom", "tools")]
    m = Manifest.from_json(doc(rootfs, both))
    assert m.artifact("rootfs-layer@tools").name == "t.squashfs" and m.rootfs.profile(None) == ("tools",)
    assert Manifest.from_json(m.to_json()) == m
    with pytest.raises(ManifestError, match="0 artifacts of kind 'layer-sbom' of layer tools"):
        Manifest.from_json(doc(rootfs, both[:1]))
    with pytest.raises(ManifestError, match="name no listed layer"):
        Manifest.from_json(doc(rootfs, [*both, art("x.squashfs", "rootfs-layer", "gpu")]))
    backwards = {**rootfs, "profiles": {"minimal": [], "standard": ["tools"], "odd": ["build", "tools"]},
                 "layers": [{"name": "tools", "depends": []}, {"name": "build", "depends": ["tools"]}]}  # fmt: skip
    with pytest.raises(ManifestError, match="bottom first"):
        Manifest.from_json(doc(backwards, both))


# -- the delta, checked by overlayfs itself ------------------------------------------------------------


@pytest.mark.unit
def test_a_delta_over_its_lower_tree_mounts_as_exactly_the_upper_tree(tmp_path):
    """New, changed (bytes, mode, link target, type) and removed paths; hard
    links kept; and the kernel's overlayfs, given the delta over the lower
    tree, shows exactly the upper tree."""
    from terminai_release.rootfs.delta import write_delta

    if os.geteuid() != 0:
        pytest.skip("mounting overlayfs and making whiteouts needs root (CI runs as root)")
    lower, upper, delta, merged = (tmp_path / n for n in ("lower", "upper", "delta", "merged"))
    common = {"etc/keep": "same", "etc/change": "old", "usr/bin/tool": "#!/bin/sh\n", "gone/inside": "x",
              "var/file-then-dir": "f", "dir-then-file/x": "d", "etc/gone-file": "bye"}  # fmt: skip
    _write(lower, common)
    (lower / "link").symlink_to("etc/keep")
    _write(upper, {k: v for k, v in common.items() if not k.startswith(("gone/", "var/", "dir-then", "etc/gone"))})
    (upper / "etc/change").write_text("new")
    os.chmod(upper / "usr/bin/tool", 0o755)
    _write(upper, {"var/file-then-dir/now": "a dir", "new/deep/file": "fresh"})
    (upper / "dir-then-file").write_text("a file now")
    (upper / "link").symlink_to("etc/change")
    os.link(upper / "new/deep/file", upper / "new/hardlink")
    delta.mkdir()
    stats = write_delta(upper, lower, delta)
    assert sorted(stats.whiteouts) == ["/etc/gone-file", "/gone"]
    assert not (delta / "etc/keep").exists(), "an unchanged file is not shipped again"
    assert os.stat(delta / "new/deep/file").st_ino == os.stat(delta / "new/hardlink").st_ino
    assert stat.S_ISCHR(os.lstat(delta / "gone").st_mode) and os.lstat(delta / "gone").st_rdev == 0
    merged.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={delta}:{lower}", str(merged)], check=True)
    try:

        def listing(root: Path) -> dict[str, tuple]:
            out = {}
            for path in sorted(root.rglob("*")):
                st = os.lstat(path)
                body = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else None
                out[path.relative_to(root).as_posix()] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), body)
            return out

        assert listing(merged) == listing(upper)
    finally:
        subprocess.run(["umount", str(merged)], check=True)


# -- built artifacts ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tools_layer(ctx):
    from terminai_release.rootfs.layer import build_layer

    return build_layer(ctx, "tools")


@pytest.mark.build
def test_the_root_image_ships_no_half_packages_and_its_sbom_lists_what_is_there(rootfs, tmp_path):
    import json

    tree = tmp_path / "tree"
    subprocess.run(["unsquashfs", "-q", "-no-progress", "-d", str(tree), str(rootfs.image)], check=True,
                   capture_output=True)  # fmt: skip
    names = {p["name"] for p in json.loads(rootfs.sbom.read_text())["packages"]}
    assert {"python3", "libc6", "procps"} <= names
    assert not names & {"perl-base", "perl", "dpkg", "debconf", "usrmerge"}, "removed packages are not listed"
    assert not (tree / "usr/bin/perl").exists() and not (tree / "var/lib/dpkg").exists()
    orphans = []
    for path in tree.rglob("*"):
        if path.is_file() and not path.is_symlink() and os.access(path, os.X_OK):
            head = path.open("rb").read(128)
            if head.startswith(b"#!"):
                interp = head[2:].split(b"\n")[0].split()[0].decode()
                if interp.startswith("/usr/bin/perl"):
                    orphans.append(str(path.relative_to(tree)))
    assert not orphans, f"scripts without their interpreter: {orphans}"
    assert (tree / "usr/lib/python3.11/cgi.py").is_file(), "a script whose interpreter never was here stays"


@pytest.mark.build
def test_the_tools_layer_adds_only_its_own_and_lists_them(tools_layer, tmp_path):
    import json

    tree = tmp_path / "tree"
    subprocess.run(["unsquashfs", "-q", "-no-progress", "-d", str(tree), str(tools_layer.image)], check=True,
                   capture_output=True)  # fmt: skip
    for program in ("usr/bin/git", "usr/bin/jq", "usr/bin/curl", "usr/bin/perl", "usr/bin/make"):
        assert (tree / program).exists(), program
    assert not (tree / "usr/bin/python3.11").exists(), "the base's interpreter is not shipped again"
    assert not (tree / "usr/lib/terminai").exists() and not (tree / "var/lib/dpkg").exists()
    assert (tree / "usr/lib/python3.11/ensurepip").is_dir(), "restored from the base's removals"
    assert list((tree / "usr/lib/python3/dist-packages/pip").rglob("*.pyc")), "the layer's Python is compiled"
    names = {p["name"] for p in json.loads(tools_layer.sbom.read_text())["packages"]}
    assert {"git", "jq", "perl-base", "python3-pip"} <= names and "python3" not in names and "libc6" not in names


@pytest.mark.build
def test_changing_one_layer_keeps_the_keys_of_the_layers_below_it(ctx, tools_layer, tmp_path):
    """A package added to `node` in layers.toml, committed: the base's and
    tools' trees are the cached ones, node's key moves."""
    from terminai_release.context import BuildContext
    from terminai_release.progress import Reporter
    from terminai_release.rootfs.layer import build_full_tree, plan_full_tree
    from terminai_release.rootfs.stack import load_stack

    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    changed = BuildContext(repo=clone, reporter=Reporter("plain"), cache=ctx.cache)
    before = load_stack(REPO)
    tools = build_full_tree(ctx, ctx.cache, before, "tools")
    build = build_full_tree(ctx, ctx.cache, before, "build")
    layers = clone / "images/rootfs/layers.toml"
    layers.write_text(
        layers.read_text().replace('packages = ["nodejs", "npm"]', 'packages = ["nodejs", "npm", "yarnpkg"]')
    )
    subprocess.run(["git", "-C", str(clone), "commit", "-qam", "node: yarn too"], check=True)
    after = load_stack(clone)
    again = build_full_tree(changed, ctx.cache, after, "tools")
    assert again.cached and again.key == tools.key
    assert build_full_tree(changed, ctx.cache, after, "build").key == build.key
    assert plan_full_tree(changed, after, "node", build).key != plan_full_tree(ctx, before, "node", build).key


# -- booted ---------------------------------------------------------------------------------------------


def _layered(boot_config, layer, **changes):
    from terminai_shim.models import RootLayer

    digest = hashlib.sha256(Path(layer.image).read_bytes()).hexdigest()
    return dataclasses.replace(boot_config, layers=(RootLayer("tools", Path(layer.image), digest),), **changes)


@pytest.mark.vm
def test_a_vm_with_the_tools_layer_runs_its_programs_and_cannot_write_it(boot_config, tools_layer, tmp_path):
    from terminai_shim.session import Session

    before = hashlib.sha256(Path(tools_layer.image).read_bytes()).hexdigest()
    with Session.boot(_layered(boot_config, tools_layer, user="root", workspace=tmp_path)) as s:
        assert s.client.hello_info["layers"] == ["tools"] and s.describe()["rootfs"]["layers"] == ["tools"]
        status, out, err = s.client.run(["sh", "-c", "git --version && jq --version && perl -e 'print 6*7'"])
        assert status.exit_code == 0 and b"git version" in out and out.endswith(b"42"), err
        # ensurepip is back (the base removes it), so `python3 -m venv` can bring pip (inv accept runs that whole)
        status, out, err = s.client.run(["python3", "-c", "import ensurepip; print(ensurepip.version())"])
        assert status.exit_code == 0 and out.strip(), err
        status, out, _ = s.client.run(["sh", "-c", "grep ' / ' /proc/mounts"])
        assert b"lowerdir=/run/ovl/layers/0:/" in out
        # Even root in the guest cannot change the layer: the disk is read-only to QEMU itself.
        status, out, err = s.client.run(["sh", "-c", "dev=/dev/$(ls /sys/class/scsi_disk/*:0:0:0/device/block); "
                                         "[ -b $dev ] && ! head -c 4096 /dev/zero > $dev"])  # fmt: skip
        assert status.exit_code == 0, err
        status, _, _ = s.client.run(["sh", "-c", "echo planted > /usr/bin/git"])  # the overlay takes it
        assert status.exit_code == 0
    assert hashlib.sha256(Path(tools_layer.image).read_bytes()).hexdigest() == before, "the layer changed on the host"


@pytest.mark.vm
def test_a_layer_swapped_after_verification_never_boots(boot_config, tools_layer, tmp_path):
    """A local user who can write the release directory swaps a layer after
    the checks passed: the digest is checked again on the descriptor QEMU
    is handed."""
    from terminai_shim.errors import BootError
    from terminai_shim.session import Session

    layer = tmp_path / "layer.squashfs"
    shutil.copy(tools_layer.image, layer)
    config = _layered(boot_config, tools_layer, snapshots="off")
    config = dataclasses.replace(config, layers=(dataclasses.replace(config.layers[0], path=layer),))
    other = tmp_path / "other"
    other.write_bytes(layer.read_bytes()[:-4096] + os.urandom(4096))
    os.replace(other, layer)
    with pytest.raises(BootError, match="is not the file that was verified"):
        Session.boot(config)


@pytest.mark.vm
def test_a_layer_the_guest_cannot_mount_means_no_session(boot_config, tmp_path):
    """Not a squashfs: PID 1 reports no layers and refuses commands; the
    shim refuses the VM rather than run on another system than asked for."""
    from terminai_shim.errors import BootError
    from terminai_shim.models import RootLayer
    from terminai_shim.session import Session

    junk = tmp_path / "junk.squashfs"
    junk.write_bytes(os.urandom(1 << 20))
    config = dataclasses.replace(boot_config, layers=(RootLayer("tools", junk),), snapshots="off")
    with pytest.raises(BootError, match=r"mounted the root filesystem layers \[\], not \['tools'\]"):
        Session.boot(config)

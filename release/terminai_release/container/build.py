"""`inv container`: the root image the VM boots and its layers, as one OCI
image archive with an image per profile.

The sources are the finished root image and layer images themselves
(unpacked), not a second assembly of their parts, so the container tier
runs exactly the bytes the microVM runs, and a profile means the same
files in both tiers. Cached by those images' digests: changing nothing
rebuilds nothing; changing the agent rebuilds the root image and then this.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from terminai_protocol import bootcontract as boot
from terminai_shim.layout import container_archive

from ..cache import RECORD, StepCache, StepOutputs, write_atomic
from ..context import BuildContext
from ..digest import canonical_json, digest_inputs, sha256_file
from ..errors import BuildError
from ..proc import run_logged, tool_version
from ..rootfs.layer import build_layer
from ..rootfs.project import build_rootfs
from ..rootfs.stack import Stack, load_stack
from .oci import ARCHIVE_MEDIA, ImageSpec, write_archive

RECIPE = 3
BASE = "base"  # the root image's tree, under every profile
# The agent as PID 1, serving on a Unix socket in a directory the shim
# bind-mounts (the boot contract names it; terminai_agent.main reads TERMINAI_*).
ENTRYPOINT = (boot.INIT,)
ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *boot.container_environment())


@dataclass(frozen=True)
class ContainerArtifacts(StepOutputs):
    @property
    def archive(self) -> Path:
        return self.output("archive")

    @property
    def images(self) -> dict[str, str]:
        """Profile -> image id."""
        return dict(self.record["outputs"]["archive"]["images"])

    @property
    def image_id(self) -> str:
        """The default profile's image (the archive's first)."""
        return self.images[self.record["outputs"]["archive"]["defaultProfile"]]


def image_profiles(stack: Stack) -> dict[str, tuple[str, ...]]:
    """Each image's trees, bottom first; the default profile first: its image
    is the archive's first, what a caller naming none gets."""
    ordered = {stack.default_profile: stack.profiles[stack.default_profile], **stack.profiles}
    return {profile: (BASE, *members) for profile, members in ordered.items()}


def build_container(ctx: BuildContext, *, cache: StepCache | None = None) -> ContainerArtifacts:
    """``cache``: where this step's entry goes (``inv repro`` rebuilds it in a
    clean one); the root image always comes from the context's cache, whose
    own reproducibility ``inv repro rootfs`` proves."""
    root = build_rootfs(ctx)
    stack = load_stack(ctx.repo)
    layers = {name: build_layer(ctx, name) for name in stack.layers}
    image = root.record["outputs"]["image"]
    version = str(root.record["inputs"]["version"])
    sde = int(root.record["inputs"]["source_date_epoch"])
    unpack = ["unsquashfs", "-version"] if image["format"] == "squashfs" else ["fsck.erofs", "--version"]
    profiles = image_profiles(stack)
    inputs = {
        "recipe": RECIPE,
        "rootfs": image["sha256"],
        "layers": {name: art.record["outputs"]["image"]["sha256"] for name, art in layers.items()},
        "profiles": {name: list(members[1:]) for name, members in profiles.items()},
        "version": version,
        "source_date_epoch": sde,
        "entrypoint": list(ENTRYPOINT),
        "env": list(ENV),
        "tool": tool_version(unpack),
        "oci": sha256_file(Path(__file__).with_name("oci.py")),
    }
    key = digest_inputs(inputs)
    cache = cache or ctx.cache

    def build(staging: Path) -> None:
        work = cache.work_dir("container", key)
        log = work / "build.log"
        trees = {BASE: work / "tree-base"}
        ctx.reporter.info("container", f"unpacking {root.image.name} and {len(layers)} layers")
        if image["format"] == "squashfs":
            argv = ["unsquashfs", "-no-progress", "-d", str(trees[BASE]), str(root.image)]
        else:
            argv = ["fsck.erofs", f"--extract={trees[BASE]}", str(root.image)]
        run_logged(argv, log=log, reporter=ctx.reporter, step="container")
        if not (trees[BASE] / boot.INIT.lstrip("/")).is_file():
            raise BuildError(f"the root image has no {boot.INIT}", log=str(log))
        for name, art in layers.items():
            trees[name] = work / f"tree-{name}"
            run_logged(["unsquashfs", "-no-progress", "-d", str(trees[name]), str(art.image)], log=log,
                       reporter=ctx.reporter, step="container")  # fmt: skip
        spec = ImageSpec(ENTRYPOINT, ENV, {"org.opencontainers.image.version": version,
                                           "org.terminai.rootfs.sha256": image["sha256"]},
                         f"terminai/runtime:{version}")  # fmt: skip
        ctx.reporter.info("container", "writing the OCI archive (sorted, clamped, uncompressed layers)")
        out = write_archive(trees, profiles, spec, staging / container_archive(version), work, sde)
        record = {
            "artifact": "container",
            "key": key,
            "inputs": inputs,
            "outputs": {"archive": {"file": out.archive.name, "sha256": sha256_file(out.archive),
                                    "size": out.archive.stat().st_size, "images": out.images,
                                    "defaultProfile": stack.default_profile,
                                    "layers": out.layers, "mediaType": ARCHIVE_MEDIA}},
        }  # fmt: skip
        write_atomic(staging / RECORD, canonical_json(record))
        shutil.rmtree(work, ignore_errors=True)

    entry, cached = cache.obtain("container", key, build)
    art = ContainerArtifacts(entry, cache.record("container", key))
    if cached:
        ctx.reporter.done("container", f"OCI image from cache ({key[:12]})")
        return art
    size = art.archive.stat().st_size
    ctx.reporter.done("container", f"built {art.archive.name}: {size} bytes, images {art.images}")
    return art


def load_into_engine(art: ContainerArtifacts) -> str:
    """Load the archive with the docker SDK; the engine must report the id computed here."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        raise BuildError("the docker SDK is not installed", hint="pip install docker") from None
    try:
        client = docker.from_env()
        with art.archive.open("rb") as f:
            images = client.images.load(f)
    except DockerException as exc:
        raise BuildError(f"cannot load the image into the engine: {exc}",
                         hint="start dockerd (the tests' `inv test` starts one)") from None  # fmt: skip
    ids = sorted({image.id for image in images})
    if ids != sorted(set(art.images.values())):
        raise BuildError(f"the engine loaded {ids}, not {sorted(art.images.values())}",
                         hint="the archive is not what was built")  # fmt: skip
    return art.image_id

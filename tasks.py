"""Invoke tasks: the release engineer's entry points.

Thin by design: each task parses its options and calls into the pipeline
package (release/terminai_release), where the work and its tests live.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from invoke import Context, task
from terminai_release.context import BuildContext
from terminai_release.errors import BuildError
from terminai_release.progress import Reporter
from terminai_shim.layout import CONTAINER_OUTPUT, KERNEL_OUTPUT, ROOTFS_OUTPUT, layer_output


def _ctx(json_events: bool) -> BuildContext:
    return BuildContext(reporter=Reporter.auto(json_events))


def _fail(exc: BuildError) -> None:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)


@task(help={"json": "emit progress as JSON events on stderr", "arch": "target architecture"})
def kernel(c: Context, json: bool = False, arch: str = "x86_64") -> None:
    """Build the guest kernel (cached by the digest of its inputs)."""
    from terminai_release.kernel import build_kernel

    ctx = _ctx(json)
    try:
        art = build_kernel(ctx, arch)
    except BuildError as exc:
        _fail(exc)
        return
    link = ctx.publish_link(KERNEL_OUTPUT, art.directory)
    print(f"kernel: {link} -> {art.directory}")


@task(name="kernel-config-bump")
def kernel_config_bump(c: Context) -> None:
    """Record a new kernel config version after a fragment changed."""
    from terminai_release.kernel.versions import bump_version

    ctx = BuildContext()
    version = bump_version(ctx.repo / "kernel-config")
    print(f"kernel config version is now {version}")


@task(help={"json": "emit progress as JSON events on stderr"})
def base(c: Context, json: bool = False) -> None:
    """Build the Debian base layer of the root filesystem (cached)."""
    from terminai_release.rootfs.base import build_base

    ctx = _ctx(json)
    try:
        layer = build_base(ctx)
    except BuildError as exc:
        _fail(exc)
        return
    print(f"rootfs-base: {layer.directory}")


@task(
    help={
        "json": "emit progress as JSON events on stderr",
        "format": "root image format: squashfs (default) or erofs",
        "kit": "use this terminai_apts wheel or source tree instead of images/survival-kit",
        "kit_sha256": "the sha256 pinning --kit (file digest, or tree digest for a directory)",
    }
)
def rootfs(c: Context, json: bool = False, format: str = "squashfs", kit: str = "", kit_sha256: str = "") -> None:
    """Build the guest root image: Debian base + agent + survival kit (cached per layer)."""

    from terminai_release.rootfs.kit import KitOverride
    from terminai_release.rootfs.project import build_rootfs

    ctx = _ctx(json)
    if bool(kit) != bool(kit_sha256):
        _fail(BuildError("--kit and --kit-sha256 go together", hint="pin the kit you pass by its sha256"))
    override = KitOverride(Path(kit).resolve(), kit_sha256) if kit else None
    try:
        art = build_rootfs(ctx, fmt=format, kit=override)
    except BuildError as exc:
        _fail(exc)
        return
    link = ctx.publish_link(ROOTFS_OUTPUT, art.directory)
    print(f"rootfs: {link} -> {art.directory}")


@task(
    help={
        "json": "emit progress as JSON events on stderr",
        "name": "one layer (default: every layer in images/rootfs/layers.toml)",
    }
)
def layers(c: Context, json: bool = False, name: str = "") -> None:
    """Build the optional root filesystem layers (cached per layer and per full tree)."""
    from terminai_release.rootfs.layer import build_layer
    from terminai_release.rootfs.stack import load_stack

    ctx = _ctx(json)
    try:
        names = [name] if name else list(load_stack(ctx.repo).layers)
        built = [build_layer(ctx, n) for n in names]
    except BuildError as exc:
        _fail(exc)
        return
    for art in built:
        link = ctx.publish_link(layer_output(art.name), art.directory)
        print(f"layer {art.name}: {link} -> {art.directory} ({art.record['outputs']['image']['size']} bytes)")


@task(help={"json": "emit progress as JSON events on stderr", "load": "load into the local engine and check its id"})
def container(c: Context, json: bool = False, load: bool = True) -> None:
    """The root image as a deterministic OCI archive for the container tier (cached)."""
    from terminai_release.container import build_container
    from terminai_release.container.build import load_into_engine

    ctx = _ctx(json)
    try:
        art = build_container(ctx)
        link = ctx.publish_link(CONTAINER_OUTPUT, art.directory)
        print(f"container: {link} -> {art.archive.name} (images {art.images})")
        if load:
            from terminai_shim.probes import engine_answers

            answers, why = engine_answers()
            if answers:
                print(f"loaded: the engine reports {load_into_engine(art)}")
            else:
                print(f"not loaded: {why}")
    except BuildError as exc:
        _fail(exc)


def _pinned(path: str, sha256: str, what: str) -> Any:
    from terminai_release.brain import PinnedInput

    if bool(path) != bool(sha256):
        _fail(BuildError(f"{what} and its sha256 go together", hint="pin every input you pass by its sha256"))
    return PinnedInput(Path(path).resolve(), sha256) if path else None


@task(
    help={
        "module": "the CLI's bundled brain module (a .js file or a directory with index.js)",
        "module_sha256": "its sha256 (file digest, or tree digest for a directory)",
        "native_x64": "terminai_native.node for win32-x64", "native_x64_sha256": "its sha256",
        "native_arm64": "terminai_native.node for win32-arm64", "native_arm64_sha256": "its sha256",
        "node_exe": "a portable node.exe", "node_exe_sha256": "its sha256",
        "sign_cert": "PEM code-signing certificate: Authenticode-sign the PE files first",
        "sign_key": "its PEM private key",
        "keyless": "sign the zip keylessly with CI's ambient OIDC identity",
        "trust_config": "sigstore ClientTrustConfig JSON for --keyless",
        "json": "emit progress as JSON events on stderr",
    }
)  # fmt: skip
def brain(
    c: Context,
    module: str = "", module_sha256: str = "",
    native_x64: str = "", native_x64_sha256: str = "",
    native_arm64: str = "", native_arm64_sha256: str = "",
    node_exe: str = "", node_exe_sha256: str = "",
    sign_cert: str = "", sign_key: str = "",
    keyless: bool = False, trust_config: str = "", json: bool = False,
) -> None:  # fmt: skip
    """The Windows brain bundle (deterministic zip + bundle.json), sigstore-signed."""
    from terminai_release.brain import BrainInputs, build_brain
    from terminai_release.cache import write_atomic
    from terminai_release.release import keep_dev_trust_root
    from terminai_release.signing.session import signer
    from terminai_shim.layout import BUNDLE_SUFFIX

    pins = {"win32-x64": _pinned(native_x64, native_x64_sha256, "--native-x64"),
            "win32-arm64": _pinned(native_arm64, native_arm64_sha256, "--native-arm64")}  # fmt: skip
    native = {k: v for k, v in pins.items() if v is not None}
    inputs = BrainInputs(
        module=_pinned(module, module_sha256, "--module"), native=native,
        node_exe=_pinned(node_exe, node_exe_sha256, "--node-exe"),
        sign_cert=Path(sign_cert).resolve() if sign_cert else None,
        sign_key=Path(sign_key).resolve() if sign_key else None,
    )  # fmt: skip
    ctx = _ctx(json)
    try:
        art = build_brain(ctx, inputs)
        ctx.publish_link("brain", art.directory)
        # A self-contained, verifiable directory: the zip, its signature, and
        # (locally) the development trust root it verifies against.
        out_dir = ctx.out / "brain-bundle"
        out_dir.mkdir(parents=True, exist_ok=True)
        data = art.zip.read_bytes()
        write_atomic(out_dir / art.zip.name, data)
        with signer(ctx, keyless=keyless, trust_config=Path(trust_config) if trust_config else None) as s:
            signature = s.sign(data)
        write_atomic(out_dir / f"{art.zip.name}{BUNDLE_SUFFIX}", signature.encode())
        if s.dev_trusted_root is not None:
            keep_dev_trust_root(s.dev_trusted_root, out_dir)
    except BuildError as exc:
        _fail(exc)
        return
    print(f"brain: {out_dir / art.zip.name}\nsignature: {out_dir / art.zip.name}{BUNDLE_SUFFIX} ({s.kind})")


@task(
    help={
        "command": "the command to run in the VM (default: a survival-kit check)",
        "json": "emit progress as JSON events on stderr",
    }
)
def demo(c: Context, command: str = "", json: bool = False) -> None:
    """The main job: build the kernel and root image, sign a release, verify it, boot it, run a command."""
    import shlex

    from terminai_release.kernel import build_kernel
    from terminai_release.release import build_release, sign_release
    from terminai_release.rootfs.project import build_rootfs

    ctx = _ctx(json)
    try:
        kern = build_kernel(ctx)
        root = build_rootfs(ctx)
        rel = build_release(ctx)
        sign_release(ctx, rel)
    except BuildError as exc:
        _fail(exc)
        return
    _development_default(rel.directory)
    ctx.publish_link(KERNEL_OUTPUT, kern.directory)
    ctx.publish_link(ROOTFS_OUTPUT, root.directory)
    argv = shlex.split(command) if command else [
        "python3", "-c",
        "import platform, terminai_apts; "
        "print('Hello from MicroVM:', platform.release(), 'terminai_apts', terminai_apts.__version__, "
        "terminai_apts.model.ObjectTableLabels.TRANSIT)",
    ]  # fmt: skip
    # The shim verifies the signed release (signature, signer, expiry, serial,
    # digests) before it boots anything; --dev accepts the local identity.
    shim = [sys.executable, "-m", "terminai_shim.cli", "run", "-v", "--backend", "qemu", "--manifest",
            str(rel.directory), "--dev", "--", *argv]  # fmt: skip
    c.run(shlex.join(shim), pty=False)


@task(help={"upgrade": "let every package move to the newest version pyproject.toml allows"})
def lock(c: Context, upgrade: bool = False) -> None:
    """Write requirements.lock (pinned and hashed) from pyproject.toml; bootstrap.sh installs from it."""
    from terminai_release.context import repo_root
    from terminai_release.lock import write_lock

    try:
        for written in write_lock(repo_root(), upgrade):
            print(f"written: {written}")
    except BuildError as exc:
        _fail(exc)


@task(help={"json": "emit progress as JSON events on stderr"})
def client(c: Context, json: bool = False) -> None:
    """The CLI's TypeScript package (clients/node): pinned dev dependencies, tsc, a consumer type-checked (cached)."""
    from terminai_release.client import build_client

    try:
        print(f"client: {build_client(_ctx(json)).dist}")
    except BuildError as exc:
        _fail(exc)


@task(name="shim-dist", help={"json": "emit progress as JSON events on stderr"})
def shim_dist(c: Context, json: bool = False) -> None:
    """The shim as a standalone executable for this machine (no Python needed), its archive and npm package (cached)."""
    from terminai_release.standalone import build_standalone

    ctx = _ctx(json)
    try:
        shim = build_standalone(ctx)
    except BuildError as exc:
        _fail(exc)
        return
    link = ctx.publish_link("shim-dist", shim.directory)
    print(f"shim-dist: {link / shim.executable.relative_to(shim.directory)}")
    print(f"  archive: {link / shim.archive.name}\n  npm package: {link / shim.npm_package.name}")


# The tests that drive `terminai-shim` as a process: run a second time by `inv test`
# against the standalone build (`pytest --standalone-shim`).
STANDALONE_SUITE = (
    "tests/test_shim_cli.py",
    "tests/test_shim_serve.py",
    "tests/test_verify.py",
    "tests/test_network.py",
    "tests/test_node_client.py",
    "tests/test_container.py",
    "tests/test_pty.py",
    "tests/test_attacks.py",
    "tests/test_brain.py",
    "tests/test_broker_policy.py",
)


@task(help={"markers": "pytest -m expression (default: everything)", "args": "extra pytest arguments"})
def test(c: Context, markers: str = "", args: str = "") -> None:
    """Run the test suite (unit, build, vm and repro tests), with a Docker engine running."""
    from terminai_release.context import repo_root
    from terminai_release.engine import ensure_engine

    m = f"-m {markers!r}" if markers else ""
    # The container tier's tests use a real engine: started here when none answers, stopped after.
    try:
        engine = ensure_engine(repo_root() / "build" / "dockerd.log")
    except BuildError as exc:
        _fail(exc)
        return
    try:
        c.run(f"{sys.executable} -m pytest --durations=25 {m} {args}", pty=False)
        # The shim's own suites again, against the standalone build a CLI user installs.
        c.run(f"{sys.executable} -m pytest --standalone-shim {m} {args} {' '.join(STANDALONE_SUITE)}", pty=False)
    finally:
        engine.stop()


@task
def lint(c: Context) -> None:
    """ruff on everything; mypy --strict on the shim."""
    c.run(f"{sys.executable} -m ruff check .", pty=False)
    c.run(f"{sys.executable} -m mypy", pty=False)


@task
def docs(c: Context) -> None:
    """Write the tables the docs derive from the code (the launch options of docs/shim-protocol.md)."""
    from terminai_shim.options import markdown_table

    path = Path(__file__).parent / "docs" / "shim-protocol.md"
    begin, end = "<!-- options: begin (inv docs) -->\n", "<!-- options: end -->"
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: its markers {begin.strip()} and {end} are gone; put them back where the table goes")
    new = text[: text.index(begin) + len(begin)] + markdown_table() + text[text.index(end) :]
    if new != text:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(new)
        tmp.replace(path)
        print(f"wrote the launch options into {path}")


@task(help={"artifact": "kernel, rootfs, layer-<name>, container, shim-dist or all (default)"})
def repro(c: Context, artifact: str = "all") -> None:
    """Prove reproducibility: a second clean build must give identical bytes."""
    from terminai_release.repro import check
    from terminai_release.rootfs.stack import load_stack

    ctx = _ctx(False)
    layers = [f"layer-{name}" for name in load_stack(ctx.repo).layers]
    names = ["kernel", "rootfs", *layers, "container", "shim-dist"] if artifact == "all" else [artifact]
    failed = False
    for name in names:
        try:
            result = check(ctx, name)
        except BuildError as exc:
            _fail(exc)
            return
        print(result.describe())
        failed |= not result.identical
    if failed:
        sys.exit(1)


@task(
    help={
        "tier": "comma-separated: host,microvm,container (default: all)",
        "profile": "comma-separated: minimal,standard,full (default: all)",
        "tasks": "comma-separated task ids (default: the whole corpus)",
    }
)
def accept(c: Context, tier: str = "", profile: str = "", tasks: str = "") -> None:
    """Run the capability corpus per tier and profile; write build/accept/results.{json,png} and apply the gate."""
    from terminai_release.accept import PROFILES, TIERS, Plan, gate, load_corpus, plot, run_accept, write_results

    def split(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
        chosen = tuple(x.strip() for x in text.split(",") if x.strip()) or known
        unknown = [x for x in chosen if x not in known]
        if unknown:
            _fail(BuildError(f"unknown {what} {unknown}", hint=f"choose from {', '.join(known)}"))
        return chosen

    ctx = _ctx(False)
    plan = Plan(split(tier, TIERS, "tier"), split(profile, PROFILES, "profile"),
                tuple(t.strip() for t in tasks.split(",") if t.strip()))  # fmt: skip

    def show(o: Any) -> None:
        print(f"{o.tier:9} {o.profile:8} {o.status:4} {o.task:28} {o.seconds:6.1f}s {o.reason}", flush=True)

    engine = None
    try:
        if "container" in plan.tiers:  # a real engine, started here when none answers (as for `inv test`)
            from terminai_release.engine import ensure_engine

            engine = ensure_engine(ctx.repo / "build" / "dockerd.log")
        outcomes = run_accept(ctx, plan, show)
        corpus = load_corpus(ctx.repo)
    except BuildError as exc:
        _fail(exc)
        return
    finally:
        if engine is not None:
            engine.stop()
    ran_tiers = tuple(t for t in ("microvm", "container") if t in plan.tiers)
    violations = gate(corpus, outcomes, ran_tiers) if "host" in plan.tiers else []
    out = ctx.repo / "build" / "accept"
    doc = write_results(out / "results.json", corpus, outcomes, violations)
    plot(doc, out / "results.png")
    for v in violations:
        print(f"gate: {v}")
    print(f"accept: {sum(o.status == 'pass' for o in outcomes)}/{len(outcomes)} passed; results in {out}")
    if violations:
        sys.exit(1)


@task(
    help={
        "parts": "comma-separated: kernel,guest,snapshot,shim,fetch,container,network,standalone,layers,latency,"
        "workspace,release (default: all)",
        "runs": "repetitions per boot measurement (median reported)",
        "clean": "also time a clean kernel build (about 10 minutes)",
    }
)
def bench(
    c: Context,
    parts: str = "kernel,guest,snapshot,shim,fetch,container,network,standalone,layers,latency,workspace,release",
    runs: int = 5,
    clean: bool = False,
) -> None:
    """Benchmarks against same-run baselines; writes build/bench/results.json and .png."""
    import json

    from terminai_release.bench.run import run

    ctx = _ctx(False)
    results = run(ctx, [p.strip() for p in parts.split(",") if p.strip()], runs, clean)
    print(json.dumps(results, indent=2))
    if "latency" in results:
        from terminai_release.bench.latency import latency_table

        print(latency_table(results["latency"]))  # the README's table
    print(f"written: {ctx.out / 'bench' / 'results.json'} and results.png")


@task(
    help={
        "channel": "release channel (dev, beta, stable)",
        "serial": "manifest serial (default: the commit's source date, monotonic)",
        "valid_days": "days until the manifest expires",
        "keyless": "sign keylessly with CI's ambient OIDC identity (default: the local development stack)",
        "trust_config": "sigstore ClientTrustConfig JSON for --keyless (default: Sigstore's public-good instance)",
        "shim_dists": "a folder of other platforms' `inv shim-dist` outputs (one folder each) to sign in too",
    }
)
def release(
    c: Context,
    channel: str = "dev",
    serial: int = -1,
    valid_days: int = 90,
    keyless: bool = False,
    trust_config: str = "",
    shim_dists: str = "",
) -> None:
    """Build every artifact, write dist/<version>/ (blobs, manifest, notes) and sign the manifest."""

    from terminai_release.release import build_release, sign_release

    ctx = _ctx(False)
    dists = tuple(sorted(p for p in Path(shim_dists).iterdir() if p.is_dir())) if shim_dists else ()
    try:
        rel = build_release(ctx, channel=channel, serial=None if serial < 0 else serial, valid_days=valid_days,
                            shim_dists=dists)  # fmt: skip
        bundle = sign_release(ctx, rel, keyless=keyless, trust_config=Path(trust_config) if trust_config else None)
    except BuildError as exc:
        _fail(exc)
        return
    print(f"release: {rel.manifest_path}\nbundle:  {bundle}")
    if not keyless:
        _development_default(rel.directory)


def _development_default(directory: Path) -> None:
    """A release signed by the local development identity becomes what a
    launch naming no release boots (the CLI's zero-argument context), unless
    the user configured a default of their own."""
    from terminai_shim.defaults import config_path, development_default

    written = development_default(directory)
    if written is not None:
        print(f"default release: {directory} (in {written}; a launch that names no release boots it)")
    else:
        print(f"default release: left as configured in {config_path()}")


def _release_dir(given: str) -> Path:
    from terminai_release.context import repo_root
    from terminai_release.version import release_version

    return Path(given).resolve() if given else repo_root() / "dist" / release_version(repo_root())


# What publish and promote share: both end in a newly signed channel pointer.
_POINTER_HELP = {
    "store": "s3://BUCKET/PREFIX (boto3: standard AWS configuration) or file://DIR",
    "keyless": "sign the channel pointer keylessly with CI's ambient OIDC identity",
    "trust_config": "sigstore ClientTrustConfig JSON for --keyless (default: public-good)",
    "valid_days": "days until the channel pointer expires",
    "json": "emit progress as JSON events on stderr",
}


def _sign_pointer(step: Callable[..., Any], json: bool, keyless: bool, trust_config: str, valid_days: int) -> None:
    """Run ``step`` (publish or promote, its own arguments bound) with the
    pointer's signing options, and print what it did."""
    try:
        result = step(_ctx(json), keyless=keyless, trust_config=Path(trust_config) if trust_config else None,
                      valid_days=valid_days)  # fmt: skip
    except BuildError as exc:
        _fail(exc)
        return
    print(result.describe())


@task(
    help={
        **_POINTER_HELP,
        "channel": "channel to point at the release (default: the channel the release was built for)",
        "release_dir": "the signed release directory (default: dist/<version>)",
    }
)
def publish(
    c: Context,
    store: str,
    channel: str = "",
    release_dir: str = "",
    keyless: bool = False,
    trust_config: str = "",
    valid_days: int = 90,
    json: bool = False,
) -> None:
    """Publish a signed release: blobs, then the release folder, then the channel pointer."""
    from terminai_release.publish import publish as run_publish

    def step(ctx: BuildContext, **signing: Any) -> Any:
        return run_publish(ctx, _release_dir(release_dir), store, channel=channel or None, **signing)

    _sign_pointer(step, json, keyless, trust_config, valid_days)


@task(
    help={
        **_POINTER_HELP,
        "version": "the release to promote: the one --from points at now",
        "from": "the channel whose release is promoted (e.g. beta)",
        "to": "the channel to point at it (e.g. stable)",
    }
)
def promote(
    c: Context,
    store: str,
    version: str,
    from_: str = "beta",
    to: str = "stable",
    keyless: bool = False,
    trust_config: str = "",
    valid_days: int = 90,
    json: bool = False,
) -> None:
    """Point one channel at the release another serves: re-signs a pointer, uploads nothing else."""
    from terminai_release.publish import promote as run_promote

    def step(ctx: BuildContext, **signing: Any) -> Any:
        return run_promote(ctx, store, version, source=from_, target=to, **signing)

    _sign_pointer(step, json, keyless, trust_config, valid_days)


@task(name="set-version", help={"version": "X.Y.Z, X.Y.Z-rc.N or X.Y.Z.devN"})
def set_version(c: Context, version: str) -> None:
    """Set the one release version (project, shim, agent, survival kit)."""
    from terminai_release.ci import set_version as run_set_version
    from terminai_release.context import repo_root

    try:
        changed = run_set_version(repo_root(), version)
    except BuildError as exc:
        _fail(exc)
        return
    print(f"version {version}: {', '.join(str(p) for p in changed) or 'unchanged'}")

"""``terminai-shim``: the command the TerminAI CLI and people run.

Imports stay inside the subcommands so ``terminai-shim --version`` (run
often by the CLI to probe for the shim) starts in milliseconds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from . import __version__

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .launch import LaunchRequest, ReleaseSource, Trust
    from .models import RootLayer


def _boot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", type=Path, help="guest kernel (vmlinux)")
    p.add_argument("--rootfs", type=Path, help="guest root image (.squashfs or .erofs)")
    p.add_argument("--workspace", type=Path,
                   help="host directory shared with the guest at its own path (and at /workspace)")  # fmt: skip
    p.add_argument("--workspace-mount", help="where the guest sees the workspace instead of its host path")
    p.add_argument("--manifest", help="a release directory: verify it, then boot its kernel and root image")
    _store_args(p)
    p.add_argument("--memory", type=int, help="guest memory in MiB (default 512, or the manifest's)")
    p.add_argument("--cpus", type=int, help="guest vCPUs (default 1, or the manifest's)")
    _trust_args(p)
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto", help="accelerator (default auto)")
    p.add_argument("--backend", choices=("auto", "qemu", "firecracker", "container"), default="auto",
                   help="isolation: auto (microVM with KVM, else a container if an engine answers, else a "
                   "microVM under TCG; TERMINAI_BACKEND_ORDER reorders), qemu, firecracker or container")  # fmt: skip
    p.add_argument("--image", type=Path, help="container image archive (.oci.tar) for --backend container")
    p.add_argument("--profile", help="the release's root filesystem profile: minimal, standard (its default, "
                   "usually), full, or another it lists")  # fmt: skip
    p.add_argument("--layers", help="the release's root filesystem layers by name, comma-separated, instead of a "
                   "profile (each brings what it stands on)")  # fmt: skip
    p.add_argument("--layer", action="append", default=[], metavar="NAME=FILE",
                   help="a root filesystem layer of your own build (inv layers) over --rootfs, bottom first "
                   "(repeatable)")  # fmt: skip
    p.add_argument("--network", choices=("none", "allowlist", "open"), default="none",
                   help="none (no network device: the default), allowlist (only --allow targets, through a "
                   "host-side proxy), open (everything the host reaches; logged)")  # fmt: skip
    p.add_argument("--allow", action="append", default=[], metavar="ENTRY",
                   help="allowlist entry: HOST[:PORT], *.DOMAIN[:PORT], an IP, or a CIDR range that permits "
                   "non-public addresses (repeatable)")  # fmt: skip
    p.add_argument("--cold", action="store_true", help="boot cold: neither restore nor save a snapshot")
    # models.GUEST_USERS, spelled out: importing models here would slow `--version`, which builds this parser
    p.add_argument("--user", choices=("user", "root"), default="user",
                   help="who commands run as in the guest: user (uid 0 without capabilities: the default) or root "
                   "(every capability)")  # fmt: skip
    p.add_argument("--writable-git", action="store_true",
                   help="let the guest write the workspace's .git (read-only by default: hooks and config there "
                   "run on the host's next git command)")  # fmt: skip
    p.add_argument(
        "--require-microvm",
        action="store_true",
        help="refuse any tier weaker than a microVM (auto never falls back to a container)",
    )


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="a published store (https://, s3://, file://, a directory): its channel's release")
    p.add_argument("--channel", help="the channel the release must be signed for, and the store's channel to follow "
                   "(default stable; dev with --dev)")  # fmt: skip
    p.add_argument("--release", help="a version in the store instead of the channel's current one")


def _trust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trusted-root", type=Path, help="sigstore trusted root JSON to verify against")
    p.add_argument("--identity", help="the signer identity the certificate must carry (exact)")
    p.add_argument("--issuer", help="the OIDC issuer that must have vouched for the signer")
    p.add_argument("--allow-http", action="store_true", help="allow plain http (loopback addresses only)")
    p.add_argument(
        "--dev",
        action="store_true",
        help="accept the local development signing identity, against your own development trust root (written by "
        "`inv release`; never one found beside a release); the channel defaults to dev",
    )


def _trust(args: argparse.Namespace) -> Trust:
    from .launch import Trust

    return Trust(args.trusted_root, args.identity, args.issuer, dev=args.dev)


def _source(args: argparse.Namespace) -> ReleaseSource | None:
    from .launch import ReleaseSource

    if not (getattr(args, "manifest", None) or getattr(args, "store", None)):
        return None
    return ReleaseSource(manifest=args.manifest, store=args.store, channel=args.channel, release=args.release,
                         allow_http=args.allow_http)  # fmt: skip


def _progress() -> Callable[[str, int, int], None] | None:
    return _progress_printer() if sys.stderr.isatty() else None


def _progress_printer() -> Callable[[str, int, int], None]:
    last = [0.0]

    def show(name: str, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        if now - last[0] > 0.1 or done == total:
            last[0] = now
            sys.stderr.write(f"\r\x1b[Kfetching {name[-24:]}: {done * 100 // max(total, 1)}% of {total} bytes")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return show


def cmd_verify(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .launch import channel_of, verify

    source = _source(args)
    if source is None:
        raise ConfigError("name a release: a directory or URL, or --store with --channel")
    release = verify(source, _trust(args), _progress())
    m = release.manifest
    print(f"verified: release {m.release} (channel {channel_of(source, _trust(args))}, serial {m.serial}), signed by "
          f"the expected identity; {', '.join(release.kinds)} match the manifest")  # fmt: skip
    return 0


def _request(args: argparse.Namespace) -> LaunchRequest:
    """The command line as a launch request; ``launch`` checks and resolves it."""
    import dataclasses

    from .launch import LaunchRequest, LocalArtifacts, local_artifacts
    from .models import NetworkPolicy

    source = _source(args)
    layers = _own_layers(args.layer)
    if source is None:
        local: LocalArtifacts | None = dataclasses.replace(local_artifacts(args.kernel, args.rootfs, args.image),
                                                           layers=layers)  # fmt: skip
    elif args.kernel or args.rootfs or args.image or layers:  # both: refused by launch, never one silently ignored
        local = LocalArtifacts(args.kernel, args.rootfs, image=args.image, layers=layers)
    else:
        local = None
    return LaunchRequest(
        source=source,
        trust=_trust(args),
        local=local,
        backend=args.backend,
        accel=args.accel,
        require_microvm=args.require_microvm,
        memory_mib=args.memory,
        cpus=args.cpus,
        network=NetworkPolicy(args.network, tuple(args.allow)),
        workspace=args.workspace,
        workspace_mount=args.workspace_mount,
        snapshots="off" if getattr(args, "cold", False) else "auto",
        user=args.user,
        writable_git=args.writable_git,
        profile=args.profile,
        layers=tuple(n.strip() for n in args.layers.split(",") if n.strip()) if args.layers is not None else None,
    )


def _own_layers(given: list[str]) -> tuple[RootLayer, ...]:
    from .errors import ConfigError
    from .models import RootLayer

    layers = []
    for entry in given:
        name, sep, file = entry.partition("=")
        if not sep or not name or not file:
            raise ConfigError(f"--layer {entry!r} is not NAME=FILE", hint="for example --layer tools=build/layer-tools/"
                              "layer-tools-0.1.0.squashfs")  # fmt: skip
        layers.append(RootLayer(name, Path(file).resolve()))
    return tuple(layers)


def cmd_run(args: argparse.Namespace) -> int:
    from .run import run_command

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("terminai-shim run: give a command after --", file=sys.stderr)
        return 2
    return run_command(_request(args), command, shell=args.shell, timeout=args.timeout, verbose=args.verbose,
                       progress=_progress(), interactive=args.interactive, tty=args.tty)  # fmt: skip


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor

    return doctor(json_output=args.json)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    return serve()


def cmd_brain(args: argparse.Namespace) -> int:
    """The Windows brain: verify a signed bundle, launch it behind the broker, check its health."""
    import json

    from .layout import BUNDLE_SUFFIX
    from .verify import policy_for
    from .windows.bundle import open_bundle

    zip_path = Path(args.bundle).resolve()
    signature = Path(args.signature) if args.signature else zip_path.with_name(zip_path.name + BUNDLE_SUFFIX)
    policy = policy_for(args.channel, _trust(args).policy())
    bundle = open_bundle(zip_path, signature, policy)
    if args.action == "verify":
        print(f"verified: {zip_path.name} ({len(bundle.doc['files'])} files), signed by {policy.describe()}; "
              f"unpacked in {bundle.directory}")  # fmt: skip
        return 0
    from .windows.launch import launch

    workspace = Path(args.workspace).resolve() if args.workspace else None
    from .windows.policy import Policy

    brain = launch(bundle, workspace=workspace, cli_version=args.cli_version, allow_shell=args.allow_shell,
                   policy=Policy.load(args.policy) if args.policy else None)  # fmt: skip
    try:
        if args.action == "health":
            info = brain.health()
            print(json.dumps(info))
            return 0 if info["ok"] else 1
        print(f"brain running: session {brain.session}, pid {brain.pid}, isolation {brain.isolation}",
              file=sys.stderr)  # fmt: skip
        if brain.process is not None:
            return int(brain.process.wait())
        import time

        while True:  # pragma: no cover - Windows: the broker serves until interrupted
            time.sleep(3600)
    finally:
        brain.stop()


def cmd_cache(args: argparse.Namespace) -> int:
    from ._internal.releases import gc
    from ._internal.snapshot import SnapshotStore

    for item in gc(args.keep) + [f"snapshot {k}" for k in SnapshotStore().gc(args.keep)]:
        print(f"removed {item}")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from ._internal.snapshot import SnapshotStore

    store = SnapshotStore()
    if args.action == "create":
        import dataclasses

        from .launch import start

        request = dataclasses.replace(_request(args), snapshots="auto", workspace=None)
        with start(request, _progress()) as session:
            snap = session.snapshot
            key = snap.key if snap is not None else session.restored_from
            print(f"{'saved' if snap is not None else 'already saved'}: {key}")
        return 0
    if args.action == "list":
        for snap in store.all():
            d = snap.meta["description"]
            print(f"{snap.key[:16]}  {snap.meta['size'] / 1e6:7.1f} MB  kernel {d['kernel_sha256'][:12]}  "
                  f"rootfs {d['rootfs_sha256'][:12]}  {d['memory_mib']} MiB x{d['cpus']} {d['accel']}")  # fmt: skip
        return 0
    if args.action == "gc":
        for key in store.gc(args.keep):
            print(f"removed {key}")
        return 0
    targets = [s.key for s in store.all()] if args.all else [k for k in args.keys]
    missing = [k for k in targets if not any(s.key.startswith(k) for s in store.all())]
    for prefix in targets:
        for snap in store.all():
            if snap.key.startswith(prefix):
                store.remove(snap.key)
                print(f"removed {snap.key}")
    return 1 if missing else 0


def _version_json() -> int:
    import json

    from .buildinfo import version_report
    from .errors import ShimError

    try:
        print(json.dumps(version_report(), indent=2))
    except ShimError as exc:
        print(f"terminai-shim: {exc}", file=sys.stderr)
        return 125
    return 0


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["--proxy-connector"]:  # QEMU starts the standalone shim as the allowlist's connector
        from ._internal.netproxy import run_connector

        return run_connector(given[1:])
    if sorted(given) == ["--json", "--version"]:
        return _version_json()
    parser = argparse.ArgumentParser(prog="terminai-shim", description="Run commands in TerminAI's isolated runtime.")
    parser.add_argument("--version", action="version", version=f"terminai-shim {__version__}",
                        help="show the version (with --json: the build, its digest, its sigstore)")  # fmt: skip
    sub = parser.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="boot a VM, run one command, shut down")
    _boot_args(run)
    run.add_argument("--timeout", type=float, help="kill the command after this many seconds (exit 124)")
    run.add_argument("--shell", action="store_true", help="run COMMAND with /bin/sh -c (explicit: no shell otherwise)")
    run.add_argument("-v", "--verbose", action="store_true", help="report boot progress on stderr")
    run.add_argument("-i", "--interactive", action="store_true", default=None,
                     help="forward stdin (the default, except -t alone with stdin not a terminal)")  # fmt: skip
    run.add_argument("-t", "--tty", action="store_true", default=None,
                     help="run the command on a terminal in the guest, sized like this one (the default when "
                     "stdin is a terminal, which is then in raw mode until the command ends)")  # fmt: skip
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    run.set_defaults(fn=cmd_run)

    doc = sub.add_parser("doctor", help="what this host offers and what the shim will use")
    doc.add_argument("--json", action="store_true", help="machine-readable output")
    doc.set_defaults(fn=cmd_doctor)

    srv = sub.add_parser("serve", help="JSON-lines protocol on stdin/stdout for the TerminAI CLI")
    srv.set_defaults(fn=cmd_serve)

    ver = sub.add_parser("verify", help="verify a release: signature, identity, expiry, serial, artifact digests")
    ver.add_argument("manifest", nargs="?", help="a release directory, or its URL (https://, file://)")
    _store_args(ver)
    _trust_args(ver)
    ver.set_defaults(fn=cmd_verify)
    fetch = sub.add_parser("fetch", help="download and verify a release into the cache (resumable)")
    fetch.add_argument("manifest", nargs="?",
                       help="the release URL (https://, file://; http:// on loopback with --allow-http)")  # fmt: skip
    _store_args(fetch)
    _trust_args(fetch)
    fetch.set_defaults(fn=cmd_verify)
    brain = sub.add_parser("brain", help="the Windows brain bundle: verify, launch behind the broker, health")
    brain.add_argument("action", choices=("verify", "launch", "health"))
    brain.add_argument("bundle", help="the brain bundle zip")
    brain.add_argument("--signature", help="its sigstore bundle (default: ZIP.sigstore.json beside it)")
    brain.add_argument("--channel", default="stable", help="whose pinned signer to expect (default stable)")
    brain.add_argument("--workspace", help="the directory the brain's file operations are confined to")
    brain.add_argument("--allow-shell", action="store_true",
                       help="approve level C (shells and their equivalents) for the whole session")  # fmt: skip
    brain.add_argument("--policy", type=Path, help="the broker policy to use instead of the shim's own policy.json")
    brain.add_argument("--cli-version", default="", help="TERMINAI_CLI_VERSION for the brain")
    _trust_args(brain)
    brain.set_defaults(fn=cmd_brain)
    cache = sub.add_parser("cache", help="the download cache")
    cache_sub = cache.add_subparsers(dest="action", required=True)
    cgc = cache_sub.add_parser("gc", help="keep the newest N releases (and their blobs) and N saved VMs")
    cgc.add_argument("--keep", type=int, default=2)
    cache.set_defaults(fn=cmd_cache)

    snap = sub.add_parser("snapshot", help="saved VMs for warm starts: create, list, rm, gc")
    snap_sub = snap.add_subparsers(dest="action", required=True)
    create = snap_sub.add_parser("create", help="boot cold and save the VM right after its agent answers")
    _boot_args(create)
    snap_sub.add_parser("list", help="saved VMs, newest first")
    rm = snap_sub.add_parser("rm", help="remove saved VMs by key (prefix)")
    rm.add_argument("keys", nargs="*")
    rm.add_argument("--all", action="store_true")
    gc = snap_sub.add_parser("gc", help="keep only the newest N saved VMs")
    gc.add_argument("--keep", type=int, default=2)
    snap.set_defaults(fn=cmd_snapshot)

    args = parser.parse_args(argv)
    from .errors import ShimError

    try:
        return int(args.fn(args))
    except ShimError as exc:
        print(f"terminai-shim: {exc}", file=sys.stderr)
        return 125
    except OSError as exc:  # the host refused something the shim needed: named, never a traceback
        name = f" {exc.filename}" if exc.filename else ""
        print(f"terminai-shim: {exc.strerror or exc}{name} (next: check that path and its permissions)",
              file=sys.stderr)  # fmt: skip
        return 125
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

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
    from .launch import LaunchRequest


def _boot_args(p: argparse.ArgumentParser) -> None:
    from .options import add_arguments

    add_arguments(p, ("local", "launch", "source", "trust"))


def _request(args: argparse.Namespace) -> LaunchRequest:
    """The command line as a launch request; ``launch`` checks and resolves it."""
    from .options import from_args, launch_request

    return launch_request(from_args(args), built_outputs=True)


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


def _request_of_release(args: argparse.Namespace) -> LaunchRequest:
    """The release and trust options of ``verify``, ``fetch`` and ``brain``."""
    from .options import from_args, launch_request

    return launch_request(from_args(args))


def cmd_verify(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .launch import channel_of, verify

    request = _request_of_release(args)
    source = request.source
    if source is None:
        raise ConfigError("name a release: a directory or URL, or --store with --channel")
    release = verify(source, request.trust, _progress())
    m = release.manifest
    print(f"verified: release {m.release} (channel {channel_of(source, request.trust)}, serial {m.serial}), signed by "
          f"the expected identity; {', '.join(release.kinds)} match the manifest")  # fmt: skip
    return 0


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


def cmd_ready(args: argparse.Namespace) -> int:
    """Would a launch start here (``launch.ready``): what the CLI's
    ``isAvailable`` asks, with ``--params`` as it would ``initialize``."""
    import json

    from .errors import ConfigError, ShimError
    from .launch import Readiness, ready
    from .options import INITIALIZE_KEYS, from_params, launch_request

    try:
        if args.params is None:
            request = _request(args)
        else:
            try:
                params = json.loads(args.params)
            except ValueError:
                raise ConfigError("--params is not JSON", hint="pass initialize's parameters as one object") from None
            if not isinstance(params, dict):
                raise ConfigError("--params is not a JSON object", hint="pass initialize's parameters as one object")
            unknown = sorted(set(params) - INITIALIZE_KEYS)
            if unknown:
                raise ConfigError(f"unknown initialize parameters: {', '.join(unknown)}",
                                  hint="docs/shim-protocol.md lists them")  # fmt: skip
            request = launch_request(from_params(params))
        answer = ready(request)
    except ShimError as exc:
        answer = Readiness(False, str(exc), code=exc.code)
    if args.json:
        print(json.dumps({"ready": answer.ready, "reason": answer.reason, "backend": answer.backend,
                          "code": answer.code}))  # fmt: skip
    else:
        print(f"{'ready' if answer.ready else 'not ready'}: {answer.reason}")
    return 0 if answer.ready else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    return serve()


def cmd_brain(args: argparse.Namespace) -> int:
    """The Windows brain: verify a signed bundle, launch it behind the broker, check its health."""
    import json

    from .windows.resolve import BrainRequest, launch_brain, open_verified, signer

    request = BrainRequest(Path(args.bundle), signature=Path(args.signature) if args.signature else None,
                           trust=_request_of_release(args).trust, channel=args.channel,
                           workspace=Path(args.workspace) if args.workspace else None, cli_version=args.cli_version,
                           allow_shell=args.allow_shell, policy=args.policy)  # fmt: skip
    if args.action == "verify":
        bundle = open_verified(request)
        files, who = len(bundle.doc["files"]), signer(request).describe()
        print(f"verified: {request.bundle.name} ({files} files), signed by {who}; unpacked in {bundle.directory}")
        return 0
    _, brain = launch_brain(request)
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
    if given == ["--version"]:  # the CLI's probe: answered before the parser and its option table are built
        print(f"terminai-shim {__version__}")
        return 0
    parser = argparse.ArgumentParser(prog="terminai-shim", description="Run commands in TerminAI's isolated runtime.")
    parser.add_argument("--version", action="version", version=f"terminai-shim {__version__}",
                        help="show the version (with --json: the build, its digest, its sigstore)")  # fmt: skip
    sub = parser.add_subparsers(dest="cmd", required=True)
    from .options import add_arguments

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

    rdy = sub.add_parser("ready", help="would a launch with these options start here (no boot): the CLI's isAvailable")
    _boot_args(rdy)
    rdy.add_argument("--params", help="initialize's parameters as JSON, instead of the options above")
    rdy.add_argument("--json", action="store_true", help="machine-readable output")
    rdy.set_defaults(fn=cmd_ready)

    srv = sub.add_parser("serve", help="JSON-lines protocol on stdin/stdout for the TerminAI CLI")
    srv.set_defaults(fn=cmd_serve)

    ver = sub.add_parser("verify", help="verify a release: signature, identity, expiry, serial, artifact digests")
    ver.add_argument("manifest", nargs="?", help="a release directory, or its URL (https://, file://)")
    add_arguments(ver, ("source", "trust"), skip=("manifest",))
    ver.set_defaults(fn=cmd_verify)
    fetch = sub.add_parser("fetch", help="download and verify a release into the cache (resumable)")
    fetch.add_argument("manifest", nargs="?",
                       help="the release URL (https://, file://; http:// on loopback with --allow-http)")  # fmt: skip
    add_arguments(fetch, ("source", "trust"), skip=("manifest",))
    fetch.set_defaults(fn=cmd_verify)
    brain = sub.add_parser("brain", help="the Windows brain bundle: verify, launch behind the broker, health")
    brain.add_argument("action", choices=("verify", "launch", "health"))
    brain.add_argument("bundle", help="the brain bundle zip")
    brain.add_argument("--signature", help="its sigstore bundle (default: ZIP.sigstore.json beside it)")
    brain.add_argument("--channel", help="whose pinned signer to expect (default stable; dev with --dev)")
    brain.add_argument("--workspace", help="the directory the brain's file operations are confined to")
    brain.add_argument("--allow-shell", action="store_true",
                       help="approve level C (shells and their equivalents) for the whole session")  # fmt: skip
    brain.add_argument("--policy", type=Path, help="the broker policy to use instead of the shim's own policy.json")
    brain.add_argument("--cli-version", default="", help="TERMINAI_CLI_VERSION for the brain")
    add_arguments(brain, ("trust",))
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

__all__ = [
    "main",
]

"""Every launch option, declared once.

A launch option reaches the shim through two doors: a flag of ``run`` (and
``snapshot create``; ``verify`` and ``fetch`` take the release and trust
ones) and a parameter of ``serve``'s ``initialize``. Each is one ``Option``
row below: its name, its flag, its JSON key, its kind, its choices, its
default, its help and the tiers that honour it. The argparse flags, the
parameters ``initialize`` accepts, both readers and the options table of
docs/shim-protocol.md are derived from these rows, and tests check the rows
against the JSON Schema and the TypeScript package's option types, so that
adding an option is one row here (and its meaning in ``launch``) and a drift
fails the build (the model is mkosi's ``config.py``).

Standard library only and nothing heavy imported: ``terminai-shim --version``
builds the parser that reads this table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError
from .layout import ROOTFS_FORMATS as ROOTFS_FORMATS  # spelled with the file names

if TYPE_CHECKING:
    from .launch import LaunchRequest

# The choices, each spelled once (``launch``, ``models`` and the backends import them).
BACKENDS = ("auto", "qemu", "firecracker", "container")
ACCELS = ("auto", "kvm", "tcg")
NETWORK_MODES = ("none", "allowlist", "open")
# Who commands run as in the guest: "user" (uid 0 without capabilities) or
# "root" (every capability). The agent checks the same two names.
GUEST_USERS = ("user", "root")

Kind = Literal["flag", "text", "path", "whole", "choice", "entries", "names", "layer-files", "network"]
Group = Literal["source", "trust", "local", "launch"]
Tier = Literal["microvm", "container"]
BOTH: tuple[Tier, ...] = ("microvm", "container")
MICROVM: tuple[Tier, ...] = ("microvm",)


@dataclass(frozen=True)
class Option:
    """One launch option. ``flag`` None: ``initialize`` only; ``key`` None:
    the command line only (``--allow``, which ``initialize`` carries inside
    ``network``). ``group`` says which part of the request it fills and
    which subcommands take it."""

    name: str
    group: Group
    kind: Kind
    help: str
    flag: str | None = None
    key: str | None = None
    choices: tuple[str, ...] = ()
    default: Any = None
    tiers: tuple[Tier, ...] = BOTH
    metavar: str | None = None


# fmt: off
OPTIONS: tuple[Option, ...] = (
    Option("kernel", "local", "path", "guest kernel (vmlinux)", "--kernel", "kernel", tiers=MICROVM),
    Option("rootfs", "local", "path", "guest root image (.squashfs or .erofs)", "--rootfs", "rootfs",
           tiers=MICROVM),
    Option("rootfs_format", "local", "choice", "the format of rootfs (default: from its name)", None, "rootfsFormat",
           choices=ROOTFS_FORMATS, tiers=MICROVM),
    Option("workspace", "launch", "path",
           "host directory shared with the guest at its own path (and at /workspace)", "--workspace", "workspace"),
    Option("workspace_mount", "launch", "text", "where the guest sees the workspace instead of its host path",
           "--workspace-mount", "workspaceMount"),
    Option("manifest", "source", "text", "a release directory: verify it, then boot its kernel and root image",
           "--manifest", "manifest"),
    Option("store", "source", "text",
           "a published store (https://, s3://, file://, a directory): its channel's release", "--store", "store"),
    Option("channel", "source", "text", "the channel the release must be signed for, and the store's channel to "
           "follow (default stable; dev with --dev)", "--channel", "channel"),
    Option("release", "source", "text", "a version in the store instead of the channel's current one", "--release",
           "release"),
    Option("memory_mib", "launch", "whole", "guest memory in MiB (default 512, or the manifest's)", "--memory",
           "memoryMib", tiers=MICROVM, metavar="MEMORY"),
    Option("cpus", "launch", "whole", "guest vCPUs (default 1, or the manifest's)", "--cpus", "cpus",
           tiers=MICROVM),
    Option("trusted_root", "trust", "path", "sigstore trusted root JSON to verify against", "--trusted-root",
           "trustedRoot"),
    Option("identity", "trust", "text", "the signer identity the certificate must carry (exact)", "--identity",
           "identity"),
    Option("issuer", "trust", "text", "the OIDC issuer that must have vouched for the signer", "--issuer", "issuer"),
    Option("allow_http", "source", "flag", "allow plain http (loopback addresses only)", "--allow-http", "allowHttp"),
    Option("dev", "trust", "flag", "accept the local development signing identity, against your own development "
           "trust root (written by `inv release`; never one found beside a release); the channel defaults to dev",
           "--dev", "dev"),
    Option("accel", "launch", "choice", "accelerator (default auto)", "--accel", "accel", ACCELS, "auto",
           tiers=MICROVM),
    Option("backend", "launch", "choice", "isolation: auto (microVM with KVM, else a container if an engine "
           "answers, else a microVM under TCG; TERMINAI_BACKEND_ORDER reorders), qemu, firecracker or container",
           "--backend", "backend", BACKENDS, "auto"),
    Option("image", "local", "path", "container image archive (.oci.tar) for --backend container", "--image", "image",
           tiers=("container",)),
    Option("image_sha256", "local", "text", "the sha256 of image, checked before the engine loads it", None,
           "imageSha256", tiers=("container",)),
    Option("profile", "launch", "text", "the release's root filesystem profile: minimal, standard (its default, "
           "usually), full, or another it lists", "--profile", "profile"),
    Option("layers", "launch", "names", "the release's root filesystem layers by name, comma-separated, instead of a "
           "profile (each brings what it stands on)", "--layers", "layers", tiers=MICROVM),
    Option("layer_files", "local", "layer-files", "a root filesystem layer of your own build (inv layers) over "
           "--rootfs, bottom first (repeatable)", "--layer", "layerFiles", tiers=MICROVM,
           metavar="NAME=FILE"),
    Option("network", "launch", "network", "none (no network device: the default), allowlist (only --allow "
           "targets, through a host-side proxy), open (everything the host reaches; logged)", "--network", "network",
           NETWORK_MODES, "none"),
    Option("allow", "launch", "entries", "allowlist entry: HOST[:PORT], *.DOMAIN[:PORT], an IP, or a CIDR range "
           "that permits non-public addresses (repeatable)", "--allow", None, metavar="ENTRY"),
    Option("cold", "launch", "flag", "boot cold: neither restore nor save a snapshot", "--cold", "cold",
           tiers=MICROVM),
    Option("user", "launch", "choice", "who commands run as in the guest: user (uid 0 without capabilities: the "
           "default) or root (every capability)", "--user", "user", GUEST_USERS, "user"),
    Option("writable_git", "launch", "flag", "let the guest write the workspace's .git (read-only by default: hooks "
           "and config there run on the host's next git command)", "--writable-git", "writableGit"),
    Option("force_workspace", "launch", "flag", "share a workspace that is /, a home directory itself, one of its "
           "parents or a system directory (refused by default: the guest could read and write all of it)",
           "--force-workspace", "forceWorkspace"),
    Option("require_microvm", "launch", "flag",
           "refuse any tier weaker than a microVM (auto never falls back to a container)", "--require-microvm",
           "requireMicrovm"),
)
# fmt: on

BY_NAME: Mapping[str, Option] = {o.name: o for o in OPTIONS}
# What ``initialize`` accepts: anything else is refused by name.
INITIALIZE_KEYS = frozenset(o.key for o in OPTIONS if o.key is not None)


def _empty(option: Option) -> Any:
    """The value of an option nobody gave."""
    if option.kind == "flag":
        return False
    if option.kind in ("entries", "layer-files"):
        return ()
    return option.default


# -- the command line ---------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, groups: Iterable[Group], *, skip: Iterable[str] = ()) -> None:
    """The flags of the options in ``groups`` (``skip``: names a subcommand
    takes its own way, as ``verify`` takes the manifest as an argument)."""
    wanted, skipped = set(groups), set(skip)
    for o in OPTIONS:
        if o.flag is None or o.group not in wanted or o.name in skipped:
            continue
        kw: dict[str, Any] = {"dest": o.name, "help": o.help}
        if o.metavar:
            kw["metavar"] = o.metavar
        if o.kind == "flag":
            parser.add_argument(o.flag, action="store_true", **kw)
        elif o.kind in ("entries", "layer-files"):
            parser.add_argument(o.flag, action="append", default=[], **kw)
        elif o.kind in ("choice", "network"):
            parser.add_argument(o.flag, choices=o.choices, default=o.default, **kw)
        else:
            parser.add_argument(o.flag, type={"path": Path, "whole": int}.get(o.kind, str), **kw)


def _from_flag(o: Option, value: Any) -> Any:
    if o.kind == "names" and value is not None:
        return tuple(n.strip() for n in str(value).split(",") if n.strip())
    if o.kind == "entries":
        return tuple(value or ())
    if o.kind == "layer-files":
        return _layer_entries(value or ())
    return _empty(o) if value is None else value


def _layer_entries(given: Iterable[str]) -> tuple[tuple[str, Path], ...]:
    layers = []
    for entry in given:
        name, sep, file = entry.partition("=")
        if not sep or not name or not file:
            raise ConfigError(f"--layer {entry!r} is not NAME=FILE", hint="for example --layer tools=build/layer-tools/"
                              "layer-tools-0.1.0.squashfs")  # fmt: skip
        layers.append((name, Path(file).resolve()))
    return tuple(layers)


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The command line's values, by option name (an option the subcommand
    does not take is absent from ``args`` and has its empty value)."""
    return {o.name: _from_flag(o, getattr(args, o.name, None)) if o.flag else _empty(o) for o in OPTIONS}


# -- initialize's parameters --------------------------------------------------


def _json_value(o: Option, value: Any) -> Any:
    if value is None or (value == "" and o.kind in ("text", "path", "choice")):  # "" is not given, as in a form
        return _empty(o)
    what = f"initialize: {o.key}"
    if o.kind == "flag":
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, not {value!r}")
        return value
    if o.kind in ("text", "path", "choice"):  # a choice is checked by launch, whichever door it came through
        if not isinstance(value, str):
            raise ConfigError(f"{what} must be a string")
        return Path(value) if o.kind == "path" else value
    if o.kind == "whole":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{what} must be a whole number, not {value!r}")
        return value
    if o.kind == "names":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{what} is a list of layer names", hint='for example ["tools", "build"]')
        return tuple(value)
    if o.kind == "layer-files":
        if not isinstance(value, list) or not all(
            isinstance(v, dict) and set(v) == {"name", "path"} and all(isinstance(x, str) and x for x in v.values())
            for v in value
        ):
            raise ConfigError(f"{what} is a list of {{name, path}}, bottom first")
        return tuple((v["name"], Path(v["path"]).resolve()) for v in value)
    raise AssertionError(f"{o.name}: no JSON reader for kind {o.kind}")  # pragma: no cover - the table's own test


def _json_network(value: Any) -> tuple[str, tuple[str, ...]]:
    """``"none"``/``"open"``, or ``{"mode": "allowlist", "allow": [...]}``."""
    if value is None:
        return "none", ()
    if isinstance(value, str):
        return value, ()
    if not isinstance(value, dict) or not isinstance(value.get("allow", []), list):
        raise ConfigError("initialize: network is a mode name or {mode, allow: [entries]}")
    return str(value.get("mode", "none")), tuple(str(x) for x in value.get("allow", []))


def from_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``initialize``'s parameters, by option name (unknown keys are refused
    before this, by ``serve``)."""
    values: dict[str, Any] = {}
    for o in OPTIONS:
        if o.kind == "network":
            values["network"], values["allow"] = _json_network(params.get(o.key or ""))
        elif o.key is not None:
            values[o.name] = _json_value(o, params.get(o.key))
    return values


# -- one request from either door ---------------------------------------------


def launch_request(values: Mapping[str, Any], *, built_outputs: bool = False) -> LaunchRequest:
    """The request both doors build, from the values by option name;
    ``launch`` checks it as a whole. ``built_outputs``: with no release
    named, take what the developer did not name from ``build/`` (the command
    line; ``initialize`` names everything it boots). Naming nothing at all
    boots the default release (``defaults``), if one is configured."""
    import dataclasses

    from .launch import LaunchRequest, LocalArtifacts, ReleaseSource, Trust, local_artifacts
    from .models import NetworkPolicy, RootLayer

    v = {**{o.name: _empty(o) for o in OPTIONS}, **values}
    source = None
    if v["manifest"] or v["store"]:  # nothing boots that did not verify
        source = ReleaseSource(manifest=v["manifest"], store=v["store"], channel=v["channel"], release=v["release"],
                               allow_http=v["allow_http"])  # fmt: skip
    layers = tuple(RootLayer(name, path) for name, path in v["layer_files"])
    named = LocalArtifacts(kernel=v["kernel"], rootfs=v["rootfs"], rootfs_format=v["rootfs_format"],
                           image=v["image"], image_sha256=v["image_sha256"], layers=layers)  # fmt: skip
    local: LocalArtifacts | None = None
    if source is None and built_outputs:
        found = local_artifacts(v["kernel"], v["rootfs"], v["image"])
        local = dataclasses.replace(found, rootfs_format=v["rootfs_format"], layers=layers,
                                    image_sha256=v["image_sha256"] or found.image_sha256)  # fmt: skip
    elif named != LocalArtifacts():  # both a release and files: refused by launch, never one silently ignored
        local = named
    trust = Trust(v["trusted_root"], v["identity"], v["issuer"], dev=v["dev"])
    if source is None and (local is None or local == LocalArtifacts(rootfs_format=local.rootfs_format)):
        from .defaults import default_release

        fallback = default_release()  # nothing named and nothing built: the configured default, verified as any
        if fallback is not None:
            source = dataclasses.replace(fallback.source, allow_http=v["allow_http"], release=v["release"],
                                         channel=v["channel"] or fallback.source.channel)  # fmt: skip
            local = None
            trust = trust if trust != Trust() else fallback.trust
    return LaunchRequest(
        source=source,
        trust=trust,
        local=local,
        backend=v["backend"],
        accel=v["accel"],
        require_microvm=v["require_microvm"],
        memory_mib=v["memory_mib"],
        cpus=v["cpus"],
        network=NetworkPolicy(v["network"], v["allow"]),
        workspace=v["workspace"],
        workspace_mount=v["workspace_mount"],
        snapshots="off" if v["cold"] else "auto",
        user=v["user"],
        writable_git=v["writable_git"],
        force_workspace=v["force_workspace"],
        profile=v["profile"],
        layers=v["layers"],
    )


# -- the docs' table ----------------------------------------------------------

_SHOWN: dict[Kind, Callable[[Option], str]] = {
    "flag": lambda o: "boolean",
    "text": lambda o: "string",
    "path": lambda o: "string (a host path)",
    "whole": lambda o: "integer",
    "choice": lambda o: " \\| ".join(f"`{c}`" for c in o.choices),
    "entries": lambda o: "strings (repeatable)",
    "names": lambda o: "list of names",
    "layer-files": lambda o: "list of `{name, path}`",
    "network": lambda o: " \\| ".join(f"`{c}`" for c in o.choices) + " (JSON: a mode, or `{mode, allow}`)",
}


def markdown_table() -> str:
    """The options table of docs/shim-protocol.md (``inv docs`` writes it; a test keeps it equal)."""
    rows = ["| `initialize` | `run` | value | default | tiers | what |", "|---|---|---|---|---|---|"]
    for o in OPTIONS:
        key = f"`{o.key}`" if o.key else ("in `network`" if o.kind == "entries" else "")
        flag = f"`{o.flag}`" if o.flag else ""
        default = "false" if o.kind == "flag" else (f"`{o.default}`" if o.default is not None else "")
        tiers = ", ".join(o.tiers)
        rows.append(f"| {key} | {flag} | {_SHOWN[o.kind](o)} | {default} | {tiers} | {o.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


__all__ = [
    "ACCELS",
    "BACKENDS",
    "BY_NAME",
    "GUEST_USERS",
    "INITIALIZE_KEYS",
    "NETWORK_MODES",
    "OPTIONS",
    "ROOTFS_FORMATS",
    "Option",
    "add_arguments",
    "from_args",
    "from_params",
    "launch_request",
    "markdown_table",
]

"""The brain bundle: a zip with ``agent-brain.js``, what the release engineer
supplies (each input pinned by sha256), and ``bundle.json`` listing every
file with its size and sha256.

Inputs, all optional but the entrypoint: the CLI's bundled brain module
(``brain/``), ``terminai_native.node`` for win32-x64 and win32-arm64
(``native/<platform>/``), a portable ``node.exe`` (``node/``), and the
survival-kit wheel (``wheels/``, the one this release builds by default).
When a code-signing certificate and key are given, every PE file (``.node``,
``.exe``) is Authenticode-signed with ``osslsigncode`` first, its signing
time set to the source date, and checked with ``osslsigncode verify``.

Deterministic: entries in sorted order, fixed time stamps (the source date),
fixed permissions, one compressor setting. Cached by the digest of all
inputs. The zip's sigstore signature is made by ``inv brain`` and ``inv
release`` (signing is never cached: it names who signed and when).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from terminai_shim.windows.bundle import BUNDLE_JSON, MEDIA_TYPE
from terminai_shim.windows.win32 import CAPABILITIES, PROFILE

from ..cache import RECORD, StepOutputs, write_atomic
from ..context import BuildContext
from ..digest import canonical_json, digest_inputs, sha256_file, sha256_tree
from ..errors import BuildError
from ..proc import tool_version
from ..rootfs.kit import build_kit_wheel
from ..sde import source_date_epoch
from ..version import release_version

RECIPE = 1
BROKER_PROTOCOL = 1
NODE_REQUIRED = ">=18"
ENTRYPOINT = "agent-brain.js"


@dataclass(frozen=True)
class PinnedInput:
    """A file (or, for the brain module, a directory) and the sha256 it must have."""

    path: Path
    sha256: str

    def check(self, what: str) -> str:
        if not self.path.exists():
            raise BuildError(f"{what} {self.path} does not exist")
        got = sha256_tree(self.path) if self.path.is_dir() else sha256_file(self.path)
        if got != self.sha256:
            raise BuildError(f"{what} {self.path} has sha256 {got}, pinned as {self.sha256}",
                             hint="pass the file you pinned, or pin the one you pass")  # fmt: skip
        return got


@dataclass(frozen=True)
class BrainInputs:
    module: PinnedInput | None = None  # the CLI's bundled brain logic (a .js file or a directory with index.js)
    native: dict[str, PinnedInput] = field(default_factory=dict)  # win32-x64 / win32-arm64 -> terminai_native.node
    node_exe: PinnedInput | None = None
    kit_wheel: PinnedInput | None = None  # default: the survival kit this release builds
    sign_cert: Path | None = None  # PEM code-signing certificate (Authenticode)
    sign_key: Path | None = None


@dataclass(frozen=True)
class BrainArtifacts(StepOutputs):
    @property
    def zip(self) -> Path:
        return self.output("bundle")


def _layout(ctx: BuildContext, inputs: BrainInputs) -> dict[str, Path]:
    """Bundle path -> source file, before signing."""
    files = {ENTRYPOINT: ctx.repo / "images/brain" / ENTRYPOINT}
    if inputs.module is not None:
        inputs.module.check("the brain module")
        src = inputs.module.path
        if src.is_dir():
            for f in sorted(p for p in src.rglob("*") if p.is_file()):
                files[f"brain/{f.relative_to(src).as_posix()}"] = f
        else:
            files[f"brain/{src.name}"] = src
    for platform, pinned in sorted(inputs.native.items()):
        if platform not in ("win32-x64", "win32-arm64"):
            raise BuildError(f"unknown native platform {platform}", hint="win32-x64 or win32-arm64")
        pinned.check(f"terminai_native.node for {platform}")
        files[f"native/{platform}/terminai_native.node"] = pinned.path
    if inputs.node_exe is not None:
        inputs.node_exe.check("node.exe")
        files["node/node.exe"] = inputs.node_exe.path
    if inputs.kit_wheel is not None:
        inputs.kit_wheel.check("the survival-kit wheel")
        files[f"wheels/{inputs.kit_wheel.path.name}"] = inputs.kit_wheel.path
    else:
        wheel = build_kit_wheel(ctx)
        files[f"wheels/{wheel.name}"] = wheel
    return files


def _module_entry(files: dict[str, Path]) -> str | None:
    mods = sorted(n for n in files if n.startswith("brain/"))
    if not mods:
        return None
    return "brain/index.js" if "brain/index.js" in mods else mods[0]


def authenticode_sign(src: Path, out: Path, cert: Path, key: Path, sde: int, log: Path) -> None:
    argv = ["osslsigncode", "sign", "-certs", str(cert), "-key", str(key), "-h", "sha256", "-n", "TerminAI brain",
            "-time", str(sde), "-in", str(src), "-out", str(out)]  # fmt: skip
    for cmd in (argv, ["osslsigncode", "verify", "-CAfile", str(cert), "-in", str(out)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
        if proc.returncode != 0:
            raise BuildError(f"{cmd[1]} of {src.name} failed", log=str(log), hint="check the certificate and key")


def build_brain(ctx: BuildContext, inputs: BrainInputs | None = None) -> BrainArtifacts:
    inputs = inputs or BrainInputs()
    if (inputs.sign_cert is None) != (inputs.sign_key is None):
        raise BuildError("a code-signing certificate and its key go together")
    version = release_version(ctx.repo)
    sde = source_date_epoch(ctx.repo, "images/brain", "pyproject.toml")
    files = _layout(ctx, inputs)
    key_inputs = {
        "recipe": RECIPE,
        "version": version,
        "source_date_epoch": sde,
        "files": {name: sha256_file(path) for name, path in sorted(files.items())},
        "signing": sha256_file(inputs.sign_cert) if inputs.sign_cert else None,
        "osslsigncode": tool_version(["osslsigncode", "--version"]) if inputs.sign_cert else None,
        "code": sha256_file(Path(__file__)),
    }
    key = digest_inputs(key_inputs)
    cache = ctx.cache

    def build(staging: Path) -> None:
        work = cache.work_dir("brain", key)
        if inputs.sign_cert and inputs.sign_key:
            for name, src in list(files.items()):
                if name.endswith((".node", ".exe")):
                    signed = work / name.replace("/", "_")
                    authenticode_sign(src, signed, inputs.sign_cert, inputs.sign_key, sde, work / "sign.log")
                    files[name] = signed
        doc = {
            "mediaType": MEDIA_TYPE,
            "schemaVersion": 1,
            "name": "terminai-brain",
            "version": version,
            "entrypoint": ENTRYPOINT,
            "module": _module_entry(files),
            "node": {"required": NODE_REQUIRED, "bundled": "node/node.exe" if "node/node.exe" in files else None},
            "appContainerProfile": PROFILE,
            "capabilities": [{"name": n, "sid": sid} for n, sid in CAPABILITIES.items()],
            "brokerProtocol": BROKER_PROTOCOL,
            "authenticode": bool(inputs.sign_cert),
            "files": [{"path": n, "size": p.stat().st_size, "sha256": sha256_file(p)}
                      for n, p in sorted(files.items())],
        }  # fmt: skip
        out = staging / f"terminai-brain-{version}.zip"
        stamp = time.gmtime(max(sde, 315532800))[:6]  # zip times start in 1980
        with zipfile.ZipFile(out, "w") as zf:
            entries = [(BUNDLE_JSON, json.dumps(doc, indent=2, sort_keys=True).encode())]
            entries += [(n, p.read_bytes()) for n, p in sorted(files.items())]
            for name, data in entries:
                info = zipfile.ZipInfo(name, date_time=stamp)
                info.external_attr = 0o100644 << 16
                info.create_system = 3
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data, compresslevel=9)
        record = {"artifact": "brain", "key": key, "inputs": key_inputs,
                  "outputs": {"bundle": {"file": out.name, "sha256": sha256_file(out), "size": out.stat().st_size,
                                         "files": len(files)}}}  # fmt: skip
        write_atomic(staging / RECORD, canonical_json(record))
        shutil.rmtree(work, ignore_errors=True)

    entry, cached = cache.obtain("brain", key, build)
    art = BrainArtifacts(entry, cache.record("brain", key))
    if cached:
        ctx.reporter.done("brain", f"brain bundle from cache ({key[:12]})")
    else:
        ctx.reporter.done("brain", f"built {art.zip.name} ({len(files)} files)")
    return art

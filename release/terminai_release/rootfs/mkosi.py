"""The pinned mkosi: fetched as a .deb from the host's own mirror, checked by
sha256, unpacked (not installed: its package would drag in a newer systemd)
and run with the host's python3.

Debian 12's own mkosi (v14) is not reproducible; 25.x from the next Debian
release is pure Python and runs here unchanged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..cache import StepCache
from ..digest import sha256_file
from ..errors import BuildError
from .aptsources import host_acquire_options, host_mirrors

HOST_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class MkosiPin:
    package: str
    version: str
    suite: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return f"{self.package}_{self.version}_all.deb"


def load_pin(path: Path) -> MkosiPin:
    data = tomllib.loads(path.read_text())["mkosi"]
    return MkosiPin(data["package"], data["version"], data["suite"], data["sha256"].lower(), int(data["size"]))


@dataclass(frozen=True)
class Mkosi:
    root: Path  # the unpacked package
    pin: MkosiPin

    @property
    def pythonpath(self) -> Path:
        return self.root / "usr/lib/python3/dist-packages"

    def argv(self, *args: str) -> list[str]:
        return [HOST_PYTHON, "-m", "mkosi", *args]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["PYTHONPATH"] = str(self.pythonpath)
        env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        return env


def ensure_mkosi(cache: StepCache, pin: MkosiPin) -> Mkosi:
    entry = cache.root / "tools" / f"mkosi-{pin.sha256[:16]}"
    if (entry / ".complete").is_file():
        return Mkosi(entry, pin)
    with cache.lock("tools", f"mkosi-{pin.sha256[:16]}"):
        if (entry / ".complete").is_file():
            return Mkosi(entry, pin)
        deb = _download(cache, pin)
        tmp = entry.with_name(entry.name + ".staging")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        (tmp / ".complete").write_text(pin.sha256 + "\n")
        shutil.rmtree(entry, ignore_errors=True)
        os.rename(tmp, entry)
    return Mkosi(entry, pin)


def _download(cache: StepCache, pin: MkosiPin) -> Path:
    apt = cache.root / "tools" / f"apt-{pin.suite}"
    target = apt / pin.filename
    if target.is_file() and sha256_file(target) == pin.sha256:
        return target
    for d in ("lists/partial", "archives/partial", "etc/sources.list.d", "etc/apt.conf.d"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    mirrors = host_mirrors()
    (apt / "etc/sources.list.d/tools.sources").write_text(
        mirrors.sources(pin.suite, with_security=False).replace(
            f"Suites: {pin.suite} {pin.suite}-updates", f"Suites: {pin.suite}"
        )
    )
    (apt / "etc/apt.conf.d/host.conf").write_text(host_acquire_options())
    opts = [
        "-oDir::Etc::SourceList=/dev/null",
        f"-oDir::Etc::SourceParts={apt}/etc/sources.list.d",
        f"-oDir::Etc::Parts={apt}/etc/apt.conf.d",
        f"-oDir::State::Lists={apt}/lists",
        f"-oDir::Cache={apt}",
        "-oDir::State::Status=/dev/null",
        "-oDebug::NoLocking=1",
        "-oAPT::Sandbox::User=root",
    ]
    for args in (["update"], ["download", f"{pin.package}={pin.version}"]):
        proc = subprocess.run(["apt-get", *opts, *args], cwd=apt, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(
                f"cannot fetch {pin.filename} from the {pin.suite} suite: {proc.stderr.strip()[-500:]}",
                hint="check that apt-get works on this host; the mirror comes from /etc/apt",
            )
    actual = sha256_file(target)
    if actual != pin.sha256 or target.stat().st_size != pin.size:
        target.unlink()
        raise BuildError(
            f"{pin.filename} has sha256 {actual}, but images/rootfs/mkosi.toml pins {pin.sha256}",
            hint="the mirror served different bytes; if a new mkosi is intended, update the pin",
        )
    return target

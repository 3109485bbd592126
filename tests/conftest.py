"""Shared fixtures. Artifacts come from the same cached pipeline tasks a user
runs (`inv kernel`, `inv rootfs`): a missing artifact is built, never skipped."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from terminai_release.context import BuildContext
from terminai_release.progress import Reporter
from terminai_release.rootfs.project import agent_pythonpath

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--standalone-shim", action="store_true",
                     help="drive the standalone shim (inv shim-dist) instead of this environment's, "
                     "with no virtual environment on PATH")  # fmt: skip


# What the default disk floor leaves a nearly full host: it refuses every session there
# (CI hosts have been seen with 4.5 GiB free of 252 GiB, under the 12.6 GiB that 5 % asks).
LOWERED_DISK_FLOOR = "1G"


def _fit_the_disk_floor(config: pytest.Config) -> None:
    """On a host already below the default floor, the shims this run starts get
    a lower one, and the run's header says so: the suite tests the shim, not the
    host's free space. The floor's own tests set theirs on a tmpfs of their own,
    so they hold the same either way."""
    if "TERMINAI_DISK_FLOOR" in os.environ:
        return
    import tempfile

    from terminai_shim._internal.diskfloor import DEFAULT_FLOOR, DiskFloor

    for where in (tempfile.gettempdir(), str(Path.home())):
        st = os.statvfs(where)
        breach = DiskFloor.parse(DEFAULT_FLOOR, st).breach(st)
        if breach is not None:
            os.environ["TERMINAI_DISK_FLOOR"] = LOWERED_DISK_FLOOR
            config.stash[_FLOOR_NOTE] = (f"disk floor lowered to {LOWERED_DISK_FLOOR} for this run: "
                                         f"{where} has {breach} ({DEFAULT_FLOOR})")  # fmt: skip
            return


_FLOOR_NOTE = pytest.StashKey[str]()


_CONFIG_DIR = pytest.StashKey[Path]()


def _own_configuration(config: pytest.Config) -> None:
    """The run's shims read a configuration of the run's own: `inv release`
    and `inv demo`, which the suite runs, make their release the default a
    launch naming none boots, and a test must neither change the
    developer's default nor boot one the developer set. The development
    trust root stays the developer's, where the suite's signing puts it."""
    import tempfile

    from terminai_shim.verify import dev_trust_root

    os.environ["TERMINAI_DEV_TRUSTED_ROOT"] = str(dev_trust_root())
    where = Path(tempfile.mkdtemp(prefix="terminai-test-config-"))
    where.chmod(0o755)  # the attack tests' other users read it too (and find nothing)
    os.environ["XDG_CONFIG_HOME"] = str(where)
    config.stash[_CONFIG_DIR] = where


@pytest.fixture(autouse=True)
def _a_configuration_of_its_own(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no default release: one a test's `inv demo` or
    `inv release` made the default stays with that test."""
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="test-", dir=request.config.stash[_CONFIG_DIR]))
    where.chmod(0o755)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(where))
    for name in ("TERMINAI_RELEASE", "TERMINAI_RELEASE_STORE", "TERMINAI_RELEASE_CHANNEL"):
        monkeypatch.delenv(name, raising=False)


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    where = config.stash.get(_CONFIG_DIR, None)
    if where is not None:
        shutil.rmtree(where, ignore_errors=True)


def pytest_report_header(config: pytest.Config) -> str | None:
    return config.stash.get(_FLOOR_NOTE, None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    note = config.stash.get(_FLOOR_NOTE, None)
    if note is not None:
        terminalreporter.write_line(f"note: {note}", yellow=True)


_PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    item.stash[_PASSED] = item.stash.get(_PASSED, True) and not report.failed
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """A passing test's temporary directory goes as soon as it ends: releases,
    images and workspaces add up to more than 10 GiB over a run, and a CI
    host's disk may have less than that free. A failing test's stays."""
    funcargs = getattr(item, "funcargs", {})
    path = funcargs.get("tmp_path")
    try:
        return (yield)
    finally:
        if isinstance(path, Path) and item.stash.get(_PASSED, False):
            import shutil

            shutil.rmtree(path, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    """Under --standalone-shim every test that starts `terminai-shim` (shimproc.SHIM)
    starts the frozen build, built here through the cached task a user runs. The
    tests themselves still run in this environment; the shim and what it starts
    see a PATH without it, as on a machine with no Python project installed."""
    _fit_the_disk_floor(config)
    _own_configuration(config)
    if not config.getoption("--standalone-shim"):
        return
    from terminai_release.standalone import build_standalone

    shim = build_standalone(BuildContext(reporter=Reporter("plain")))
    # Installed from its release archive where any user can run it (the build
    # cache may be a private home): the attack tests run it as another user.
    installed = REPO / "build" / "test-standalone" / shim.record["key"]
    if not (installed / "terminai-shim").is_dir():
        import shutil

        staging = installed.with_name(f".{installed.name}.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        subprocess.run(["tar", "-xzf", str(shim.archive), "-C", str(staging)], check=True)
        staging.chmod(0o755)
        os.replace(staging, installed)
    os.environ["TERMINAI_TEST_SHIM"] = str(installed / shim.executable.relative_to(shim.directory))
    venv = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d != venv)
    os.environ.pop("VIRTUAL_ENV", None)


@pytest.fixture(scope="session")
def ctx() -> BuildContext:
    return BuildContext(reporter=Reporter("plain"))


@pytest.fixture(scope="session")
def kernel(ctx):
    from terminai_release.kernel import build_kernel

    return build_kernel(ctx)


@pytest.fixture(scope="session")
def rootfs(ctx):
    from terminai_release.rootfs.project import build_rootfs

    return build_rootfs(ctx)


@pytest.fixture(scope="session")
def boot_config(kernel, rootfs):
    from terminai_shim.models import BootConfig

    return BootConfig(
        kernel=kernel.vmlinux, rootfs=rootfs.image, rootfs_format=rootfs.record["outputs"]["image"]["format"]
    )


@pytest.fixture(scope="session")
def docker_engine():
    """A real Docker engine (`inv test` starts one; started here if none answers)."""
    from terminai_release.engine import ensure_engine

    engine = ensure_engine(REPO / "build" / "dockerd.log")
    yield
    engine.stop()


@pytest.fixture(scope="session")
def container_image(ctx, docker_engine):
    from terminai_release.container import build_container

    return build_container(ctx)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="module")
def vm(boot_config, workspace):
    from terminai_shim.session import Session

    session = Session.boot(dataclasses.replace(boot_config, workspace=workspace))
    yield session
    session.close()


class HostAgent:
    """The real agent, run on the host as a plain process on a Unix socket.

    Same code as in the guest; only the transport differs (the container
    tier's transport). Used for fast protocol tests without a VM.
    """

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "agent.sock"
        env = dict(os.environ, PYTHONPATH=agent_pythonpath(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "terminai_agent", f"--channel=unix:{self.path}"],
            env=env,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not self.path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"agent did not start: {self.proc.stderr.read().decode() if self.proc.stderr else ''}"
                )
            time.sleep(0.01)

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.path))
        return sock

    def client(self):
        from terminai_shim._internal.client import AgentClient

        c = AgentClient(self.connect())
        c.hello()
        return c

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def host_agent(tmp_path) -> Iterator[HostAgent]:
    agent = HostAgent(tmp_path)
    yield agent
    agent.stop()

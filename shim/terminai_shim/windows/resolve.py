"""The Windows tier's front door: one brain request in, a verified bundle or
a launched brain out, for ``terminai-shim brain`` and ``serve``'s
``brain.launch`` alike (as ``launch`` is for the microVM and the container).
The channel, the signer, the signature's default place and the checks of
the workspace and the broker policy live here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..launch import Trust
from ..layout import BUNDLE_SUFFIX

if TYPE_CHECKING:
    from ..verify import TrustPolicy
    from .broker import Approver
    from .bundle import BrainBundle
    from .launch import BrainSession

DEFAULT_APPROVAL_TIMEOUT = 120.0  # seconds a level B or C request waits for the CLI's answer


@dataclass(frozen=True)
class BrainRequest:
    """``channel`` None: the trust's default (``stable``; ``dev`` for the
    development identity). ``signature`` None: ``BUNDLE.sigstore.json``
    beside the bundle. ``policy`` None: the shim's own broker policy."""

    bundle: Path
    signature: Path | None = None
    trust: Trust = field(default_factory=Trust)
    channel: str | None = None
    workspace: Path | None = None
    cli_version: str = ""
    allow_shell: bool = False
    policy: Path | None = None
    approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT


def signer(request: BrainRequest) -> TrustPolicy:
    """Who must have signed the bundle: the trust given, else the signer pinned for the channel."""
    from ..verify import policy_for

    return policy_for(request.channel or request.trust.default_channel, request.trust.policy())


def open_verified(request: BrainRequest) -> BrainBundle:
    """The bundle, verified against ``signer(request)``, and unpacked."""
    from .bundle import open_bundle

    bundle = request.bundle.resolve()
    signature = request.signature or bundle.with_name(bundle.name + BUNDLE_SUFFIX)
    return open_bundle(bundle, signature, signer(request))


def launch_brain(request: BrainRequest, approver: Approver | None = None) -> tuple[BrainBundle, BrainSession]:
    """Verify the bundle, then start its brain behind the broker. The request
    is checked whole before the bundle is read."""
    from .launch import launch
    from .policy import Policy

    if request.workspace is not None and not request.workspace.is_dir():
        raise ConfigError(f"the brain's workspace {request.workspace} is not a directory",
                          hint="create it or pass an existing one")  # fmt: skip
    if request.approval_timeout <= 0:
        raise ConfigError("the approval timeout must be positive")
    policy = Policy.load(request.policy) if request.policy else None
    bundle = open_verified(request)
    brain = launch(bundle, workspace=request.workspace.resolve() if request.workspace else None,
                   cli_version=request.cli_version, allow_shell=request.allow_shell, approver=approver,
                   approval_timeout=request.approval_timeout, policy=policy)  # fmt: skip
    return bundle, brain


__all__ = [
    "DEFAULT_APPROVAL_TIMEOUT",
    "BrainRequest",
    "launch_brain",
    "open_verified",
    "signer",
]

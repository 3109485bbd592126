"""`inv brain`: the Windows brain bundle, deterministic and signed."""

from .build import BrainArtifacts, BrainInputs, PinnedInput, build_brain

__all__ = ["BrainArtifacts", "BrainInputs", "PinnedInput", "build_brain"]

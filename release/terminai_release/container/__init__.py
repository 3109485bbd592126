"""The container tier's image: the guest root image as an OCI archive."""

from .build import ContainerArtifacts, build_container

__all__ = ["ContainerArtifacts", "build_container"]

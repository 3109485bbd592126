"""Two clean builds of the same commit give identical bytes (`inv repro`)."""

from __future__ import annotations

import pytest
from terminai_release.repro import check

pytestmark = pytest.mark.repro


def test_rootfs_is_reproducible(ctx, rootfs, tmp_path):
    result = check(ctx, "rootfs", scratch=tmp_path)
    assert result.identical, result.describe()


def test_kernel_is_reproducible(ctx, kernel, tmp_path):
    result = check(ctx, "kernel", scratch=tmp_path)
    assert result.identical, result.describe()


def test_container_archive_is_reproducible(ctx, container_image, tmp_path):
    result = check(ctx, "container", scratch=tmp_path)
    assert result.identical, result.describe()


def test_the_standalone_shim_is_reproducible(ctx, tmp_path):
    """Its archive and npm package, from a second clean environment and freeze
    in another directory (PyInstaller with SOURCE_DATE_EPOCH and PYTHONHASHSEED=0)."""
    result = check(ctx, "shim-dist", scratch=tmp_path)
    assert result.identical, result.describe()


def test_a_layer_is_reproducible(ctx, tmp_path):
    """The tools layer from a clean cache: the base's and its own mkosi trees
    again, both finished, the delta, its squashfs and SBOM. (The other
    layers go through the same code; `inv repro` checks each.)"""
    result = check(ctx, "layer-tools", scratch=tmp_path)
    assert result.identical, result.describe()

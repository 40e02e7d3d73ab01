"""Fixtures the test files share."""

from __future__ import annotations

import pytest
from idx_files import learnable_idx


@pytest.fixture(scope="session")
def idx_root(tmp_path_factory):
    """A small learnable MNIST-format dataset (IDX files) for the runs through fg-cli; read only."""
    return learnable_idx(tmp_path_factory.mktemp("idx"))

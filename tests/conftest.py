"""Fixtures the test files share."""

from __future__ import annotations

import os

import pytest
from idx_files import FASHION, learnable_idx


@pytest.fixture(scope="session")
def idx_root(tmp_path_factory):
    """A small learnable MNIST-format dataset (IDX files) for the runs through fg-cli; read only."""
    return learnable_idx(tmp_path_factory.mktemp("idx"))


def _fashion(tmp_path_factory, **kwargs):
    from fg_lightning.data import MNISTDataModule

    if not os.path.isdir(FASHION):
        pytest.skip(f"needs Debian's dataset-fashion-mnist in {FASHION} (.ci/run installs it)")
    data = MNISTDataModule("fashion_mnist", root=str(tmp_path_factory.mktemp("data")), download=False, batch_size=256,
                           **kwargs)
    data.setup("fit")
    return data


@pytest.fixture(scope="module")  # per test file, as each file's own was
def fashion(tmp_path_factory):
    """Real Fashion-MNIST, 1,024 training images held out for validation, batches of 256 images (1×28×28)."""
    return _fashion(tmp_path_factory, val_size=1024)


@pytest.fixture(scope="module")
def fashion_flat(tmp_path_factory):
    """Real Fashion-MNIST, 2,048 held out for validation, batches of 256 flattened images (784)."""
    return _fashion(tmp_path_factory, val_size=2048, flatten=True)

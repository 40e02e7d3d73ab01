"""Write small MNIST-style IDX files for tests (no network needed).

Import from a test module in this folder as ``from idx_files import write_idx``: pytest's default ``prepend``
import mode puts the folder of a test file that has no ``__init__.py`` beside it on ``sys.path``.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

# Debian's dataset-fashion-mnist (the real Fashion-MNIST, IDX files), which .ci/run installs; the tests that train on
# real data skip without it.
FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION),
                                   reason=f"needs Debian's dataset-fashion-mnist in {FASHION} (.ci/run installs it)")

IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array) -> bytes:
    """An unsigned-byte IDX file: magic ``00 00 08 <ndim>``, big-endian int32 dims, then the bytes in C order."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def write_idx_file(path, array) -> str:
    """Write one IDX file at `path`, gzipped when it ends in ``.gz``; return the path."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(idx_bytes(array))
    return path


def write_idx(folder, train_images, train_labels, test_images, test_labels, gz: bool = True) -> dict[str, str]:
    """Write the four IDX files (``train-*`` and ``t10k-*``) into `folder` (created if needed).

    Images are uint8 ``(N, 28, 28)``, labels uint8 ``(N,)``. Returns the paths keyed like ``IDX_STEMS``.
    """
    os.makedirs(folder, exist_ok=True)
    arrays = {"train_images": train_images, "train_labels": train_labels,
              "test_images": test_images, "test_labels": test_labels}
    suffix = ".gz" if gz else ""
    return {key: write_idx_file(os.path.join(folder, IDX_STEMS[key] + suffix), arrays[key]) for key in IDX_STEMS}


def learnable_idx(root, bad_label=None) -> str:
    """96 training and 32 test images in `root`; the label says which of 10 pixel blocks is bright (a task any
    estimator learns in a few steps). ``bad_label`` replaces the sixth training label (e.g. 200, out of range)."""
    rng = np.random.default_rng(0)

    def images(labels):
        x = rng.integers(0, 60, size=(len(labels), 28, 28))
        for i, label in enumerate(labels):
            x[i, 2 * label : 2 * label + 6, 4:24] = 250
        return x.astype(np.uint8)

    train_labels, test_labels = rng.integers(0, 10, 96), rng.integers(0, 10, 32)
    train_images = images(train_labels)
    if bad_label is not None:
        train_labels[5] = bad_label
    write_idx(root, train_images, train_labels.astype(np.uint8), images(test_labels), test_labels.astype(np.uint8))
    return str(root)

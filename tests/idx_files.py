"""Write small MNIST-style IDX files for tests (no network needed).

Import from a test module in this folder as ``from idx_files import write_idx``: pytest's default ``prepend``
import mode puts the folder of a test file that has no ``__init__.py`` beside it on ``sys.path``.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

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

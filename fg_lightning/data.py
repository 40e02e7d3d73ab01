"""MNIST and Fashion-MNIST as a LightningDataModule of in-memory tensors.

The four IDX files of a dataset are found on disk (or downloaded through torchvision), parsed by a small IDX reader
and kept whole in memory as normalised float32 tensors: 60k 28×28 images are ~190 MB, and slicing a tensor is much
faster than torchvision's per-item PIL transforms.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from typing import Any, Iterator

import torch
import torchvision
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset
from typing_extensions import override

# Where Debian's `dataset-fashion-mnist` package puts the four .gz files (searched last, Fashion-MNIST only).
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# IDX file stems, keyed by (split, kind); each may sit on disk as `<stem>` or `<stem>.gz`.
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

# dataset name -> (torchvision class name, pixel mean, pixel std) of the training images scaled to [0, 1].
DATASETS = {
    "mnist": ("MNIST", 0.1307, 0.3081),
    "fashion_mnist": ("FashionMNIST", 0.2860, 0.3530),
}


class DatasetNotFoundError(FileNotFoundError):
    """The four IDX files of a dataset were found in none of the folders searched (and could not be downloaded)."""


def read_idx(path: str) -> Tensor:
    """Read an unsigned-byte IDX file (gzipped when `path` ends in ``.gz``) into a uint8 tensor of its dims.

    IDX layout: magic ``00 00 08 <ndim>``, then ``ndim`` big-endian int32 dims, then the bytes in C order.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read IDX file {path!r}: {err}") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path!r} is not an unsigned-byte IDX file (magic bytes {data[:4].hex()!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}i", data[4:header])
    if len(data) - header != math.prod(dims):
        raise ValueError(f"{path!r}: header says dims {dims} but holds {len(data) - header} bytes of data")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


class EpochPermutation(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)``: Lightning calls :meth:`set_epoch` before each epoch, so a
    run resumed at epoch ``e`` sees the same order as the run that never stopped. ``start`` skips the first
    indices of the next iteration (a resumed, half-finished epoch)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        start, self.start = self.start, 0
        return iter(torch.randperm(self.size, generator=generator)[start:].tolist())

    def __len__(self) -> int:
        return self.size


class ResumableDataLoader(DataLoader):
    """The training loader: shuffled by :class:`EpochPermutation`, and resumable mid-epoch through Lightning's
    ``state_dict`` / ``load_state_dict`` protocol (the checkpoint records the epoch and the batches consumed)."""

    def __init__(self, dataset: TensorDataset, seed: int, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=EpochPermutation(len(dataset), seed), **kwargs)
        self._consumed = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: EpochPermutation = self.sampler  # type: ignore[assignment]
        self._consumed = 0
        if self._resume is not None:
            epoch, consumed = self._resume
            self._resume = None
            if epoch == sampler.epoch and consumed * self.batch_size < len(sampler):
                sampler.start, self._consumed = consumed * self.batch_size, consumed
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "consumed": self._consumed}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (state["epoch"], state["consumed"])


class MNISTDataModule(LightningDataModule):
    """MNIST (as in the paper) or Fashion-MNIST, as normalised in-memory tensors with a seeded validation split.

    Batches are ``(images, labels)``: images float32 ``(B, 1, 28, 28)`` (``(B, 784)`` when ``flatten=True``),
    scaled to [0, 1] then normalised with the dataset's mean/std (MNIST 0.1307/0.3081, Fashion-MNIST
    0.2860/0.3530); labels int64 ``(B,)`` in 0..9. ``train`` + ``val`` are the 60k training images split by a
    seeded permutation (``val_size`` for validation); ``test`` is the 10k ``t10k`` set.

    The four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each gzipped ``.gz`` or not) are looked for, in this order, in:

    1. torchvision's layout, ``root/MNIST/raw`` or ``root/FashionMNIST/raw``;
    2. ``root`` itself;
    3. for Fashion-MNIST, ``/usr/share/datasets/fashion-mnist`` (Debian: ``apt-get install dataset-fashion-mnist``).

    Only when none holds all four and ``download=True`` does torchvision download them into ``root/<Name>/raw``.
    Otherwise :meth:`check_files` (called by :meth:`prepare_data` and :meth:`setup`, and callable early by a CLI)
    raises :class:`DatasetNotFoundError` listing the folders searched and how to get the files.

    Args:
        dataset: ``"mnist"`` or ``"fashion_mnist"``.
        root: folder searched for (and downloaded into) the files.
        batch_size: samples per batch of every loader (the last batch may be smaller).
        val_size: training images held out for validation (0 for none).
        download: let torchvision download missing files (needs internet).
        num_workers: DataLoader worker processes (persistent when > 0).
        pin_memory: pin batches in page-locked memory; ``None`` means "when CUDA is available".
        seed: seeds both the train/val split and the training shuffle, so runs are reproducible.
        flatten: give images as ``(B, 784)`` vectors, for MLPs.

    Example::

        dm = MNISTDataModule("fashion_mnist", root="data", batch_size=128, download=False)
        trainer = Trainer(max_epochs=1)
        trainer.fit(model, datamodule=dm)
    """

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(
        self,
        dataset: str = "mnist",
        root: str = "data",
        batch_size: int = 256,
        val_size: int = 5000,
        download: bool = True,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        flatten: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"Invalid dataset: {dataset!r}; expected one of {sorted(DATASETS)}")
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (must be >= 1)")
        if val_size < 0:
            raise ValueError(f"Invalid val_size: {val_size} (must be >= 0)")
        if num_workers < 0:
            raise ValueError(f"Invalid num_workers: {num_workers} (must be >= 0)")
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = os.fspath(root)
        self.batch_size = batch_size
        self.val_size = val_size
        self.download = download
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.seed = seed
        self.flatten = flatten
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def search_folders(self) -> list[str]:
        """The folders searched for the four IDX files, in order (absolute paths)."""
        class_name = DATASETS[self.dataset][0]
        folders = [os.path.join(self.root, class_name, "raw"), self.root]
        if self.dataset == "fashion_mnist":
            folders.append(DEBIAN_FASHION_MNIST)
        return [os.path.abspath(folder) for folder in folders]

    def find_files(self) -> dict[tuple[str, str], str] | None:
        """Paths of the four IDX files, keyed like ``IDX_FILES``, from the first folder holding all four; or None."""
        for folder in self.search_folders():
            paths = {}
            for key, stem in IDX_FILES.items():
                # Prefer the uncompressed file: torchvision's download leaves both, and it reads faster.
                found = [os.path.join(folder, name) for name in (stem, stem + ".gz")]
                found = [path for path in found if os.path.isfile(path)]
                if not found:
                    break
                paths[key] = found[0]
            else:
                return paths
        return None

    def check_files(self) -> dict[tuple[str, str], str]:
        """Find the four IDX files, downloading them if allowed; raise :class:`DatasetNotFoundError` if that fails.

        Returns their paths keyed like ``IDX_FILES``.
        """
        paths = self.find_files()
        if paths is not None:
            return paths
        reason = "download=False"
        if self.download:
            class_name = DATASETS[self.dataset][0]
            try:
                # Downloads and extracts all four files into root/<class_name>/raw (searched first).
                getattr(torchvision.datasets, class_name)(self.root, train=True, download=True)
            except Exception as err:  # URLError, RuntimeError, OSError...: reported in one message below
                # One line, no traceback: torchvision's message spans lines (one per mirror tried).
                reason = f"download failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
            paths = self.find_files()
            if paths is not None:
                return paths
        folders = "\n".join(f"  - {folder}" for folder in self.search_folders())
        names = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())
        hint = "run with download=True on a machine with internet access, or put the four files in root"
        if self.dataset == "fashion_mnist":
            hint += ", or `apt-get install dataset-fashion-mnist` (Debian/Ubuntu)"
        raise DatasetNotFoundError(
            f"{self.dataset} not found ({reason}). Looked in:\n{folders}\n"
            f"for the four IDX files {names}.\nTo get them: {hint}."
        )

    @override
    def prepare_data(self) -> None:
        # Runs once per node, before setup(): the place for the (single) download.
        self.check_files()

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        paths = self.check_files()
        train_images, train_labels = self._load(paths, "train")
        if self.val_size >= len(train_labels):
            raise ValueError(f"Invalid val_size: {self.val_size} (the training set has {len(train_labels)} images)")
        # Seeded split: same seed, same split. Index tensors rather than Subset keep batches as plain slices.
        order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(self.seed))
        val_index, train_index = order[: self.val_size], order[self.val_size :]
        self.train_set = TensorDataset(train_images[train_index], train_labels[train_index])
        self.val_set = TensorDataset(train_images[val_index], train_labels[val_index])
        self.test_set = TensorDataset(*self._load(paths, "test"))

    def _load(self, paths: dict[tuple[str, str], str], split: str) -> tuple[Tensor, Tensor]:
        """Images float32 (N, 1, 28, 28) or (N, 784), normalised; labels int64 (N,)."""
        images, labels = read_idx(paths[(split, "images")]), read_idx(paths[(split, "labels")])
        if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{split} files hold images of shape {tuple(images.shape)} and labels of shape {tuple(labels.shape)};"
                " expected (N, 28, 28) and (N,)"
            )
        _, mean, std = DATASETS[self.dataset]
        images = (images.to(torch.float32) / 255 - mean) / std
        images = images.reshape(-1, 784) if self.flatten else images.unsqueeze(1)
        return images, labels.to(torch.int64)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("MNISTDataModule.setup() must run before asking for a dataloader")
        loader = ResumableDataLoader if shuffle else DataLoader
        extra = {"seed": self.seed} if shuffle else {}
        return loader(
            dataset,
            batch_size=self.batch_size,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **extra,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

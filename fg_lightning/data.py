"""MNIST and Fashion-MNIST as a LightningDataModule of in-memory tensors.

torchvision's ``MNIST`` / ``FashionMNIST`` find, download and parse the IDX files; this module only adds what they
lack: a shim for flat folders of (gzipped) files such as Debian's ``dataset-fashion-mnist``, messages that say what to
do, checks of what was loaded, and whole normalised tensors sliced one batch at a time (60k 28×28 images are ~190 MB,
and one gather per batch is much faster than torchvision's per-item PIL transforms).

:class:`DigitsDataModule` gives scikit-learn's bundled 8×8 digits (no download) the same shape and loaders, resized to
28×28, as a seeded few-shot split for fine-tuning an (Fashion-)MNIST model offline (needs the ``finetune`` extra).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import traceback
import zlib
from typing import Any, Callable, Iterator

import torch
import torchvision
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchvision.datasets.utils import extract_archive
from typing_extensions import override

# Where Debian's `dataset-fashion-mnist` package puts the four .gz files (searched last, Fashion-MNIST only).
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# The four IDX files torchvision reads from root/<class name>/raw (uncompressed there; elsewhere also as `.gz`).
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# dataset name -> (torchvision class name, pixel mean, pixel std) of the training images scaled to [0, 1].
DATASETS = {
    "mnist": ("MNIST", 0.1307, 0.3081),
    "fashion_mnist": ("FashionMNIST", 0.2860, 0.3530),
}


class DatasetNotFoundError(FileNotFoundError):
    """The four IDX files of a dataset were found in none of the folders searched (and could not be downloaded or
    put where torchvision reads them). The message names fg-cli's flags; :meth:`naming` gives it with another
    tool's (fg-bench has ``--root``, not ``--data.root``)."""

    FG_CLI_FLAGS = {"download": "--data.download true", "root": "--data.root <folder>",
                    "dataset": "--data.dataset fashion_mnist"}

    def __init__(self, template: str) -> None:
        super().__init__(template.format(**self.FG_CLI_FLAGS))
        self.template = template

    def naming(self, download: str, root: str, dataset: str) -> str:
        """The message with these flags in place of fg-cli's."""
        return self.template.format(download=download, root=root, dataset=dataset)


class DataError(ValueError):
    """The data files are truncated, corrupted or hold bad labels, or the split does not fit them (found in
    :meth:`MNISTDataModule.setup`, before training)."""


def _one_line(err: BaseException) -> str:
    """``Type: message`` on one line: torchvision's download errors span lines (one per mirror tried)."""
    message = " ".join(str(err).split())[:300]
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _four_files(folder: str) -> list[str] | None:
    """Paths of the four IDX files in `folder`, each plain or ``.gz`` (plain preferred); None if one is missing."""
    paths = []
    for name in IDX_NAMES:
        found = [path for path in (os.path.join(folder, name + ext) for ext in ("", ".gz")) if os.path.isfile(path)]
        if not found:
            return None
        paths.append(found[0])
    return paths


class BatchTensorDataset(TensorDataset):
    """A TensorDataset the DataLoader asks for a whole batch at once (``__getitems__``): one ``index_select`` per
    tensor instead of ``batch_size`` single items stacked by the collate function. Use with :func:`whole_batch`."""

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return [tensor.index_select(0, index) for tensor in self.tensors]


def whole_batch(batch: list[Tensor]) -> list[Tensor]:
    """The loaders' ``collate_fn``: ``__getitems__`` already built ``[images, labels]``. A module-level function,
    not a lambda, so worker processes can pickle it."""
    return batch


class EpochPermutation(DistributedSampler):
    """A shuffle that depends only on ``(seed, epoch)``: Lightning calls :meth:`set_epoch` before each epoch, so a
    run resumed at epoch ``e`` sees the same order as the run that never stopped. ``start`` skips the first
    indices of the next iteration (a resumed, half-finished epoch).

    Data parallel (``num_replicas`` ranks): the epoch's order is cut into *union batches* of ``num_replicas ×
    batch_size`` indices, and rank ``r`` takes the ``r``-th ``batch_size`` of each, so that the ranks' batches of a
    step together are the batch of one process with ``num_replicas × batch_size`` (the estimators combine them so).
    The last, short union batch is split as evenly as possible; every index is seen once per epoch across the ranks
    and every rank has the same number of batches, except that a last union batch of fewer than ``num_replicas``
    indices is left out of that epoch (the next epoch's order differs). A ``DistributedSampler``, so that Lightning
    keeps it instead of putting its own in its place."""

    def __init__(self, size: int, seed: int, batch_size: int = 1, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.size, self.batch_size, self.start = size, batch_size, 0

    def _shard(self, order: Tensor) -> Tensor:
        """This rank's indices of the epoch's ``order``."""
        union = self.batch_size * self.num_replicas
        full = len(order) // union * union
        mine = order[:full].view(-1, self.num_replicas, self.batch_size)[:, self.rank].reshape(-1)
        rest = order[full:]
        if len(rest) < self.num_replicas:
            return mine
        return torch.cat([mine, rest.tensor_split(self.num_replicas)[self.rank]])

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        start, self.start = self.start, 0
        return iter(self._shard(torch.randperm(self.size, generator=generator))[start:].tolist())

    def __len__(self) -> int:
        return len(self._shard(torch.arange(self.size)))


class ResumableDataLoader(DataLoader):
    """The training loader: shuffled by :class:`EpochPermutation`, and resumable mid-epoch through Lightning's
    ``state_dict`` / ``load_state_dict`` protocol (the checkpoint records the epoch and the batches consumed).

    ``in_flight()`` tells how many of the batches handed out have not finished their training step: a checkpoint
    written as an exception stops a step (Ctrl-C, a divergence) must not count that batch as consumed (unless its
    update was applied: ``ForwardGradientModule`` then counts it, see ``fg_lightning.module.resumable_loops``)."""

    def __init__(self, dataset: TensorDataset, seed: int, in_flight: Callable[[], int] | None = None,
                 num_replicas: int = 1, rank: int = 0, **kwargs: Any) -> None:
        sampler = EpochPermutation(len(dataset), seed, kwargs.get("batch_size", 1), num_replicas, rank)
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._consumed = 0
        self._resume: tuple[int, int] | None = None
        self._in_flight = in_flight

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
        consumed = self._consumed - (self._in_flight() if self._in_flight is not None else 0)
        return {"epoch": self.sampler.epoch, "consumed": consumed}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (state["epoch"], state["consumed"])


class TensorDataModule(LightningDataModule):
    """What the project's datamodules share once ``setup`` has made their ``train_set``, ``val_set`` and ``test_set``
    (:class:`BatchTensorDataset`): the training loader a seeded :class:`ResumableDataLoader` (this rank's share of every
    union batch under data parallel, resumed mid-epoch exactly), the others in order; the last batch kept. A subclass
    sets ``batch_size``, ``seed``, ``num_workers`` and ``pin_memory``."""

    def __init__(self, batch_size: int, num_workers: int, pin_memory: bool | None, seed: int, flatten: bool) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (must be >= 1)")
        if num_workers < 0:
            raise ValueError(f"Invalid num_workers: {num_workers} (must be >= 0)")
        self.batch_size, self.num_workers, self.seed, self.flatten = batch_size, num_workers, seed, flatten
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_set: BatchTensorDataset | None = None
        self.val_set: BatchTensorDataset | None = None
        self.test_set: BatchTensorDataset | None = None

    def _batches_in_flight(self) -> int:
        """Training batches Lightning fetched whose step has not been processed (an exception stopped it)."""
        if self.trainer is None:
            return 0
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return max(0, progress.ready - progress.processed)

    def _loader(self, dataset: BatchTensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        loader = ResumableDataLoader if shuffle else DataLoader
        extra = {}
        if shuffle:  # data parallel: this rank's share of every union batch (see EpochPermutation)
            trainer = self.trainer
            extra = {"seed": self.seed, "in_flight": self._batches_in_flight,
                     "num_replicas": trainer.world_size if trainer else 1, "rank": trainer.global_rank if trainer else 0}
        return loader(
            dataset,
            batch_size=self.batch_size,
            drop_last=False,
            collate_fn=whole_batch,
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

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test set, in order, so that prediction ``i`` belongs to ``test_set.tensors[1][i]``."""
        return self._loader(self.test_set, shuffle=False)


class MNISTDataModule(TensorDataModule):
    """MNIST (as in the paper) or Fashion-MNIST, as normalised in-memory tensors with a seeded validation split.

    Batches are ``[images, labels]``: images float32 ``(B, 1, 28, 28)`` (``(B, 784)`` when ``flatten=True``),
    scaled to [0, 1] then normalised with the dataset's mean/std (MNIST 0.1307/0.3081, Fashion-MNIST
    0.2860/0.3530); labels int64 ``(B,)`` in 0..9. ``train`` + ``val`` are the 60k training images split by a
    seeded permutation (``val_size`` for validation); ``test`` is the 10k ``t10k`` set.

    ``torchvision.datasets.MNIST`` / ``FashionMNIST`` read the four IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``) from ``root/MNIST/raw`` or
    ``root/FashionMNIST/raw``. When that folder lacks them, they are extracted (``.gz``) or copied there from the first
    folder holding all four: ``root`` itself, then, for Fashion-MNIST, ``/usr/share/datasets/fashion-mnist`` (Debian:
    ``apt-get install dataset-fashion-mnist``). Only when none holds them and ``download=True`` does torchvision
    download them. Otherwise :meth:`check_files` (called by :meth:`prepare_data` and :meth:`setup`, and callable early
    by a CLI) raises :class:`DatasetNotFoundError` listing the folders searched and how to get the files. A truncated
    or corrupted file, or a label outside 0..9, raises :class:`DataError` (a ``ValueError``) naming the file.

    Args:
        dataset: ``"mnist"`` or ``"fashion_mnist"``.
        root: folder searched for the files; ``root/<Name>/raw`` must be writable unless it already holds them.
        batch_size: samples per batch of every loader (the last batch may be smaller); per process under
            ``fg_ddp``, whose processes share union batches of ``world_size × batch_size`` (:class:`EpochPermutation`).
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
        if dataset not in DATASETS:
            raise ValueError(f"Invalid dataset: {dataset!r}; expected one of {sorted(DATASETS)}")
        super().__init__(batch_size, num_workers, pin_memory, seed, flatten)
        if val_size < 0:
            raise ValueError(f"Invalid val_size: {val_size} (must be >= 0)")
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = os.fspath(root)
        self.val_size = val_size
        self.download = download
        self._copied_from: str | None = None  # where check_files() copied the files from, for setup's log line

    @property
    def raw_folder(self) -> str:
        """Where torchvision reads the four uncompressed files: ``root/<Name>/raw`` (absolute)."""
        return os.path.abspath(os.path.join(self.root, DATASETS[self.dataset][0], "raw"))

    def search_folders(self) -> list[str]:
        """The folders searched for the four IDX files, in order (absolute paths)."""
        folders = [self.raw_folder, os.path.abspath(self.root)]
        return folders + [DEBIAN_FASHION_MNIST] * (self.dataset == "fashion_mnist")

    def check_files(self) -> str:
        """Make sure the four uncompressed files are in :attr:`raw_folder` (copying from a flat folder or downloading
        them if needed) and return that folder; raise :class:`DatasetNotFoundError` if that cannot be done."""
        raw = self.raw_folder
        for folder in self.search_folders():
            paths = _four_files(folder)
            if paths is not None:
                if paths != [os.path.join(raw, name) for name in IDX_NAMES]:
                    self._copy_into_raw(paths)
                    if folder != raw:
                        self._copied_from = folder
                return raw
        reason = self._download() if self.download else "download=False"
        if reason is None:
            return raw
        folders = "\n".join(f"  - {folder}" for folder in self.search_folders())
        debian = "" if self.dataset == "fashion_mnist" else "offline, `{dataset}` after "
        found = f"{self.dataset} not found ({reason}). Looked in:\n{folders}".replace("{", "{{").replace("}", "}}")
        raise DatasetNotFoundError(
            f"{found}\nfor the four IDX files "
            f"{', '.join(name + '[.gz]' for name in IDX_NAMES)}.\nTo get them: download=True (`{{download}}`) "
            "with internet access; or put the four files (or their .gz) in root; or point `{root}` / "
            f"`root=` at a folder holding them; or {debian}`apt-get install dataset-fashion-mnist` (Debian/Ubuntu)."
        )

    def _copy_into_raw(self, paths: list[str]) -> None:
        """Extract (``.gz``) or copy `paths` into :attr:`raw_folder` through a staging folder, so that an interrupted
        or failed copy never leaves a partial file where torchvision would take it for a whole one."""
        raw = self.raw_folder
        try:
            os.makedirs(raw, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".partial-", dir=raw)
        except OSError as err:
            where = (f"{self.dataset}: found the IDX files in {os.path.dirname(paths[0])} but cannot put them in {raw}, "
                     f"where torchvision reads them ({_one_line(err)})").replace("{", "{{").replace("}", "}}")
            raise DatasetNotFoundError(where + ". Pass a writable folder as `{root}` / `root=`.") from None
        try:
            for path in paths:
                try:
                    if path.endswith(".gz"):
                        extract_archive(path, staging)
                    else:
                        shutil.copyfile(path, os.path.join(staging, os.path.basename(path)))
                except (EOFError, zlib.error, gzip.BadGzipFile) as err:
                    raise DataError(f"{path} is truncated or corrupted ({_one_line(err)})") from None
            for name in IDX_NAMES:
                os.replace(os.path.join(staging, name), os.path.join(raw, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _download(self) -> str | None:
        """Let torchvision download into :attr:`raw_folder`; None on success, else a one-line reason. The folders the
        attempt created are removed again if it left them empty (a failed download leaves no trace)."""
        created, folder = [], self.raw_folder
        while not os.path.isdir(folder):
            created, folder = created + [folder], os.path.dirname(folder)
        try:
            getattr(torchvision.datasets, DATASETS[self.dataset][0])(self.root, train=True, download=True)
            return None
        except Exception as err:  # URLError, RuntimeError, OSError...: reported in DatasetNotFoundError's message
            if all(os.path.isfile(os.path.join(self.raw_folder, name)) for name in IDX_NAMES):
                return None  # downloaded but unreadable: setup() names the bad file
            reason = f"download failed: {_one_line(err)}"
        for folder in created:  # deepest first
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        return reason

    @override
    def prepare_data(self) -> None:
        # Runs once per node, before setup(): the place for the (single) copy or download.
        self.check_files()

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        raw = self.check_files()
        train_images, train_labels = self._load(raw, train=True)
        if self.val_size >= len(train_labels):
            raise DataError(f"Invalid val_size: {self.val_size} (the training set has {len(train_labels)} images)")
        # Seeded split: same seed, same split. Index tensors rather than Subset keep batches as plain slices.
        order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(self.seed))
        val_index, train_index = order[: self.val_size], order[self.val_size :]
        self.train_set = BatchTensorDataset(train_images[train_index], train_labels[train_index])
        self.val_set = BatchTensorDataset(train_images[val_index], train_labels[val_index])
        self.test_set = BatchTensorDataset(*self._load(raw, train=False))
        source = f" (copied there from {self._copied_from})" if self._copied_from else ""
        rank_zero_info(f"MNISTDataModule: {self.dataset} from {raw}{source}")

    def _load(self, raw: str, train: bool) -> tuple[Tensor, Tensor]:
        """Images float32 (N, 1, 28, 28) or (N, 784), normalised; labels int64 (N,). Checks what torchvision read,
        so that bad files fail here, naming the file, rather than as an index error in the middle of training."""
        class_name, mean, std = DATASETS[self.dataset]
        images_file, labels_file = (os.path.join(raw, name) for name in IDX_NAMES[0 if train else 2 :][:2])
        try:
            parsed = getattr(torchvision.datasets, class_name)(self.root, train=train, download=False)
        except (AssertionError, RuntimeError, ValueError, TypeError) as err:
            # torchvision's reason seldom names the file; the reader in the traceback tells which one it was.
            frames = {frame.name for frame in traceback.extract_tb(err.__traceback__)}
            bad = (labels_file if "read_label_file" in frames
                   else images_file if "read_image_file" in frames else f"{images_file} or {labels_file}")
            raise DataError(f"{bad} is truncated or corrupted ({_one_line(err)}); delete it, get it again") from None
        images, labels = parsed.data, parsed.targets
        if images.dtype != torch.uint8 or images.shape[1:] != (28, 28):
            raise DataError(f"{images_file} holds {images.dtype} images of shape {tuple(images.shape)}; "
                            "expected uint8 (N, 28, 28)")
        if labels.shape != images.shape[:1]:
            raise DataError(f"{labels_file} holds labels of shape {tuple(labels.shape)} for {len(images)} images")
        bad_labels = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad_labels):
            raise DataError(f"{labels_file} holds label {bad_labels[0].item()}; labels must be in 0..9")
        images = (images.to(torch.float32) / 255 - mean) / std
        images = images.reshape(-1, 784) if self.flatten else images.unsqueeze(1)
        return images, labels.to(torch.int64)


# scikit-learn's digits scaled to [0, 1] (16 grey levels: x / 16) and resized to 28 × 28 (bilinear): pixel mean and std
# of the default training split (per_class=50, seed=0: 500 images), fixed like MNIST's so that a checkpoint's inputs
# do not depend on the split. tests/test_digits.py recomputes them. (The whole set: 0.3053 / 0.3247.)
DIGITS_MEAN, DIGITS_STD = 0.3034, 0.3243
DIGITS_EXTRA = "DigitsDataModule needs scikit-learn: pip install 'fg-lightning[finetune]'"


def _import_load_digits() -> Callable[..., Any]:
    """``sklearn.datasets.load_digits``, or an ImportError naming the extra (one line) when scikit-learn is missing."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(DIGITS_EXTRA) from None
    return load_digits


class DigitsDataModule(TensorDataModule):
    """scikit-learn's handwritten digits (1,797 images of 8 × 8, 16 grey levels, 10 classes; shipped inside the
    package, nothing downloaded) as a few-shot split of normalised in-memory tensors, shaped like MNIST's, to fine-tune
    a model built for (Fashion-)MNIST offline.

    Batches are ``[images, labels]`` like :class:`MNISTDataModule`'s: images float32 ``(B, 1, 28, 28)`` (``(B, 784)``
    when ``flatten=True``), scaled to [0, 1] (``x / 16``), resized once at :meth:`setup` to 28 × 28 (bilinear,
    ``torch.nn.functional.interpolate``), then normalised with :data:`DIGITS_MEAN` / :data:`DIGITS_STD` (0.3034 /
    0.3243, of the default training split); labels int64 ``(B,)`` in 0..9.

    The split is stratified and seeded: a permutation drawn from ``seed`` orders the images; of each class, the first
    ``per_class`` are the training set, the next ``val_per_class`` the validation set and all the others the test set
    (held out: at the defaults 500 / 100 / 1,197 images). Each set keeps the images in scikit-learn's order (the
    training loader shuffles, as :class:`MNISTDataModule`'s does: :class:`ResumableDataLoader`, resumable mid-epoch).
    A split that leaves a class without a test image is refused (``per_class + val_per_class`` must be less than the
    smallest class, 174 images).

    Args:
        per_class: training images per class (>= 1).
        val_per_class: validation images per class (0 for none).
        batch_size: samples per batch of every loader (the last batch may be smaller).
        num_workers: DataLoader worker processes (persistent when > 0).
        pin_memory: pin batches in page-locked memory; ``None`` means "when CUDA is available".
        seed: seeds both the split and the training shuffle, so runs are reproducible.
        flatten: give images as ``(B, 784)`` vectors, for MLPs.

    Needs scikit-learn (``pip install 'fg-lightning[finetune]'``): without it, construction raises ImportError.

    Example::

        dm = DigitsDataModule(per_class=20, batch_size=32)
        Trainer(max_epochs=20).fit(model_trained_on_mnist, datamodule=dm)
    """

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(
        self,
        per_class: int = 50,
        val_per_class: int = 10,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        flatten: bool = False,
    ) -> None:
        _import_load_digits()
        if per_class < 1:
            raise ValueError(f"Invalid per_class: {per_class} (must be >= 1)")
        if val_per_class < 0:
            raise ValueError(f"Invalid val_per_class: {val_per_class} (must be >= 0)")
        super().__init__(batch_size, num_workers, pin_memory, seed, flatten)
        self.save_hyperparameters()
        self.per_class = per_class
        self.val_per_class = val_per_class

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self._load()
        counts = torch.bincount(labels, minlength=self.num_classes)
        smallest = int(counts.argmin())
        if self.per_class + self.val_per_class >= counts[smallest]:
            raise DataError(
                f"Invalid per_class: {self.per_class} with val_per_class {self.val_per_class} leaves class {smallest} "
                f"({int(counts[smallest])} images) no test image: per_class + val_per_class must be at most "
                f"{int(counts[smallest]) - 1}")
        train_index, val_index, test_index = self.split(labels)
        self.train_set = BatchTensorDataset(images[train_index], labels[train_index])
        self.val_set = BatchTensorDataset(images[val_index], labels[val_index])
        self.test_set = BatchTensorDataset(images[test_index], labels[test_index])
        rank_zero_info(f"DigitsDataModule: scikit-learn digits, {len(train_index)} training, {len(val_index)} "
                       f"validation, {len(test_index)} test images (per_class={self.per_class}, "
                       f"val_per_class={self.val_per_class}, seed={self.seed})")

    def split(self, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Indices (into scikit-learn's order, ascending) of the training, validation and test images: one seeded
        permutation of all the images; of each class, its first ``per_class`` in that order train, the next
        ``val_per_class`` validate, the rest test."""
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        end = self.per_class + self.val_per_class
        parts: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        for label in range(self.num_classes):
            members = order[labels[order] == label]
            for part, chosen in zip(parts, (members[: self.per_class], members[self.per_class : end], members[end:])):
                part.append(chosen)
        train, val, test = (torch.cat(part).sort().values for part in parts)
        return train, val, test

    def _load(self) -> tuple[Tensor, Tensor]:
        """All 1,797 images float32 (N, 1, 28, 28) or (N, 784), resized and normalised; labels int64 (N,)."""
        digits = _import_load_digits()()
        images = torch.as_tensor(digits.images, dtype=torch.float32)
        labels = torch.as_tensor(digits.target).to(torch.int64)
        if images.ndim != 3 or images.shape[1:] != (8, 8) or labels.shape != images.shape[:1]:
            raise DataError(f"sklearn.datasets.load_digits gave images of shape {tuple(images.shape)} and labels of "
                            f"shape {tuple(labels.shape)}; expected (N, 8, 8) and (N,)")
        if images.min() < 0 or images.max() > 16 or labels.min() < 0 or labels.max() >= self.num_classes:
            raise DataError("sklearn.datasets.load_digits gave pixels outside 0..16 or labels outside 0..9")
        images = torch.nn.functional.interpolate(images.unsqueeze(1) / 16, size=(28, 28), mode="bilinear",
                                                 align_corners=False)
        images = (images - DIGITS_MEAN) / DIGITS_STD
        return (images.reshape(-1, 784) if self.flatten else images), labels

"""MNISTDataModule on small IDX files written here (offline), plus the real Fashion-MNIST where Debian installed it."""

from __future__ import annotations

import logging
import os
import pickle
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.mnist as tv_mnist
from idx_files import IDX_STEMS, write_idx, write_idx_file
from lightning.pytorch import LightningModule, Trainer

import fg_lightning.data as data_module
from fg_lightning.data import BatchTensorDataset, DatasetNotFoundError, MNISTDataModule

N_TRAIN, N_TEST, VAL_SIZE = 64, 32, 16
MEAN_STD = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}
RAW_FOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def fake_arrays(first_id: int = 0):
    """Random uint8 images whose pixel [0, 0] is a unique id (train: first_id + i, test: 100 + i); labels i % 10."""
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, size=(N_TRAIN, 28, 28), dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(N_TEST, 28, 28), dtype=np.uint8)
    train_images[:, 0, 0] = first_id + np.arange(N_TRAIN)
    test_images[:, 0, 0] = 100 + np.arange(N_TEST)
    return train_images, np.arange(N_TRAIN) % 10, test_images, np.arange(N_TEST) % 10


def expected_images(images_uint8, dataset="mnist"):
    mean, std = MEAN_STD[dataset]
    return (torch.tensor(images_uint8, dtype=torch.float32) / 255 - mean) / std


def ids_of(images, dataset="mnist"):
    """Recover the pixel-[0, 0] ids from normalised images (N, 1, 28, 28) or (N, 784)."""
    mean, std = MEAN_STD[dataset]
    first_pixel = images.reshape(len(images), -1)[:, 0]
    return torch.round((first_pixel * std + mean) * 255).to(torch.int64)


@pytest.fixture
def gz_root(tmp_path):
    """A root folder holding the four fake .gz files directly."""
    write_idx(tmp_path, *fake_arrays())
    return tmp_path


def loaded(root, **kwargs):
    kwargs.setdefault("val_size", VAL_SIZE)
    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("download", False)
    dm = MNISTDataModule(root=str(root), **kwargs)
    dm.setup("fit")
    return dm


# --- loading -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_loads_four_files_from_root_with_exact_normalised_values(tmp_path, gz):
    train_images, train_labels, test_images, test_labels = fake_arrays()
    write_idx(tmp_path, *fake_arrays(), gz=gz)
    dm = loaded(tmp_path)
    # The flat folder's files were extracted / copied where torchvision reads them, and nothing else was left there.
    assert sorted(os.listdir(tmp_path / "MNIST" / "raw")) == sorted(IDX_STEMS.values())

    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (N_TRAIN - VAL_SIZE, VAL_SIZE, N_TEST)
    test_x, test_y = dm.test_set.tensors
    assert test_x.shape == (N_TEST, 1, 28, 28) and test_x.dtype == torch.float32
    assert test_y.dtype == torch.int64
    # The test set is not split or shuffled: it is the t10k file, in order, normalised with MNIST's mean/std.
    torch.testing.assert_close(test_x[:, 0], expected_images(test_images), rtol=0, atol=1e-6)
    assert torch.equal(test_y, torch.tensor(test_labels, dtype=torch.int64))

    # Train + val are a disjoint cover of the training file; every image and label matches its source.
    for subset in (dm.train_set, dm.val_set):
        x, y = subset.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        ids = ids_of(x)
        torch.testing.assert_close(x[:, 0], expected_images(train_images[ids.numpy()]), rtol=0, atol=1e-6)
        assert torch.equal(y, torch.tensor(train_labels[ids.numpy()], dtype=torch.int64))
    all_ids = torch.cat([ids_of(dm.train_set.tensors[0]), ids_of(dm.val_set.tensors[0])])
    assert sorted(all_ids.tolist()) == list(range(N_TRAIN))


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_loads_uncompressed_files_from_torchvision_layout(tmp_path, dataset):
    train_images, _, test_images, _ = fake_arrays()
    write_idx(tmp_path / RAW_FOLDER[dataset] / "raw", *fake_arrays(), gz=False)
    dm = loaded(tmp_path, dataset=dataset)
    assert dm.check_files() == str(tmp_path / RAW_FOLDER[dataset] / "raw")
    assert sorted(os.listdir(tmp_path / RAW_FOLDER[dataset] / "raw")) == sorted(IDX_STEMS.values())
    # Normalised with this dataset's own mean/std.
    torch.testing.assert_close(dm.test_set.tensors[0][:, 0], expected_images(test_images, dataset), rtol=0, atol=1e-6)
    assert len(dm.train_set) + len(dm.val_set) == N_TRAIN


def test_gz_files_in_torchvision_layout_are_extracted_in_place(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw, *fake_arrays(), gz=True)
    dm = loaded(tmp_path)
    assert sorted(os.listdir(raw)) == sorted([*IDX_STEMS.values(), *(s + ".gz" for s in IDX_STEMS.values())])
    assert len(dm.test_set) == N_TEST


def test_torchvision_layout_is_searched_before_root(tmp_path):
    write_idx(tmp_path, *fake_arrays(first_id=0))
    write_idx(tmp_path / "MNIST" / "raw", *fake_arrays(first_id=50), gz=False)
    dm = loaded(tmp_path)
    ids = torch.cat([ids_of(dm.train_set.tensors[0]), ids_of(dm.val_set.tensors[0])])
    assert ids.min().item() == 50


def test_log_names_the_folder_loaded(gz_root, caplog, monkeypatch):
    # Lightning stops its loggers propagating (to caplog's handler on the root logger) when it is imported first.
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        loaded(gz_root)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MNISTDataModule:")]
    assert lines == [f"MNISTDataModule: mnist from {gz_root / 'MNIST' / 'raw'} (copied there from {gz_root})"]


def test_flatten_gives_784_vectors(gz_root):
    dm = loaded(gz_root, flatten=True)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 784) and y.shape == (8,) and y.dtype == torch.int64
    assert dm.test_set.tensors[0].shape == (N_TEST, 784)
    assert MNISTDataModule.input_shape == (1, 28, 28) and MNISTDataModule.num_classes == 10


# --- split and shuffle -------------------------------------------------------------------------------------------


def split_ids(dm):
    return ids_of(dm.train_set.tensors[0]).tolist(), ids_of(dm.val_set.tensors[0]).tolist()


def test_same_seed_same_split_and_first_batch(gz_root):
    a, b = loaded(gz_root, seed=3), loaded(gz_root, seed=3)
    assert split_ids(a) == split_ids(b)
    batch_a, batch_b = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert torch.equal(batch_a[0], batch_b[0]) and torch.equal(batch_a[1], batch_b[1])


def test_different_seed_different_split(gz_root):
    a, b = loaded(gz_root, seed=0), loaded(gz_root, seed=1)
    assert sorted(split_ids(a)[1]) != sorted(split_ids(b)[1])


def test_loaders_cover_each_set_once_train_shuffled_eval_in_order(gz_root):
    dm = loaded(gz_root, batch_size=5)  # 48 training images: the last batch (3) is kept, not dropped
    train_batches = list(dm.train_dataloader())
    assert [len(y) for _, y in train_batches] == [5] * 9 + [3]
    train_ids = torch.cat([ids_of(x) for x, _ in train_batches])
    assert sorted(train_ids.tolist()) == sorted(split_ids(dm)[0])
    assert train_ids.tolist() != split_ids(dm)[0]  # shuffled
    val_ids = torch.cat([ids_of(x) for x, _ in dm.val_dataloader()])
    assert val_ids.tolist() == split_ids(dm)[1]
    test_ids = torch.cat([ids_of(x) for x, _ in dm.test_dataloader()])
    assert test_ids.tolist() == list(range(100, 100 + N_TEST))


def test_loader_options_pass_through(gz_root):
    dm = loaded(gz_root, num_workers=2, pin_memory=False)
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers and not loader.pin_memory
    assert not loaded(gz_root).train_dataloader().persistent_workers
    assert MNISTDataModule().pin_memory == torch.cuda.is_available()
    assert MNISTDataModule(pin_memory=True).pin_memory


def test_batch_is_one_getitems_call_equal_to_plain_indexing(gz_root, monkeypatch):
    dm = loaded(gz_root, batch_size=5)
    calls = []
    getitems = BatchTensorDataset.__getitems__

    def counted(self, indices):
        calls.append(list(indices))
        return getitems(self, indices)

    monkeypatch.setattr(BatchTensorDataset, "__getitems__", counted)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        calls.clear()
        images, labels = loader.dataset.tensors
        order = list(loader.sampler)  # EpochPermutation depends only on (seed, epoch): the loader draws the same
        batches = list(loader)
        assert calls == [order[i : i + 5] for i in range(0, len(order), 5)]  # one call per batch, in sampler order
        for (x, y), indices in zip(batches, calls, strict=True):
            assert torch.equal(x, images[indices]) and torch.equal(y, labels[indices])
    pickle.dumps(dm.train_dataloader().collate_fn)  # worker processes started by spawn must pickle it


def test_training_loader_resumes_mid_epoch(gz_root):
    assert_resumes_mid_epoch(loaded(gz_root, batch_size=5))


def assert_resumes_mid_epoch(dm) -> int:
    """``dm``'s training loader, stopped after 3 batches of epoch 2 and resumed from its state, gives the rest of
    that epoch's batches exactly; returns the number of batches in the epoch."""
    full = dm.train_dataloader()
    full.sampler.set_epoch(2)
    batches = list(full)
    partial = dm.train_dataloader()
    partial.sampler.set_epoch(2)
    seen = [batch for _, batch in zip(range(3), partial)]
    resumed = dm.train_dataloader()
    resumed.load_state_dict(partial.state_dict())
    assert partial.state_dict() == {"epoch": 2, "consumed": 3}
    resumed.sampler.set_epoch(2)
    rest = list(resumed)
    assert len(seen) + len(rest) == len(batches)
    for (x, y), (x_ref, y_ref) in zip(seen + rest, batches, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    return len(batches)
    assert resumed.state_dict() == {"epoch": 2, "consumed": len(batches)}


def test_val_size_zero_and_too_large(gz_root):
    dm = loaded(gz_root, val_size=0)
    assert (len(dm.train_set), len(dm.val_set)) == (N_TRAIN, 0)
    with pytest.raises(ValueError, match=f"val_size: {N_TRAIN}"):
        loaded(gz_root, val_size=N_TRAIN)


def test_hyperparameters_saved():
    dm = MNISTDataModule("fashion_mnist", batch_size=32, seed=7)
    assert dm.hparams["dataset"] == "fashion_mnist"
    assert dm.hparams["batch_size"] == 32 and dm.hparams["seed"] == 7


class _TinyClassifier(LightningModule):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(784, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.linear(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_runs_under_trainer(gz_root, tmp_path):
    dm = MNISTDataModule(root=str(gz_root), val_size=VAL_SIZE, batch_size=8, download=False)
    trainer = Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(_TinyClassifier(), datamodule=dm)
    assert trainer.global_step == 2


# --- bad input -----------------------------------------------------------------------------------------------------


def test_unknown_dataset_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match="'cifar10'") as info:
        MNISTDataModule("cifar10")
    assert "mnist" in str(info.value) and "fashion_mnist" in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": -1}, "batch_size: -1"),
    ({"batch_size": 0}, "batch_size: 0"),
    ({"val_size": -5}, "val_size: -5"),
    ({"num_workers": -2}, "num_workers: -2"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNISTDataModule(**kwargs)


def test_missing_files_without_download(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path), download=False)  # __init__ does not touch the disk
    for check in (dm.check_files, dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as info:
            check()
        message = str(info.value)
        assert str(tmp_path) in message and str(tmp_path / "MNIST" / "raw") in message
        assert "download=False" in message and "download=True" in message and "--data.root" in message
        assert "--data.dataset fashion_mnist" in message and "apt-get install dataset-fashion-mnist" in message
        assert all(stem in message for stem in IDX_STEMS.values())
    assert isinstance(info.value, FileNotFoundError)
    assert os.listdir(tmp_path) == []


def test_missing_fashion_mnist_lists_debian_folder_and_package(tmp_path, monkeypatch):
    missing = tmp_path / "no-debian-here"
    monkeypatch.setattr(data_module, "DEBIAN_FASHION_MNIST", str(missing))
    with pytest.raises(DatasetNotFoundError) as info:
        MNISTDataModule("fashion_mnist", root=str(tmp_path / "data"), download=False).check_files()
    message = str(info.value)
    assert str(missing) in message and str(tmp_path / "data" / "FashionMNIST" / "raw") in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_incomplete_folder_is_not_used(tmp_path):
    paths = write_idx(tmp_path, *fake_arrays())
    os.remove(paths["test_labels"])
    with pytest.raises(DatasetNotFoundError):
        MNISTDataModule(root=str(tmp_path), download=False).check_files()
    assert not (tmp_path / "MNIST").exists()


def test_download_without_network_gives_the_same_clear_error(tmp_path, monkeypatch):
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_network)
    root = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError) as info:
        MNISTDataModule(root=str(root), download=True).prepare_data()
    assert calls, "torchvision's download was never attempted"
    message = str(info.value)
    assert "download failed" in message and "name resolution" in message and "download=False" not in message
    assert str(root / "MNIST" / "raw") in message and "download=True" in message and "\nTo get them" in message
    assert len(message.splitlines()[0]) < 400  # the reason is one line, however many mirrors were tried
    # Raised after the failure was handled: no chained urllib/torchvision traceback reaches the user.
    assert info.value.__cause__ is None and info.value.__context__ is None
    # The folders the attempt created (root/MNIST/raw and root itself) are gone again.
    assert os.listdir(tmp_path) == []


def test_download_fills_torchvision_raw_folder_then_loads(tmp_path, monkeypatch):
    train_images, train_labels, test_images, test_labels = fake_arrays()
    arrays = {IDX_STEMS["train_images"]: train_images, IDX_STEMS["train_labels"]: train_labels,
              IDX_STEMS["test_images"]: test_images, IDX_STEMS["test_labels"]: test_labels}

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        stem = os.path.basename(filename or url).removesuffix(".gz")
        write_idx_file(os.path.join(download_root, stem), arrays[stem])  # as torchvision leaves it: extracted

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", fake_download)
    dm = MNISTDataModule(root=str(tmp_path), download=True, val_size=VAL_SIZE)
    dm.prepare_data()
    assert sorted(os.listdir(tmp_path / "MNIST" / "raw")) == sorted(arrays)
    dm.setup()
    torch.testing.assert_close(dm.test_set.tensors[0][:, 0], expected_images(test_images), rtol=0, atol=1e-6)


def test_unwritable_root_names_the_folder_and_the_option(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    write_idx(debian, *fake_arrays())
    monkeypatch.setattr(data_module, "DEBIAN_FASHION_MNIST", str(debian))
    root = tmp_path / "a-file"
    root.write_text("not a folder")  # cannot hold root/FashionMNIST/raw, even for root (chmod does not stop root)
    with pytest.raises(DatasetNotFoundError) as info:
        MNISTDataModule("fashion_mnist", root=str(root), download=False).setup()
    message = str(info.value)
    assert str(root / "FashionMNIST" / "raw") in message and str(debian) in message
    assert "writable" in message and "--data.root" in message and "root=" in message


def raw_with(tmp_path, **arrays):
    """Write the four fake files, uncompressed, into root/MNIST/raw, with `arrays` replacing some of them."""
    names = ("train_images", "train_labels", "test_images", "test_labels")
    defaults = dict(zip(names, fake_arrays()))
    return write_idx(tmp_path / "MNIST" / "raw", *(arrays.get(name, defaults[name]) for name in names), gz=False)


def test_corrupted_idx_file_names_the_file(tmp_path):
    paths = raw_with(tmp_path)
    with open(paths["train_labels"], "wb") as f:
        f.write(b"this is not an IDX file at all")
    with pytest.raises(ValueError, match="truncated or corrupted") as info:
        loaded(tmp_path)
    assert paths["train_labels"] in str(info.value) and "\n" not in str(info.value)


def test_truncated_idx_file_names_the_file(tmp_path):
    paths = raw_with(tmp_path)
    with open(paths["test_images"], "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="truncated or corrupted") as info:
        loaded(tmp_path)
    assert paths["test_images"] in str(info.value) and "\n" not in str(info.value)


def test_truncated_gz_file_names_it_and_leaves_no_partial_file(gz_root):
    path = str(gz_root / (IDX_STEMS["train_images"] + ".gz"))
    with open(path, "r+b") as f:
        f.truncate(2000)
    with pytest.raises(ValueError, match="truncated or corrupted") as info:
        loaded(gz_root)
    assert path in str(info.value)
    assert os.listdir(gz_root / "MNIST" / "raw") == []  # nothing torchvision could mistake for a whole file


def test_label_out_of_range_names_the_value_and_the_file(tmp_path):
    labels = np.arange(N_TRAIN) % 10
    labels[7] = 200
    paths = raw_with(tmp_path, train_labels=labels)
    with pytest.raises(ValueError, match="label 200") as info:
        loaded(tmp_path)
    assert paths["train_labels"] in str(info.value)


def test_images_of_the_wrong_shape_name_the_file(tmp_path):
    paths = raw_with(tmp_path, test_images=np.zeros((N_TEST, 28, 27), np.uint8))
    with pytest.raises(ValueError, match=r"\(32, 28, 27\)") as info:
        loaded(tmp_path)
    assert paths["test_images"] in str(info.value)


# --- the real Fashion-MNIST ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir(data_module.DEBIAN_FASHION_MNIST),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(data_module, "rank_zero_info", logged.append)
    dm = MNISTDataModule("fashion_mnist", root=str(tmp_path), download=False)  # empty root: falls back to Debian
    dm.setup()
    assert logged == [f"MNISTDataModule: fashion_mnist from {tmp_path / 'FashionMNIST' / 'raw'} "
                      f"(copied there from {data_module.DEBIAN_FASHION_MNIST})"]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    x, y = dm.train_set.tensors
    assert x.shape == (55000, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.unique().tolist()) == set(range(10))
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    batch_x, batch_y = next(iter(dm.train_dataloader()))
    assert batch_x.shape == (256, 1, 28, 28) and batch_y.shape == (256,)
    assert sorted(os.listdir(tmp_path / "FashionMNIST" / "raw")) == sorted(IDX_STEMS.values())

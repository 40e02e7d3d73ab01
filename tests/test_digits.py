"""DigitsDataModule: scikit-learn's 8×8 digits resized to MNIST's 28×28, split few-shot (offline, no download)."""

from __future__ import annotations

import importlib.util
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningArgumentParser
from torch import nn

pytest.importorskip("sklearn", reason="DigitsDataModule needs scikit-learn (the finetune extra)")
from sklearn.datasets import load_digits  # noqa: E402
from test_data import assert_resumes_mid_epoch  # noqa: E402

import fg_lightning  # noqa: E402
import fg_lightning.data  # noqa: E402
from fg_lightning.data import (  # noqa: E402
    DIGITS_MEAN, DIGITS_STD, BatchTensorDataset, DataError, DigitsDataModule, ResumableDataLoader,
)
from fg_lightning.engine import CNN, MLP  # noqa: E402
from fg_lightning.estimators import Backprop  # noqa: E402
from fg_lightning.module import ForwardGradientModule  # noqa: E402

N, CLASS_SIZES = 1797, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # the smallest class: 8, 174 images


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's images scaled to [0, 1], (N, 1, 8, 8) float32, and labels int64."""
    bunch = load_digits()
    return torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16, torch.as_tensor(bunch.target)


@pytest.fixture(scope="module")
def resized(digits):
    """Every image resized as the datamodule must: bilinear, 28×28, in [0, 1] (not yet normalised)."""
    return nn.functional.interpolate(digits[0], size=(28, 28), mode="bilinear", align_corners=False)


def loaded(**kwargs):
    dm = DigitsDataModule(**kwargs)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def default():
    return loaded()


def indices(dm, labels):
    return [index.tolist() for index in dm.split(labels)]


# --- what it gives -------------------------------------------------------------------------------------------------


def test_shapes_dtypes_and_values_are_the_resized_digits_normalised(default, digits, resized):
    labels = digits[1]
    assert CLASS_SIZES == torch.bincount(labels).tolist()
    assert (len(default.train_set), len(default.val_set), len(default.test_set)) == (500, 100, N - 600)
    for dataset, index in zip((default.train_set, default.val_set, default.test_set), default.split(labels)):
        assert isinstance(dataset, BatchTensorDataset)
        x, y = dataset.tensors
        assert x.shape == (len(index), 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (len(index),) and y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
        pixels = x * DIGITS_STD + DIGITS_MEAN
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6  # [0, 1] before normalising
        # Exactly scikit-learn's image and label at that index, resized (bilinear) and normalised.
        torch.testing.assert_close(x, (resized[index] - DIGITS_MEAN) / DIGITS_STD, rtol=0, atol=1e-6)
        assert torch.equal(y, labels[index])
    # The corners of a resized 8×8 image are its corner pixels (bilinear, align_corners=False), not a blur of a pad.
    torch.testing.assert_close(resized[:, :, ::27, ::27], digits[0][:, :, ::7, ::7])
    assert DigitsDataModule.num_classes == 10 and DigitsDataModule.input_shape == (1, 28, 28)


def test_normalisation_constants_are_the_default_training_splits_mean_and_std(default, digits, resized):
    train = resized[default.split(digits[1])[0]]
    assert (DIGITS_MEAN, DIGITS_STD) == (0.3034, 0.3243)
    assert (round(train.mean().item(), 4), round(train.std().item(), 4)) == (DIGITS_MEAN, DIGITS_STD)
    x = default.train_set.tensors[0]
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3


def test_flatten_gives_784_vectors(default):
    dm = loaded(flatten=True)
    for flat, image in zip((dm.train_set, dm.val_set, dm.test_set), (default.train_set, default.val_set,
                                                                      default.test_set)):
        assert flat.tensors[0].shape == (len(image), 784) and torch.equal(flat.tensors[0], image.tensors[0].flatten(1))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 784) and y.shape == (64,)


# --- the split -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_class, val_per_class", [(50, 10), (1, 0), (7, 3), (163, 10), (173, 0)])
def test_per_class_counts_are_exact(digits, per_class, val_per_class):
    dm = DigitsDataModule(per_class=per_class, val_per_class=val_per_class)
    labels = digits[1]
    train, val, test = dm.split(labels)
    assert torch.bincount(labels[train], minlength=10).tolist() == [per_class] * 10
    assert torch.bincount(labels[val], minlength=10).tolist() == [val_per_class] * 10
    assert torch.bincount(labels[test], minlength=10).tolist() == [n - per_class - val_per_class for n in CLASS_SIZES]


def test_the_three_splits_are_disjoint_and_cover_the_set(default, digits, resized):
    train, val, test = indices(default, digits[1])
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert sorted(train + val + test) == list(range(N))
    assert all(part == sorted(part) for part in (train, val, test))  # each in scikit-learn's order
    # The sets' images too (not only the indices): together they are every image once.
    together = torch.cat([d.tensors[0] for d in (default.train_set, default.val_set, default.test_set)])
    order = torch.tensor(train + val + test).argsort()
    torch.testing.assert_close(together[order], (resized - DIGITS_MEAN) / DIGITS_STD, rtol=0, atol=1e-6)


def test_same_seed_same_split_and_first_batch_other_seed_other_split(digits):
    labels = digits[1]
    a, b = loaded(seed=3), loaded(seed=3)
    assert indices(a, labels) == indices(b, labels)
    batch_a, batch_b = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert torch.equal(batch_a[0], batch_b[0]) and torch.equal(batch_a[1], batch_b[1])
    other = indices(DigitsDataModule(seed=4), labels)
    assert other[0] != indices(a, labels)[0] and other[1] != indices(a, labels)[1]
    # A draw, not scikit-learn's first images of each class: with any seed, few of a class's first 50 train.
    first = [i for c in range(10) for i in (labels == c).nonzero().flatten()[:50].tolist()]
    for seed in (0, 1):
        assert len(set(first) & set(indices(DigitsDataModule(seed=seed), labels)[0])) < 250


def test_the_training_draw_grows_with_per_class(digits):
    """More shots per class add images to the training set: the 10 of per_class=10 are among the 50 of per_class=50
    (same seed), so a few-shot sweep only adds examples."""
    labels = digits[1]
    small, large = indices(DigitsDataModule(per_class=10), labels), indices(DigitsDataModule(per_class=50), labels)
    assert set(small[0]) < set(large[0])


# --- loaders -------------------------------------------------------------------------------------------------------


def test_loaders_cover_each_set_once_train_shuffled_eval_in_order(default):
    train = default.train_dataloader()
    assert isinstance(train, ResumableDataLoader)
    batches = list(train)
    assert [len(y) for _, y in batches] == [64] * 7 + [52]  # 500 = 7 × 64 + 52: the last batch is kept
    x = torch.cat([x for x, _ in batches])
    train_x = default.train_set.tensors[0]
    assert not torch.equal(x, train_x)  # shuffled
    assert torch.equal(x.flatten(1).sum(1).sort().values, train_x.flatten(1).sum(1).sort().values)
    for loader, dataset in ((default.val_dataloader(), default.val_set), (default.test_dataloader(), default.test_set),
                            (default.predict_dataloader(), default.test_set)):
        assert torch.equal(torch.cat([x for x, _ in loader]), dataset.tensors[0])
        assert torch.equal(torch.cat([y for _, y in loader]), dataset.tensors[1])


def test_training_loader_resumes_mid_epoch():
    dm = loaded(per_class=5, val_per_class=0, batch_size=7)  # 50 images: 7 batches, the last of 1
    assert assert_resumes_mid_epoch(dm) == 8


def test_a_loader_before_setup_says_so():
    with pytest.raises(RuntimeError, match=r"DigitsDataModule.setup\(\) must run"):
        DigitsDataModule().train_dataloader()


# --- arguments -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"per_class": -1}, "per_class: -1"),
    ({"per_class": 0}, "per_class: 0"),
    ({"val_per_class": -3}, "val_per_class: -3"),
    ({"batch_size": 0}, "batch_size: 0"),
    ({"num_workers": -2}, "num_workers: -2"),
])
def test_bad_arguments_fail_at_construction_in_one_line_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        DigitsDataModule(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("per_class, val_per_class", [(164, 10), (174, 0), (100, 74), (2000, 10)])
def test_a_split_that_leaves_a_class_no_test_image_is_refused_naming_it(per_class, val_per_class):
    with pytest.raises(DataError, match=f"per_class: {per_class} with val_per_class {val_per_class} leaves class 8 "
                                        r"\(174 images\) no test image.*at most 173$") as info:
        loaded(per_class=per_class, val_per_class=val_per_class)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_without_scikit_learn_construction_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn...` raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError) as info:
        DigitsDataModule()
    assert str(info.value) == "DigitsDataModule needs scikit-learn: pip install 'fg-lightning[finetune]'"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_fg_lightning_data_imports_without_scikit_learn(monkeypatch):
    """fg_lightning/data.py run afresh (as a module of another name) with scikit-learn missing: it imports, and only
    building a DigitsDataModule asks for scikit-learn."""
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    spec = importlib.util.spec_from_file_location("_fg_data_without_sklearn", fg_lightning.data.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    with pytest.raises(ImportError) as info:
        fresh.DigitsDataModule()
    assert str(info.value) == "DigitsDataModule needs scikit-learn: pip install 'fg-lightning[finetune]'"
    fresh.MNISTDataModule()  # the rest of the module works


def test_exported_saved_and_built_by_jsonargparse():
    assert fg_lightning.DigitsDataModule is DigitsDataModule and "DigitsDataModule" in fg_lightning.__all__
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(DigitsDataModule, "data")
    config = parser.parse_args(["--data.per_class", "5", "--data.seed", "2", "--data.batch_size", "16"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    dm = instantiate(config).data
    assert isinstance(dm, DigitsDataModule)
    assert (dm.per_class, dm.val_per_class, dm.seed, dm.batch_size) == (5, 10, 2, 16)
    assert dict(dm.hparams) == {"per_class": 5, "val_per_class": 10, "batch_size": 16, "num_workers": 0,
                                "pin_memory": None, "seed": 2, "flatten": False}


# --- fine-tuning ---------------------------------------------------------------------------------------------------


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def trainer(max_steps, callbacks=(), **kwargs):
    return pl.Trainer(max_steps=max_steps, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kwargs)


def test_a_tiny_torch_cnn_learns_the_digits_with_backprop():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
                            nn.ReLU(), nn.Flatten(), nn.Linear(8 * 7 * 7, 10))
    # Adam: the last 5 steps' mean loss was 0.09-0.22 of the first 5's over six (torch seed, split seed) pairs; SGD
    # (lr 0.02-0.1, momentum 0 or 0.9) stalled above 0.9 at some of them within 30 steps.
    module = ForwardGradientModule(network, Backprop(), lambda p: torch.optim.Adam(p, lr=0.01))
    recorder = LossRecorder()
    run = trainer(30, [recorder], num_sanity_val_steps=0, limit_val_batches=0)
    run.fit(module, datamodule=DigitsDataModule(batch_size=32))  # 500 images: 16 batches an epoch
    first, last = recorder.losses[:5], recorder.losses[-5:]
    assert run.global_step == 30 and sum(last) / 5 < 0.5 * sum(first) / 5, recorder.losses


@pytest.mark.parametrize("network", [CNN, MLP])
def test_the_projects_mnist_networks_take_it_unchanged(network):
    """The engine's CNN and MLP, built for (Fashion-)MNIST, train and test on it as they are."""
    module = ForwardGradientModule(network(seed=0), Backprop(), lambda p: torch.optim.SGD(p, lr=0.01))
    dm = DigitsDataModule(per_class=2, val_per_class=1, batch_size=8)
    run = trainer(2, num_sanity_val_steps=0, limit_val_batches=1, limit_test_batches=1)
    run.fit(module, datamodule=dm)
    (metrics,) = run.test(module, datamodule=dm, verbose=False)
    assert run.global_step == 2 and torch.isfinite(torch.tensor(metrics["test/loss"]))

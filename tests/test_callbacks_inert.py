"""Callbacks never change the run: a run with every default callback of configs/trainer.yaml (those that apply without
a logger or a checkpoint folder) equals a run with none, step for step, on a model with dropout and batch norm; and
GradientCosine measures against the gradient of the function the step differentiated (the same dropout mask, the
same batch statistics), so backprop's cosine is 1."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fg_lightning.callbacks import CommBytes, EstimatorSummary, GradientCosine, PeakMemory, StepTimer
from fg_lightning.estimators import Backprop, MultiDirection, ZerothOrder
from fg_lightning.module import ForwardGradientModule

STEPS = 6


class Recorder(Logger):
    """Keeps what is logged to it, and each step's training loss."""

    def __init__(self):
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class Losses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].clone())


def fit(estimator, callbacks):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))
    data = TensorDataset(torch.randn(8 * STEPS, 12), torch.randint(0, 4, (8 * STEPS,)))
    module = ForwardGradientModule(model, estimator, lambda p: torch.optim.SGD(p, lr=0.1))
    losses, logger = Losses(), Recorder()
    pl.Trainer(max_steps=STEPS, callbacks=[*callbacks, losses], logger=logger, log_every_n_steps=1,
               enable_model_summary=False, enable_checkpointing=False, enable_progress_bar=False,
               accelerator="cpu").fit(module, DataLoader(data, batch_size=8))
    return losses.losses, model, logger


def every_default_callback():
    return [StepTimer(), CommBytes(), PeakMemory(), GradientCosine(every_n_steps=1), EstimatorSummary()]


@pytest.mark.parametrize("make_estimator", [Backprop, lambda: MultiDirection(k=2, seed=1),
                                            lambda: ZerothOrder(k=2, seed=1)],
                         ids=["backprop", "multi_direction", "zeroth_order"])
def test_a_run_with_every_default_callback_equals_a_run_with_none(make_estimator):
    watched, watched_model, _ = fit(make_estimator(), every_default_callback())
    plain, plain_model, _ = fit(make_estimator(), [])
    assert len(watched) == len(plain) == STEPS
    for step, (got, want) in enumerate(zip(watched, plain)):
        assert torch.equal(got, want), f"step {step}: loss {float(got)} with the callbacks, {float(want)} without"
    got, want = watched_model.state_dict(), plain_model.state_dict()
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(got)
    assert int(got["1.num_batches_tracked"]) == STEPS  # the step's forward moved them, once a step
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_the_cosine_of_backprop_is_one_under_dropout_and_batch_norm():
    _, _, logger = fit(Backprop(), [GradientCosine(every_n_steps=1, histograms=False)])
    cosines = {step: m["grad/cosine"] for step, m in logger.metrics if "grad/cosine" in m}
    assert sorted(cosines) == list(range(STEPS))
    assert all(abs(c - 1) < 1e-6 for c in cosines.values()), cosines

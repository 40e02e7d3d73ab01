"""``ForwardGradientModule``: a LightningModule whose update comes from a gradient estimator."""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from fg_lightning.callbacks import UpdateCallback
from fg_lightning.engine import Network, cross_entropy
from fg_lightning.estimators import DivergenceError, GradientEstimator, apply_estimate

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


# Set by fg-cli while it builds the module from a config: the hyperparameters are then the parsed config (class paths
# and arguments), which lets load_from_checkpoint rebuild the module; objects passed in by hand are not hyperparameters.
_FROM_CONFIG: ContextVar[bool] = ContextVar("fg_lightning_from_config", default=False)


@contextlib.contextmanager
def building_from_config() -> Iterator[None]:
    """Within this block, a :class:`ForwardGradientModule` records its arguments (a parsed config) as hyperparameters."""
    token = _FROM_CONFIG.set(True)
    try:
        yield
    finally:
        _FROM_CONFIG.reset(token)


class ForwardGradientModule(LightningModule):
    """Trains ``network`` with the updates that ``estimator`` produces (``automatic_optimization = False``).

    Each training step: ``estimate = estimator.estimate(network, x, y, global_step)``; every ``p.grad`` is set to
    ``estimate.grads[name]``; the optimizer (plain SGD by default, as in the paper) steps through
    ``self.optimizers()``, so ``global_step`` counts optimizer steps and ``max_steps``, checkpoints and LR monitors
    behave as usual. A non-finite loss or update raises :class:`DivergenceError` naming the step, the estimator and
    the learning rate, before the parameters are touched. Validation and test are forward passes only.
    The estimator's state (its generator, the momentum estimator's ranking) is saved in checkpoints, so resuming
    continues bit-for-bit.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.

    Args:
        network: an engine :class:`~fg_lightning.engine.Network`, e.g. ``MLP()`` or ``CNN()``.
        estimator: a :class:`~fg_lightning.estimators.GradientEstimator`.
        optimizer: a factory ``params -> torch.optim.Optimizer``; default ``torch.optim.SGD`` with ``lr=1e-3``.

    Example::

        module = ForwardGradientModule(MLP(), MultiDirection(k=10), lambda p: torch.optim.SGD(p, lr=1e-2))
        Trainer(max_steps=1000, callbacks=[StepTimer(), GradientCosine()]).fit(module, datamodule=MNISTDataModule())
    """

    def __init__(
        self, network: Network, estimator: GradientEstimator, optimizer: OptimizerFactory | None = None
    ) -> None:
        super().__init__()
        if not isinstance(network, Network):
            raise TypeError(f"network must be an fg_lightning.engine.Network, got {type(network).__name__}")
        if not isinstance(estimator, GradientEstimator):
            raise TypeError(f"estimator must be a GradientEstimator, got {type(estimator).__name__}")
        estimator.validate(network)  # bad settings for this network fail here, before training
        self.automatic_optimization = False
        self.network = network
        self.estimator = estimator
        self.optimizer_factory = optimizer
        self.save_hyperparameters(ignore=None if _FROM_CONFIG.get() else ["network", "estimator", "optimizer"])
        self.train_acc = MulticlassAccuracy(num_classes=network.num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=network.num_classes)
        self.test_acc = MulticlassAccuracy(num_classes=network.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.network.parameters()
        return torch.optim.SGD(params, lr=1e-3) if self.optimizer_factory is None else self.optimizer_factory(params)

    def _update_callbacks(self) -> list[UpdateCallback]:
        return [cb for cb in self.trainer.callbacks if isinstance(cb, UpdateCallback)] if self._trainer else []

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, labels = batch
        optimizer = self.optimizers()
        step = self.global_step
        callbacks = self._update_callbacks()
        for callback in callbacks:
            callback.on_before_update(self.trainer, self, batch)
        for callback in callbacks:
            callback.on_update_start(self.trainer, self)
        estimate = self.estimator.estimate(self.network, x, labels, step)
        apply_estimate(estimate, self.network, optimizer, step, self.estimator)
        for callback in callbacks:
            callback.on_update_end(self.trainer, self, estimate)
        for callback in callbacks:
            callback.on_after_update(self.trainer, self, estimate)
        self.train_acc(estimate.logits, labels)
        self.log("train/loss", estimate.loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        return estimate.loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> None:
        x, labels = batch
        logits = self.network(x)
        loss = cross_entropy(logits, labels)
        accuracy(logits, labels)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}/acc", accuracy, prog_bar=stage == "val")

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["estimator_state"] = self.estimator.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "estimator_state" in checkpoint:
            self.estimator.load_state_dict(checkpoint["estimator_state"])

"""``ForwardGradientModule``: a LightningModule whose update comes from a gradient estimator."""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from fg_lightning.callbacks import ExceptionCheckpoint, UpdateCallback
from fg_lightning.checkpoints import CheckpointMismatchError, check_settings
from fg_lightning.distributed import check_strategy
from fg_lightning.engine import Network
from fg_lightning.estimators import DivergenceError, GradientEstimator, training_step
from fg_lightning.estimators.base import Inputs, batch_size
from fg_lightning.estimators.collective import Collective, TorchCollective
from fg_lightning.estimators.compiled import CompiledStep
from fg_lightning.torch_network import Loss, TorchNetwork

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[  # optimizer -> a torch.optim.lr_scheduler scheduler (a return type jsonargparse can resolve)
    [torch.optim.Optimizer], Union[torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau]
]


def _epoch_cut_short(trainer: Any) -> bool:
    """Whether training stopped (``max_steps``, ``trainer.should_stop``) before the epoch's last batch: Lightning still
    ends the epoch then (its ``on_train_epoch_end`` hooks run), but a resumed run goes on with the same epoch."""
    batches = trainer.fit_loop.epoch_loop.batch_progress
    return not batches.is_last_batch and 0 < batches.current.ready < trainer.num_training_batches


def resumable_loops(loops: dict[str, Any], trainer: Any, update_applied: bool) -> None:
    """Rewrite the fit loop's progress counters in a checkpoint's ``loops`` so that Lightning resumes where the run is.

    Lightning reads the counters as a checkpoint written at a batch's end (``on_train_batch_end``, where the
    step-interval checkpoints are written) or at an epoch's end. Two other moments leave counters it misreads:

    - Training stopped before the epoch's last batch (``max_steps``): the epoch is marked processed (and completed, by
      ``on_train_end``), so the epoch-end checkpoint and the ``last.ckpt`` written as training ends would resume at
      the next epoch, skipping the rest of this one and its validation. They are saved as the checkpoint written at
      that last batch's end: the epoch started but not processed, the batch processed but not completed, one batch
      fewer counted for the loggers (Lightning counts it again as it resumes). The training loader's own state
      (:class:`~fg_lightning.data.ResumableDataLoader`: the epoch and the batches consumed) then matches the epoch
      the fit loop resumes, and the loader skips the consumed batches.
    - An exception stopped a step in flight (Ctrl-C, a peer's death: ``ExceptionCheckpoint``): its batch is fetched
      but not processed, and the loader does not count it consumed. Before the step's update (``update_applied``
      False) the resumed run takes that batch again, but Lightning adds one to the loggers' step count as it resumes
      (right only after a batch's end), so every later step would be logged one step late: the count is saved one
      lower. After the update (a callback's exception, Ctrl-C while the step logs) the parameters hold it: the batch
      is saved as processed and consumed, as at its end, so that it is not taken twice.

    Lightning decides how to resume from the ``total`` batch counters but, resuming mid-batch, resets only the
    ``current`` ones: ``total`` stays a batch ahead, and the next checkpoint of that run would resume as if the batch
    were unfinished (one batch short of the epoch's end: its validation skipped). ``total`` is saved as far ahead of
    its processed count as ``current`` is.
    """
    fit = loops["fit_loop"]
    epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
    stepped = fit["epoch_loop.state_dict"]
    current = batches["current"]
    for field in ("ready", "started"):
        batches["total"][field] = batches["total"]["processed"] + current[field] - current["processed"]
    if current["ready"] > current["processed"]:  # a step in flight
        if not (update_applied and current["started"] == current["ready"]):
            stepped["_batches_that_stepped"] -= 1
            return
        for key in ("total", "current"):
            batches[key]["processed"] += 1
        for state in fit["state_dict"].get("combined_loader", []):
            if isinstance(state, dict) and "consumed" in state:
                state["consumed"] += 1
    elif epochs["total"]["processed"] == epochs["total"]["started"] > 0 and _epoch_cut_short(trainer):
        for key in ("total", "current"):
            epochs[key]["processed"] = epochs[key]["completed"] = epochs[key]["started"] - 1
            batches[key]["completed"] = batches[key]["processed"] - 1
        stepped["_batches_that_stepped"] -= 1


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back until the block ends, then delivered to their own handlers (in the main thread;
    elsewhere nothing is held): an update applied part by part as it is formed (``UpdateAsFormed``) is never left
    half done by a Ctrl-C or a scheduler's SIGTERM, so the checkpoint written on the interrupt holds the whole step
    or none of it, and the resumed run continues exactly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items() if handler is not None}  # None: not set from Python
    for sig in previous:
        signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


# The engine's hand-written passes use the parameters' dtype; nobody has checked them under autocast or half precision.
PRECISIONS = {"32-true", "32", "64-true", "64"}


def check_learning_rate(lr: Any) -> None:
    """Refuse a learning rate that is not a finite positive number, naming it: torch.optim accepts nan, inf and 0."""
    try:
        value = float(lr)
    except (TypeError, ValueError):
        return  # None (an optimizer without one), or not a number: the optimizer or the parser names it
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"lr {lr} is not a finite positive number: the learning rate scales every update "
                         "(e.g. --model.optimizer.init_args.lr 1e-3)")


def check_precision(precision: Any) -> None:
    """Refuse a precision the hand-written passes have not been checked under (autocast, half precision)."""
    if precision is not None and str(precision) not in PRECISIONS:
        raise MisconfigurationException(f"precision {precision} is not supported: the hand-written passes have not "
                                        "been checked under autocast or half precision; use 32-true or 64-true")


class ForwardGradientModule(LightningModule):
    """Trains ``network`` with the updates that ``estimator`` produces (``automatic_optimization = False``).

    Each training step is :func:`~fg_lightning.estimators.training_step`: ``estimator.estimate(network, x, y,
    global_step, comm)`` (``comm``: the module's communicator, a ``TorchCollective`` under ``fg_ddp``), then
    :func:`~fg_lightning.estimators.apply_estimate`: every ``p.grad`` is set to ``estimate.grads[name]``, clipped
    if asked (``gradient_clip_val``: by norm or value, as Lightning clips a gradient), and the optimizer (plain SGD
    by default, as in the paper) steps through ``self.optimizers()``, so ``global_step`` counts optimizer steps and
    ``max_steps``, checkpoints and LR monitors behave as usual. The learning-rate scheduler, if any, is stepped after
    every ``interval`` (``"epoch"`` or ``"step"``; ``ReduceLROnPlateau`` on ``val/loss``), as Lightning steps one
    under automatic optimisation. Under plain SGD with no clipping, activity perturbation and the random-direction
    estimators apply each part of their update (a layer's, a parameter's) as they form it, with no ``.grad`` and no
    parameter-sized estimate (``UpdateAsFormed``), except on the steps a callback reads the estimate
    (``UpdateCallback.reads_estimate``: GradientCosine's); a Ctrl-C or SIGTERM is held until the step is whole. A
    non-finite loss or update raises :class:`DivergenceError` naming the step, the estimator and the learning rate,
    before the parameters are touched (an update applied as formed: before the non-finite part, the error naming the
    parts already applied; a non-finite *input* batch is named as such). Validation and test are forward passes only;
    ``predict`` gives class probabilities. The estimator's state (its generator, the momentum estimator's ranking) is
    saved in checkpoints, so resuming continues bit-for-bit; a checkpoint of another network or estimator raises
    :class:`CheckpointMismatchError` (built from a config, as by LightningCLI, its recorded settings are compared:
    :func:`~fg_lightning.checkpoints.check_settings`).

    Several processes (``Trainer(strategy="fg_ddp", devices=N, num_nodes=M)``, see :mod:`fg_lightning.distributed`):
    every rank starts from rank 0's parameters and estimator state, the estimator exchanges what its update needs
    (e.g. K directional derivatives and the loss) and every rank takes the update one process would take on the union
    of the ranks' batches. Lightning's own ``ddp`` (and FSDP, DeepSpeed) is refused at setup, in one line.

    Logs ``train/loss``, ``train/acc`` (every step), ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.

    Args:
        network: an engine :class:`~fg_lightning.engine.Network` (``MLP()``, ``CNN()``: hand-written passes), or any
            ``torch.nn.Module`` classifier, which runs on the torch backend
            (:class:`~fg_lightning.torch_network.TorchNetwork`: ``torch.autograd.forward_ad``).
        estimator: a :class:`~fg_lightning.estimators.GradientEstimator`.
        optimizer: a factory ``params -> torch.optim.Optimizer``; default ``torch.optim.SGD`` with ``lr=1e-3``.
        lr_scheduler: a factory ``optimizer -> scheduler`` (any ``torch.optim.lr_scheduler``), or None.
        lr_scheduler_interval: step the scheduler after every ``"epoch"`` or every optimizer ``"step"``.
        gradient_clip_val: clip the estimate before the optimizer step (None: no clipping).
        gradient_clip_algorithm: ``"norm"`` (the total norm over all parameters) or ``"value"`` (each entry).
        loss: torch backend only: ``loss(logits, labels)``, a batch mean (default ``torch.nn.functional.cross_entropy``).
        num_classes: torch backend only: for the accuracy metrics (default: the last ``nn.Linear``'s out_features).
        trainable: torch backend only: train just the parameters whose names match these names or ``fnmatch``
            patterns (``["heads.*"]``), the rest frozen; default the parameters that require grad (a PEFT LoRA
            model's adapters: ``peft.get_peft_model(model, LoraConfig(...))`` freezes the rest itself).
        compile: run each step's estimate under ``torch.compile`` (CUDA graphs on a GPU; one process; engine networks;
            :class:`~fg_lightning.estimators.compiled.CompiledStep`): the same parameters as eager, within float
            rounding. An estimator that cannot be compiled (momentum) is refused here, in one line.

    Example::

        module = ForwardGradientModule(MLP(), MultiDirection(k=10), lambda p: torch.optim.SGD(p, lr=1e-2),
                                       lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))
        Trainer(max_steps=1000, callbacks=[StepTimer(), GradientCosine()]).fit(module, datamodule=MNISTDataModule())
    """

    def __init__(
        self,
        network: torch.nn.Module,
        estimator: GradientEstimator,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        lr_scheduler_interval: str = "epoch",
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        loss: Loss | None = None,
        num_classes: int | None = None,
        trainable: list[str] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(network, torch.nn.Module):
            raise TypeError(f"network must be a torch.nn.Module (an engine Network or any classifier), got "
                            f"{type(network).__name__}")
        if isinstance(network, Network):
            if loss is not None or num_classes is not None or trainable is not None:
                raise ValueError(f"{type(network).__name__} has its loss (softmax cross-entropy) and its classes built "
                                 "in and trains every parameter: leave loss, num_classes and trainable out")
        elif not isinstance(network, TorchNetwork):  # any other nn.Module: the torch backend
            network = TorchNetwork(network, loss=loss, num_classes=num_classes, trainable=trainable)
        elif trainable is not None:
            raise ValueError("pass trainable to the TorchNetwork you built, not to the module")
        if not isinstance(estimator, GradientEstimator):
            raise TypeError(f"estimator must be a GradientEstimator, got {type(estimator).__name__}")
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be positive or None, got gradient_clip_val={gradient_clip_val!r}")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}")
        estimator.validate(network)  # bad settings for this network fail here, before training
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got compile={compile!r}")
        self.compiled_step = CompiledStep(estimator, network) if compile else None  # refuses what cannot compile
        self.automatic_optimization = False
        self.network = network
        self.estimator = estimator
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self._state_before_update: dict[str, Any] | None = None  # set while a step has not applied its update
        self.comm = Collective()  # one process until setup("fit") knows the strategy
        # torch.optim checks its arguments (lr, betas...) only as it is built: one built now fails here, not at fit.
        built = ForwardGradientModule.configure_optimizers(self)
        check_learning_rate((built["optimizer"] if isinstance(built, dict) else built).defaults.get("lr"))
        # Built by LightningCLI (fg-cli), the hyperparameters are the parsed config it hands to Lightning (class paths
        # and arguments), from which load_from_checkpoint rebuilds the module; objects passed in by hand are not.
        objects = ["network", "estimator", "optimizer", "lr_scheduler", "loss"]
        self.save_hyperparameters(ignore=None if _given_hyperparameters.get() is not None else objects)
        self.train_acc = MulticlassAccuracy(num_classes=network.num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=network.num_classes)
        self.test_acc = MulticlassAccuracy(num_classes=network.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    @override
    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision)
        # Before the strategy wraps or moves anything: a strategy that cannot train the engine fails here, in one line.
        if stage != "fit":  # evaluation runs under any strategy (Lightning's ddp only wraps the module to fit)
            return
        check_strategy(self.trainer.strategy)
        if self.compiled_step is not None and self.trainer.world_size > 1:
            raise ValueError(f"compile=True trains one process, not {self.trainer.world_size}: use compile=False "
                             "with several processes")
        # The processes the update is formed across, passed to every estimate: under fg_ddp the estimator exchanges
        # what its update needs; in one process nothing, but the bytes a step would send are counted (CommBytes).
        self.comm = TorchCollective() if self.trainer.world_size > 1 else Collective()

    @override
    def teardown(self, stage: str) -> None:
        self.comm = Collective()  # the process group ends with the fit

    @override
    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:  # the same directions on every rank: rank 0's estimator state (seed, generator)
            self.estimator.load_state_dict(self.trainer.strategy.broadcast(self.estimator.state_dict()))

    @override
    def configure_optimizers(self) -> Any:
        params = self.network.parameters()
        optimizer = torch.optim.SGD(params, lr=1e-3) if self.optimizer_factory is None else self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        # Under manual optimisation Lightning keeps the scheduler (and its state in checkpoints) but never steps it,
        # and drops interval/monitor keys: the module steps it itself (_step_schedulers).
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def _step_schedulers(self, interval: str) -> None:
        if interval != self.lr_scheduler_interval:
            return
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                metric = self.trainer.callback_metrics.get("val/loss")
                if metric is None:
                    raise ValueError("ReduceLROnPlateau steps on val/loss, which no validation has logged yet: "
                                     "run validation every epoch (e.g. --trainer.check_val_every_n_epoch 1)")
                config.scheduler.step(metric)
            else:
                config.scheduler.step()

    def _update_callbacks(self) -> list[UpdateCallback]:
        return [cb for cb in self.trainer.callbacks if isinstance(cb, UpdateCallback)]

    def _out_of_memory(self, err: RuntimeError, x: Inputs, step: int) -> RuntimeError:
        """The error to raise for ``err``: a one-line MemoryError naming ``k`` if the step ran out of memory."""
        # torch.OutOfMemoryError is one; the CPU allocator raises a plain RuntimeError
        if not isinstance(err, torch.OutOfMemoryError) and "allocate" not in str(err):
            return err
        k = getattr(self.estimator, "k", None)
        hint = f"; k={k} directions hold k tangents of every parameter: lower k" if k is not None else ""
        return MemoryError(f"{self.estimator!r} ran out of memory at step {step} on a batch of {batch_size(x)}"
                           f"{hint} ({' '.join(str(err).split())[:200]})")

    def _divergence(self, err: DivergenceError, x: Inputs, step: int) -> DivergenceError:
        """The error to raise: the data's fault if the input batch is not finite; else where the last good state is."""
        if not all(bool(value.isfinite().all()) for value in (x.values() if isinstance(x, Mapping) else [x])):
            return DivergenceError(f"the input batch of step {step} holds NaN or infinite values: the data, not the "
                                   "learning rate, made the loss non-finite")
        saved = [cb.ckpt_path for cb in self.trainer.callbacks if isinstance(cb, ExceptionCheckpoint) and cb.ckpt_path]
        where = (f" The parameters before this step are saved in {saved[0]}." if saved
                 else " Checkpoints saved before this step are kept.")
        return DivergenceError(str(err) + where)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # What a checkpoint written while this batch's step is interrupted before its update must hold: the estimator
        # as the step found it, so that the resumed run draws the same directions for the same batch. Set before
        # Lightning starts the step, so that until the update a checkpoint never takes the step for done.
        self._state_before_update = self.estimator.state_dict()

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
        clip = None if self.gradient_clip_val is None else functools.partial(
            self.clip_gradients, optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)
        with _signals_held():  # a Ctrl-C or SIGTERM lands after the step, not inside a half-applied update
            try:
                if self.compiled_step is not None:
                    estimate = self.compiled_step(x, labels, step, optimizer, self.comm, before_step=clip)
                else:
                    estimate = training_step(self.estimator, self.network, x, labels, step, optimizer, self.comm,
                                             before_step=clip,
                                             keep_estimate=any(c.reads_estimate() for c in callbacks))
            except DivergenceError as err:
                raise self._divergence(err, x, step) from None
            except RuntimeError as err:
                translated = self._out_of_memory(err, x, step)
                if translated is err:
                    raise
                raise translated from None
            self._step_schedulers("step")
            # The update is applied: a checkpoint written from here on (an exception in a callback, Ctrl-C) holds this
            # step as done, so its schedule is stepped first (see resumable_loops).
            self._state_before_update = None
        for callback in callbacks:
            callback.on_update_end(self.trainer, self, estimate)
        for callback in callbacks:
            callback.on_after_update(self.trainer, self, estimate)
        self.train_acc(estimate.logits, labels)
        self.log("train/loss", estimate.loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        return estimate.loss

    @override
    def on_train_epoch_end(self) -> None:
        if not _epoch_cut_short(self.trainer):  # max_steps mid-epoch: the resumed run finishes this epoch
            self._step_schedulers("epoch")

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> None:
        x, labels = batch
        logits = self.network(x)
        loss = self.network.logits_loss(logits, labels)
        accuracy(logits, labels)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)  # sync: the mean over the ranks
        self.log(f"{stage}/acc", accuracy, prog_bar=stage == "val")

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    @override
    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities ``(B, C)``."""
        return self.network(batch[0]).softmax(1)

    def _fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match: the network's class and parameter shapes, the estimator's class."""
        return {"network": type(getattr(self.network, "module", self.network)).__name__,
                "estimator": type(self.estimator).__name__,
                "shapes": {name: tuple(p.shape) for name, p in self.network.named_parameters()}}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        interrupted = self._state_before_update
        checkpoint["estimator_state"] = interrupted if interrupted is not None else self.estimator.state_dict()
        checkpoint["fg_lightning"] = self._fingerprint()
        if "loops" in checkpoint and self._trainer is not None:
            resumable_loops(checkpoint["loops"], self.trainer, update_applied=self._state_before_update is None)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved, mine = checkpoint.get("hyper_parameters") or {}, dict(self.hparams)
        if "network" in saved and "network" in mine:  # both built from a config (else one by hand: the fingerprint)
            check_settings(saved, mine, getattr(self._trainer, "ckpt_path", None),
                           resuming=self._trainer is not None and self.trainer.state.fn == "fit")
        saved, mine = checkpoint.get("fg_lightning"), self._fingerprint()
        if saved is not None and saved != mine:
            def describe(f: dict[str, Any]) -> str:
                sizes = "x".join(str(shape[0]) for name, shape in f["shapes"].items() if name.endswith("weight"))
                return f"{f['network']} ({sizes}) trained by {f['estimator']}"

            raise CheckpointMismatchError(
                f"the checkpoint holds {describe(saved)}, but this module is {describe(mine)}: resume it with the "
                "config it was trained with, or start a new run"
            )
        if "estimator_state" in checkpoint:
            self.estimator.load_state_dict(checkpoint["estimator_state"])

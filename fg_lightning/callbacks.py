"""Callbacks that measure the update a :class:`~fg_lightning.module.ForwardGradientModule` makes each step.

They hook into the module's update, not only into Lightning's batch hooks, so that what they time is the estimator
and the optimizer update alone. The module calls, in this order, for every callback that has them:

1. ``on_before_update(trainer, module, batch)`` — untimed; the parameters are those the estimate is taken at;
2. ``on_update_start(trainer, module)`` — then the estimator runs and the optimizer steps;
3. ``on_update_end(trainer, module, estimate)``;
4. ``on_after_update(trainer, module, estimate)`` — untimed diagnostics.

So a diagnostic's own work (the cosine callback's backprop) is never counted in step time or peak memory.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelSummary
from typing_extensions import override

from fg_lightning.estimators import Estimate, Rewind, cosine


class UpdateCallback(Callback):
    """A callback that sees each update of a ForwardGradientModule (see the module docstring for the order)."""

    def on_before_update(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None: ...

    def reads_estimate(self) -> bool:
        """True when this step's ``on_update_end`` / ``on_after_update`` read ``estimate.grads`` (asked after
        ``on_before_update``): the step then keeps its estimate instead of applying it as it is formed
        (:func:`~fg_lightning.estimators.training_step`'s ``keep_estimate``)."""
        return False

    def on_update_start(self, trainer: Trainer, pl_module: LightningModule) -> None: ...

    def on_update_end(self, trainer: Trainer, pl_module: LightningModule, estimate: Estimate) -> None: ...

    def on_after_update(self, trainer: Trainer, pl_module: LightningModule, estimate: Estimate) -> None: ...


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(UpdateCallback):
    """Wall-clock time of each update: the estimator, the finiteness check of its result and the optimizer step,
    synchronised on CUDA.

    Logs:
        ``perf/step_ms``: every step.
        ``perf/step_ms_median``, ``perf/step_ms_median_exact``, ``perf/step_ms_median_forward``: at the end of
        each training epoch, the median over the epoch's steps — all of them, those that also computed the exact
        gradient (``Estimate.exact``: the momentum estimator's checkpoint steps, Table I) and those that did not.
        The warm-up steps (``warmup``, default 3) of each epoch are left out of the medians.

    Example::

        Trainer(callbacks=[StepTimer(), PeakMemory(), GradientCosine(every_n_steps=50)])
    """

    def __init__(self, warmup: int = 3) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got warmup={warmup!r}")
        self.warmup = warmup
        self._start = 0.0
        self._epoch = 0
        self._times: list[tuple[float, bool]] = []
        self._restored = False  # _epoch and _times came from a checkpoint

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Resumed from a checkpoint written at an epoch's last step, Lightning goes on in the next epoch without an
        # epoch start: the restored times belong to the finished epoch.
        if self._restored and trainer.current_epoch != self._epoch:
            self._times, self._restored = [], False
        self._epoch = trainer.current_epoch

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A run resumed in the middle of an epoch keeps that epoch's times; any other epoch starts afresh.
        if not (self._restored and trainer.current_epoch == self._epoch):
            self._times = []
        self._restored, self._epoch = False, trainer.current_epoch

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "times": list(self._times)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch, self._times = state_dict["epoch"], [tuple(t) for t in state_dict["times"]]
        self._restored = True

    @override
    def on_update_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _sync(pl_module.device)
        self._start = time.perf_counter()

    @override
    def on_update_end(self, trainer: Trainer, pl_module: LightningModule, estimate: Estimate) -> None:
        _sync(pl_module.device)
        ms = (time.perf_counter() - self._start) * 1e3
        self._times.append((ms, estimate.exact))
        pl_module.log("perf/step_ms", ms, on_step=True, on_epoch=False)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        timed = self._times[self.warmup :]
        for tag, times in (
            ("perf/step_ms_median", [ms for ms, _ in timed]),
            ("perf/step_ms_median_exact", [ms for ms, exact in timed if exact]),
            ("perf/step_ms_median_forward", [ms for ms, exact in timed if not exact]),
        ):
            if times:  # several processes: the mean of their medians
                pl_module.log(tag, statistics.median(times), sync_dist=True)


class PeakMemory(UpdateCallback):
    """Peak CUDA memory of each update: ``torch.cuda.max_memory_allocated`` after a reset at the update's start.

    Logs ``perf/peak_mem_mb`` (MiB, all tensors on the device, weights included) every step on CUDA; nothing on
    other devices. Use ``fg-bench memory`` for measurements above the resting state and for the CPU.

    Example::

        Trainer(accelerator="gpu", callbacks=[PeakMemory()])
    """

    @override
    def on_update_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    @override
    def on_update_end(self, trainer: Trainer, pl_module: LightningModule, estimate: Estimate) -> None:
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
            pl_module.log("perf/peak_mem_mb", peak, on_step=True, on_epoch=False)


class CommBytes(UpdateCallback):
    """Bytes the estimator sends from each process into collectives during the update (all-reduces, gathers), as
    counted by the communicator the module passes to it (``ForwardGradientModule.comm``, a
    :class:`~fg_lightning.estimators.collective.Collective`).

    Under ``fg_ddp`` that is what each step communicates: K + 2 numbers for the random-direction estimators (their K
    directional derivatives, the loss and the batch size), the gradient for backprop. In one process nothing is sent
    and the figure is what the same step would send across processes.

    Logs ``perf/comm_bytes`` every step.

    Example::

        Trainer(strategy="fg_ddp", devices=2, callbacks=[CommBytes(), StepTimer()])
    """

    def __init__(self) -> None:
        self._start = 0

    @override
    def on_update_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = pl_module.comm.bytes

    @override
    def on_update_end(self, trainer: Trainer, pl_module: LightningModule, estimate: Estimate) -> None:
        sent = pl_module.comm.bytes - self._start
        pl_module.log("perf/comm_bytes", float(sent), on_step=True, on_epoch=False)


class GradientCosine(UpdateCallback):
    """Cosine between the estimate and the exact gradient at the same parameters, every ``every_n_steps`` steps.

    The exact gradient comes from the network's backprop on the same batch, before the optimizer step, outside the
    timed update. It leaves the run as it was: the global random state and the network's buffers are put back after
    its forward, so the step draws the same dropout masks and moves the batch-norm statistics once, as without the
    callback, and the exact gradient is that of the function the step differentiates (the same dropout masks, the
    same batch statistics): backprop's cosine is 1.

    Logs:
        ``grad/cosine``: over all parameters; ``grad/cosine/<param name>``: per parameter tensor.
        With ``histograms=True`` and a TensorBoard logger, ``grad/error/<param name>``: a histogram of
        ``estimate − exact`` per parameter tensor (the paper's Fig. 7).

    Example::

        Trainer(callbacks=[GradientCosine(every_n_steps=10)], logger=TensorBoardLogger("tb_logs"))
    """

    def __init__(self, every_n_steps: int = 10, histograms: bool = True) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got every_n_steps={every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.histograms = histograms
        self._exact: dict[str, torch.Tensor] | None = None
        self._step = 0

    @override
    def on_before_update(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        self._exact = None
        self._step = trainer.global_step
        if self._step % self.every_n_steps == 0:
            x, labels = batch
            rewind = Rewind(pl_module.network, labels.device)
            self._exact = pl_module.estimator.exact_gradient(pl_module.network, x, labels, pl_module.comm)
            rewind()  # the step's forward then runs as if this one had not

    @override
    def reads_estimate(self) -> bool:
        return self._exact is not None

    @override
    def on_after_update(self, trainer: Trainer, pl_module: LightningModule, estimate: Estimate) -> None:
        if self._exact is None:
            return
        exact, self._exact = self._exact, None
        metrics = {"grad/cosine": cosine(estimate.grads, exact)}
        for name, grad in exact.items():
            metrics[f"grad/cosine/{name}"] = cosine(estimate.grads, {name: grad})
        # Straight to the loggers: Lightning's log_every_n_steps would drop most steps of a sparse diagnostic.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._step)
            experiment = getattr(logger, "experiment", None)
            if self.histograms and hasattr(experiment, "add_histogram"):
                for name, grad in exact.items():
                    error = (estimate.grads[name] - grad).flatten().float().cpu()
                    experiment.add_histogram(f"grad/error/{name}", error, self._step)


class ExceptionCheckpoint(Callback):
    """A checkpoint when training stops on an exception (Ctrl-C, SIGTERM, a crash or a divergence), saved as
    ``interrupted.ckpt`` in the run's own checkpoint folder (the first ``ModelCheckpoint``'s, else
    ``<log dir>/checkpoints``), and only once a step has been trained.

    A divergence is raised before the parameters change, so its checkpoint holds the last finite parameters (with an
    update applied as it is formed, some of them may have taken the step: the error names them). Resume
    with ``--ckpt_path <run>/checkpoints/interrupted.ckpt`` (``fg-cli`` also finds it as ``--ckpt_path last``).
    Lightning's own ``OnExceptionCheckpoint`` needs its folder before the run has one, and its presence makes every
    later ``fit`` silently resume from the newest checkpoint it can find; this one does neither.

    Example::

        Trainer(callbacks=[ModelCheckpoint(save_last=True, every_n_train_steps=50), ExceptionCheckpoint()])
    """

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | None = None, filename: str = "interrupted") -> None:
        if not filename:
            raise ValueError("ExceptionCheckpoint needs a filename, got filename=''")
        self.dirpath, self.filename = dirpath, filename
        self._trainer: Trainer | None = None

    @property
    def ckpt_path(self) -> str | None:
        """Where the checkpoint goes: asked late, since ModelCheckpoint fixes its own folder in its setup, which
        Lightning runs after this callback's (None while no run's folder is known)."""
        dirpath = self.dirpath
        if dirpath is None and self._trainer is not None:
            trainer = self._trainer
            dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
            dirpath = dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        return None if dirpath is None else os.path.join(dirpath, self.filename + self.FILE_EXTENSION)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.ckpt_path is not None and trainer.global_step > 0:  # nothing trained: nothing worth leaving behind
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)


class EstimatorSummary(ModelSummary):
    """Lightning's model summary, counting every parameter as trained: the engine keeps ``requires_grad=False`` (no
    autograd), so the stock summary reports "0 Trainable params" although the estimator updates all of them."""

    @override
    def summarize(self, summary_data: Any, total_parameters: int, trainable_parameters: int, *args: Any,
                  **kwargs: Any) -> None:
        super().summarize(summary_data, total_parameters, total_parameters, *args, **kwargs)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict``'s class probabilities of the predicted set, in order, with its labels, to
    ``<log dir>/predictions.pt``: ``{"probabilities": (N, C), "labels": (N,), "ckpt_path": ...}``. ``fg-cli`` adds
    it to every run; the predicted set is the datamodule's ``test_set`` (a ``TensorDataset``). One process only: the
    file holds the set in order."""

    def __init__(self, filename: str = "predictions.pt") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename

    @staticmethod
    def check(world_size: int) -> None:
        if world_size > 1:
            raise ValueError(f"predict writes the test set's probabilities in order to one file: run it on one "
                             f"device (--trainer.devices 1), not {world_size} processes")

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict":
            self.check(trainer.world_size)

    @override
    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        labels, folder = trainer.datamodule.test_set.tensors[1], trainer.log_dir or "."
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, self.filename)
        torch.save({"probabilities": torch.cat([batch.detach().cpu() for batch in predictions]), "labels": labels,
                    "ckpt_path": trainer.ckpt_path}, path)
        print(f"predictions of {len(labels)} test images written to {path}")

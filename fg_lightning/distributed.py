"""Data-parallel training on Lightning's DDP, the forward-gradient way.

Lightning's ``ddp`` wraps the module in ``torch.nn.parallel.DistributedDataParallel``, which all-reduces the
gradients autograd computes; the engine keeps its parameters at ``requires_grad=False`` and no autograd runs, so the
wrapper refuses the module. :class:`ForwardGradientDDPStrategy` (registered as ``fg_ddp``) is Lightning's DDP
strategy (process launch, process group, ranks, samplers, checkpoints on rank 0, multi-node, SLURM and torchrun
environments) without that wrapper: the estimator exchanges what its update needs through the
:class:`~fg_lightning.estimators.collective.TorchCollective` that the module passes to its ``estimate`` — K
directional derivatives and the loss for random directions, the layer inputs for input-generated directions, the
gradient for backprop, activity perturbation and guesses — and every rank takes the update one process would take
on the union of the ranks' batches.

    fg-cli fit --config configs/mlp_naive.yaml --trainer.devices 2 --trainer.strategy fg_ddp
    Trainer(strategy="fg_ddp", devices=2)  # or ForwardGradientDDPStrategy(...) for its DDPStrategy arguments
"""

from __future__ import annotations

import contextlib
import re
import signal
from datetime import timedelta
from typing import Any, Iterator, Literal

import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy, Strategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from typing_extensions import override

STRATEGY_NAMES = {"fg_ddp": "popen", "fg_ddp_spawn": "spawn", "fg_ddp_fork": "fork"}

# How long a collective waits for the other processes before the run ends. A training step's all-reduce waits for
# the slowest process's forward pass, seconds at most; five minutes leave room for a slow first step, a long
# validation on one rank or a checkpoint written to a slow disk, and end a run whose peer hangs long before
# Lightning's default of 30 minutes would.
DEFAULT_TIMEOUT = timedelta(minutes=5)


class PeerLostError(RuntimeError):
    """Another process of the run died, or did not answer a collective within the strategy's ``timeout``."""


class ForwardGradientDDPStrategy(DDPStrategy):
    """:class:`~lightning.pytorch.strategies.DDPStrategy` without ``DistributedDataParallel``: the parameters (and
    buffers) of rank 0 are broadcast once at setup, and the module's communicator keeps the ranks in step after
    that. Takes DDPStrategy's own arguments; the ones that configure the wrapper (``find_unused_parameters``,
    communication hooks, model averaging) have nothing to act on and are refused.

    ``timeout`` (default :data:`DEFAULT_TIMEOUT`, 5 minutes; DDPStrategy's is 30) bounds how long any collective
    waits for the other processes: gloo's all-reduce raises after it (NCCL's watchdog aborts the process instead;
    not tried here). When a peer dies (its connection closes at once) or hangs (the timeout runs out), the training
    step raises :class:`PeerLostError` naming this rank; from then on the strategy's barriers are skipped, so that
    ``ExceptionCheckpoint`` still writes ``interrupted.ckpt`` on rank 0 instead of waiting for the lost peer again
    (``Trainer.save_checkpoint`` ends with a barrier), and rank 0 kills the processes it launched (``fg-cli
    --trainer.devices N``) rather than leave a hung one holding its device; under torchrun its agent ends them.
    From fg-cli::

        --trainer.strategy fg_lightning.ForwardGradientDDPStrategy --trainer.strategy.timeout 0:01:00
    """

    def __init__(self, accelerator: Accelerator | None = None, parallel_devices: list | None = None,
                 cluster_environment: ClusterEnvironment | None = None, checkpoint_io: CheckpointIO | None = None,
                 precision_plugin: Precision | None = None, process_group_backend: str | None = None,
                 timeout: timedelta | None = DEFAULT_TIMEOUT,
                 start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen", **kwargs: Any) -> None:
        # Named arguments, not DDPStrategy's **kwargs, so that LightningCLI offers only these.
        if kwargs:
            raise ValueError(f"ForwardGradientDDPStrategy does not wrap the module in DistributedDataParallel, so "
                             f"{', '.join(sorted(kwargs))} would do nothing: leave them out")
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timeout, start_method=start_method)
        self.peer_lost = False

    @contextlib.contextmanager
    def _watching_peers(self) -> Iterator[None]:
        """Where the strategy's collectives run (the estimator's in the training step, the logged metrics' in
        validation, Lightning's barriers and broadcasts around checkpoints): a collective's failure becomes
        :class:`PeerLostError`."""
        try:
            yield
        except Exception as err:
            lost = self.as_peer_lost(err)
            if lost is None or lost is err:
                raise
            raise lost from err

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._watching_peers():
            return super().training_step(*args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._watching_peers():
            return super().validation_step(*args, **kwargs)

    @override
    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        with self._watching_peers():
            return super().reduce(*args, **kwargs)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.peer_lost:
            return obj
        with self._watching_peers():
            return super().broadcast(obj, src)

    def as_peer_lost(self, err: BaseException) -> PeerLostError | None:
        """`err` as a :class:`PeerLostError` if it is a collective's failure (None otherwise), and remember that the
        peers are gone. Gloo raises a plain RuntimeError whose message names its source file; NCCL a DistError."""
        message = str(err)
        if isinstance(err, PeerLostError):
            return err
        if not (isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo" in message)):
            return None
        self.peer_lost = True
        cause = re.sub(r"^\[[^\]]*\]\s*", "", message).split(". ")[0]  # gloo's source location and advice dropped
        what = (f"another process did not answer within {self._timeout} (it hangs or was stopped; "
                f"ForwardGradientDDPStrategy(timeout=...) sets the wait)" if "timed out" in message.lower()
                else "another process died")
        return PeerLostError(f"rank {self.global_rank} of {self.world_size}: {what} ({cause})")

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self.peer_lost:  # a barrier now would wait for the lost peer (or fail) again
            return
        with self._watching_peers():
            super().barrier(*args, **kwargs)

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        if self.peer_lost and isinstance(self.launcher, _SubprocessScriptLauncher):
            self.launcher.kill(signal.SIGKILL)  # a hung process this one started would hold its device forever

    @override
    def configure_ddp(self) -> None:
        # No DistributedDataParallel: the same starting point on every rank, then the module's communicator.
        assert self.model is not None
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def wraps_in_ddp(strategy: Strategy) -> bool:
    """Whether ``strategy`` is one of Lightning's own DDP strategies, which wrap the module in
    DistributedDataParallel."""
    return isinstance(strategy, DDPStrategy) and not isinstance(strategy, ForwardGradientDDPStrategy)


def check_strategy(strategy: Strategy) -> None:
    """Raise ``ValueError`` (one line) for a multi-process strategy other than :class:`ForwardGradientDDPStrategy`:
    Lightning's ``ddp`` family wraps the module in DistributedDataParallel, which refuses parameters that autograd
    does not train; FSDP and DeepSpeed shard them, which the estimators (one update from whole parameters) do not
    support."""
    if isinstance(strategy, ParallelStrategy) and not isinstance(strategy, ForwardGradientDDPStrategy) \
            and strategy.world_size > 1:
        name = type(strategy).__name__
        raise ValueError(f"strategy {name} cannot train the engine's networks across {strategy.world_size} processes"
                         f"{' (DistributedDataParallel needs autograd gradients)' if wraps_in_ddp(strategy) else ''}"
                         ": use --trainer.strategy fg_ddp (Trainer(strategy='fg_ddp')), which all-reduces what each "
                         "estimator needs")



def auto_strategy(accelerator: Any = "auto", devices: Any = "auto", num_nodes: int = 1) -> str:
    """What ``strategy="auto"`` means for training here: ``"fg_ddp"`` where Lightning's "auto" would pick one of its
    DDP strategies (several devices or nodes), which cannot train the engine, else ``"auto"``. Asks Lightning's own
    rule (its accelerator connector, which the Trainer builds from the same arguments)."""
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    chosen = _AcceleratorConnector(accelerator=accelerator, devices=devices, num_nodes=num_nodes).strategy
    return "fg_ddp" if wraps_in_ddp(chosen) else "auto"

for _name, _start_method in STRATEGY_NAMES.items():
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, ForwardGradientDDPStrategy, start_method=_start_method,
                                  description=f"fg_lightning's DDP (no DistributedDataParallel wrapper), start "
                                              f"method {_start_method!r}")

"""Data-parallel training on Lightning's DDP, the forward-gradient way.

Lightning's ``ddp`` wraps the module in ``torch.nn.parallel.DistributedDataParallel``, which all-reduces the
gradients autograd computes; the engine keeps its parameters at ``requires_grad=False`` and no autograd runs, so the
wrapper refuses the module. :class:`ForwardGradientDDPStrategy` (registered as ``fg_ddp``) is Lightning's DDP
strategy (process launch, process group, ranks, samplers, checkpoints on rank 0, multi-node, SLURM and torchrun
environments) without that wrapper: the estimator exchanges what its update needs through its
:class:`~fg_lightning.estimators.collective.TorchCollective` — K directional derivatives and the loss for random
directions, the layer inputs for input-generated directions, the gradient for backprop, activity perturbation and
guesses — and every rank takes the update one process would take on the union of the ranks' batches.

    fg-cli fit --config configs/mlp_naive.yaml --trainer.devices 2 --trainer.strategy fg_ddp
    Trainer(strategy="fg_ddp", devices=2)  # or ForwardGradientDDPStrategy(...) for its DDPStrategy arguments
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy, Strategy, StrategyRegistry
from typing_extensions import override

STRATEGY_NAMES = {"fg_ddp": "popen", "fg_ddp_spawn": "spawn", "fg_ddp_fork": "fork"}
WRAPPER_ARGUMENTS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period", "kwargs")


class ForwardGradientDDPStrategy(DDPStrategy):
    """:class:`~lightning.pytorch.strategies.DDPStrategy` without ``DistributedDataParallel``: the parameters (and
    buffers) of rank 0 are broadcast once at setup, and the estimator's collective keeps the ranks in step after
    that. Takes DDPStrategy's arguments (``process_group_backend``, ``timeout``, ``start_method``, …); the ones that
    configure the wrapper (``find_unused_parameters``, communication hooks, model averaging) have nothing to act on
    and are refused."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        own = set(inspect.signature(DDPStrategy).parameters) - set(WRAPPER_ARGUMENTS)
        wrapper_only = sorted(key for key in kwargs if key not in own)  # the rest of DDPStrategy's go to the wrapper
        if wrapper_only:
            raise ValueError(f"ForwardGradientDDPStrategy does not wrap the module in DistributedDataParallel, so "
                             f"{', '.join(wrapper_only)} would do nothing: leave them out")
        super().__init__(*args, **kwargs)

    @override
    def configure_ddp(self) -> None:
        # No DistributedDataParallel: the same starting point on every rank, then the estimator's collective.
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


for _name, _start_method in STRATEGY_NAMES.items():
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, ForwardGradientDDPStrategy, start_method=_start_method,
                                  description=f"fg_lightning's DDP (no DistributedDataParallel wrapper), start "
                                              f"method {_start_method!r}")

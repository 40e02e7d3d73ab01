"""The training step under ``torch.compile``: ``ForwardGradientModule(compile=True)``, ``fg-bench speed``'s compiled
engine cases. Eager (:func:`~fg_lightning.estimators.training_step`) stays the reference; ``tests/test_compile.py``
checks that both give the same parameters for every registered estimator that compiles."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

from fg_lightning.estimators.base import CompilableModel, Estimate, GradientEstimator, apply_estimate, finite
from fg_lightning.estimators.collective import Collective


def compile_refusal(estimator: GradientEstimator, network: torch.nn.Module) -> str | None:
    """Why ``estimator``'s step on ``network`` cannot be compiled, in one line naming it, or None when it can."""
    if not (isinstance(network, CompilableModel) and network.compilable):
        return (f"compile=True compiles the engine's hand-written step; {type(network).__name__} runs on the torch "
                "backend (torch.autograd.forward_ad), which it does not compile: use an engine MLP or CNN, or "
                "compile=False")
    why = estimator.compile_refusal()
    return None if why is None else f"{estimator!r} cannot run compiled (compile=True): {why}"


def finite_flag(estimate: Estimate) -> Tensor:
    """One 0-d bool: the loss and every part of the estimate are finite (computed in the compiled graph)."""
    parts = [estimate.loss.isfinite(), *(finite(grad) for grad in estimate.grads.values())]
    return torch.stack(parts).all()


class CompiledStep:
    """:func:`~fg_lightning.estimators.training_step` with the estimate under ``torch.compile``: every forward, JVP
    and VJP kernel of the engine, the estimate and its finite check, fused by the compiler; then
    :func:`~fg_lightning.estimators.apply_estimate`, the one place an estimate becomes an update.

    - **Mode.** On a GPU ``mode="reduce-overhead"``: inductor's kernels replayed as CUDA graphs, because at the batch
      sizes people train with the step is kernel launches (issue 17: 1–3 ms of launches per step on an H200). Where
      a graph cannot be captured (a CPU tensor in it, an input it mutates) inductor skips CUDA graphs for that graph
      alone and says why in its log, so no second mode is needed; ``max-autotune-no-cudagraphs`` would add minutes
      of autotuning to the first step for matmuls that cuBLAS already runs well. On the CPU the default mode (CUDA
      graphs do not exist there). ``dynamic=False``: one graph per batch shape (the last, shorter batch of an epoch
      compiles once more), which CUDA graphs need.
    - **Randomness.** ``torch.randn(..., generator=g)`` is a graph break in torch 2.14 (dynamo cannot put a
      ``torch.Generator`` in a graph): each draw runs eagerly from the estimator's own generator, between compiled
      pieces, so the directions, the generator's state and ``state_dict()`` / resume are exactly eager's. The pass is
      compiled in pieces between draws; ``nested_graph_breaks`` resumes each piece inside the function that drew
      (without it every draw would cut back to this step's frame and recompile it for every step number).
    - **Finite check.** The flag is computed in the graph (:func:`finite_flag`) and read once on the host, as
      eager's check reads its one flag; on a non-finite estimate the eager check runs to raise
      :class:`~fg_lightning.estimators.DivergenceError` with its message, before any parameter changes. The read is
      kept (no deferred check) because a torch optimizer's step cannot be taken back.
    - **Update.** The torch optimizer's step stays eager: it is already a few multi-tensor (foreach) kernels
      (``fused=True`` on a GPU makes it one), and compiled it would bake each learning rate into the graph (a
      recompilation at every scheduler change) and trace Lightning's optimizer wrapper.
    - **Outputs.** On a GPU the estimate's tensors live in the CUDA graphs' memory until the next step: a step's
      ``Estimate`` is good until the next step starts (callbacks use it within the step).
    - **One process.** A communicator of several processes is refused (the compiled graph would have to hold its
      collectives); the bytes a one-process step would send are still counted (``comm.bytes``).

    Estimators whose step cannot be compiled (:meth:`GradientEstimator.compile_refusal`) and the torch backend are
    refused as this is built, in one line (:func:`compile_refusal`). ``backend`` is ``torch.compile``'s (the tests use
    ``"aot_eager"``: the same graphs without inductor's code generation).
    """

    def __init__(self, estimator: GradientEstimator, network: torch.nn.Module, backend: str | Callable = "inductor",
                 mode: str | None = None) -> None:
        why = compile_refusal(estimator, network)
        if why is not None:
            raise ValueError(why)
        self.estimator, self.network, self.backend, self.mode = estimator, network, backend, mode
        self._compiled: dict[str, Callable] = {}  # device type -> the compiled estimate

    def _estimate(self, x: Tensor, labels: Tensor, step: int, comm: Collective) -> tuple[Estimate, Tensor]:
        estimate = self.estimator.estimate(self.network, x, labels, step, comm)
        return estimate, finite_flag(estimate)

    def compiled(self, device: torch.device) -> Callable:
        """The compiled estimate for ``device``'s type (``reduce-overhead`` on CUDA unless ``mode`` is given)."""
        if device.type not in self._compiled:
            mode = self.mode if self.mode is not None or device.type != "cuda" else "reduce-overhead"
            self._compiled[device.type] = torch.compile(self._estimate, backend=self.backend, mode=mode, dynamic=False)
        return self._compiled[device.type]

    def __call__(self, x: Tensor, labels: Tensor, step: int, optimizer: torch.optim.Optimizer, comm: Collective,
                 before_step: Callable[[], None] | None = None) -> Estimate:
        if comm.world_size > 1:
            raise ValueError(f"compile=True trains one process; {type(comm).__name__} has {comm.world_size}: "
                             "use compile=False with several processes")
        if labels.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten from here on
        scratch = Collective()  # a fresh counter: the graph would otherwise specialise on comm.bytes, step by step
        with _nested_graph_breaks():
            estimate, finite = self.compiled(labels.device)(x, labels, step, scratch)
        comm.bytes += scratch.bytes
        apply_estimate(estimate, self.network, optimizer, step, self.estimator, before_step, finite=finite)
        return estimate


def _nested_graph_breaks() -> contextlib.AbstractContextManager:
    """Dynamo resuming a graph break in the function where it happens (torch >= 2.10), where it exists."""
    if hasattr(torch._dynamo.config, "nested_graph_breaks"):
        return torch._dynamo.config.patch(nested_graph_breaks=True)
    return contextlib.nullcontext()

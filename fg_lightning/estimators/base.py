"""The estimator contract: one strategy object per gradient estimator.

An estimator turns one batch into an update direction. It only calls the engine (``network.jvp`` or
``network.loss_and_grad``), never ``torch.autograd``.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor

from fg_lightning.engine import JvpResult, ReplayedSource, TangentSource, weighted_sum
from fg_lightning.estimators.collective import ONE_PROCESS, Collective


@runtime_checkable
class ForwardModel(Protocol):
    """What every estimator may call on a network: the protocol both backends implement, so that every estimator is
    written once (the hand-written engine's :class:`~fg_lightning.engine.Network`: ``MLP``, ``CNN``; the torch
    backend's :class:`~fg_lightning.torch_network.TorchNetwork`: any ``torch.nn`` classifier).

    - ``named_parameters()`` / ``parameters()``: the trained parameters (one meaning in both backends: the ones an
      estimator's update covers), by full name; ``buffers()``: the state a forward may change (batch-norm
      statistics), which zeroth order puts back between its queries;
    - ``loss_and_grad(x, labels) -> (loss, logits, grads)``: the exact gradient, a tensor per parameter name;
    - ``jvp(x, labels, tangents, objective="loss", reduction="batch") -> JvpResult``: forward mode, the one
      primitive: the loss and its directional derivatives along a
      :class:`~fg_lightning.engine.tangents.TangentSource`'s tangents (``reduction="example"``: each example's
      term; ``objective="local"``: the local losses' too, the engine's networks with heads);
    - ``fully_connected(layer)``: whether input-generated directions (Section III-D) apply to a layer's weight;
    - ``network(x)``: the logits (zeroth order's queries); ``has_local_losses``, ``num_classes``,
      ``logits_loss(logits, labels)``.

    ``x`` is the batch's input, a tensor or (the torch backend) a mapping of tensors, :data:`Inputs`: an estimator
    takes the number of examples with :func:`batch_size`, never ``len(x)``.
    """

    has_local_losses: bool
    num_classes: int

    def __call__(self, x: Inputs) -> Tensor: ...

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def buffers(self) -> Iterator[Tensor]: ...

    def loss_and_grad(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]: ...

    def jvp(self, x: Tensor, labels: Tensor, tangents: TangentSource, objective: str = "loss",
            reduction: str = "batch") -> JvpResult: ...

    def fully_connected(self, layer: Any) -> bool: ...

    def logits_loss(self, logits: Tensor, labels: Tensor) -> Tensor: ...


@runtime_checkable
class ActivityModel(ForwardModel, Protocol):
    """What activity perturbation asks besides :class:`ForwardModel` (both backends have it): activity tangents in
    ``jvp``, and the one-layer weight step after the pass.

    - ``activity_norms(name)``: the per-example normalisations right after a layer, past which its activity is
      perturbed (their VJP takes the estimate back to the layer's output); ``activity_mask(name, site)``: where the
      loss's derivative at that point can be non-zero (a following ReLU on, a following max-pool's picks), or None;
      ``activity_past(name)``: the ReLUs and tiling max-pool after those normalisations past which the engine's pass
      may draw the tangent instead (none on the torch backend);
    - ``logit_layers()``: layers whose output is the logits of a loss (their gradient is exact);
    - ``layer_grads(name, layer, layer_input, d_output)``: one layer's parameter gradients from its own VJP;
    - ``logits_grad(logits, labels)``: ∂L/∂logits of the loss;
    - optionally ``primal_calls(x)``: the primal pass again, call by call (the engine's networks), so that
      :class:`~fg_lightning.estimators.ActivityPerturbation` recomputes each layer's input instead of keeping it;
      and ``activity_mask_in_site(name)``: whether the site, once the pass is over, holds its own mask (an in-place
      ReLU's output), so that a kept call need not keep the mask beside it.
    """

    def activity_norms(self, name: str) -> list: ...

    def activity_past(self, name: str) -> list: ...

    def activity_mask(self, name: str, site: Tensor) -> Tensor | None: ...

    def logit_layers(self) -> set[str]: ...

    def layer_grads(self, name: str, layer: Any, layer_input: Tensor, d_output: Tensor) -> dict[str, Tensor]: ...

    def logits_grad(self, logits: Tensor, labels: Tensor) -> Tensor: ...


@runtime_checkable
class LocalLossModel(ActivityModel, Protocol):
    """A network cut into blocks with a loss head each (Ren et al. 2023; the engine's ``MLP(local_losses=True)``,
    ``CNN(local_losses=True)``): a local tangent source stops at block boundaries in ``jvp``, and

    - ``local_loss_and_grad(x, labels) -> (loss, logits, grads, block losses)``: each block's local-loss gradient;
    - ``block_parameters()``: the full parameter names of each block, its head's included;
    - ``named_layers()``: the network's own layers (not its heads), in order;
    - ``output_groups(name) -> list[slice] | None``: with group-wise losses (``groups=G``), the slices of layer
      ``name``'s output channels that reach each replicated loss alone (``JvpResult.group_derivs`` holds each one's
      derivatives); None for a layer whose output is not split;
    - ``output_cells(name, shape) -> Tensor | None``: with patch-wise losses (``CNN(patches=P)``), the group and
      patch replica each element of layer ``name``'s output reaches alone (``JvpResult.patch_derivs``); asked only of
      a network whose pass gives patch derivatives.
    """

    def local_loss_and_grad(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], list[Tensor]]: ...

    def output_groups(self, name: str) -> list[slice] | None: ...

    def block_parameters(self) -> list[list[str]]: ...

    def named_layers(self) -> Iterator[tuple[str, Any]]: ...

    def output_cells(self, name: str, shape: Sequence[int]) -> Tensor | None: ...


# Optional capabilities: an estimator asks ``isinstance(network, <one of these>)``, never for a class.

@runtime_checkable
class RecomputableModel(Protocol):
    """A network that can run its primal pass again, call by call (the engine's networks), so that activity
    perturbation need not keep the layers' inputs (``ActivityPerturbation(recompute=True)``):

    - ``primal_calls(x)``: each parameterised layer's call, ``(name, layer, input, output)``, in the pass's order;
    - ``activity_mask_in_site(name)``: whether the perturbed point, once the pass is over, holds its own mask (an
      in-place ReLU's output, the next layer's input), so that no mask need be kept beside it.
    """

    def primal_calls(self, x: Tensor) -> Iterator[tuple[str, Any, Tensor, Tensor]]: ...

    def activity_mask_in_site(self, name: str) -> bool: ...


@runtime_checkable
class LayeredBlocksModel(LocalLossModel, Protocol):
    """A local-loss network whose blocks and heads are lists of the engine's layers, run by their own hand-written
    passes (per-example local guesses, :mod:`fg_lightning.estimators.per_example`):

    - ``blocks``: each block's layer names and its head's name (None for the last block, whose loss is the network's);
    - ``head_layers(head)``: a head's layers, ``(name, layer)``, in order.
    """

    blocks: list[tuple[list[str], str | None]]

    def head_layers(self, head: str) -> list[tuple[str, Any]]: ...


@runtime_checkable
class CompilableModel(Protocol):
    """A network whose training step runs under ``torch.compile`` (the engine's; the torch backend's
    ``forward_ad`` pass does not compile): ``compilable`` is True."""

    compilable: bool


@runtime_checkable
class WrapperModel(Protocol):
    """A network that wraps a ``torch.nn`` model (the torch backend's ``TorchNetwork``): ``module`` is that model,
    the one error messages name."""

    module: torch.nn.Module


Inputs = Union[Tensor, Mapping[str, Tensor]]
"""A batch's input: one tensor with the examples along dim 0, or a mapping of such tensors that the torch backend
passes to the model as keyword arguments (a Hugging Face batch: ``{"input_ids": (B, T), "attention_mask": (B, T)}``)."""


def batch_size(x: Inputs) -> int:
    """The number of examples in the input ``x``: ``len(x)`` for a tensor; for a mapping, the dim 0 that all its
    values share (``ValueError`` naming each key's size when they do not, or when it is empty)."""
    if not isinstance(x, Mapping):
        return len(x)
    sizes = {key: value.shape[0] if isinstance(value, Tensor) and value.dim() else None for key, value in x.items()}
    if not sizes:
        raise ValueError("the input is an empty mapping: a batch needs at least one tensor")
    if None in sizes.values() or len(set(sizes.values())) > 1:
        raise ValueError(f"the input's values must all be tensors with the examples along dim 0, but their batch "
                         f"sizes (dim 0) are {sizes}")
    return next(iter(sizes.values()))


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The global generators' state: the CPU's, and the device's on CUDA."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class Rewind:
    """Puts the global generators' state (:func:`rng_state`) and ``module``'s buffers back as they are now, to replay
    a pass as if the one before had not run: the same dropout masks, the same batch statistics. The torch backend
    replays each direction's pass from it, estimators that take several forward passes each query from it, and the
    callbacks that run a forward of their own put the run back with it."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module, self.device = module, torch.device(device)
        self.state = rng_state(self.device)
        self.buffers = [b.clone() for b in module.buffers()]

    def __call__(self) -> None:
        set_rng_state(self.state, self.device)
        for buffer, saved in zip(self.module.buffers(), self.buffers):
            buffer.copy_(saved)


@dataclass
class Estimate:
    """What an estimator returns for one step.

    ``grads`` maps every parameter name of the network to a tensor of that parameter's shape.
    ``exact`` is True when the step computed the exact gradient by backprop besides the estimate (the momentum
    estimator's checkpoint steps, Algorithm 1), so that time per step can be reported with and without those steps
    (Table I).
    """

    loss: Tensor
    logits: Tensor
    grads: typing.Mapping[str, Tensor]
    exact: bool = False


class ReplayedGrads(typing.Mapping[str, Tensor]):
    """An estimate kept as its direction weights and formed one parameter at a time, on each access: ``ĝ_p = Σ_j w_j
    v_j,p`` with ``v_j,p`` drawn again from its seed (:class:`ReplayedGaussianTangents`). Nothing parameter-sized is
    kept until a consumer (a torch optimizer's ``.grad``, clipping, the cosine callback) forms all of them, as an
    eager estimate; plain SGD never does (:class:`UpdateAsFormed`)."""

    def __init__(self, weights: Tensor, source: "ReplayedGaussianTangents", params: dict[str, Tensor]) -> None:
        self.weights, self.source, self.params = weights, source, params

    def __getitem__(self, name: str) -> Tensor:
        return weighted_sum(self.weights, self.source.draw(name, self.params[name]))

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or update; it stops instead of training through NaNs."""


def finite(tensor: Tensor) -> Tensor:
    """Whether ``tensor`` holds no nan or inf, as a 0-dim bool tensor (no device sync): whether its sum is finite, one
    read of the tensor (30× cheaper on the CPU than ``isfinite().all()``, which was a tenth of a small MLP's step). A
    sum that overflows (values near the dtype's largest) counts as not finite too: an update that large has diverged."""
    return tensor.sum().isfinite()


def weights_finite(weights: Tensor) -> dict[str, Tensor]:
    """The finite check of an estimate formed from Gaussian directions, ``ĝ = Σ_j w_j v_j``, by its direction weights:
    finite, and small enough that no draw (below 16 in magnitude: a chance under 1e-50 per draw to exceed it) times
    their sum overflows. ``{"direction weights": flag}`` (False for nan and inf too)."""
    return {"direction weights": weights.abs().sum() < torch.finfo(weights.dtype).max / 16}


def check_finite(estimate: Estimate, step: int, estimator: "GradientEstimator", lr: float) -> None:
    """Raise :class:`DivergenceError` if the loss or any part of the update is not finite (one device sync). A
    :class:`ReplayedGrads` estimate is checked by its weights (:func:`weights_finite`)."""
    grads = estimate.grads
    if isinstance(grads, ReplayedGrads):
        ok = weights_finite(grads.weights)
    else:
        ok = {name: finite(g) for name, g in grads.items()}
    _check(estimate.loss, ok, step, estimator, lr)


def _check(loss: Tensor | None, ok: dict[str, Tensor], step: int, estimator: "GradientEstimator", lr: float,
           applied: typing.Sequence[str] = ()) -> None:
    """Raise :class:`DivergenceError` unless ``loss`` (when given) and every flag of ``ok`` (a part of the update by
    name, True where finite) hold; ``applied``: the parts an update applied as formed had already applied."""
    fine = torch.stack(([loss.isfinite()] if loss is not None else []) + list(ok.values())).tolist()  # one sync
    if all(fine):
        return
    what = "loss" if loss is not None and not fine.pop(0) else "update"
    bad = [name for name, flag in zip(ok, fine) if not flag]
    shown = f"loss={float(loss):.4g}" if loss is not None else "loss not yet known"
    note = (f"; the update of {', '.join(applied)} was already applied as it was formed (plain SGD), the rest of the "
            "step was not" if applied else "")
    raise DivergenceError(
        f"training diverged at step {step}: non-finite {what} ({shown}"
        f"{', non-finite update of ' + ', '.join(bad) if bad else ''}) with estimator {estimator!r} "
        f"at learning rate {lr:g}{note}. Lower the learning rate or pick a lower-variance estimator."
    )


class AppliedGrads(typing.Mapping[str, Tensor]):
    """The estimate of a step whose update was applied part by part as the estimator formed it
    (:class:`UpdateAsFormed`) and not kept: its parameter names, no values. Reading a value raises, naming how to
    keep the estimate (``training_step(..., keep_estimate=True)``; the module does it on the steps a callback reads
    it, e.g. :class:`~fg_lightning.callbacks.GradientCosine`'s)."""

    def __init__(self, names: typing.Iterable[str]) -> None:
        self.names = list(names)

    def __getitem__(self, name: str) -> Tensor:
        raise RuntimeError(f"the estimate of {name!r} was applied as it was formed (plain SGD) and not kept: pass "
                           "keep_estimate=True to training_step to read it")

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class UpdateAsFormed:
    """Plain SGD applied to each part of an estimate as the estimator forms it: ``update(grads)`` with one part (a
    dict by parameter name of the union batch's gradient: the estimator has combined it across processes) checks it
    is finite (:class:`DivergenceError` before it is applied, naming the parts already applied) and steps ``p -=
    lr·ĝ_p``. An estimator whose ``estimate`` takes ``update`` then keeps no parameter-sized estimate (activity
    perturbation applies each layer's as soon as its block's loss is known, the random-direction estimators each
    parameter's as they form it from the pass's derivatives); :func:`training_step` gives it one under plain SGD with
    nothing that reads the estimate, and it returns :meth:`done`'s estimate."""

    def __init__(self, network: torch.nn.Module, lr: float, step: int, estimator: "GradientEstimator") -> None:
        self.params = dict(network.named_parameters())
        self.lr, self.step, self.estimator = lr, step, estimator
        self.applied: list[str] = []

    def check(self, ok: dict[str, Tensor]) -> None:
        """Raise :class:`DivergenceError` unless every flag of ``ok`` (a part of the update by name: True where it is
        finite) holds, one device sync: for an estimator that checks what its parts are formed from at once."""
        _check(None, ok, self.step, self.estimator, self.lr, self.applied)

    def __call__(self, grads: dict[str, Tensor], checked: bool = False) -> None:
        if not checked:
            self.check({name: finite(grad) for name, grad in grads.items()})
        with torch.no_grad():  # the torch backend's parameters require grad
            for name, grad in grads.items():
                self.params[name].add_(grad, alpha=-self.lr)
        self.applied.extend(grads)

    def done(self, loss: Tensor, logits: Tensor) -> Estimate:
        """The step's estimate once every part is applied: ``loss`` (the union batch's), checked finite;
        :class:`AppliedGrads` for its gradient."""
        missing = [name for name in self.params if name not in self.applied]
        if missing:
            raise RuntimeError(f"{self.estimator!r} applied no update to {', '.join(missing)} in its step")
        _check(loss, {}, self.step, self.estimator, self.lr, self.applied)
        return Estimate(loss, logits, AppliedGrads(self.params))


def apply_estimate(
    estimate: Estimate, network: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
    estimator: "GradientEstimator", before_step: Callable[[], None] | None = None, finite: Tensor | None = None,
) -> None:
    """Take one optimizer step along a whole ``estimate`` (the other way an estimate becomes an update is part by part,
    :class:`UpdateAsFormed`).

    Checks that the loss and every part of the estimate are finite (:class:`DivergenceError` otherwise, before any
    parameter changes), writes ``estimate.grads[name]`` as each parameter's ``.grad``, calls ``before_step`` (e.g.
    gradient clipping, which sees the estimate as ``.grad``), steps ``optimizer`` (any ``torch.optim.Optimizer``, or
    Lightning's wrapper of one) and clears the gradients again.

    A :class:`ReplayedGrads` estimate forms each ``.grad`` from its seed here: one parameter-sized copy of the
    estimate, as any optimizer that reads ``.grad`` needs (under plain SGD :func:`training_step` applies it as it is
    formed instead, :class:`UpdateAsFormed`).
    """
    if finite is None or not bool(finite):  # finite: the flag a compiled step computed in its graph, read once
        check_finite(estimate, step, estimator, optimizer.param_groups[0]["lr"])
    for name, param in network.named_parameters():
        param.grad = estimate.grads[name]
    if before_step is not None:
        before_step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@functools.cache
def _applies_as_formed(cls: type) -> bool:
    """Whether ``cls.estimate`` takes ``update``: an :class:`UpdateAsFormed` through which it applies each part of its
    update as it forms it, returning ``update.done(...)``'s estimate (a subclass that overrides ``estimate`` without
    it gets the whole-estimate path)."""
    return "update" in inspect.signature(cls.estimate).parameters


def _plain_sgd_lr(optimizer: Any) -> float | None:
    """The learning rate if ``optimizer`` (or the one Lightning wraps) is plain SGD, whose step is ``p -= lr·g``: one
    group, no momentum, weight decay, nesterov or maximize. None otherwise."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    plain = not (group["momentum"] or group["weight_decay"] or group["nesterov"] or group["maximize"])
    return float(group["lr"]) if plain else None


def training_step(
    estimator: "GradientEstimator", network: ForwardModel, x: Tensor, labels: Tensor, step: int,
    optimizer: torch.optim.Optimizer, comm: Collective, before_step: Callable[[], None] | None = None,
    keep_estimate: bool = False,
) -> Estimate:
    """The one training step: ``estimator``'s estimate for this batch at optimizer step ``step``, combined across the
    processes of ``comm`` (a :class:`~fg_lightning.estimators.collective.Collective`; required: the caller that
    trains knows which processes take part), then :func:`apply_estimate`. :class:`~fg_lightning.ForwardGradientModule`,
    ``fg-bench`` and the tests all train through it.

    Under plain SGD with no ``before_step``, an estimator whose ``estimate`` takes ``update`` applies each part of its
    update as it forms it (:class:`UpdateAsFormed`, inside ``optimizer.step``'s closure, so that Lightning counts the
    step), and the returned estimate's ``grads`` is an :class:`AppliedGrads` with no values: pass
    ``keep_estimate=True`` on a step whose estimate is read (the same parameters either way)."""
    formed = not keep_estimate and before_step is None and _applies_as_formed(type(estimator))
    lr = _plain_sgd_lr(optimizer) if formed else None
    if lr is None:
        estimate = estimator.estimate(network, x, labels, step, comm)
        apply_estimate(estimate, network, optimizer, step, estimator, before_step)
        return estimate
    update, estimates = UpdateAsFormed(network, lr, step, estimator), []
    optimizer.step(lambda: estimates.append(estimator.estimate(network, x, labels, step, comm, update=update)))
    return estimates[0]


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")
    return value


DISTRIBUTIONS = ("rademacher", "gaussian")
_SIGNS: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # row b: the signs ±1 of byte b's 8 bits


def check_distribution(distribution: Any) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got distribution={distribution!r}")
    return distribution


def draw_(target: Tensor, distribution: str, generator: torch.Generator) -> Tensor:
    """``target`` filled in place with independent draws from ``generator``: standard normal (``"gaussian"``), or
    Rademacher signs ±1 with probability 1/2 each (mean 0, variance 1, as the normal's): 64 signs from each 64-bit
    draw, each byte's 8 bits read through a table of 256 rows of signs, about a tenth of ``normal_``'s time on the CPU
    (10M float32 on one thread: 4.3 ms against 55 ms). The same ``generator`` state gives the same numbers."""
    if distribution == "gaussian":
        return target.normal_(generator=generator)
    key = (target.device, target.dtype)
    if key not in _SIGNS:
        bits = torch.arange(256, device=target.device)[:, None] >> torch.arange(8, device=target.device) & 1
        _SIGNS[key] = (1 - 2 * bits).to(target.dtype)
    signs, count = _SIGNS[key], -(-target.numel() // 8)  # bytes needed
    words = torch.empty(-(-count // 8), dtype=torch.int64, device=target.device)
    index = words.random_(-(2**63), 2**63 - 1, generator=generator).view(torch.uint8)[:count].int()
    if target.numel() % 8 == 0 and target.is_contiguous():
        return torch.index_select(signs, 0, index, out=target.view(-1, 8)).view(target.shape)
    return target.copy_(signs.index_select(0, index).view(-1)[:target.numel()].view(target.shape))


class GradientEstimator:
    """Base class. Subclasses set ``unbiased`` (on the instance where it depends on an argument) and implement
    :meth:`estimate`.

    Randomness comes from the estimator's own ``torch.Generator`` (seeded with ``seed``, on the parameters'
    device), never from the global RNG, so the same seed gives the same directions whatever else draws numbers.
    ``state_dict()`` holds everything needed to continue bit-for-bit after a resume.

    Data parallel: :meth:`estimate`'s ``comm`` (a :class:`~fg_lightning.estimators.collective.Collective`; one
    process when not given, a ``TorchCollective`` under :class:`~fg_lightning.distributed.ForwardGradientDDPStrategy`)
    combines what each rank computed, so that every rank takes the update of one process on the union batch. Each
    estimator calls it where its update needs it: the K directional derivatives and the loss (random directions, the
    same on every rank; ``comm.mean_derivatives``), the layer inputs (input-generated directions) or the gradient
    (backprop, activity perturbation, guesses; ``comm.mean_gradient``). The contract test runs every registered
    estimator on two ranks in two threads (``ThreadCollective``) against one process on the union batch.
    """

    unbiased: bool = False  # a class default; an estimator whose arguments decide it sets it on the instance
    needs_local_losses: ClassVar[bool] = False  # trains a network cut into blocks with a loss head each
    requires: ClassVar[type] = ForwardModel  # the capability (a protocol) it asks of a network

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got seed={seed!r}")
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_state: dict[str, Any] | None = None

    # -- the strategy ------------------------------------------------------------------------------------------
    def estimate(self, network: ForwardModel, x: Tensor, labels: Tensor, step: int,
                 comm: Collective = ONE_PROCESS) -> Estimate:
        """The update direction for this batch at optimizer step ``step`` (0-based), with what it needs from the other
        processes combined through ``comm`` (one process when not given)."""
        raise NotImplementedError

    def compile_refusal(self) -> str | None:
        """Why this estimator's step cannot run under ``torch.compile`` (``ForwardGradientModule(compile=True)``, see
        :mod:`fg_lightning.estimators.compiled`), or None when it can. An estimator whose step is decided by Python on
        the step number (a new graph at every step) says so here; the compile test checks every other one."""
        return None

    def validate(self, network: ForwardModel) -> None:
        """Raise ``ValueError`` if this estimator cannot run on ``network`` (called before training starts): a
        network without the capability the estimator asks for (``requires``: a protocol), or with local-loss heads
        it would leave untrained. Subclasses that add checks call ``super().validate(network)``."""
        name = type(self).__name__
        model = type(network.module if isinstance(network, WrapperModel) else network).__name__
        if self.needs_local_losses and not isinstance(network, LocalLossModel):
            raise ValueError(f"{name} trains each block on its local loss: it needs a LocalLossModel "
                             f"({', '.join(_members(LocalLossModel, ActivityModel))}), which the engine's "
                             f"MLP(local_losses=True) / CNN(local_losses=True) are; {model} has no local-loss heads")
        if not isinstance(network, self.requires):
            lacks = [m for m in _members(self.requires) if not hasattr(network, m)]
            raise ValueError(f"{name} needs a {self.requires.__name__}; {model} lacks {', '.join(lacks)}")
        if network.has_local_losses != self.needs_local_losses:
            if self.needs_local_losses:
                raise ValueError(f"{type(self).__name__} trains each block on its local loss and needs a network with "
                                 "local-loss heads: MLP(local_losses=True) or CNN(local_losses=True)")
            raise ValueError(f"{type(self).__name__} trains the network's own loss and would leave the local-loss heads "
                             "untrained: use a network without them (local_losses=False) or a local estimator")

    def exact_gradient(self, network: ForwardModel, x: Tensor, labels: Tensor,
                       comm: Collective = ONE_PROCESS) -> dict[str, Tensor]:
        """The gradient this estimator estimates, by backprop: the reference of its cosine and of its bias. The
        network loss's gradient, or each block's local-loss gradient for an estimator that ``needs_local_losses``;
        over the union batch of ``comm``'s processes."""
        if self.needs_local_losses:
            loss, _, grads, _ = network.local_loss_and_grad(x, labels)
        else:
            loss, _, grads = network.loss_and_grad(x, labels)
        return comm.mean_gradient(batch_size(x), loss, grads)[1]

    # -- randomness ----------------------------------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if self._generator is None or self._generator.device.type != device.type:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            if self._pending_state is not None:
                saved_on = self._pending_state["device"]
                if saved_on != device.type:
                    raise ValueError(
                        f"{type(self).__name__} state was saved with a {saved_on} generator and cannot continue "
                        f"bit-for-bit on {device.type}; resume on {saved_on}"
                    )
                generator.set_state(self._pending_state["generator"])
                self._pending_state = None
            self._generator = generator
        return self._generator

    def randn(self, *shape: int, like: Tensor) -> Tensor:
        """Standard normal draws of ``shape`` on ``like``'s device and dtype, from this estimator's generator."""
        return torch.randn(shape, generator=self.generator(like.device), device=like.device, dtype=like.dtype)

    # -- resume --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._generator is not None:
            rng = {"device": self._generator.device.type, "generator": self._generator.get_state()}
        else:
            rng = self._pending_state
        return {"seed": self.seed, "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self._generator = None
        self._pending_state = state["rng"]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "unbiased")
        return f"{type(self).__name__}({args})"


def _members(protocol: type, *without: type) -> list[str]:
    """The members a protocol declares beyond those of ``without`` (and of ``Protocol`` itself)."""
    declared = set(getattr(protocol, "__protocol_attrs__", None) or typing._get_protocol_attrs(protocol))  # type: ignore[attr-defined]
    for other in without:
        declared -= set(getattr(other, "__protocol_attrs__", None) or typing._get_protocol_attrs(other))  # type: ignore[attr-defined]
    return sorted(declared)


class GaussianTangents(TangentSource):
    """``k`` independent standard normal directions over every trained parameter, drawn from ``estimator``'s
    generator as the pass reaches each layer."""

    def __init__(self, estimator: GradientEstimator, k: int) -> None:
        self.estimator, self.k = estimator, k

    def weights(self, name: str, layer: Any, layer_input: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
        return {param: self.estimator.randn(self.k, *p.shape, like=p) for param, p in params.items()}


class ReplayedGaussianTangents(ReplayedSource):
    """:class:`GaussianTangents`' directions, the very same numbers, drawn again instead of kept (the seed replay of
    MeZO, Malladi et al. 2023, with the estimator's own generator): as the pass reaches a parameter its ``(k,
    *shape)`` directions are drawn from the estimator's generator after its state is recorded, and drawn again from
    that state whenever asked (:meth:`draw`). The engine's pass holds one layer's tangents at a time and the estimate
    is formed by drawing each parameter's again. The estimator's generator advances as the stored path's does, so
    the same seed gives the same estimates, resume and data-parallel draws as ``tangents="stored"``."""

    def __init__(self, estimator: GradientEstimator, k: int) -> None:
        self.estimator, self.k = estimator, k
        self.states: dict[str, Tensor] = {}  # full parameter name -> the generator's state before its draw

    def draw(self, name: str, param: Tensor) -> Tensor:
        """Parameter ``name``'s ``(k, *param.shape)`` directions, drawn again: the same at every call."""
        generator = torch.Generator(device=param.device)
        generator.set_state(self.states[name])
        return torch.randn((self.k, *param.shape), generator=generator, device=param.device, dtype=param.dtype)

    def weights(self, name: str, layer: Any, layer_input: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
        tangents = {}
        for param, p in params.items():
            full = f"{name}.{param}" if name else param
            if full in self.states:  # asked again (a later chunk of directions, a later pass)
                tangents[param] = self.draw(full, p)
            else:
                self.states[full] = self.estimator.generator(p.device).get_state()
                tangents[param] = self.estimator.randn(self.k, *p.shape, like=p)
        return tangents


def parameter_layout(network: ForwardModel) -> Iterator[tuple[str, torch.Size, int]]:
    """``(name, shape, offset)`` of every parameter in the flattened parameter vector, in ``named_parameters`` order."""
    offset = 0
    for name, param in network.named_parameters():
        yield name, param.shape, offset
        offset += param.numel()


def num_parameters(network: ForwardModel) -> int:
    return sum(p.numel() for p in network.parameters())


def cosine(estimate: dict[str, Tensor], exact: dict[str, Tensor]) -> float:
    """Cosine between two gradients given per parameter name, over the names of ``exact`` (one device sync)."""
    dot = sum((estimate[name] * grad).sum() for name, grad in exact.items())
    sq_estimate = sum(estimate[name].square().sum() for name in exact)
    sq_exact = sum(grad.square().sum() for grad in exact.values())
    norm = float((sq_estimate * sq_exact).sqrt())
    return float(dot) / norm if norm > 0 else 0.0


def forward_gradient(result: JvpResult, dir_weights: Tensor | None = None) -> dict[str, Tensor]:
    """``ĝ = Σ_k w_k (∇f·v_k) v_k`` per parameter (Eq. 2; with ``w_k = 1/K``, the mean of Eq. 7)."""
    weights = result.dir_derivs if dir_weights is None else result.dir_derivs * dir_weights
    return {name: weighted_sum(weights, tangent) for name, tangent in result.tangents.items()}

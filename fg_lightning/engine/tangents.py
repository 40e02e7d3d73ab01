"""Tangent representations for forward-mode passes.

A tangent carries a leading direction axis K. Most tangents are dense tensors of shape ``(K, *param.shape)``.
A fully connected weight may instead carry a rank-one tangent per direction (Section III-D: ``n xᵀ``), which
:class:`OuterTangent` stores as its two factors, so that the layer's tangent product costs a matrix-vector
product instead of a matrix-matrix product and nothing of the weight's size is materialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor


@dataclass(frozen=True)
class OuterTangent:
    """K rank-one tangents of a ``(out, in)`` weight: ``tangent[k] = out_factor[k] ⊗ in_factor[k]``.

    ``out_factor``: ``(K, out)``; ``in_factor``: ``(K, in)``.
    """

    out_factor: Tensor
    in_factor: Tensor

    def __post_init__(self) -> None:
        if self.out_factor.dim() != 2 or self.in_factor.dim() != 2 or len(self.out_factor) != len(self.in_factor):
            raise ValueError(
                "OuterTangent expects out_factor (K, out) and in_factor (K, in), got "
                f"{tuple(self.out_factor.shape)} and {tuple(self.in_factor.shape)}"
            )

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_factor.shape[0], self.out_factor.shape[1], self.in_factor.shape[1]))

    def dense(self) -> Tensor:
        """The ``(K, out, in)`` tensor this stands for."""
        return self.out_factor.unsqueeze(2) * self.in_factor.unsqueeze(1)


Tangent = Union[Tensor, OuterTangent]


def full_name(layer: str, param: str) -> str:
    """A parameter's key in ``named_parameters()`` from its layer's name and its own (a parameter of the root module,
    whose name is ``""``, is keyed by its own name)."""
    return f"{layer}.{param}" if layer else param


def weighted_sum(weights: Tensor, tangent: Tangent) -> Tensor:
    """``Σ_k weights[k] · tangent[k]``, of the parameter's shape, without densifying an :class:`OuterTangent`.

    This is how every forward-gradient estimate is formed: ``ĝ = Σ_k (∇f·v_k) v_k`` (Eq. 2, averaged in Eq. 7).
    """
    if isinstance(tangent, OuterTangent):
        # Σ_k w_k a_k b_kᵀ = (a ⊙ w)ᵀ b, one (out, K) @ (K, in) matmul.
        return (tangent.out_factor * weights.to(tangent.out_factor.dtype).unsqueeze(1)).t() @ tangent.in_factor
    # the parameter's dtype (a float32 layer in a float64 model has float64 derivatives)
    return torch.tensordot(weights.to(tangent.dtype), tangent, dims=1)


def directions(tangent: Tangent, start: int, stop: int) -> Tangent:
    """Directions ``start:stop`` of a tangent (a view; an :class:`OuterTangent` stays factored)."""
    if isinstance(tangent, OuterTangent):
        return OuterTangent(tangent.out_factor[start:stop], tangent.in_factor[start:stop])
    return tangent[start:stop]


class TangentSource:
    """What a forward-mode pass (``Network.jvp``, ``TorchNetwork.jvp``: the one primitive both backends implement)
    asks as it reaches each layer that owns parameters. A source is a small object with explicit state; estimators
    compose it instead of passing flags, and what it can do beyond weight tangents is its type:
    :class:`ReplayedSource` (the same tangents whenever asked again) and :class:`ActivitySource` (tangents on the
    layers' outputs).

    - :meth:`weights` is asked once per such layer, with the layer's input (so a direction may depend on it, Section
      III-D) and its own trained parameters by name (``params``: the ones ``network.named_parameters()`` lists, the
      same meaning in both backends), for their tangents, each ``(K, *param.shape)`` or an :class:`OuterTangent`; a
      parameter left out has a zero tangent.
    - :meth:`block_done` (a pass of the local losses): a block's derivatives, as soon as they are known.

    What the pass differentiates (the network's loss or its local losses) and how it reduces over the batch are
    asked of the pass (``jvp(..., objective=, reduction=)``, :func:`check_objective`), not of the source.
    """

    def weights(self, name: str, layer: Any, layer_input: Tensor, params: Mapping[str, Tensor]) -> Mapping[str, Tangent]:
        return {}

    def block_done(self, index: int, derivs: Tensor, group_derivs: Tensor,
                   patch_derivs: Optional[Tensor] = None) -> None:
        """Called by the engine's pass of the local losses (``objective="local"``) as soon as block ``index``'s
        local-loss derivatives are known (``(K, ...)``, and its groups' ``(K, ..., G)``; its groups and patches' ``(K,
        ..., G, P²)``, passed only where its head has patches), when one pass carries every direction: the block's
        update can be formed now and what it keeps released (activity perturbation's weight steps). It may run the
        layers' own VJPs (``layer_grads``), not a pass of the network. The result carries the same derivatives."""


class ReplayedSource(TangentSource):
    """A source that gives the same tangents whenever it is asked again for a layer (drawn again from a recorded
    generator state, as MeZO's seed replay): the engine's pass then keeps none of them (one layer's tangents alive
    at a time, asked again in a later chunk of directions), its result carries no ``tangents``, and the estimator
    asks again to form its estimate. (The torch backend, one pass per direction, asks again at every call of a layer
    and keeps that direction's tangents for that call alone: flat in K.)"""


class ActivitySource(TangentSource):
    """A source that also perturbs the layers' outputs (activity perturbation, Ren et al. 2023).

    - :meth:`activity` is asked after each call of a layer that owns parameters, for a ``(K, *output.shape)`` tangent
      added to that call's output tangent, or ``None``. The pass owns what it returns (it may change it in place): a
      source that needs its tangent later keeps a copy or draws it again. It may keep references (the input, the
      output) for the estimator's step after the pass; it must not call back into the network while the pass runs.
      ``output`` may be changed in place by the next layer (an in-place ReLU).
    - The engine's pass asks it :meth:`activity_site` layers after the layer (the torch backend: at the layer's
      output): a layer followed by per-example normalisations (``network.activity_norms(name)``) is asked after them,
      its own output then coming as ``layer_output`` (and, where no tangent went through the normalisations, their
      primal states as ``norm_states``, what their VJPs need); asked past the layers after those
      (``network.activity_past``), the normalisations' output comes as ``site``, the last of those layers' primal
      state as ``saved``. ``output`` is where the tangent is added.
    - :meth:`add_activity`: where the output already has a tangent and one engine pass carries every direction, the
      pass asks for that tangent with the source's own added, in place: a source that can draw into it (the activity
      noise) overrides it, so that no whole activity tangent lies beside the output's.
    """

    def activity(self, name: str, layer: Any, layer_input: Tensor, output: Tensor) -> Optional[Tensor]:
        return None

    def activity_site(self, name: str) -> int:
        """How many layers after layer ``name`` the engine's pass asks for its activity tangent (0: at its output)."""
        return 0

    def add_activity(self, name: str, layer: Any, layer_input: Tensor, output: Tensor, tangent: Tensor,
                     **extra: Any) -> Tensor:
        """``tangent`` (the output's, ``(K, *output.shape)``) with this source's activity tangent added, in place."""
        mine = self.activity(name, layer, layer_input, output, **extra)
        if mine is None:
            return tangent
        if mine.shape != tangent.shape:
            raise ValueError(f"activity tangent of {name!r} has shape {tuple(mine.shape)}, expected "
                             f"{tuple(tangent.shape)}")
        return tangent.add_(mine)


class StreamedTangent:
    """K activity tangents ``(K, *shape)`` that are never whole in memory, drawn a chunk at a time where they are used.
    A local loss's head needs of the tangent on its input only its products with the loss's derivative there summed
    over each of the head's cells (:meth:`cell_dots`); where the tangent goes on through layers, :meth:`dense` draws
    it whole. One of the two is asked, once."""

    num_dirs: int

    def cell_dots(self, weights: Tensor, cell_sums: Callable[[Tensor], Tensor]) -> Tensor:
        """``cell_sums(tangent * weights)``, ``(K, B, cells)``: ``weights`` ``(B, *shape[1:])`` (the pass's, which the
        tangent may change in place), ``cell_sums`` mapping any ``(K', b, *shape[1:])`` to ``(K', b, cells)``."""
        raise NotImplementedError

    def dense(self) -> Tensor:
        """The ``(K, *shape)`` tensor this stands for, a new one the pass owns."""
        raise NotImplementedError


class StreamedSource(ActivitySource):
    """An activity source whose tangents can stay undrawn until used (:class:`StreamedTangent`). Where a layer's
    activity tangent is all the tangent its block's head sees (the block's last parameterised layer, no tangent yet
    in the block, only elementwise layers (``Layer.elementwise``) between its site and the head), the engine's pass of
    the local losses asks :meth:`stream_activity` instead of :meth:`activity`, and no ``(K, B, ...)`` tangent exists
    in that block: memory and time of the tangent's elementwise work go, the head's cell sums are formed a cache-sized
    chunk at a time."""

    def stream_activity(self, name: str, layer: Any, layer_input: Tensor, output: Tensor,
                        **extra: Any) -> Optional[StreamedTangent]:
        """What :meth:`activity` gives, as a :class:`StreamedTangent` (asked with the same arguments), or ``None``."""
        raise NotImplementedError


OBJECTIVES = ("loss", "local")  # what a forward-mode pass differentiates: the network's loss, its local losses
REDUCTIONS = ("batch", "example")  # its derivatives: of the batch's mean loss (K,), or each example's term (K, B)


def check_objective(objective: str, reduction: str) -> None:
    """A forward-mode pass's ``objective`` and ``reduction``, refused in one line naming the bad value."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be 'loss' or 'local', got objective={objective!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'batch' or 'example', got reduction={reduction!r}")


class WeightTangents(TangentSource):
    """A source from a function ``tangent_fn(name, layer, layer_input) -> {param: tangent}``."""

    def __init__(self, tangent_fn: Callable[[str, Any, Tensor], Mapping[str, Tangent]]) -> None:
        self.tangent_fn = tangent_fn

    def weights(self, name: str, layer: Any, layer_input: Tensor, params: Mapping[str, Tensor]) -> Mapping[str, Tangent]:
        return self.tangent_fn(name, layer, layer_input)


class GivenTangents(TangentSource):
    """Tangents given up front by full parameter name (``"fc1.weight"``: views of one flat direction, say)."""

    def __init__(self, by_name: Mapping[str, Tangent]) -> None:
        self.by_name = by_name

    def weights(self, name: str, layer: Any, layer_input: Tensor, params: Mapping[str, Tensor]) -> Mapping[str, Tangent]:
        full = {param: full_name(name, param) for param in params}
        return {param: self.by_name[key] for param, key in full.items() if key in self.by_name}


def as_source(tangents: "TangentSource | Callable[..., Mapping[str, Tangent]]") -> TangentSource:
    """A :class:`TangentSource` as it is, a ``tangent_fn`` wrapped in :class:`WeightTangents`."""
    return tangents if isinstance(tangents, TangentSource) else WeightTangents(tangents)

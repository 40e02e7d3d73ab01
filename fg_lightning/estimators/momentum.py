"""The momentum forward-mode method (Section III-E, Algorithm 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fg_lightning.engine import GivenTangents
from fg_lightning.estimators.base import (
    Estimate, ForwardModel, GradientEstimator, batch_size, check_positive_int, parameter_layout,
)
from fg_lightning.estimators.collective import ONE_PROCESS, Collective


class MomentumForwardGradient(GradientEstimator):
    r"""Directions ranked like the gradient of the last backprop checkpoint, blended with fresh noise (Algorithm 1).

    At optimizer step ``t``:

    1. if ``t mod fix_gap = 0``: run backprop and store the parameter indices sorted by gradient value (a
       *checkpoint*; ``Estimate.exact`` is True);
    2. the decay rate is squared every ``decrease_gap`` steps (not at step 0):
       :math:`d_t = d_0^{\,2^{\lfloor t / \text{decrease\_gap} \rfloor}}` — derived from ``t``, so nothing drifts;
    3. :math:`v_1 \sim \mathcal N(0, I)`; shuffle the stored index list within consecutive segments whose length is
       ``shuffle_ratio`` × its length; give the ``j``-th smallest value of :math:`v_1` to the parameter at position
       ``j`` of the shuffled list (so :math:`v_1` is ranked like the gradient, up to the shuffle);
    4. :math:`v_2 \sim \mathcal N(0, I)`; :math:`\gamma = d_t^{\,t \bmod \text{fix\_gap}}`;
       :math:`\hat v = \gamma v_1 + (1-\gamma) v_2`;
    5. :math:`\hat g = (\nabla f\cdot\hat v)\,\hat v`. At a checkpoint the exact gradient is at hand, so
       :math:`\nabla f\cdot\hat v` is a dot product and no forward-mode pass runs.

    ``ranking="global"`` ranks all parameters of the model together, as the paper does; ``"per_tensor"`` ranks
    within each parameter tensor. Not unbiased. With ``decay_rate=1, shuffle_ratio=0`` the direction is the
    gradient's ranking exactly (the paper's Fig. 11 and 12, middle).
    """

    unbiased = False

    def __init__(
        self,
        fix_gap: int = 10,
        decrease_gap: int = 10,
        decay_rate: float = 0.9,
        shuffle_ratio: float = 0.5,
        ranking: str = "global",
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        self.fix_gap = check_positive_int("fix_gap", fix_gap)
        self.decrease_gap = check_positive_int("decrease_gap", decrease_gap)
        if not 0.0 < decay_rate <= 1.0:
            raise ValueError(f"decay_rate must lie in (0, 1], got decay_rate={decay_rate!r}")
        if not 0.0 <= shuffle_ratio <= 1.0:
            raise ValueError(f"shuffle_ratio must lie in [0, 1], got shuffle_ratio={shuffle_ratio!r}")
        if ranking not in ("global", "per_tensor"):
            raise ValueError(f"ranking must be 'global' or 'per_tensor', got ranking={ranking!r}")
        self.decay_rate, self.shuffle_ratio, self.ranking = float(decay_rate), float(shuffle_ratio), ranking
        self._sorted_index: Tensor | None = None  # (n,) flat parameter indices in gradient order, per group

    def compile_refusal(self) -> str | None:
        return ("its step is decided in Python by the step number (backprop every fix_gap steps, the blend "
                "γ = d_t^(t mod fix_gap)), so torch.compile would compile it again at every step")

    def decay_at(self, step: int) -> float:
        """The decay rate in force at ``step``: ``decay_rate`` squared once per ``decrease_gap`` steps."""
        squarings = min(step // self.decrease_gap, 1023)  # d^(2^1023) underflows to 0 for any d < 1
        return self.decay_rate ** (2.0**squarings)

    def _groups(self, network: ForwardModel) -> list[tuple[int, int]]:
        """``(offset, size)`` of each ranking group in the flattened parameter vector."""
        layout = [(offset, shape.numel()) for _, shape, offset in parameter_layout(network)]
        if self.ranking == "global":
            return [(0, sum(size for _, size in layout))]
        return layout

    def _rank(self, flat_grad: Tensor, groups: list[tuple[int, int]]) -> Tensor:
        return torch.cat([flat_grad[o : o + s].argsort() + o for o, s in groups])

    def _sorted_normals(self, size: int, like: Tensor) -> Tensor:
        """``size`` standard normal draws in ascending order, without a sort: the order statistics of ``size``
        uniforms are the normalised partial sums of ``size + 1`` exponentials (Rényi), mapped through the normal
        quantile function. (A sort of 1.9M values costs ~190 ms on two CPU cores; this ~50 ms.)"""
        generator = self.generator(like.device)
        spacings = torch.empty(size + 1, device=like.device, dtype=torch.float64).exponential_(generator=generator)
        sums = spacings.cumsum_(0)
        return torch.special.ndtri(sums[:-1] / sums[-1]).to(like.dtype)

    def _segment_permutation(self, size: int, segment: int, device: torch.device) -> Tensor:
        """A permutation of ``range(size)`` that shuffles within consecutive segments of length ``segment`` only."""
        generator = self.generator(device)
        starts = range(0, size, segment)
        if len(starts) <= 64:  # few segments: one O(L) randperm each
            return torch.cat([torch.randperm(min(segment, size - s), generator=generator, device=device) + s
                              for s in starts])
        keys = (torch.arange(size, device=device) // segment).to(torch.float64)  # many short segments: one sort
        keys += torch.rand(size, generator=generator, device=device, dtype=torch.float64)
        return keys.argsort()

    def _ranked_noise(self, like: Tensor, groups: list[tuple[int, int]]) -> Tensor:
        """:math:`v_1`: sorted normal draws placed in the (segment-shuffled) order of the stored ranking."""
        assert self._sorted_index is not None
        placed = torch.empty(len(self._sorted_index), device=like.device, dtype=like.dtype)
        for offset, size in groups:
            order = self._sorted_index[offset : offset + size]
            segment = max(1, round(self.shuffle_ratio * size))
            if segment > 1:
                order = order[self._segment_permutation(size, segment, like.device)]
            placed[order] = self._sorted_normals(size, like)
        return placed

    def estimate(self, network: ForwardModel, x: Tensor, labels: Tensor, step: int,
                 comm: Collective = ONE_PROCESS) -> Estimate:
        layout = list(parameter_layout(network))
        groups = self._groups(network)
        first = next(network.parameters())
        checkpoint = step % self.fix_gap == 0 or self._sorted_index is None
        if checkpoint:  # data parallel: the gradient all-reduced, so that every rank ranks it the same
            loss, logits, grads = network.loss_and_grad(x, labels)
            loss, grads = comm.mean_gradient(batch_size(x), loss, grads)
            exact = torch.cat([grads[name].flatten() for name, _, _ in layout])
            self._sorted_index = self._rank(exact, groups)
        gamma = self.decay_at(step) ** (step % self.fix_gap)
        direction = gamma * self._ranked_noise(first, groups) + (1.0 - gamma) * self.randn(len(self._sorted_index), like=first)
        if checkpoint:
            dir_deriv = exact @ direction
        else:
            views = {name: direction[offset : offset + shape.numel()].view(1, *shape) for name, shape, offset in layout}
            result = comm.mean_derivatives(batch_size(x), network.jvp(x, labels, GivenTangents(views)))
            loss, logits, dir_deriv = result.loss, result.logits, result.dir_derivs[0]
        flat = direction * dir_deriv
        grads = {name: flat[offset : offset + shape.numel()].view(shape) for name, shape, offset in layout}
        return Estimate(loss, logits, grads, exact=checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sorted_index": self._sorted_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._sorted_index = state["sorted_index"]

"""Forward gradients from random directions over all parameters: naive (III-A), multi-direction (III-B) and
partitioned (III-C). Each carries all its K tangents through one batched forward-mode pass (in chunks of directions
when ``Network.tangent_memory_mb`` asks for them)."""

from __future__ import annotations

import torch
from torch import Tensor

from fg_lightning.engine import ReplayedSource, full_name, weighted_sum
from fg_lightning.estimators.base import (
    Estimate, ForwardModel, GaussianTangents, GradientEstimator, ReplayedGaussianTangents, ReplayedGrads,
    UpdateAsFormed, batch_size, check_positive_int, num_parameters, parameter_layout, weights_finite,
)
from fg_lightning.estimators.collective import ONE_PROCESS, Collective


class MultiDirection(GradientEstimator):
    r"""``k`` forward gradients from independent Gaussian directions, in one batched forward-mode pass, aggregated as
    their mean (Section III-B) or as the gradient's projection on their span (Flügel et al., 2024).

    ``aggregation="mean"``:

    .. math::
        \hat g = \frac{1}{k}\sum_{j=1}^{k} (\nabla f \cdot v_j)\, v_j, \qquad v_j \sim \mathcal N(0, I)

    Unbiased. Per coordinate, one Gaussian direction has variance :math:`\sum_{j\ne i} g_j^2 + 2 g_i^2`
    (Eq. 6; the paper drops the fourth-moment term :math:`2g_i^2 - g_i^2`); the mean of ``k`` has ``1/k`` of it
    (Eq. 7–8). Its norm is about :math:`\sqrt{n/k}\,|g|`: the noise, not the gradient, sets the largest stable rate.

    ``aggregation="orthogonal"``: with :math:`V = [v_1 \dots v_k]` (``n × k``) and the ``k`` derivatives
    :math:`d = V^\top \nabla f`,

    .. math::
        \hat g = V (V^\top V)^{-1} d = P_V \nabla f,

    the orthogonal projection of the gradient on the span of the directions: never longer than the gradient, exact
    for ``k = n``, and for Gaussian directions :math:`E[\hat g] = (k/n)\,\nabla f` (biased towards zero, so not
    ``unbiased``) with a cosine to the gradient of about :math:`\sqrt{k/n}`, the mean's. Its step is about
    :math:`(k/n)\,\nabla f` where the mean's noise is :math:`\sqrt{n/k}\,|g|`: it is stable at learning rates
    far above backprop's and needs them (on the paper's MLP, k = 10: stable at 100, where the mean diverges above
    2e-3). Flügel et al. (2024), "Beyond Backpropagation: Optimization with Multi-Tangent Forward Gradients". The
    Gram matrix :math:`V^\top V` costs ``k² n`` multiply-adds (in float64).

    ``tangents="replayed"``: each parameter's directions are drawn again from the generator state recorded before
    the pass drew them, to form the estimate, instead of being kept (:class:`ReplayedGaussianTangents`): the same
    numbers as ``"stored"`` at the same seed, for one more draw of every direction; the pass holds one layer's
    tangents at a time. Under plain SGD (:func:`~fg_lightning.estimators.training_step`) each parameter's update is
    applied as it is formed, so the step keeps nothing parameter-sized where ``"stored"`` keeps the tangents.
    """

    unbiased = True

    def __init__(self, k: int = 1, aggregation: str = "mean", tangents: str = "stored", seed: int = 0) -> None:
        super().__init__(seed)
        self.k = check_positive_int("k", k)
        if aggregation not in ("mean", "orthogonal"):
            raise ValueError(f"aggregation must be 'mean' or 'orthogonal', got aggregation={aggregation!r}")
        if tangents not in ("stored", "replayed"):
            raise ValueError(f"tangents must be 'stored' or 'replayed', got tangents={tangents!r}")
        self.aggregation, self.tangents = aggregation, tangents
        self.unbiased = aggregation == "mean"

    def validate(self, network: ForwardModel) -> None:
        super().validate(network)
        n = num_parameters(network)
        if self.aggregation == "orthogonal" and self.k > n:
            raise ValueError(f"k={self.k} directions cannot be independent in the network's {n} parameters: "
                             "orthogonal aggregation needs k <= n")

    def estimate(self, network: ForwardModel, x: Tensor, labels: Tensor, step: int,
                 comm: Collective = ONE_PROCESS, update: UpdateAsFormed | None = None) -> Estimate:
        replayed = self.tangents == "replayed"
        source = ReplayedGaussianTangents(self, self.k) if replayed else GaussianTangents(self, self.k)
        result = comm.mean_derivatives(batch_size(x), network.jvp(x, labels, source))
        params = dict(network.named_parameters())

        def tangent(name: str) -> Tensor:  # parameter name's (k, *shape) directions: drawn again, or as kept
            return source.draw(name, params[name]) if replayed else result.tangents[name]

        if self.aggregation == "mean":
            weights = result.dir_derivs / self.k  # Eq. 7: ĝ = (1/k) Σ (∇f·v_j) v_j
        else:  # coefficients c = (VᵀV)⁻¹ d, so that ĝ = V c: the k×k Gram matrix summed over the parameter tensors
            flat = (v.reshape(len(v), -1).double() for v in map(tangent, params))  # (k, numel); a 0-d parameter too
            gram = sum(v @ v.t() for v in flat)
            weights = torch.linalg.solve(gram, result.dir_derivs.double()).to(result.dir_derivs.dtype)
        if update is not None:  # each parameter's part applied as it is formed, its kept tangent released
            update.check(weights_finite(weights))
            for name in params:
                update({name: weighted_sum(weights, source.draw(name, params[name]) if replayed
                                           else result.tangents.pop(name))}, checked=True)
            return update.done(result.loss, result.logits)
        if replayed:  # formed one parameter at a time where the estimate is read
            return Estimate(result.loss, result.logits, ReplayedGrads(weights, source, params))
        return Estimate(result.loss, result.logits, {name: weighted_sum(weights, tangent(name)) for name in params})


class NaiveForwardGradient(MultiDirection):
    r"""The forward gradient of Baydin et al. (Section III-A, Eq. 2): :math:`\hat g = (\nabla f\cdot v)\,v`,
    :math:`v \sim \mathcal N(0, I)` over all parameters. Unbiased (Eq. 5), variance of order ``n`` (Eq. 6)."""

    def __init__(self, tangents: str = "stored", seed: int = 0) -> None:
        super().__init__(k=1, aggregation="mean", tangents=tangents, seed=seed)

    def __repr__(self) -> str:
        replayed = ", tangents='replayed'" if self.tangents == "replayed" else ""
        return f"NaiveForwardGradient(seed={self.seed}{replayed})"


class Partition(GradientEstimator):
    r"""One source direction split into ``k`` zero-padded parts; the sum of the ``k`` estimates (Section III-C).

    .. math::
        \hat g = \sum_{j=1}^{k} (\nabla f\cdot v^{j})\, v^{j}, \qquad
        \hat g_i = v_i \sum_{l \in P(i)} g_l v_l

    where :math:`v^j` keeps the coordinates of part :math:`j` of :math:`v` and zeros elsewhere, and :math:`P(i)` is the
    part holding coordinate :math:`i`. Parts are contiguous slices of the flattened parameter vector (in
    ``named_parameters`` order, sizes ``n/k`` ± 1) as in the paper's example, or, with ``assignment="random"``, a
    fresh random assignment each step.

    ``normalize=True`` (default) rescales each part to norm :math:`\sqrt{m_j}` (its size): a part is then uniform on
    that sphere, so :math:`E[v^j v^{j\top}]` is still the identity on the part (unbiased), the variance per
    coordinate is exactly Eq. 9's :math:`(m-1)\sigma^2` form, :math:`\sum_{l\in P(i), l\ne i} g_l^2\,\frac{m}{m+2} +
    g_i^2\frac{2m-2}{m+2}`, and ``k = n`` returns the exact gradient, as the paper states. With Gaussian parts
    (``normalize=False``) the variance is :math:`\sum_{l\in P(i), l\ne i} g_l^2 + 2g_i^2` and ``k = n`` gives
    :math:`g_i v_i^2`, not :math:`g_i`. All ``k`` parts go through one batched forward-mode pass.
    """

    unbiased = True

    def __init__(self, k: int = 10, assignment: str = "contiguous", normalize: bool = True, seed: int = 0) -> None:
        super().__init__(seed)
        self.k = check_positive_int("k", k)
        if assignment not in ("contiguous", "random"):
            raise ValueError(f"assignment must be 'contiguous' or 'random', got assignment={assignment!r}")
        self.assignment = assignment
        self.normalize = normalize
        self._contiguous_cache: tuple[int, torch.device, Tensor] | None = None

    def validate(self, network: ForwardModel) -> None:
        super().validate(network)
        n = num_parameters(network)
        if self.k > n:
            raise ValueError(f"k={self.k} is larger than the number of parameters of the network ({n})")

    def _part_ids(self, n: int, device: torch.device) -> Tensor:
        """Part index of every flattened coordinate, ``(n,)``."""
        if self.assignment == "random":
            return torch.randperm(n, generator=self.generator(device), device=device) % self.k
        if self._contiguous_cache is None or self._contiguous_cache[:2] != (n, device):
            ids = torch.arange(n, device=device) * self.k // n
            self._contiguous_cache = (n, device, ids)
        return self._contiguous_cache[2]

    def estimate(self, network: ForwardModel, x: Tensor, labels: Tensor, step: int,
                 comm: Collective = ONE_PROCESS) -> Estimate:
        self.validate(network)
        layout = {name: (shape, offset) for name, shape, offset in parameter_layout(network)}
        first = next(network.parameters())
        n = num_parameters(network)
        part_ids = self._part_ids(n, first.device)
        source = self.randn(n, like=first)  # the one source vector v, flattened
        if self.normalize:  # each part onto the sphere of radius sqrt(its size)
            sq_norms = torch.zeros(self.k, device=source.device, dtype=source.dtype).index_add_(0, part_ids, source**2)
            sizes = torch.bincount(part_ids, minlength=self.k).to(source.dtype)
            source.mul_((sizes / sq_norms).sqrt_()[part_ids])

        result = comm.mean_derivatives(batch_size(x),
                                       network.jvp(x, labels, _PartTangents(self.k, layout, part_ids, source)))
        # Parts are disjoint, so Σ_j (∇f·v^j) v^j is v times the derivative of each coordinate's own part.
        flat = source.mul_(result.dir_derivs[part_ids])  # the tangents hold copies: source is free to reuse
        grads = {name: flat[offset : offset + shape.numel()].view(shape) for name, (shape, offset) in layout.items()}
        return Estimate(result.loss, result.logits, grads)


class _PartTangents(ReplayedSource):
    """Partition's ``k`` directions: row ``j`` of a parameter's tangent holds the flat source vector ``v`` on the
    coordinates of part ``j`` and zeros elsewhere, built as the pass reaches the parameter's layer. Replayed: built
    again from ``v`` whenever asked, so the engine's pass keeps none of them (one layer's ``k`` padded tangents alive
    at a time, not ``k`` parameter-sized ones); the estimate needs only ``v`` and the derivatives."""

    def __init__(self, k: int, layout: dict[str, tuple[torch.Size, int]], part_ids: Tensor, source: Tensor) -> None:
        self.k, self.layout, self.part_ids, self.source = k, layout, part_ids, source

    def weights(self, name: str, layer: object, layer_input: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
        tangents = {}
        for param, p in params.items():
            shape, offset = self.layout[full_name(name, param)]
            ids, values = self.part_ids[offset : offset + p.numel()], self.source[offset : offset + p.numel()]
            padded = torch.zeros(self.k, p.numel(), device=p.device, dtype=p.dtype)  # (k, numel)
            tangents[param] = padded.scatter_(0, ids.unsqueeze(0), values.to(p.dtype).unsqueeze(0)).view(self.k, *shape)
        return tangents

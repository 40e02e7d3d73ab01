r"""Zeroth-order gradient estimates: SPSA with MeZO's in-place perturbation and seed replay (Malladi et al. 2023,
"Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333). Forward passes only: no forward-mode
derivative, no backward pass."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fg_lightning.estimators.base import (
    Estimate, ForwardModel, GradientEstimator, ReplayedGrads, Rewind, UpdateAsFormed, batch_size,
    check_distribution, check_positive_int, draw_, weights_finite,
)
from fg_lightning.estimators.collective import ONE_PROCESS, Collective

HALF_PRECISION = (torch.float16, torch.bfloat16)


class _Queries:
    """The perturbations of one step, kept as generator states: ``states[i][name]``, the state of the estimator's
    generator just before it drew parameter ``name``'s part of query ``i``'s direction ``z_i``. :meth:`draw` draws
    that part again, the same numbers at every call; nothing parameter-sized is kept."""

    def __init__(self, distribution: str) -> None:
        self.distribution = distribution
        self.states: list[dict[str, Tensor]] = []
        self._replay: dict[torch.device, torch.Generator] = {}  # one scratch generator per device, set per draw

    def sample(self, generator: torch.Generator, param: Tensor) -> Tensor:
        """A draw of ``z``'s part for ``param`` (its shape, dtype, device) from ``generator``."""
        return draw_(torch.empty_like(param, memory_format=torch.contiguous_format), self.distribution, generator)

    @torch.compiler.disable  # a generator's state cannot be in a graph: eager, one graph for every parameter
    def draw(self, query: int, name: str, param: Tensor) -> Tensor:
        """Query ``query``'s ``z`` for parameter ``name``, drawn again from its recorded state."""
        generator = self._replay.get(param.device)
        if generator is None:
            generator = self._replay[param.device] = torch.Generator(device=param.device)
        generator.set_state(self.states[query][name])
        return self.sample(generator, param)


class _QueryGrads(ReplayedGrads):
    r"""The estimate :math:`\hat g_p = \sum_i w_i z_{i,p}` of each parameter, formed on each access from the queries'
    recorded states: the sum and one :math:`z_{i,p}` alive at a time. Checked for divergence by its weights, as any
    :class:`~fg_lightning.estimators.ReplayedGrads` (a Rademacher draw is 1 in magnitude, below the Gaussian's 16)."""

    def __init__(self, weights: Tensor, queries: _Queries, params: dict[str, Tensor]) -> None:
        super().__init__(weights, queries, params)  # type: ignore[arg-type]

    def __getitem__(self, name: str) -> Tensor:
        param, grad = self.params[name], None
        for query in range(len(self.weights)):
            z = self.source.draw(query, name, param)  # type: ignore[call-arg]
            weight = self.weights[query]  # a 0-d tensor: no device sync
            grad = z.mul_(weight) if grad is None else grad.addcmul_(z, weight)
        return grad


class ZerothOrder(GradientEstimator):
    r"""SPSA's two-sided estimate with MeZO's in-place perturbation (Malladi et al. 2023): ``k`` queries (MeZO's
    ``q``) of the loss at :math:`\theta \pm \varepsilon z_i`, forward passes only.

    .. math::
        \hat g = \frac{1}{k}\sum_{i=1}^{k}
            \frac{L(\theta + \varepsilon z_i) - L(\theta - \varepsilon z_i)}{2\varepsilon}\, z_i,
        \qquad z_i \sim \mathcal N(0, I)\ \text{(Gaussian) or Rademacher (±1)}.

    The central difference is :math:`\nabla f\cdot z_i + O(\varepsilon^2)`, so :math:`\hat g` is the forward gradient
    of :class:`~fg_lightning.estimators.MultiDirection` (Eq. 7) up to :math:`O(\varepsilon^2)`: :math:`E[\hat g] =
    \nabla f + O(\varepsilon^2)` (not ``unbiased``). With Gaussian :math:`z` it is exactly unbiased for the gradient
    of the Gaussian-smoothed loss :math:`f_\varepsilon(\theta) = E_u[f(\theta + \varepsilon u)]`, which differs from
    :math:`\nabla f` by :math:`O(\varepsilon^2)` where :math:`f` is smooth (Nesterov & Spokoiny 2017). Its variance
    is the forward gradient's: per coordinate :math:`(\sum_j g_j^2 + g_i^2)/k` for Gaussian :math:`z`,
    :math:`\sum_{j\ne i} g_j^2/k` for Rademacher.

    **The step, as MeZO takes it.** For each query: the estimator generator's state is recorded (its own generator,
    never the global one), every trained parameter is moved in place by :math:`+\varepsilon z` (``z`` drawn parameter
    by parameter from that state), the loss taken; then :math:`-2\varepsilon z` (``z`` drawn again from the same
    state), the loss taken; then :math:`+\varepsilon z` puts the parameters back. In floating point that restore
    is not exact: three roundings per query, at most 1.5 ulps per parameter. With Gaussian :math:`z` (a new value at
    every query) they add up as a random walk, measured 0.5√S ulps RMS after S queries in float32
    (tests/test_zeroth_order.py); with Rademacher :math:`z` (the same :math:`\pm\varepsilon` at every query) a
    parameter that does not move repeats its roundings, measured 0.06·S ulps RMS, 0.5·S at most, until an update
    moves it. Half precision is refused: its ulp is as large as :math:`\varepsilon z` (MeZO issue #42). Each of the
    ``2k`` forwards differentiates the same function: the global random state and the buffers are put back before
    each (:class:`~fg_lightning.estimators.Rewind`), so dropout draws one mask and batch-norm statistics move once, as
    in one training forward.

    **Memory.** The step holds the model and one parameter-sized ``z`` at a time (a parameter's part, drawn as it is
    added), and while it forms a parameter's update for ``k > 1`` that part too: its peak is inference's (fg-bench
    memory's method, the paper's MLP at batch 256 on the CPU, above rest: 5.89 MB at k = 1, a forward and its loss
    5.84 MB, stock autograd backprop 11.6 MB; 13.8 MB at k = 4, the 4 MB fc2.weight's update and z beside each
    other). The estimate is kept as the ``k`` weights and the generator's state before each
    parameter's draw (``k`` per parameter tensor: 16 bytes each on CUDA, 5 KB on the CPU)
    (:class:`~fg_lightning.estimators.ReplayedGrads`): each parameter's :math:`\hat g_p` is drawn again when read,
    and under plain SGD (:func:`~fg_lightning.estimators.training_step`) applied as it is formed, one parameter at a
    time (:class:`~fg_lightning.estimators.UpdateAsFormed`), so nothing parameter-sized is kept at any point. Under
    ``compile=True`` the draws run eagerly between the compiled pieces, as every estimator's
    (:class:`~fg_lightning.estimators.compiled.CompiledStep`).

    **Reported.** ``Estimate.loss`` is :math:`\frac{1}{k}\sum_i (L_i^+ + L_i^-)/2` and ``logits`` the mean of the
    first query's :math:`+` and :math:`-` logits, so that no third forward runs: second-order accurate
    (:math:`L(\theta) + O(\varepsilon^2)`) where the network is smooth, first-order at an example whose ReLU or
    max-pool kink the perturbation crosses (measured at ε = 1e-3 on small MLPs and CNNs: logits within 0.9ε, their
    median within 2e-5, the loss within 0.05ε).

    **Data parallel.** The ``k`` loss differences and the loss are batch means: one all-reduce of ``k + 1`` numbers
    (``comm.batch_mean``) makes every rank's update one process's on the union batch; the perturbations are the same
    on every rank (the generator is seeded the same).

    Args:
        k: the number of queries (two forwards each).
        eps: the perturbation's scale :math:`\varepsilon` (MeZO: 1e-3).
        distribution: ``"gaussian"`` or ``"rademacher"``.
        seed: the estimator generator's seed.
    """

    unbiased = False

    def __init__(self, k: int = 1, eps: float = 1e-3, distribution: str = "gaussian", seed: int = 0) -> None:
        super().__init__(seed)
        self.k = check_positive_int("k", k)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a finite number > 0, got eps={eps!r}")
        self.eps, self.distribution = float(eps), check_distribution(distribution)

    def validate(self, network: ForwardModel) -> None:
        super().validate(network)
        self._refuse_half_precision(network)

    def _refuse_half_precision(self, network: ForwardModel) -> None:
        for name, param in network.named_parameters():
            if param.dtype in HALF_PRECISION:
                raise ValueError(
                    f"ZerothOrder cannot train {name} in {param.dtype}: perturbing and restoring it in place "
                    f"(θ + εz − 2εz + εz) drifts when its ulp is near εz (eps={self.eps:g}; MeZO issue #42): "
                    "train float32 parameters (autocast may still run the forwards in half precision)")

    def estimate(self, network: ForwardModel, x: Tensor, labels: Tensor, step: int,
                 comm: Collective = ONE_PROCESS, update: UpdateAsFormed | None = None) -> Estimate:
        self._refuse_half_precision(network)  # also here: a network cast after validate() (Lightning's precision)
        examples = batch_size(x)  # a bad input refused before any parameter moves
        params = dict(network.named_parameters())
        queries = _Queries(self.distribution)
        rewind = Rewind(network, labels.device)  # type: ignore[arg-type]
        losses, differences, logits = [], [], None
        with torch.no_grad():
            for query in range(self.k):
                states = {}
                for name, param in params.items():  # +εz, z drawn parameter by parameter from the generator
                    generator = self.generator(param.device)
                    states[name] = generator.get_state()
                    param.add_(queries.sample(generator, param), alpha=self.eps)
                queries.states.append(states)
                if query:
                    rewind()  # the same dropout mask and buffers as the first forward
                plus_logits = network(x)  # type: ignore[operator]
                plus = network.logits_loss(plus_logits, labels)
                self._shift(queries, query, params, -2 * self.eps)
                rewind()
                minus_logits = network(x)  # type: ignore[operator]
                minus = network.logits_loss(minus_logits, labels)
                self._shift(queries, query, params, self.eps)  # back to θ, up to rounding
                if logits is None:
                    logits = (plus_logits + minus_logits) / 2  # (B, C), second-order accurate
                losses.append((plus + minus) / 2)
                differences.append((plus - minus) / (2 * self.eps))  # ∇L·z_i + O(ε²)
            loss, differences = comm.batch_mean([torch.stack(losses).mean(), torch.stack(differences)], examples)
        weights = differences / self.k  # ĝ = Σ_i w_i z_i
        grads = _QueryGrads(weights, queries, params)
        if update is None:
            return Estimate(loss, logits, grads)
        update.check(weights_finite(weights))
        with torch.no_grad():
            for name in params:  # each parameter's part applied as it is formed, then released
                update({name: grads[name]}, checked=True)
        return update.done(loss, logits)

    @staticmethod
    def _shift(queries: _Queries, query: int, params: dict[str, Tensor], scale: float) -> None:
        """Every parameter moved in place by ``scale · z`` of query ``query``, ``z`` drawn again part by part."""
        for name, param in params.items():
            param.add_(queries.draw(query, name, param), alpha=scale)


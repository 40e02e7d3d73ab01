"""Forward gradients whose fully connected weight directions come from the layer's input (Section III-D).

For a weight ``W (out, in)`` with layer input ``u (B, in)``, the true gradient is ``G = Σ_b δ_b u_bᵀ``: its rows lie
in the span of the inputs. A direction ``n xᵀ`` with ``n ~ N(0, I_out)`` and ``x`` a unit vector from that span
wastes no variance on the rest of ``R^in``. The tangent is rank one, so the engine carries it as an
:class:`~fg_lightning.engine.OuterTangent` and its tangent product costs one matrix–vector product. Biases and
convolution kernels get Gaussian directions as in the naive method.

The same holds for the weight of a ``torch.nn.Linear`` on the torch backend (its input rows: all leading axes).

Scaling: the direction is ``sqrt(s) n xᵀ`` and the estimate ``(∇f·v) v``, so the weight's estimate carries the
factor ``s`` (split evenly between the derivative and the direction; the paper multiplies the estimate alone by
``β``, which also multiplies the noise from every other layer by ``β``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fg_lightning.engine import OuterTangent, Tangent, TangentSource
from fg_lightning.estimators.base import Estimate, ForwardModel, GradientEstimator, batch_size, forward_gradient
from fg_lightning.estimators.collective import ONE_PROCESS, Collective


class _InputGenerated(GradientEstimator):
    def input_direction(self, layer_input: Tensor) -> tuple[Tensor, float | Tensor]:
        """``(x (in,), s)``: a unit direction in the span of the layer input and the weight's scale factor."""
        raise NotImplementedError

    def estimate(self, network: ForwardModel, x: Tensor, labels: Tensor, step: int,
                 comm: Collective = ONE_PROCESS) -> Estimate:
        result = comm.mean_derivatives(batch_size(x), network.jvp(x, labels, _InputTangents(self, network, comm)))
        return Estimate(result.loss, result.logits, forward_gradient(result))


class _InputTangents(TangentSource):
    """One direction: ``sqrt(s) n xᵀ`` (an :class:`OuterTangent`) for each fully connected weight, ``x`` from the
    layer's input; Gaussian for every other parameter."""

    def __init__(self, estimator: _InputGenerated, network: ForwardModel, comm: Collective) -> None:
        self.estimator, self.network, self.comm = estimator, network, comm

    def weights(self, name: str, layer: object, layer_input: Tensor, params: dict[str, Tensor]) -> dict[str, Tangent]:
        estimator, tangents = self.estimator, {}
        for param, p in params.items():
            if param == "weight" and self.network.fully_connected(layer):
                # (B, ..., in) -> rows (B·…, in), from the union batch (gathered across ranks) as one process
                rows = layer_input.reshape(-1, layer_input.shape[-1])
                direction, scale = estimator.input_direction(self.comm.gather_rows(rows))
                noise = estimator.randn(1, p.shape[0], like=p) * (scale**0.5)
                tangents[param] = OuterTangent(noise, direction.unsqueeze(0))
            else:
                tangents[param] = estimator.randn(1, *p.shape, like=p)
        return tangents


class InputQR(_InputGenerated):
    r"""``x`` a uniformly chosen column of ``Q`` from the reduced QR decomposition ``uᵀ = Q R`` (Section III-D-1).

    ``Q`` has ``r = min(in, B)`` orthonormal columns spanning the inputs, so :math:`E[x x^\top] = QQ^\top / r` and
    :math:`E[\hat G] = G\,QQ^\top / r`. Since the rows of ``G`` lie in that span, :math:`G QQ^\top = G`, and the
    factor that makes the estimate exactly unbiased is ``r``. The paper (Eq. 18) multiplies by the batch size
    ``β``, which equals ``r`` only when ``B ≤ in`` (its setting: batch 256, 784 or 1024 inputs); for ``B > in``,
    ``β`` overshoots by ``B / in``.
    """

    unbiased = True

    def input_direction(self, layer_input: Tensor) -> tuple[Tensor, float | Tensor]:
        q, _ = torch.linalg.qr(layer_input.t())  # (in, r)
        rank = q.shape[1]
        column = torch.randint(rank, (1,), generator=self.generator(q.device), device=q.device)
        return q.index_select(1, column).squeeze(1), float(rank)


class InputApprox(_InputGenerated):
    r"""``x`` a uniformly chosen input sample divided by its norm: no QR (Section III-D-2). Not unbiased.

    :math:`E[\hat G] = s\, G M` with :math:`M = \frac1B \sum_b \hat u_b \hat u_b^\top` (unit rows :math:`\hat u_b`).
    After a ReLU the inputs point in nearly the same direction, so ``M`` is far from ``I/β`` and the paper's ``β``
    overshoots the gradient's scale by one to two orders of magnitude. ``scale`` chooses ``s``:

    - ``"effective_rank"`` (default): :math:`s = 1/\operatorname{tr}(M^2) = B^2 / \sum_{b,b'} \cos^2(u_b, u_{b'})`,
      the effective rank of the normalised inputs. It is exactly ``r`` (InputQR's unbiasing factor) when the inputs
      are orthogonal, and about 1 when they are all aligned. On the paper's MLP with Fashion-MNIST (batch 256) it
      puts the projection of :math:`E[\hat G]` on ``G`` at 0.2–1.1 ``|G|²`` per layer at initialisation and 1.2–1.6
      after 300 SGD steps, where ``β`` puts it at 20–70. For a batch above 256, ``tr(M²)`` is estimated from the
      pairs within 256 random samples.
    - ``"batch"``: the paper's ``s = β``.
    - a number: that ``s``.
    """

    unbiased = False
    max_rank_samples = 256

    def __init__(self, scale: str | float = "effective_rank", seed: int = 0) -> None:
        super().__init__(seed)
        if isinstance(scale, str):
            if scale not in ("effective_rank", "batch"):
                raise ValueError(f"scale must be 'effective_rank', 'batch' or a positive number, got scale={scale!r}")
        elif not scale > 0:
            raise ValueError(f"scale must be 'effective_rank', 'batch' or a positive number, got scale={scale!r}")
        self.scale = scale

    def input_direction(self, layer_input: Tensor) -> tuple[Tensor, float | Tensor]:
        batch = layer_input.shape[0]
        generator = self.generator(layer_input.device)
        sample = torch.randint(batch, (1,), generator=generator, device=layer_input.device)
        row = layer_input.index_select(0, sample).squeeze(0)
        direction = row / row.norm().clamp_min(torch.finfo(row.dtype).tiny)
        if self.scale == "batch":
            return direction, float(batch)
        if self.scale != "effective_rank":
            return direction, float(self.scale)
        return direction, self.effective_rank(layer_input, generator)

    @classmethod
    def effective_rank(cls, layer_input: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``1 / tr(M²)`` for the normalised rows of ``layer_input (B, in)``, from at most 256 rows."""
        batch = layer_input.shape[0]
        rows = layer_input
        if batch > cls.max_rank_samples:
            picked = torch.randperm(batch, generator=generator, device=rows.device)[: cls.max_rank_samples]
            rows = rows.index_select(0, picked)
        unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
        cos_sq = (unit @ unit.t()).square_()
        count = len(unit)
        off_diagonal_mean = (cos_sq.sum() - cos_sq.diagonal().sum()) / max(count * (count - 1), 1)
        # tr(M²) = (1/B²) Σ_{b,b'} cos² = 1/B + (1 − 1/B) · mean over b ≠ b'
        return 1.0 / (1.0 / batch + (1.0 - 1.0 / batch) * off_diagonal_mean)

"""Tangent representations for forward-mode passes.

A tangent carries a leading direction axis K. Most tangents are dense tensors of shape ``(K, *param.shape)``.
A fully connected weight may instead carry a rank-one tangent per direction (Section III-D: ``n xᵀ``), which
:class:`OuterTangent` stores as its two factors, so that the layer's tangent product costs a matrix-vector
product instead of a matrix-matrix product and nothing of the weight's size is materialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

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


def weighted_sum(weights: Tensor, tangent: Tangent) -> Tensor:
    """``Σ_k weights[k] · tangent[k]``, of the parameter's shape, without densifying an :class:`OuterTangent`.

    This is how every forward-gradient estimate is formed: ``ĝ = Σ_k (∇f·v_k) v_k`` (Eq. 2, averaged in Eq. 7).
    """
    if isinstance(tangent, OuterTangent):
        # Σ_k w_k a_k b_kᵀ = (a ⊙ w)ᵀ b, one (out, K) @ (K, in) matmul.
        return (tangent.out_factor * weights.unsqueeze(1)).t() @ tangent.in_factor
    return torch.tensordot(weights, tangent, dims=1)


def directions(tangent: Tangent, start: int, stop: int) -> Tangent:
    """Directions ``start:stop`` of a tangent (a view; an :class:`OuterTangent` stays factored)."""
    if isinstance(tangent, OuterTangent):
        return OuterTangent(tangent.out_factor[start:stop], tangent.in_factor[start:stop])
    return tangent[start:stop]

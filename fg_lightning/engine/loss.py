"""Mean softmax cross-entropy with its three passes, computed through log-sum-exp.

``f(z) = (1/B) Σ_b [logsumexp(z_b) − z_b[y_b]]``; ``∂f/∂z = (softmax(z) − onehot(y)) / B``.
Log-sum-exp keeps the loss finite for any finite logits: the paper's NaNs (Section III-A-2) came from a softmax
that overflowed before the logarithm.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits (B, C)`` against integer ``labels (B,)``."""
    return (logits.logsumexp(1) - logits.gather(1, labels.unsqueeze(1)).squeeze(1)).mean()


def cross_entropy_and_grad(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The loss and ``∂loss/∂logits``, shape ``(B, C)``."""
    log_norm = logits.logsumexp(1, keepdim=True)  # (B, 1)
    loss = (log_norm.squeeze(1) - logits.gather(1, labels.unsqueeze(1)).squeeze(1)).mean()
    grad = (logits - log_norm).exp_()  # softmax, (B, C)
    grad.scatter_add_(1, labels.unsqueeze(1), torch.full_like(log_norm, -1.0))
    return loss, grad.div_(logits.shape[0])


def cross_entropy_jvp(logits: Tensor, labels: Tensor, d_logits: Tensor, per_example: bool = False) -> tuple[Tensor, Tensor]:
    """The loss and its directional derivatives ``(K,)`` along the logit tangents ``d_logits (K, B, C)``; with
    ``per_example``, ``(K, B)``: each example's term of the mean loss (they sum to the ``(K,)`` result)."""
    loss, grad = cross_entropy_and_grad(logits, labels)
    return loss, torch.einsum("kbc,bc->kb" if per_example else "kbc,bc->k", d_logits, grad)

"""The exact gradient, from the engine's hand-written VJPs: the baseline every estimator is compared with."""

from __future__ import annotations

from torch import Tensor

from fg_lightning.estimators.base import Estimate, ForwardModel, GradientEstimator, batch_size
from fg_lightning.estimators.collective import ONE_PROCESS, Collective


class Backprop(GradientEstimator):
    """Reverse-mode autodiff: one forward and one backward pass through the same layers as the forward-mode
    estimators, so that their time and memory compare fairly. ``grads`` is ``∇f`` exactly."""

    unbiased = True

    def estimate(self, network: ForwardModel, x: Tensor, labels: Tensor, step: int,
                 comm: Collective = ONE_PROCESS) -> Estimate:
        loss, logits, grads = network.loss_and_grad(x, labels)
        loss, grads = comm.mean_gradient(batch_size(x), loss, grads)  # data parallel: one all-reduce of the gradient
        return Estimate(loss, logits, grads)

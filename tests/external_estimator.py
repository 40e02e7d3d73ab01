"""An estimator defined outside the package, as a user adds one (docs/estimators.md, "Adding an estimator"): a forward
gradient with Rademacher directions, v_i = ±1 with equal probability. Unbiased (E[vvᵀ] = I), and a little less noisy
than a Gaussian direction: its variance per coordinate is Σ_{j≠i} g_j², without the Gaussian's 2g_i² fourth-moment
term."""

from __future__ import annotations

from fg_lightning.engine import TangentSource
from fg_lightning.estimators import Estimate, GradientEstimator, forward_gradient
from fg_lightning.estimators.base import check_positive_int
from fg_lightning.estimators.collective import ONE_PROCESS
from fg_lightning.estimators.registry import EstimatorSpec, Training


class RademacherTangents(TangentSource):
    def __init__(self, estimator: GradientEstimator, k: int) -> None:
        self.estimator, self.k = estimator, k

    def weights(self, name, layer, layer_input, params):
        return {param: self.estimator.randn(self.k, *p.shape, like=p).sign_() for param, p in params.items()}


class RademacherForwardGradient(GradientEstimator):
    unbiased = True

    def __init__(self, k: int = 1, seed: int = 0) -> None:
        super().__init__(seed)
        self.k = check_positive_int("k", k)

    def estimate(self, network, x, labels, step, comm=ONE_PROCESS):
        result = comm.mean_derivatives(len(x), network.jvp(x, labels, RademacherTangents(self, self.k)))
        return Estimate(result.loss, result.logits, forward_gradient(result, 1.0 / self.k))


SPEC = EstimatorSpec("rademacher", RademacherForwardGradient, lr={"mlp": 1e-4, "cnn": 1e-4},
                     grid=(1e-4, 3e-4, 1e-3), training=Training(2e-3))

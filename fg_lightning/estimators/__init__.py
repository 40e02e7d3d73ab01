"""Gradient estimators: one strategy object per method of the paper (Section III) and the backprop baseline.

``REGISTRY`` maps each estimator's short name to its :class:`EstimatorSpec`."""

from fg_lightning.estimators.backprop import Backprop
from fg_lightning.estimators.base import (
    DivergenceError, Estimate, GradientEstimator, apply_estimate, check_finite, cosine, forward_gradient,
    parameter_layout,
)
from fg_lightning.estimators.directions import MultiDirection, NaiveForwardGradient, Partition
from fg_lightning.estimators.input_generated import InputApprox, InputQR
from fg_lightning.estimators.momentum import MomentumForwardGradient
from fg_lightning.estimators.registry import REGISTRY, EstimatorSpec

__all__ = [
    "REGISTRY", "Backprop", "DivergenceError", "Estimate", "EstimatorSpec", "GradientEstimator", "InputApprox",
    "InputQR", "MomentumForwardGradient", "MultiDirection", "NaiveForwardGradient", "Partition", "apply_estimate",
    "check_finite", "cosine", "forward_gradient", "parameter_layout",
]

"""Gradient estimators: one strategy object per method of the paper (Section III) and the backprop baseline."""

from fg_lightning.estimators.backprop import Backprop
from fg_lightning.estimators.base import Estimate, GradientEstimator, cosine, forward_gradient, parameter_layout
from fg_lightning.estimators.directions import MultiDirection, NaiveForwardGradient, Partition
from fg_lightning.estimators.input_generated import InputApprox, InputQR
from fg_lightning.estimators.momentum import MomentumForwardGradient

__all__ = [
    "Backprop", "Estimate", "GradientEstimator", "InputApprox", "InputQR", "MomentumForwardGradient",
    "MultiDirection", "NaiveForwardGradient", "Partition", "cosine", "forward_gradient", "parameter_layout",
]

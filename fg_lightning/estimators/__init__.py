"""Gradient estimators: one strategy object per method of the paper (Section III), the backprop baseline, and the
field's methods beyond the paper (activity perturbation, local losses, local guesses, orthogonal aggregation) and the
zeroth-order SPSA / MeZO estimate (forward passes only).

``REGISTRY`` maps each estimator's short name to its :class:`EstimatorSpec`."""

from fg_lightning.estimators.backprop import Backprop
from fg_lightning.estimators.base import (
    ActivityModel, AppliedGrads, CompilableModel, DivergenceError, Estimate, ForwardModel, GaussianTangents,
    GradientEstimator, LayeredBlocksModel, LocalLossModel, RecomputableModel, ReplayedGrads, Rewind, UpdateAsFormed,
    WrapperModel, apply_estimate, check_finite, cosine,
    forward_gradient, num_parameters, parameter_layout, training_step,
)
from fg_lightning.estimators.directions import MultiDirection, NaiveForwardGradient, Partition
from fg_lightning.estimators.input_generated import InputApprox, InputQR
from fg_lightning.estimators.local import (
    ActivityPerturbation, LocalActivityPerturbation, LocalBackprop, LocalGuess, LocalWeightPerturbation,
)
from fg_lightning.estimators.momentum import MomentumForwardGradient
from fg_lightning.estimators.registry import REGISTRY, EstimatorSpec
from fg_lightning.estimators.zeroth_order import ZerothOrder

__all__ = [
    "REGISTRY", "ActivityModel", "AppliedGrads", "ActivityPerturbation", "GaussianTangents", "LocalLossModel", "Backprop", "LocalActivityPerturbation", "LocalBackprop", "LocalGuess",
    "LocalWeightPerturbation", "DivergenceError", "Estimate", "EstimatorSpec", "ForwardModel", "GradientEstimator", "InputApprox",
    "InputQR", "MomentumForwardGradient", "MultiDirection", "NaiveForwardGradient", "Partition", "ReplayedGrads", "Rewind", "apply_estimate",
    "check_finite", "cosine", "forward_gradient", "num_parameters", "parameter_layout", "training_step", "UpdateAsFormed", "ZerothOrder",
    "CompilableModel", "LayeredBlocksModel", "RecomputableModel", "WrapperModel",
]

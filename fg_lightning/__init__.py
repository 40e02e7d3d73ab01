"""fg_lightning: training neural networks with forward gradients, as a PyTorch Lightning suite."""

__version__ = "0.1.0"

from fg_lightning.callbacks import GradientCosine, PeakMemory, StepTimer, UpdateCallback
from fg_lightning.data import MNISTDataModule
from fg_lightning.engine import CNN, MLP, JvpResult, Network, OuterTangent, cnn, mlp, to_torch
from fg_lightning.estimators import (
    Backprop, Estimate, GradientEstimator, InputApprox, InputQR, MomentumForwardGradient, MultiDirection,
    NaiveForwardGradient, Partition,
)
from fg_lightning.module import DivergenceError, ForwardGradientModule

__all__ = [
    "Backprop", "CNN", "DivergenceError", "Estimate", "ForwardGradientModule", "GradientCosine", "GradientEstimator",
    "InputApprox", "InputQR", "JvpResult", "MLP", "MNISTDataModule", "MomentumForwardGradient", "MultiDirection",
    "NaiveForwardGradient", "Network", "OuterTangent", "Partition", "PeakMemory", "StepTimer", "UpdateCallback",
    "cnn", "mlp", "to_torch",
]

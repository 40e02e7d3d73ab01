"""fg_lightning: training neural networks with forward gradients, as a PyTorch Lightning suite."""

from fg_lightning.engine import (
    Conv2d, Flatten, JvpResult, Linear, MaxPool2d, Network, OuterTangent, ReLU, cnn, mlp, weighted_sum,
)

__all__ = [
    "Conv2d", "Flatten", "JvpResult", "Linear", "MaxPool2d", "Network", "OuterTangent", "ReLU", "cnn", "mlp",
    "weighted_sum",
]

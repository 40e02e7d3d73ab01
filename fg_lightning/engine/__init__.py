"""From-scratch tensor-op engine: hand-written forward, backprop (VJP) and forward-mode (JVP) passes."""

from fg_lightning.engine.layers import (
    GELU, AdaptiveAvgPool2d, AddSkip, Conv2d, Flatten, GlobalAvgPool, GroupNorm, Layer, LayerNorm, Linear, MaxPool2d,
    ReLU, Skip, TokenMixing,
)
from fg_lightning.engine.loss import cross_entropy, cross_entropy_and_grad, cross_entropy_jvp
from fg_lightning.engine.network import CNN, MLP, Head, JvpResult, Mixer, Network, TangentFn
from fg_lightning.engine.reference import to_torch
from fg_lightning.engine.tangents import (
    GivenTangents, OuterTangent, Tangent, TangentSource, WeightTangents, as_source, full_name, weighted_sum,
)

__all__ = [
    "AdaptiveAvgPool2d", "AddSkip", "CNN", "Conv2d", "Flatten", "GELU", "GlobalAvgPool", "GroupNorm", "Head", "MLP",
    "JvpResult", "Layer", "LayerNorm", "Linear", "MaxPool2d", "Mixer", "Network", "OuterTangent", "ReLU", "Skip",
    "Tangent", "TokenMixing", "GivenTangents", "TangentFn", "TangentSource", "WeightTangents", "as_source", "to_torch",
    "cross_entropy", "cross_entropy_and_grad", "cross_entropy_jvp", "full_name", "weighted_sum",
]

"""From-scratch tensor-op engine: hand-written forward, backprop (VJP) and forward-mode (JVP) passes."""

from fg_lightning.engine.layers import (
    GELU, AdaptiveAvgPool2d, AddSkip, Conv2d, Flatten, GlobalAvgPool, GroupNorm, Layer, LayerNorm, Linear, MaxPool2d,
    ReLU, Skip, TokenMixing,
)
from fg_lightning.engine.loss import cross_entropy, cross_entropy_and_grad, cross_entropy_jvp
from fg_lightning.engine.network import CNN, MLP, Head, JvpResult, Mixer, Network, TangentFn
from fg_lightning.engine.reference import to_torch
from fg_lightning.engine.tangents import (
    ActivitySource, GivenTangents, OuterTangent, ReplayedSource, StreamedSource, StreamedTangent, Tangent,
    TangentSource, WeightTangents, as_source, check_objective, full_name, weighted_sum,
)

__all__ = [
    "ActivitySource", "AdaptiveAvgPool2d", "AddSkip", "as_source", "check_objective", "CNN", "Conv2d",
    "cross_entropy", "cross_entropy_and_grad", "cross_entropy_jvp", "Flatten", "full_name", "GELU", "GivenTangents",
    "GlobalAvgPool", "GroupNorm", "Head", "JvpResult", "Layer", "LayerNorm", "Linear", "MaxPool2d", "Mixer", "MLP",
    "Network", "OuterTangent", "ReLU", "ReplayedSource", "Skip", "StreamedSource",
    "StreamedTangent", "Tangent", "TangentFn", "TangentSource", "to_torch",
    "TokenMixing", "weighted_sum", "WeightTangents",
]

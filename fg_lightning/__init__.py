"""fg_lightning: training neural networks with forward gradients, as a PyTorch Lightning suite.

The public names below are imported on first use, so that ``import fg_lightning.engine`` and
``import fg_lightning.estimators`` need torch alone (no Lightning, torchmetrics or torchvision).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "fg_lightning.callbacks": ["CommBytes", "GradientCosine", "PeakMemory", "StepTimer", "UpdateCallback"],
    "fg_lightning.distributed": ["ForwardGradientDDPStrategy"],
    "fg_lightning.data": ["DigitsDataModule", "MNISTDataModule"],
    "fg_lightning.engine": ["CNN", "MLP", "JvpResult", "Mixer", "Network", "OuterTangent", "to_torch"],
    "fg_lightning.estimators": [
        "REGISTRY", "ActivityPerturbation", "Backprop", "DivergenceError", "Estimate", "GradientEstimator",
        "InputApprox", "InputQR", "LocalActivityPerturbation", "LocalBackprop", "LocalGuess", "LocalWeightPerturbation",
        "MomentumForwardGradient", "MultiDirection", "NaiveForwardGradient", "Partition", "ZerothOrder",
        "apply_estimate",
    ],
    "fg_lightning.module": ["ForwardGradientModule"],
    "fg_lightning.torch_network": ["TorchNetwork"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'fg_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

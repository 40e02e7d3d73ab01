"""The one list of estimators. Benchmarks, the contract and statistical tests and the config-coverage test iterate
it, so adding an estimator is its file, one line here and its configs (``configs/{mlp,cnn}_<name>.yaml``)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from fg_lightning.estimators.backprop import Backprop
from fg_lightning.estimators.base import GradientEstimator
from fg_lightning.estimators.directions import MultiDirection, NaiveForwardGradient, Partition
from fg_lightning.estimators.input_generated import InputApprox, InputQR
from fg_lightning.estimators.local import (
    ActivityPerturbation, LocalActivityPerturbation, LocalBackprop, LocalGuess, LocalWeightPerturbation,
)
from fg_lightning.estimators.momentum import MomentumForwardGradient


@dataclass(frozen=True)
class EstimatorSpec:
    """One registered estimator: its short name (configs, ``fg-bench --estimators``), its class and the arguments
    that make it this variant; the rest is derived from an instance, so it cannot disagree with it."""

    name: str
    cls: type[GradientEstimator]
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def takes_k(self) -> bool:
        """Whether the class has a number of directions / parts ``k``."""
        return "k" in inspect.signature(self.cls).parameters

    @property
    def unbiased(self) -> bool:
        return self.make().unbiased

    @property
    def needs_local_losses(self) -> bool:
        return self.cls.needs_local_losses

    def make(self, k: int | None = None, seed: int = 0, **kwargs: Any) -> GradientEstimator:
        """An instance; ``k`` is passed only to the estimators that take it."""
        if self.takes_k and k is not None:
            kwargs["k"] = k
        return self.cls(seed=seed, **{**self.kwargs, **kwargs})


REGISTRY: dict[str, EstimatorSpec] = {
    spec.name: spec
    for spec in (
        EstimatorSpec("backprop", Backprop),
        EstimatorSpec("naive", NaiveForwardGradient),
        EstimatorSpec("multi_direction", MultiDirection),
        EstimatorSpec("orthogonal", MultiDirection, {"aggregation": "orthogonal"}),
        EstimatorSpec("partition", Partition),
        EstimatorSpec("input_qr", InputQR),
        EstimatorSpec("input_approx", InputApprox),
        EstimatorSpec("momentum", MomentumForwardGradient),
        EstimatorSpec("activity", ActivityPerturbation),
        EstimatorSpec("local_activity", LocalActivityPerturbation),
        EstimatorSpec("local_weight", LocalWeightPerturbation),
        EstimatorSpec("local_backprop", LocalBackprop),
        EstimatorSpec("local_guess", LocalGuess),
    )
}

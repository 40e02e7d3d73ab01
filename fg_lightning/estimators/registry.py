"""The one list of estimators. Benchmarks, the contract and statistical tests and the config-coverage test iterate
it, so adding an estimator is its class and one :func:`register` call (here, or in your own package), plus its configs
(``configs/{mlp,cnn}_<name>.yaml``) to train it with fg-cli."""

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
from fg_lightning.estimators.zeroth_order import ZerothOrder


BACKWARD = {
    "none": "forward mode only",
    "layer": "a weight's outer product with its own layer input (one layer's VJP)",
    "block": "backprop within a block (and its head)",
    "global": "backprop through the whole network",
}


@dataclass(frozen=True)
class Training:
    """The short training every estimator passes in the tests (tests/test_estimators.py): plain SGD at ``lr`` for
    ``steps`` steps on the MLP, judged against backprop at the same rate (``versus``: None, a share of its progress;
    ``"beats"``: clearly better; ``"stable where it diverges"``: backprop diverges at that rate)."""

    lr: float
    steps: int = 150
    versus: str | None = None


@dataclass(frozen=True)
class EstimatorSpec:
    """One registered estimator, the one record that fg-bench, the tests and the configs read: its short name
    (configs, ``fg-bench --estimators``), its class and the arguments that make it this variant; the backward
    computation it uses (``backward``: a key of :data:`BACKWARD`, the leaderboard's classes); the configs' learning
    rate per model (``lr``, with ``k`` directions where the class takes them); fg-bench accuracy's default grid of
    rates (``grid``); the tests' short training (``training``); and ``same_as``: the estimator whose numbers this
    one gives, by another route through time and memory (``naive_replayed``: naive's, its tangents drawn again
    instead of kept), which the benches of numbers (quality, stability, accuracy) leave out by default and those
    of cost (speed, memory, depth) time. What follows from an instance (unbiasedness, local losses) is derived from
    one, so it cannot disagree with it."""

    name: str
    cls: type[GradientEstimator]
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    backward: str = "none"
    lr: dict[str, float] = field(default_factory=dict, hash=False)
    k: int | None = None
    grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    training: Training = Training(1e-3)
    same_as: str | None = None

    def __post_init__(self) -> None:
        if self.backward not in BACKWARD:
            raise ValueError(f"{self.name}: backward must be one of {sorted(BACKWARD)}, got {self.backward!r}")

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


REGISTRY: dict[str, EstimatorSpec] = {}


def register(spec: EstimatorSpec) -> EstimatorSpec:
    """Add an estimator, defined here or anywhere else, to :data:`REGISTRY`: fg-bench's choices, the accuracy grids and
    the contract tests then take it."""
    if spec.name in REGISTRY and REGISTRY[spec.name] != spec:
        raise ValueError(f"an estimator named {spec.name!r} is registered already ({REGISTRY[spec.name].cls.__name__})")
    if spec.same_as is not None and spec.same_as not in REGISTRY:
        raise ValueError(f"{spec.name}: same_as={spec.same_as!r} names no estimator registered before it")
    REGISTRY[spec.name] = spec
    return spec


# The configs' rates are the paper's (Section IV) for the paper's estimators and those fg-bench accuracy picked on one
# H200 for the others (local_weight's on the CNN is a guess); the grids are around what trains the MLP on
# Fashion-MNIST in 200 steps at batch 256 (results/cpu/stability*). The tests' settings: MultiDirection/Partition
# reach about backprop's progress (partition(4) sometimes more), so only a floor makes sense; momentum's step is ~n
# times larger than its rate suggests (|ĝ| ≈ cos·n·|g|): at 1e-6 it must beat backprop at 1e-6, which barely moves
# (Fig. 9-11); InputQR's noise is heavy-tailed and needs a small rate; the orthogonal projection is never longer than
# the gradient: it trains at lr 100, where backprop diverges; the local ones are judged against LocalBackprop.
# zeroth_order (MeZO's q = k = 1) is naive's forward gradient up to O(ε²): on the MLP at batch 256 over 200 steps
# (fg-bench stability, CPU) the same losses as naive at every rate (2.28, 2.23, 1.73 at 1e-4, 3e-4, 1e-3; both diverge
# at 3e-3), so naive's rates and grid; its test trains at k = 4 as multi_direction's does (lr 5e-3: held-out loss
# 2.339 -> 1.204, backprop 1.127).
for _spec in (
    EstimatorSpec("backprop", Backprop, backward="global", lr={"mlp": 1e-2, "cnn": 1e-2},
                  grid=(0.03, 0.1, 0.3), training=Training(1e-2)),
    EstimatorSpec("naive", NaiveForwardGradient, lr={"mlp": 1e-4, "cnn": 1e-4},
                  grid=(1e-4, 3e-4, 1e-3), training=Training(2e-3)),
    EstimatorSpec("naive_replayed", NaiveForwardGradient, {"tangents": "replayed"}, lr={"mlp": 1e-4, "cnn": 1e-4},
                  grid=(1e-4, 3e-4, 1e-3), training=Training(2e-3), same_as="naive"),
    EstimatorSpec("multi_direction", MultiDirection, lr={"mlp": 1e-2, "cnn": 1e-2}, k=100,
                  grid=(3e-4, 1e-3, 2e-3), training=Training(5e-3)),
    EstimatorSpec("orthogonal", MultiDirection, {"aggregation": "orthogonal"}, lr={"mlp": 100.0, "cnn": 100.0}, k=10,
                  grid=(30.0, 100.0, 300.0), training=Training(100.0, versus="stable where it diverges")),
    EstimatorSpec("partition", Partition, lr={"mlp": 1e-2, "cnn": 1e-2}, k=10,
                  grid=(3e-4, 1e-3, 2e-3), training=Training(3e-3)),
    EstimatorSpec("input_qr", InputQR, lr={"mlp": 1e-3, "cnn": 1e-3},
                  grid=(3e-5, 1e-4, 3e-4), training=Training(3e-5, steps=500)),
    EstimatorSpec("input_approx", InputApprox, lr={"mlp": 1e-3, "cnn": 1e-3},
                  grid=(1e-4, 3e-4, 1e-3), training=Training(1e-3)),
    EstimatorSpec("momentum", MomentumForwardGradient, backward="global", lr={"mlp": 1e-6, "cnn": 1e-6},
                  grid=(3e-7, 1e-6, 3e-6), training=Training(1e-6, versus="beats")),
    EstimatorSpec("activity", ActivityPerturbation, backward="layer", lr={"mlp": 0.03, "cnn": 0.03}, k=10,
                  grid=(3e-3, 1e-2, 3e-2), training=Training(1e-2)),
    EstimatorSpec("activity_recomputed", ActivityPerturbation, {"recompute": True}, backward="layer",
                  lr={"mlp": 0.03, "cnn": 0.03}, k=10, grid=(3e-3, 1e-2, 3e-2), training=Training(1e-2),
                  same_as="activity"),
    EstimatorSpec("local_activity", LocalActivityPerturbation, backward="layer", lr={"mlp": 0.1, "cnn": 0.1}, k=10,
                  grid=(1e-2, 3e-2, 1e-1), training=Training(1e-2)),
    EstimatorSpec("local_weight", LocalWeightPerturbation, lr={"mlp": 3e-3, "cnn": 1e-3}, k=10,
                  grid=(1e-3, 3e-3, 1e-2), training=Training(3e-3, steps=300)),
    EstimatorSpec("local_backprop", LocalBackprop, backward="block", lr={"mlp": 0.3, "cnn": 0.3},
                  grid=(0.03, 0.1, 0.3), training=Training(1e-2)),
    EstimatorSpec("local_guess", LocalGuess, backward="block", lr={"mlp": 0.3, "cnn": 0.1},
                  grid=(0.03, 0.1, 0.3), training=Training(1e-2)),
    EstimatorSpec("local_guess_example", LocalGuess, {"projection": "example"}, backward="block",
                  lr={"mlp": 0.3, "cnn": 0.1}, grid=(0.03, 0.1, 0.3), training=Training(1e-2)),
    EstimatorSpec("zeroth_order", ZerothOrder, lr={"mlp": 1e-4, "cnn": 1e-4}, k=1,
                  grid=(1e-4, 3e-4, 1e-3), training=Training(5e-3)),
):
    register(_spec)

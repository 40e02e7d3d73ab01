"""The torch backend's contract on a zoo of small models, "exact or refused": every model the backend accepts gets an
exact estimate from the weight estimators and an unbiased one from activity perturbation, or a one-line refusal (a
``ValueError``) raised before any parameter changes.

Every model is float64 (but one float32 layer in ``dtype_mix``), a few hundred parameters at most, a batch of 6.
Each compared call starts from the same random state and buffers (:meth:`Problem.rewind`), so dropout draws the same
masks and batch statistics are the same in the reference and in the estimate.

- weights, basis: ``network.jvp`` along the ``n`` basis vectors of the parameters (one pass each) is autograd's
  gradient, relative error at most ``1e-10``;
- weights, orthogonal: ``MultiDirection(k=n, aggregation="orthogonal")`` (the gradient's projection on ``n``
  independent directions) is autograd's gradient;
- weights, every other registered weight estimator: one estimate, finite, of the parameters' shapes (the one refusal
  allowed: input-generated directions for an ``nn.Linear`` called more than once in one forward);
- activity, oracle: ``ActivityPerturbation(k=N)`` with its Gaussian tangents replaced by the scaled basis of the
  ``N`` per-example coordinates of the perturbed sites (``u_j = sqrt(N) e_j``, the same coordinate in every example
  row), so that ``(1/N) Σ_j d_j u_j`` is the estimator's expectation exactly: it must be autograd's gradient (with
  ``exact_output=True``, and again with ``exact_output=False``: the output layer perturbed too);
- activity, k=2: the real estimator runs (finite, right shapes), or refuses as expected.

A refusal is a ``ValueError`` whose message is one line, holds the expected words, and comes before any parameter
changes. The basis and orthogonal checks run ``n`` forward passes and the activity oracle ``N``: the models are kept
to a few hundred parameters and perturbed coordinates.

``CASES`` is the zoo the fixes were made against; ``HELD_OUT`` is checked against the same contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import zoo_models as zoo
from torch import Tensor, nn

from fg_lightning.engine import GivenTangents
from fg_lightning.estimators import REGISTRY, ActivityPerturbation, MultiDirection
from fg_lightning.estimators import local as local_module
from fg_lightning.torch_network import TorchNetwork

BATCH, SEED, DATA_SEED = 6, 1234, 99
TOLERANCE = 1e-10


# -- expectations ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refused:
    """A one-line ``ValueError`` whose message holds every string of ``all_of`` and at least one of ``any_of``;
    ``batch``: it mentions the batch (the word, besides in a class name such as BatchNorm)."""

    all_of: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()
    batch: bool = False

    def __str__(self) -> str:
        return f"refused({', '.join(self.all_of + self.any_of)})"


UNBIASED = None  # activity perturbation's expectation is autograd's gradient


@dataclass(frozen=True)
class UnbiasedOrRefused:
    """Either is the contract (a case of the zoo's own, where the brief fixes neither): unbiased, or ``refusal``."""

    refusal: Refused

    def __str__(self) -> str:
        return f"unbiased or {self.refusal}"


MIXES_BATCH = Refused(any_of=("BatchNorm", "'norm'"), batch=True)  # names the batch norm, mentions the batch


REENTRANT = Refused(all_of=("use_reentrant",))


def tuple_output(module_class: str) -> Refused:
    return Refused(all_of=(module_class, "returns a tuple"))


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]  # a float64 model (dtype_mix: one float32 layer), in train mode unless it says
    inputs: Callable[[torch.Generator], Tensor]
    classes: int = 3
    activity: Refused | UnbiasedOrRefused | None = UNBIASED  # ActivityPerturbation() (exact_output=True)
    # ActivityPerturbation(exact_output=False); "same": as ``activity``
    activity_open: Refused | UnbiasedOrRefused | None | str = "same"
    tolerance: float = TOLERANCE  # relative error of the exact checks
    weights: Refused | None = None  # the weight estimators' refusal (None: exact)
    calls_a_linear_twice: bool = False  # input_qr / input_approx may refuse it

    def __str__(self) -> str:
        return self.name


def flat(features: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randn(BATCH, features, generator=g, dtype=torch.float64)


def shaped(*shape: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randn(BATCH, *shape, generator=g, dtype=torch.float64)


def tokens(vocabulary: int, length: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randint(0, vocabulary, (BATCH, length), generator=g)


def double(make: Callable[..., nn.Module], *args, **kwargs) -> Callable[[], nn.Module]:
    return lambda: make(*args, **kwargs).double()


IMAGE = shaped(2, 5, 5)
SEQUENCE = shaped(4, 3)  # (B, T, features) for the recurrent models
TOKENS4 = shaped(3, 4)  # (B, T, 4) for the attention models

CASES = [
    Case("linear", double(zoo.mlp), flat(4)),
    Case("conv1d", double(zoo.conv1d), shaped(2, 7)),
    Case("conv2d", double(zoo.conv2d), IMAGE),
    Case("conv3d", double(zoo.conv3d), shaped(1, 3, 4, 4)),
    Case("conv_transpose2d", double(zoo.conv_transpose2d), shaped(2, 3, 3)),
    Case("batchnorm1d_train", double(zoo.batchnorm1d), flat(4), activity=MIXES_BATCH),
    Case("batchnorm1d_train_no_affine", double(zoo.batchnorm1d, affine=False), flat(4), activity=MIXES_BATCH),
    Case("batchnorm2d_train", double(zoo.batchnorm2d), IMAGE, activity=MIXES_BATCH),
    Case("batchnorm1d_eval", double(zoo.batchnorm1d, train=False), flat(4)),
    Case("batchnorm2d_eval", double(zoo.batchnorm2d, train=False), IMAGE),
    Case("batch_centering_custom", double(zoo.batch_centering), flat(4),
         activity=Refused(any_of=("BatchCenter", "'norm'"), batch=True)),
    Case("layernorm", double(zoo.layernorm), flat(4)),
    Case("groupnorm", double(zoo.groupnorm), IMAGE),
    Case("instancenorm2d_affine", double(zoo.instancenorm2d), IMAGE),
    Case("dropout_train", double(zoo.dropout), flat(4)),
    Case("embedding", double(zoo.Embedded), tokens(7, 5)),
    Case("rnn", double(zoo.Recurrent, nn.RNN), SEQUENCE, activity=tuple_output("RNN")),
    Case("gru", double(zoo.Recurrent, nn.GRU), SEQUENCE, activity=tuple_output("GRU")),
    Case("lstm", double(zoo.Recurrent, nn.LSTM), SEQUENCE, activity=tuple_output("LSTM")),
    Case("rnncell_loop", double(zoo.CellLoop, nn.RNNCell), SEQUENCE),
    Case("grucell_loop", double(zoo.CellLoop, nn.GRUCell), SEQUENCE),
    Case("lstmcell_loop", double(zoo.CellLoop, nn.LSTMCell), SEQUENCE, activity=tuple_output("LSTMCell")),
    Case("multihead_attention_dropout0", double(zoo.Attention, 0.0), TOKENS4,
         activity=tuple_output("MultiheadAttention")),
    Case("multihead_attention_dropout0.1", double(zoo.Attention, 0.1), TOKENS4,
         activity=tuple_output("MultiheadAttention")),
    Case("sdpa", double(zoo.SDPA), TOKENS4),
    Case("sdpa_dropout0.1", double(zoo.SDPA, 0.1), TOKENS4),
    Case("transformer_encoder_dropout0", double(zoo.Encoder, 0.0), TOKENS4,
         activity=tuple_output("MultiheadAttention")),
    Case("transformer_encoder_dropout0.1", double(zoo.Encoder, 0.1), TOKENS4,
         activity=tuple_output("MultiheadAttention")),
    Case("weight_norm", double(zoo.weight_norm), flat(4)),
    Case("spectral_norm", double(zoo.spectral_norm), flat(4)),
    Case("checkpoint_non_reentrant", double(zoo.Checkpointed, False), flat(4)),
    # torch's reentrant checkpoint has no forward-mode rule and refuses autograd.grad: refused for every estimator
    Case("checkpoint_reentrant", double(zoo.Checkpointed, True), flat(4), weights=REENTRANT, activity=REENTRANT),
    Case("relu_inplace", double(zoo.relu_inplace), flat(4)),
    Case("inplace_logits", double(zoo.InPlaceLogits), flat(4),
         activity=Refused(all_of=("changes its output before the loss", "exact_output=False")),
         activity_open=UNBIASED),
    Case("residual", double(zoo.Residual), flat(4)),
    Case("skip_past_relu_in_sequential", double(zoo.SkipPastReLU), flat(4)),
    Case("functional_relu", double(zoo.FunctionalReLU), flat(4)),
    Case("maxpool_after_conv_relu", double(zoo.maxpool), IMAGE),
    Case("skip_past_maxpool", double(zoo.SkipPastPool), IMAGE),
    Case("module_called_twice", double(zoo.Reused), flat(5), calls_a_linear_twice=True),
    Case("multi_input_forward", double(zoo.MultiInput), flat(4)),
    Case("bilinear", double(zoo.BilinearModel), flat(4)),
    Case("custom_module_with_f_dropout", double(zoo.custom_dropout), flat(4)),
    Case("bool_bias_cell", double(zoo.bool_bias_cell), flat(4)),
    Case("frozen_parameters", double(zoo.frozen), flat(4)),
    Case("gelu_silu_tanh", double(zoo.smooth_activations), flat(4)),
    Case("prelu", double(zoo.prelu), flat(4)),
    Case("adaptive_avgpool", double(zoo.adaptive_avgpool), IMAGE),
    # float32 arithmetic in one layer: exact to float32's precision, not 1e-10 (measured: 3e-8 along the basis and
    # for activity; 1.4e-6 for the orthogonal projection, whose solve multiplies the float32 rounding by the
    # conditioning of the directions)
    Case("dtype_mix_float32_layer", zoo.DtypeMix, flat(4), tolerance=1e-5),
    Case("buffer_updated_under_no_grad", double(zoo.RunningBuffer), flat(4)),
    # a site whose first axis is not the batch (time-major), of another length than the batch and of the same
    Case("time_major_linear_T4", double(zoo.TimeMajor), shaped(4, 3),
         activity=UnbiasedOrRefused(Refused(batch=True))),
    Case("time_major_linear_T6", double(zoo.TimeMajor), shaped(BATCH, 3),
         activity=UnbiasedOrRefused(Refused(batch=True))),
]

HELD_OUT = [
    Case("held_out_text_conv1d_groupnorm", double(zoo.TextConv), tokens(8, 6)),
    Case("held_out_tiny_vit", double(zoo.TinyViT), shaped(1, 4, 4), activity=tuple_output("MultiheadAttention")),
    Case("held_out_grucell_loop", double(zoo.GRULoop), shaped(5, 3)),
    Case("held_out_depthwise_conv", double(zoo.depthwise), shaped(3, 4, 4)),
    Case("held_out_layernorm_gelu_residual", double(zoo.LNResidualMLP), flat(4)),
    Case("held_out_embedding_mean_pool", double(zoo.EmbeddingMeanPool), tokens(9, 4)),
]

ALL = CASES + HELD_OUT
WEIGHT_ESTIMATORS = [name for name, spec in REGISTRY.items()
                     if not spec.needs_local_losses and not issubclass(spec.cls, ActivityPerturbation)]
FORWARD_FREE = {"backprop", "zeroth_order"}  # estimators that run no forward-mode pass


# -- the problem and its reference ------------------------------------------------------------------------------

class Problem:
    """A case's model (built from a fixed seed), wrapped, with its batch; ``rewind()`` puts the model's buffers back
    as built and seeds the global generator, before each call that is compared."""

    def __init__(self, case: Case) -> None:
        torch.manual_seed(sum(map(ord, case.name)))
        self.module = case.build()
        self.network = TorchNetwork(self.module)
        generator = torch.Generator().manual_seed(DATA_SEED)
        self.x = case.inputs(generator)
        self.labels = torch.randint(0, case.classes, (BATCH,), generator=generator)
        self.buffers = {name: b.clone() for name, b in self.module.named_buffers()}
        self.names = [name for name, p in self.module.named_parameters() if p.requires_grad]
        assert self.names == [name for name, _ in self.network.named_parameters()]
        self.params = dict(self.module.named_parameters())
        assert 0 < sum(self.params[n].numel() for n in self.names) <= 400, "keep the zoo small"

    def rewind(self) -> None:
        with torch.no_grad():
            for name, buffer in self.module.named_buffers():
                buffer.copy_(self.buffers[name])
        torch.manual_seed(SEED)

    def reference(self) -> dict[str, Tensor]:
        """Autograd's gradient of the cross-entropy of the module's logits, from the rewound state (by
        ``backward()``: a reentrant checkpoint refuses ``torch.autograd.grad``)."""
        self.rewind()
        trained = [self.params[n] for n in self.names]
        kept = [p.grad for p in trained]
        try:
            for p in trained:
                p.grad = None
            with torch.enable_grad():
                F.cross_entropy(self.module(self.x), self.labels).backward()
            return {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                    for n, p in zip(self.names, trained)}
        finally:
            for p, grad in zip(trained, kept):
                p.grad = grad

    @property
    def n(self) -> int:
        return sum(self.params[n].numel() for n in self.names)

    def snapshot(self) -> dict[str, Tensor]:
        return {name: p.detach().clone() for name, p in self.module.named_parameters()}


def flatten(grads: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([grads[n].detach().double().flatten() for n in names])


def relative_error(estimate: dict[str, Tensor], exact: dict[str, Tensor], names: list[str]) -> tuple[float, str]:
    """``|ĝ - g| / |g|`` over all parameters, and the parameter with the largest share of the error."""
    reference = flatten(exact, names)
    scale = float(reference.norm())
    assert scale > 0, "the reference gradient is zero: a useless case"
    errors = {n: float((estimate[n].detach().double() - exact[n].double()).norm()) for n in names}
    worst = max(errors, key=errors.get)
    return float(flatten(estimate, names).sub(reference).norm()) / scale, f"{worst} ({errors[worst] / scale:.3g})"


def assert_exact(estimate: dict[str, Tensor], exact: dict[str, Tensor], names: list[str], tolerance: float) -> None:
    assert set(names) <= set(estimate), f"no estimate for {sorted(set(names) - set(estimate))}"
    for n in names:
        assert tuple(estimate[n].shape) == tuple(exact[n].shape), n
    error, worst = relative_error(estimate, exact, names)
    assert error <= tolerance, f"relative error {error:.3g} > {tolerance:g}; worst parameter {worst}"


def assert_refused(problem: Problem, run: Callable[[], object], expected: Refused) -> None:
    before = problem.snapshot()
    with pytest.raises(ValueError) as info:
        run()
    message = str(info.value)
    assert "\n" not in message, f"the refusal is not one line: {message!r}"
    for text in expected.all_of:
        assert text in message, f"{text!r} not in the refusal: {message!r}"
    if expected.any_of:
        assert any(text in message for text in expected.any_of), \
            f"none of {expected.any_of} in the refusal: {message!r}"
    if expected.batch:
        assert "batch" in message.lower().replace("batchnorm", ""), \
            f"the refusal does not mention the batch: {message!r}"
    after = problem.snapshot()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed before the refusal"


def assert_estimate(problem: Problem, grads) -> None:
    assert set(grads) == set(problem.names), sorted(set(grads) ^ set(problem.names))
    for name in problem.names:
        grad = grads[name]
        assert tuple(grad.shape) == tuple(problem.params[name].shape), name
        assert bool(torch.isfinite(grad).all()), f"non-finite estimate of {name}"


def ids(cases: list[Case]) -> list[str]:
    return [case.name for case in cases]


@pytest.fixture(autouse=True)
def one_thread():
    """The zoo's tensors are tiny: one thread (on a busy machine, torch's thread pool costs several times the
    arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- weight estimators -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
def test_weights_basis_jvp_is_the_gradient(case):
    """``network.jvp`` along the n basis vectors gives the gradient itself, coordinate by coordinate."""
    problem = Problem(case)
    exact = problem.reference()
    n, offset, basis, tangents = problem.n, 0, torch.eye(problem.n, dtype=torch.float64), {}
    for name in problem.names:
        param = problem.params[name]
        tangents[name] = basis[:, offset:offset + param.numel()].reshape(n, *param.shape).to(param.dtype)
        offset += param.numel()
    problem.rewind()
    if case.weights is not None:
        assert_refused(problem, lambda: problem.network.jvp(problem.x, problem.labels, GivenTangents(tangents)),
                       case.weights)
        return
    result = problem.network.jvp(problem.x, problem.labels, GivenTangents(tangents))
    assert tuple(result.dir_derivs.shape) == (n,)
    offset, estimate = 0, {}
    for name in problem.names:
        size = problem.params[name].numel()
        estimate[name] = result.dir_derivs[offset:offset + size].reshape(problem.params[name].shape)
        offset += size
    assert_exact(estimate, exact, problem.names, case.tolerance)


@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
def test_weights_orthogonal_with_k_n_is_the_gradient(case):
    problem = Problem(case)
    exact = problem.reference()
    problem.rewind()

    def run():
        return MultiDirection(k=problem.n, aggregation="orthogonal", seed=0).estimate(
            problem.network, problem.x, problem.labels, 0)

    if case.weights is not None:
        assert_refused(problem, run, case.weights)
        return
    estimate = run()
    assert_exact(estimate.grads, exact, problem.names, case.tolerance)


@pytest.mark.parametrize("estimator", WEIGHT_ESTIMATORS)
@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
def test_weights_every_estimator_runs(case, estimator):
    """One estimate (momentum: its backprop checkpoint at step 0, then a forward step at step 1), finite and of the
    parameters' shapes; input-generated directions may refuse an nn.Linear called twice in one forward."""
    problem = Problem(case)
    spec = REGISTRY[estimator]
    made = spec.make(k=min(3, problem.n)) if spec.takes_k else spec.make()
    steps = [0, 1] if estimator == "momentum" else [0]

    def run():
        for step in steps:
            problem.rewind()
            assert_estimate(problem, made.estimate(problem.network, problem.x, problem.labels, step).grads)

    if case.weights is not None and estimator in FORWARD_FREE:  # no forward-mode pass: it may run where those refuse
        try:
            run()
        except ValueError:
            assert_refused(problem, run, case.weights)
    elif case.weights is not None:
        assert_refused(problem, run, case.weights)
    elif case.calls_a_linear_twice and estimator in ("input_qr", "input_approx"):
        try:
            run()
        except ValueError:  # allowed, if it is the right refusal
            assert_refused(problem, run, Refused(all_of=("called more than once",)))
    else:
        run()


# -- activity perturbation -------------------------------------------------------------------------------------

class BasisDraws:
    """Replaces ``_ActivityTangents.draws``: first (``N`` unknown) it records the perturbed calls and draws zeros; then
    direction ``j`` is ``sqrt(N)`` at per-example coordinate ``j`` of the perturbed sites, concatenated in the order the
    pass meets them (the same coordinate in every example row), zero elsewhere. The pass and the weight step get the
    same tangents."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, int, int]] = []  # (call, offset, size), keyed by identity
        self.total: int | None = None

    def place(self, call) -> tuple[int, int]:
        for seen, offset, size in self.calls:
            if seen is call:
                return offset, size
        offset = sum(size for _, _, size in self.calls)
        size = math.prod(call.shape[1:])
        self.calls.append((call, offset, size))
        return offset, size

    def draws(self, source, call, generator, into=None):
        offset, size = self.place(call)
        k = source.estimator.k

        def direction(j: int):
            u = call.like.new_zeros(call.shape)
            if self.total is not None and offset <= j < offset + size:
                u.view(call.shape[0], -1)[:, j - offset] = self.total**0.5
            return [(slice(None), u)]

        return (direction(j) for j in range(k))


def activity_oracle(problem: Problem, monkeypatch, exact_output: bool) -> dict[str, Tensor]:
    """The expectation of ``ActivityPerturbation(exact_output=...)``'s estimate, exactly."""
    basis = BasisDraws()
    with monkeypatch.context() as patched:
        patched.setattr(local_module._Noise, "draws",
                        lambda noise, into=None: basis.draws(noise.source, noise.call, noise.generator, into))
        problem.rewind()
        ActivityPerturbation(k=1, exact_output=exact_output, seed=0).estimate(
            problem.network, problem.x, problem.labels, 0)
        total = sum(size for _, _, size in basis.calls)
        assert 0 < total <= 600, f"{total} perturbed coordinates: keep the zoo small"
        basis.calls, basis.total = [], total
        problem.rewind()
        grads = ActivityPerturbation(k=total, exact_output=exact_output, seed=0).estimate(
            problem.network, problem.x, problem.labels, 0).grads
        assert sum(size for _, _, size in basis.calls) == total, "the second pass perturbed other sites"
    return grads


def check_activity(problem: Problem, case: Case, expected, oracle: Callable[[Problem], dict[str, Tensor]]) -> None:
    if isinstance(expected, Refused):
        assert_refused(problem, lambda: oracle(problem), expected)
        return
    try:
        grads = oracle(problem)
    except ValueError:
        if not isinstance(expected, UnbiasedOrRefused):
            raise
        assert_refused(problem, lambda: oracle(problem), expected.refusal)
        return
    assert_exact(grads, problem.reference(), problem.names, case.tolerance)


@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
def test_activity_expectation_is_the_gradient(case, monkeypatch):
    """ActivityPerturbation() (exact_output=True): its expectation is autograd's gradient, or it refuses."""
    check_activity(Problem(case), case, case.activity, lambda problem: activity_oracle(problem, monkeypatch, True))


@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
def test_activity_with_the_output_perturbed_too(case, monkeypatch):
    """ActivityPerturbation(exact_output=False): the output layer perturbed as well (Ren et al.'s FG-A)."""
    expected = case.activity if case.activity_open == "same" else case.activity_open
    check_activity(Problem(case), case, expected, lambda problem: activity_oracle(problem, monkeypatch, False))


@pytest.mark.parametrize("case", ALL, ids=ids(ALL))
def test_activity_runs_with_its_own_tangents(case):
    """The real estimator, k=2: it runs, or refuses as the oracle's case expects."""
    problem = Problem(case)
    problem.rewind()

    def run():
        return ActivityPerturbation(k=2, seed=0).estimate(problem.network, problem.x, problem.labels, 0)

    if isinstance(case.activity, Refused):
        assert_refused(problem, run, case.activity)
        return
    try:
        estimate = run()
    except ValueError:
        if not isinstance(case.activity, UnbiasedOrRefused):
            raise
        assert_refused(problem, run, case.activity.refusal)
        return
    assert_estimate(problem, estimate.grads)

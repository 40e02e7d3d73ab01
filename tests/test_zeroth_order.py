"""ZerothOrder (SPSA with MeZO's in-place perturbation and seed replay): its mean is the gradient (float64, ε = 1e-6,
Gaussian and Rademacher, on an engine MLP and on a torch model with dropout); the in-place perturb-and-restore drifts
by rounding only, as a random walk; half precision is refused before any update; it trains both backends; applied as
formed it takes the kept estimate's SGD step bit for bit, one parameter at a time; two ranks take one process's update
on the union batch in one all-reduce of k + 1 numbers. And the mutants these tests exist to catch: an estimate scaled
by 1.1, a perturbation not restored, z drawn again differently, the random state not rewound between forwards."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from test_estimators import (
    SEED, TARGET_SE, check_two_ranks_take_the_union_batch_update, count_parts_as_formed, flat, gaussian_var, mutant,
    small_problem, tiny_problem,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fg_lightning.engine import MLP, cross_entropy
from fg_lightning.estimators import (
    REGISTRY, AppliedGrads, DivergenceError, ZerothOrder, training_step,
)
from fg_lightning.estimators import zeroth_order as zeroth_order_module
from fg_lightning.estimators.collective import ONE_PROCESS, Collective
from fg_lightning.module import ForwardGradientModule
from fg_lightning.torch_network import TorchNetwork

K = 4


def rademacher_var(g, k=1):
    """Per coordinate, (g·z) z_i with z_i = ±1: Σ_{j≠i} g_j², over k for the mean of k."""
    return (g.square().sum() - g.square()) / k


THEORY_VAR = {"gaussian": lambda g: gaussian_var(g, K), "rademacher": lambda g: rademacher_var(g, K)}


def dropout_problem():
    """A float64 torch model with dropout in training mode, its batch, and the global seed each compared call starts
    from (the same dropout mask in the reference and in every estimate)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)).double().train()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    return TorchNetwork(model), x, torch.randint(0, 3, (8,), generator=generator)


def check_mean_is_the_gradient(make, problem, theory_var, draws=2000, max_count=40_000):
    """test_estimators.check_unbiased's statistics, each estimate from the same global random state: the mean gain
    ĝ·g/|g|² is 1 within 4.5 standard errors (drawn until the standard error is below TARGET_SE), every coordinate's
    mean within 5 standard errors of g_i, and the sample variances are the closed form's. At ε = 1e-6 in float64
    the O(ε²) bias and the rounding (1e-16 / ε) are far below the 1 % the draws resolve."""
    estimator = make(SEED)
    net, x, labels = problem()
    torch.manual_seed(SEED)
    state = torch.get_rng_state()  # (set again below: cheaper than torch.manual_seed)
    exact = flat(net.loss_and_grad(x, labels)[2])  # autograd's (torch) or backprop's (engine), that dropout mask
    blocks = []
    while True:
        done = sum(len(b) for b in blocks)
        block = []
        for step in range(done, done + draws):
            torch.set_rng_state(state)
            block.append(flat(estimator.estimate(net, x, labels, step).grads))
        blocks.append(torch.stack(block))
        samples = torch.cat(blocks)
        gains = samples @ exact / exact.square().sum()
        se = float(gains.std()) / math.sqrt(len(gains))
        if se < TARGET_SE or len(gains) >= max_count:
            break
    count = len(gains)
    assert se < TARGET_SE, f"{count} draws leave the gain's standard error at {se:.3g}"
    z = (float(gains.mean()) - 1) / se
    assert abs(z) < 4.5, f"mean gain {float(gains.mean()):.4f} ± {se:.4f} (z = {z:.1f}) over {count} draws"
    var = theory_var(exact)
    z = (samples.mean(0) - exact) / (var / count).sqrt()
    assert z.abs().max() < 5, z
    ratio = samples.var(0) / var
    assert 0.85 < ratio.mean() < 1.15, ratio


def zeroth(distribution="gaussian", eps=1e-6):
    return lambda seed=0: ZerothOrder(k=K, eps=eps, distribution=distribution, seed=seed)


PROBLEMS = {"engine_mlp": tiny_problem, "torch_dropout": dropout_problem}


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_the_mean_of_many_estimates_is_the_gradient(distribution, problem):
    check_mean_is_the_gradient(zeroth(distribution), PROBLEMS[problem], THEORY_VAR[distribution])


# -- the in-place perturbation drifts by rounding only ------------------------------------------------------------

QUERIES = 300


def drift_in_ulps(estimator, queries=QUERIES):
    """Float32: the parameters of a small MLP after ``queries`` estimates (one query each, no update) against a copy
    restored exactly (its parameters never move: θ₀), in rounding units ``u = eps₃₂ (|θ₀| + 2ε·6)`` (an upper bound of
    the ulp of any value the coordinate takes: |z| < 6). Each query adds three roundings to nearest (+εz, −2εz, +εz),
    each within u/2, mean zero, variance ≤ u²/12: after S queries a random walk of standard deviation ≤ (u/2)√S."""
    net, x, labels = small_problem(n=32)
    restored_exactly = {name: p.detach().clone() for name, p in net.named_parameters()}
    for step in range(queries):
        estimator.estimate(net, x, labels, step)
    drift = torch.cat([(p.detach() - restored_exactly[name]).flatten() for name, p in net.named_parameters()])
    theta = torch.cat([p.flatten() for p in restored_exactly.values()])
    unit = torch.finfo(torch.float32).eps * (theta.abs() + 2 * estimator.eps * 6)
    ulps = drift.abs() / unit
    return float(ulps.square().mean().sqrt()), float(ulps.max()), float(drift.abs().max())


def check_drift(estimator, queries=QUERIES):
    """Gaussian z: a fresh value at every query, so the roundings are independent: the RMS over the coordinates at
    most 0.75√S (the random walk's 0.5√S; measured 0.45-0.51√S at seeds 0-29), the largest at most 4√S (measured
    1.5-2.0√S: the largest of 227 walks, about 3.5 of their standard deviations).

    Rademacher z: the same ±ε at every query, so a coordinate's roundings, a function of θ and the sign alone,
    repeat while θ stays where it is (here: no update) and add up linearly: at most 1.5·S (three roundings of at most
    u/2 each, the hard bound; measured 0.44-0.52·S at seeds 0-9), the RMS at most 0.1·S (measured 0.057-0.061·S)."""
    rms, largest, absolute = drift_in_ulps(estimator, queries)
    root = math.sqrt(queries)
    print(f"{estimator.distribution} drift after {queries} queries: rms {rms:.2f} ulps ({rms / root:.3f}√S, "
          f"{rms / queries:.4f}S), largest {largest:.1f} ulps ({largest / root:.2f}√S, {largest / queries:.3f}S), "
          f"{absolute:.3g} absolute")
    if estimator.distribution == "gaussian":
        rms_bound, largest_bound = 0.75 * root, 4 * root
    else:
        rms_bound, largest_bound = 0.1 * queries, 1.5 * queries
    assert rms <= rms_bound, f"rms drift {rms:.2f} ulps over {queries} queries, above {rms_bound:.1f}"
    assert largest <= largest_bound, f"largest drift {largest:.1f} ulps over {queries} queries, above {largest_bound:.1f}"


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_perturb_and_restore_drifts_by_rounding_only(distribution):
    check_drift(ZerothOrder(k=1, distribution=distribution, seed=SEED))


# -- half precision ------------------------------------------------------------------------------------------------


def torch_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["engine", "torch"])
def test_half_precision_is_refused_in_one_line_before_any_update(backend, dtype):
    _, x, labels = small_problem()
    net = small_problem()[0] if backend == "engine" else TorchNetwork(torch_mlp())
    net = net.to(dtype)
    estimator = ZerothOrder(seed=1)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    generator = estimator.generator(torch.device("cpu")).get_state()
    for refused in (lambda: estimator.validate(net),
                    lambda: training_step(estimator, net, x.to(dtype), labels, 0,
                                          torch.optim.SGD(net.parameters(), lr=0.1), ONE_PROCESS)):
        with pytest.raises(ValueError) as info:
            refused()
        message = str(info.value)
        assert "\n" not in message and str(dtype) in message and "ZerothOrder" in message, message
    with pytest.raises(ValueError, match=str(dtype)):
        ForwardGradientModule(net if backend == "engine" else net.module, estimator)
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name]), name
    assert torch.equal(estimator.generator(torch.device("cpu")).get_state(), generator)  # nothing drawn


@pytest.mark.parametrize("make, message", [
    (lambda: ZerothOrder(k=0), "k=0"),
    (lambda: ZerothOrder(eps=0.0), "eps=0.0"),
    (lambda: ZerothOrder(eps=-1e-3), "eps=-0.001"),
    (lambda: ZerothOrder(eps=float("nan")), "eps=nan"),
    (lambda: ZerothOrder(eps="small"), "eps='small'"),
    (lambda: ZerothOrder(distribution="uniform"), "distribution='uniform'"),
    (lambda: ZerothOrder(seed=1.5), "seed=1.5"),
])
def test_bad_arguments_name_the_value(make, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")) as info:
        make()
    assert "\n" not in str(info.value)


# -- training ------------------------------------------------------------------------------------------------------


def test_a_short_training_lowers_the_loss_on_the_engine():
    net, x, labels = small_problem()
    estimator, optimizer = ZerothOrder(k=4, seed=0), torch.optim.SGD(net.parameters(), lr=0.05)
    before = float(cross_entropy(net(x), labels))
    for step in range(200):
        rows = slice(step % 4 * 32, (step % 4 + 1) * 32)
        training_step(estimator, net, x[rows], labels[rows], step, optimizer, ONE_PROCESS)
    after = float(cross_entropy(net(x), labels))
    print(f"engine MLP: loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.3, (before, after)


def test_a_short_training_lowers_the_loss_on_the_torch_backend_through_the_module():
    """A torch model with dropout and batch norm, trained by ForwardGradientModule under a Trainer."""
    _, x, labels = small_problem()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))

    def loss():
        model.eval()
        with torch.no_grad():
            value = float(nn.functional.cross_entropy(model(x), labels))
        model.train()
        return value

    before = loss()
    module = ForwardGradientModule(model, ZerothOrder(k=4, seed=0), lambda p: torch.optim.SGD(p, lr=0.05))
    pl.Trainer(max_steps=200, logger=False, enable_model_summary=False, enable_checkpointing=False,
               enable_progress_bar=False, accelerator="cpu").fit(
        module, DataLoader(TensorDataset(x, labels), batch_size=32, shuffle=True))
    after = loss()
    print(f"torch backend: loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.3, (before, after)
    assert int(model[1].num_batches_tracked) == 200  # the batch statistics moved once a step, not 2k times


# -- applied as formed ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("backend", ["engine", "torch"])
def test_applied_as_formed_is_the_kept_estimates_sgd_step_bit_for_bit(backend, distribution, monkeypatch):
    """Under plain SGD the update of each parameter is applied as it is formed (UpdateAsFormed), one parameter per part
    and never more than one formed part alive: the parameters of the kept estimate's step through ``.grad``, bit for
    bit, with no ``.grad`` written."""
    def trained(keep, steps=3):
        net, x, labels = small_problem()
        if backend == "torch":
            net = TorchNetwork(torch_mlp())
        estimator = ZerothOrder(k=3, distribution=distribution, seed=2)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        for step in range(steps):
            rows = slice(step * 32, (step + 1) * 32)
            estimate = training_step(estimator, net, x[rows], labels[rows], step, optimizer, ONE_PROCESS,
                                     keep_estimate=keep)
            assert isinstance(estimate.grads, AppliedGrads) != keep
        return net

    most, parts = count_parts_as_formed(monkeypatch)
    formed = trained(keep=False)
    names = [name for name, _ in formed.named_parameters()]
    assert most[0] == 1 and parts == 3 * [[name] for name in names]
    kept = trained(keep=True)
    for (name, got), want in zip(formed.named_parameters(), kept.parameters()):
        assert got.grad is None, name
        assert torch.equal(got, want), name


def test_a_non_finite_loss_difference_is_refused_before_any_update():
    net, x, labels = small_problem()
    x = x.clone()
    x[0, 0] = float("inf")
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    with pytest.raises(DivergenceError):
        training_step(ZerothOrder(), net, x, labels, 0, torch.optim.SGD(net.parameters(), lr=0.1), ONE_PROCESS)
    for name, p in net.named_parameters():
        assert torch.allclose(p, before[name], rtol=0, atol=1e-6), name  # within the restore's rounding


# -- data parallel -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "cnn", "torch_cnn"])
def test_two_ranks_equal_one_process_on_the_union_batch(model):
    """tests/ddp_worker.py's three steps on two ranks in two threads (the torch backend too: ZerothOrder runs no
    forward-mode pass) against one process on the union batches, float64."""
    check_two_ranks_take_the_union_batch_update("zeroth_order", model)


def test_one_all_reduce_of_k_differences_and_the_loss(monkeypatch):
    calls = []
    original = Collective.batch_mean

    def counted(self, tensors, batch_size):
        calls.append([tuple(t.shape) for t in tensors])
        return original(self, tensors, batch_size)

    monkeypatch.setattr(Collective, "batch_mean", counted)
    net, x, labels = small_problem()
    comm = Collective()
    ZerothOrder(k=5).estimate(net.double(), x.double(), labels, 0, comm)
    assert calls == [[(), (5,)]]
    assert comm.bytes == (1 + 5 + 1) * 8  # the loss, the 5 differences, the batch size


# -- resume --------------------------------------------------------------------------------------------------------


def test_the_generator_state_is_all_a_resume_needs():
    """No state but the generator's: a resumed estimator on the checkpoint's parameters continues bit for bit."""
    net, x, labels = small_problem()
    original = ZerothOrder(k=2, seed=4)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    for step in range(3):
        training_step(original, net, x, labels, step, optimizer, ONE_PROCESS)
    state = original.state_dict()
    assert set(state) == {"seed", "rng"}
    saved = {name: p.detach().clone() for name, p in net.named_parameters()}
    for step in range(3, 6):
        training_step(original, net, x, labels, step, optimizer, ONE_PROCESS)
    straight = {name: p.detach().clone() for name, p in net.named_parameters()}
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(saved[name])
    resumed = ZerothOrder(k=2, seed=99)
    resumed.load_state_dict(state)
    for step in range(3, 6):
        training_step(resumed, net, x, labels, step, optimizer, ONE_PROCESS)
    for name, p in net.named_parameters():
        assert torch.equal(p, straight[name]), name


# -- the mutants these tests catch ---------------------------------------------------------------------------------


def _no_restore(monkeypatch):
    shift = ZerothOrder._shift
    monkeypatch.setattr(ZerothOrder, "_shift", staticmethod(
        lambda queries, query, params, scale: None if scale > 0 else shift(queries, query, params, scale)))


def _drawn_again_differently(monkeypatch):
    """z drawn again from another state than the one recorded: the estimate's and the restore's z are not the
    perturbation's."""
    def other(self, query, name, param):
        return self.sample(torch.Generator(param.device).manual_seed(1000 + query), param)

    monkeypatch.setattr(zeroth_order_module._Queries, "draw", other)


def _not_rewound(monkeypatch):
    monkeypatch.setattr(zeroth_order_module, "Rewind", lambda network, device: lambda: None)


def test_an_estimate_scaled_by_1_1_is_caught():
    with pytest.raises(AssertionError, match="mean gain"):
        check_mean_is_the_gradient(mutant(zeroth(), "scaled_by_1.1"), tiny_problem, THEORY_VAR["gaussian"])


def test_z_drawn_again_differently_is_caught(monkeypatch):
    _drawn_again_differently(monkeypatch)
    with pytest.raises(AssertionError, match="mean gain"):
        check_mean_is_the_gradient(zeroth(), tiny_problem, THEORY_VAR["gaussian"])


def test_a_perturbation_not_restored_is_caught(monkeypatch):
    _no_restore(monkeypatch)
    with pytest.raises(AssertionError, match="drift"):
        check_drift(ZerothOrder(k=1, seed=SEED), queries=20)


def test_forwards_that_draw_other_dropout_masks_are_caught(monkeypatch):
    _not_rewound(monkeypatch)
    with pytest.raises(AssertionError):
        check_mean_is_the_gradient(zeroth(), dropout_problem, THEORY_VAR["gaussian"], draws=500, max_count=500)


def test_the_registry_record():
    spec = REGISTRY["zeroth_order"]
    assert spec.cls is ZerothOrder and spec.backward == "none" and spec.takes_k and not spec.unbiased
    assert spec.make(k=7).k == 7

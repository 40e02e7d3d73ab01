"""Estimators, over the whole REGISTRY: the contract (names, shapes, seeds, resume, the loss they report), unbiasedness
(the gain ĝ·g/|g|² against its standard error; per coordinate against the closed-form variances), InputQR's expectation
computed exactly, Algorithm 1's schedule, training on real data, cosine on the paper's MLP, and the mutants these tests
exist to catch (an estimate scaled by 1.1, zeros, a wrong loss)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import threading
from dataclasses import replace

import ddp_worker
import pytest
import torch
from idx_files import needs_fashion

from fg_lightning.engine import CNN, MLP, cross_entropy
from fg_lightning.estimators import (
    REGISTRY, Backprop, DivergenceError, GradientEstimator, InputApprox, InputQR, LocalBackprop, LocalGuess,
    MomentumForwardGradient, MultiDirection, NaiveForwardGradient, Partition, ZerothOrder, apply_estimate,
)
from fg_lightning.estimators.collective import ONE_PROCESS, Collective, ThreadCollective
from fg_lightning.estimators.local import _ActivityTangents

DEFAULT_K = 4


def registered(name, **kwargs):
    """``make(seed)`` for a registry entry (k = DEFAULT_K where it takes one) with ``kwargs``."""
    return lambda seed=0: REGISTRY[name].make(k=DEFAULT_K, seed=seed, **kwargs)


# Every registered estimator with its defaults, plus the settings that take other code paths.
CASES = {name: registered(name) for name in REGISTRY} | {
    "multi_direction_replayed": registered("multi_direction", tangents="replayed"),
    "orthogonal_replayed": registered("orthogonal", tangents="replayed"),
    "partition_random": registered("partition", assignment="random"),
    "partition_gaussian": registered("partition", normalize=False),
    "input_approx_batch_scale": registered("input_approx", scale="batch"),
    "input_approx_numeric_scale": registered("input_approx", scale=3.0),
    "momentum_short_gaps": registered("momentum", fix_gap=3, decrease_gap=3, decay_rate=0.8),
    "momentum_per_tensor": registered("momentum", fix_gap=3, decrease_gap=3, ranking="per_tensor"),
    "activity_no_mask": registered("activity", relu_mask=False),
    "local_activity_no_mask": registered("local_activity", relu_mask=False),
    "activity_every_layer": registered("activity", exact_output=False),
    "activity_gaussian": registered("activity", distribution="gaussian"),
    "local_activity_gaussian": registered("local_activity", distribution="gaussian"),
}


def small_problem(seed=0, n=128, features=10, classes=3, local=False):
    """A learnable toy task: labels from a random linear teacher. ``local``: the network has local-loss heads."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    labels = (x @ torch.randn(features, classes, generator=gen)).argmax(1)
    return MLP(in_features=features, hidden=(16,), num_classes=classes, seed=seed, local_losses=local), x, labels


def small_cnn_problem(local=False):
    gen = torch.Generator().manual_seed(0)
    net = CNN(channels=(2, 3, 4), hidden=5, seed=0, local_losses=local)
    return net, torch.randn(6, 1, 28, 28, generator=gen), torch.randint(0, 10, (6,), generator=gen)


def local(make) -> bool:
    """Whether the estimator ``make`` builds trains a network with local-loss heads."""
    return make().needs_local_losses


def cosine(a: dict, b: dict) -> float:
    fa = torch.cat([t.flatten() for t in a.values()])
    fb = torch.cat([b[name].flatten() for name in a])
    return float(fa @ fb / (fa.norm() * fb.norm()))


class Mutant(GradientEstimator):
    """An estimator whose estimates pass through ``mutate``: what the tests below must catch."""

    def __init__(self, inner: GradientEstimator, mutate) -> None:
        super().__init__(inner.seed)
        self.inner, self.mutate, self.unbiased = inner, mutate, inner.unbiased
        self.needs_local_losses = inner.needs_local_losses

    def exact_gradient(self, network, x, labels, comm=ONE_PROCESS):
        return self.inner.exact_gradient(network, x, labels, comm)

    def estimate(self, network, x, labels, step, comm=ONE_PROCESS):
        return self.mutate(self.inner.estimate(network, x, labels, step, comm), step)

    def validate(self, network):
        self.inner.validate(network)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


MUTATIONS = {
    "scaled_by_1.1": lambda e, step: replace(e, grads={n: 1.1 * g for n, g in e.grads.items()}),
    "zeros": lambda e, step: replace(e, grads={n: torch.zeros_like(g) for n, g in e.grads.items()}),
    "loss_of_0.5": lambda e, step: replace(e, loss=torch.tensor(0.5)),
    "zeros_between_exact_steps": lambda e, step: e if e.exact else MUTATIONS["zeros"](e, step),
}


def mutant(make, mutation):
    return lambda seed=0: Mutant(make(seed), MUTATIONS[mutation])


# --- the contract ---------------------------------------------------------------------------------------------------


def parameters_put_back(net):
    """A function that puts ``net``'s parameters back as they are now. An estimator that perturbs them in place and
    restores them (ZerothOrder, as MeZO) leaves them within rounding of where they were, and its next estimate moves
    by that rounding over ε: estimates compared bit for bit start from the same parameters."""
    saved = {name: p.detach().clone() for name, p in net.named_parameters()}

    def put_back():
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(saved[name])

    return put_back


def check_contract(make, net, x, labels):
    first, second, other_seed = make(seed=1), make(seed=1), make(seed=2)
    for step in range(4):
        put_back = parameters_put_back(net)
        a, b, c = (put_back() or e.estimate(net, x, labels, step) for e in (first, second, other_seed))
        assert list(a.grads) == [name for name, _ in net.named_parameters()]
        for name, param in net.named_parameters():
            assert a.grads[name].shape == param.shape and a.grads[name].dtype == param.dtype
            assert torch.equal(a.grads[name], b.grads[name]), "same seed must give the same estimate"
    if not isinstance(first, (Backprop, LocalBackprop, LocalGuess)):  # the deterministic ones
        assert any(not torch.equal(a.grads[n], c.grads[n]) for n in a.grads), "another seed must give other directions"


def reported_tolerance(estimator) -> dict:
    """How close ``estimator``'s reported loss and logits are to the network's: assert_close's defaults, but for
    ZerothOrder, which reports the mean of the values at θ ± εz: L(θ) + O(ε²) where the network is smooth, O(ε) at an
    example whose ReLU or max-pool kink the perturbation crosses. Measured at ε = 1e-3 on the small MLP and CNN, seeds
    0-9, 4 steps each: logits off by at most 0.87ε (their median by 1.6e-5), the loss by 0.044ε; allowed: 5ε and ε,
    still 0.6 below a loss of 0.5."""
    inner = getattr(estimator, "inner", estimator)  # a Mutant's estimator
    if isinstance(inner, ZerothOrder):
        return {"logits": dict(rtol=0, atol=5 * inner.eps), "loss": dict(rtol=0, atol=inner.eps)}
    return {"logits": {}, "loss": {}}


def check_reports_the_network_loss(make, net, x, labels):
    """``Estimate.loss`` and ``.logits`` are the network's on this batch, at every step (exact or not)."""
    estimator = make(seed=1)
    tolerance = reported_tolerance(estimator)
    logits = net(x)
    for step in range(4):
        estimate = estimator.estimate(net, x, labels, step)
        torch.testing.assert_close(estimate.logits, logits, **tolerance["logits"])
        torch.testing.assert_close(estimate.loss, cross_entropy(logits, labels), **tolerance["loss"])


@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("problem", [small_problem, small_cnn_problem], ids=["mlp", "cnn"])
def test_contract_names_shapes_seeds_and_reported_loss(make, problem):
    net, x, labels = problem(local=local(make))
    make().validate(net)
    check_contract(make, net, x, labels)
    check_reports_the_network_loss(make, net, x, labels)


@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
def test_state_dict_round_trip_continues_identically(make):
    net, x, labels = small_problem(local=local(make))
    original = make(seed=3)
    for step in range(4):
        original.estimate(net, x, labels, step)
    state, put_back = copy.deepcopy(original.state_dict()), parameters_put_back(net)  # and the parameters, as saved
    expected = [original.estimate(net, x, labels, step) for step in range(4, 8)]
    resumed = make(seed=99)  # the seed is part of the state: a resumed estimator need not be built with it
    resumed.load_state_dict(state)
    put_back()
    for step, want in zip(range(4, 8), expected):
        got = resumed.estimate(net, x, labels, step)
        assert got.exact == want.exact
        for name in want.grads:
            assert torch.equal(got.grads[name], want.grads[name])


def in_threads(run, world_size=2):
    """``run(comm)`` on ``world_size`` ranks, each a thread with its own ThreadCollective; the results in rank order."""
    results, errors = [None] * world_size, []

    def rank(comm):
        try:
            results[comm.rank] = run(comm)
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the other ranks are released
            errors.append(err)
            comm.abort()

    threads = [threading.Thread(target=rank, args=(comm,)) for comm in ThreadCollective.group(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:  # the failing rank's error, not the others' broken barrier
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


def check_two_ranks_take_the_union_batch_update(name, model, wrap=lambda estimator: estimator):
    """tests/ddp_worker.py's three steps (the last union batch split 5 + 4) on two ranks in two threads: both ranks end
    with identical parameters, equal (float64) to one process trained on the union batches; and the exact gradient
    (GradientCosine's reference) is the union batch's. ``wrap``: applied to each estimator."""
    made = [(network, wrap(estimator)) for network, estimator in (ddp_worker.make(name, model) for _ in range(3))]
    rank0, rank1 = in_threads(lambda comm: ddp_worker.train(name, model, comm, comm.rank, comm.world_size,
                                                            made[comm.rank]))
    single = ddp_worker.train(name, model, Collective(), made=made[2])
    for what in ("params", "exact"):
        for param, value in rank0[what].items():
            assert torch.equal(value, rank1[what][param]), f"{what} {param} differs between the ranks"
            torch.testing.assert_close(value, single[what][param], rtol=1e-9, atol=1e-12, msg=f"{what} {param}")
    assert rank0["losses"] == rank1["losses"]
    torch.testing.assert_close(rank0["losses"], single["losses"], rtol=1e-12, atol=0)


# Every registered estimator on the engine's networks (the torch backend's forward_ad allows one pass per process at a
# time; it runs the same estimators' reductions, and tests/test_distributed.py runs it on two processes).
THREAD_CASES = [(name, model) for name, model in ddp_worker.cases() if model != "torch_cnn"]


@pytest.mark.parametrize("name, model", THREAD_CASES)
def test_contract_two_ranks_in_one_process_take_the_union_batch_update(name, model):
    """The data-parallel contract in one process: an estimator that forgets a reduction (its derivatives' mean, the
    gradient's, the gathered layer inputs, its rows of the union batch's noise) fails here, not only on two
    processes."""
    check_two_ranks_take_the_union_batch_update(name, model)


@pytest.mark.parametrize("name", ["activity", "local_activity"])
@pytest.mark.parametrize("model, elements", [("mlp", 40), ("cnn", 300)])
def test_two_ranks_take_their_rows_of_noise_drawn_a_few_examples_at_a_time(name, model, elements, monkeypatch):
    """The activity estimators draw their per-example noise for the union batch a few examples at a time (here 4 or 5
    rows of the MLP's 12, 2 of the CNN's first 9): chunks that straddle the ranks' boundary still give each rank its
    rows of the one process's noise."""
    monkeypatch.setattr(_ActivityTangents, "DRAW_ELEMENTS", {"cpu": elements})
    check_two_ranks_take_the_union_batch_update(name, model)


class ForgetsToReduce(Mutant):
    """Ignores the communicator it is given: an estimator that forgets every reduction."""

    def __init__(self, inner):
        super().__init__(inner, lambda estimate, step: estimate)

    def estimate(self, network, x, labels, step, comm=ONE_PROCESS):
        return self.inner.estimate(network, x, labels, step)


@pytest.mark.parametrize("name", REGISTRY)
def test_contract_a_forgotten_reduction_is_caught_in_one_process(name):
    with pytest.raises(AssertionError):
        check_two_ranks_take_the_union_batch_update(name, "mlp", wrap=ForgetsToReduce)


def test_registry_flags_come_from_the_estimators():
    assert {name for name, spec in REGISTRY.items() if spec.takes_k} == {
        "multi_direction", "orthogonal", "partition", "activity", "activity_recomputed", "local_activity",
        "local_weight", "zeroth_order"}
    assert {name for name, spec in REGISTRY.items() if not spec.unbiased} == {
        "orthogonal", "input_approx", "momentum", "local_guess", "local_guess_example", "zeroth_order"}
    assert REGISTRY["orthogonal"].make(k=3).aggregation == "orthogonal"
    assert {name for name, spec in REGISTRY.items() if spec.needs_local_losses} == {
        "local_activity", "local_weight", "local_backprop", "local_guess", "local_guess_example"}
    assert REGISTRY["partition"].make(k=7).k == 7 and REGISTRY["naive"].make(k=7).k == 1


# --- unbiasedness and variance against closed forms (a tiny float64 network where many samples are cheap) ---------

def tiny_problem(batch=8, local=False):
    gen = torch.Generator().manual_seed(5)
    net = MLP(in_features=4, hidden=(5,), num_classes=3, seed=5, local_losses=local).double()
    x = torch.randn(batch, 4, generator=gen, dtype=torch.float64)
    return net, x, torch.randint(0, 3, (batch,), generator=gen)


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([t.flatten() for t in grads.values()])


def samples_of(estimator, net, x, labels, steps):
    return torch.stack([flat(estimator.estimate(net, x, labels, step).grads) for step in steps])


def gaussian_var(g, k=1):
    """Eq. 6 with the fourth moment kept: Var ĝ_i = Σ_{j≠i} g_j² + 2 g_i², over k for the mean of k (Eq. 7)."""
    return (g.square().sum() + g.square()) / k


def contiguous_parts(n, k):
    return torch.arange(n) * k // n


def partition_var(g, k, normalize):
    parts = contiguous_parts(len(g), k)
    part_sq = torch.zeros(k, dtype=g.dtype).index_add_(0, parts, g.square())[parts]  # Σ_{l∈P(i)} g_l²
    if not normalize:
        return part_sq + g.square()
    m = torch.bincount(parts, minlength=k).to(g.dtype)[parts]
    return m / (m + 2) * (part_sq - g.square()) + g.square() * (2 * m - 2) / (m + 2)  # Eq. 9's (m-1)σ² form




# The statistical tests draw from this seed; `FG_TEST_SEED=<n> pytest tests/test_estimators.py` runs them at another.
SEED = int(os.environ.get("FG_TEST_SEED", "11"))
TARGET_SE = 0.0125  # the gain's standard error: a 10 % scale error then lies 8 standard errors out


def draw_until_precise(estimator, net, x, labels, exact, block=2000, max_count=40_000):
    """Estimates ``(count, n)``, drawn in blocks until the gain ĝ·g/|g|² is known to ``TARGET_SE``."""
    blocks = []
    while True:
        done = sum(len(b) for b in blocks)
        blocks.append(samples_of(estimator, net, x, labels, range(done, done + block)))
        gains = torch.cat(blocks) @ exact / exact.square().sum()
        if gains.std() / math.sqrt(len(gains)) < TARGET_SE or len(gains) >= max_count:
            return torch.cat(blocks)


def check_unbiased(make, theory_var=None, batch=8):
    """E[ĝ] = g: the mean gain ĝ·g/|g|² is 1 within 4.5 standard errors, and (given a closed-form variance) every
    coordinate's mean is within 5 standard errors of g_i and the sample variances match the closed form."""
    estimator = make(seed=SEED)
    net, x, labels = tiny_problem(batch, local=estimator.needs_local_losses)
    exact = flat(estimator.exact_gradient(net, x, labels))  # the network's gradient, or LocalBackprop's
    samples = draw_until_precise(estimator, net, x, labels, exact)
    gains = samples @ exact / exact.square().sum()
    count, se = len(gains), float(gains.std()) / math.sqrt(len(gains))
    if se < 1e-12:  # a deterministic estimator (backprop): the gain is exactly 1
        assert float(gains.mean()) == pytest.approx(1.0, abs=1e-12)
        return
    assert se < TARGET_SE, f"{count} draws leave the gain's standard error at {se:.3g}: too few to see a 10 % error"
    z = (float(gains.mean()) - 1) / se
    assert abs(z) < 4.5, f"mean gain {float(gains.mean()):.4f} ± {se:.4f} (z = {z:.1f}) over {count} draws"
    if theory_var is not None:
        var = theory_var(exact)
        z = (samples.mean(0) - exact) / (var / count).sqrt()
        assert z.abs().max() < 5, z  # n = 43 coordinates, each z ~ N(0, 1) if unbiased
        ratio = samples.var(0) / var
        assert 0.85 < ratio.mean() < 1.15, ratio


THEORY_VAR = {  # closed-form per-coordinate variances (Eq. 6-9, with the fourth-moment terms kept)
    "naive": lambda g: gaussian_var(g),
    "naive_replayed": lambda g: gaussian_var(g),
    "multi_direction_replayed": lambda g: gaussian_var(g, DEFAULT_K),
    "multi_direction": lambda g: gaussian_var(g, DEFAULT_K),
    "partition": lambda g: partition_var(g, DEFAULT_K, normalize=True),
    "partition_gaussian": lambda g: partition_var(g, DEFAULT_K, normalize=False),
}
UNBIASED = [name for name, make in CASES.items() if make().unbiased]
UNBIASED_REGISTERED = [name for name in UNBIASED if name in REGISTRY]


@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_estimators_average_to_the_gradient(name):
    check_unbiased(CASES[name], THEORY_VAR.get(name))


def input_qr_expectation(make, batch, monkeypatch):
    """E[ĝ] of an InputQR-based estimator, computed exactly through its own code. Given the column of Q picked in each
    layer, the estimate is a quadratic form in the estimator's standard normal draws z, so E_z[ĝ] = Σ_i ĝ(z = e_i) over
    the basis of z's space; E over the columns is the mean over every choice of one column per layer."""
    net, x, labels = tiny_problem(batch)
    layers = [layer for layer in net.children() if any(True for _ in layer.parameters())]
    # z in the order the estimator draws it: per layer the weight's out-factor n (out,), then the bias (out,)
    sizes = [size for layer in layers for size in (layer.out_features, layer.out_features)]
    ranks = [min(layer.in_features, batch) for layer in layers]  # Q's columns per layer
    script = {}

    def scripted_randn(self, *shape, like):
        return next(script["draws"]).reshape(shape).to(like.dtype)

    def scripted_randint(high, size, **kwargs):
        column = next(script["columns"])
        assert column < high == ranks[len(script["seen"])]
        script["seen"].append(column)
        return torch.tensor([column], device=kwargs.get("device"))

    monkeypatch.setattr(GradientEstimator, "randn", scripted_randn)
    monkeypatch.setattr(torch, "randint", scripted_randint)
    estimator, total = make(seed=0), sum(sizes)
    expectation = torch.zeros(sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    for columns in itertools.product(*(range(rank) for rank in ranks)):
        for index in range(total):
            basis = torch.zeros(total, dtype=torch.float64)
            basis[index] = 1
            script.update(draws=iter(basis.split(sizes)), columns=iter(columns), seen=[])
            expectation += flat(estimator.estimate(net, x, labels, 0).grads)
    monkeypatch.undo()
    return expectation / math.prod(ranks), flat(net.loss_and_grad(x, labels)[2])


@pytest.mark.parametrize("batch", [8, 3], ids=["batch-above-inputs", "batch-below-inputs"])
def test_input_qr_expectation_is_the_gradient_exactly(batch, monkeypatch):
    """r = min(in, B) is the unbiasing factor in both regimes (the paper's β is right only for B <= in)."""
    expectation, exact = input_qr_expectation(CASES["input_qr"], batch, monkeypatch)
    torch.testing.assert_close(expectation, exact, rtol=1e-9, atol=1e-12)


def test_biased_estimators_say_so():
    assert not InputApprox.unbiased and not MomentumForwardGradient.unbiased
    assert not MultiDirection(k=3, aggregation="orthogonal").unbiased and MultiDirection(k=3).unbiased
    assert all(cls.unbiased for cls in (Backprop, NaiveForwardGradient, MultiDirection, Partition, InputQR))


@pytest.mark.parametrize("k", [5, 43], ids=["k-below-n", "k-equal-n"])
def test_orthogonal_aggregation_is_the_projection_of_the_gradient_on_the_directions(k):
    """ĝ = V(VᵀV)⁻¹Vᵀg, computed here by least squares from the tangents the estimator used; with k = n Gaussian
    directions (a basis) it is the exact gradient."""
    net, x, labels = tiny_problem()
    exact = flat(net.loss_and_grad(x, labels)[2])
    estimator = MultiDirection(k=k, aggregation="orthogonal", seed=SEED)
    tangents = {}
    original = net.jvp

    def recording_jvp(x, labels, tangent_fn):
        result = original(x, labels, tangent_fn)
        tangents.update(result.tangents)
        return result

    net.jvp = recording_jvp
    estimate = flat(estimator.estimate(net, x, labels, 0).grads)
    directions = torch.cat([t.flatten(1) for t in tangents.values()], dim=1).t()  # V: (n, k)
    projection = directions @ torch.linalg.lstsq(directions, exact.unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(estimate, projection, rtol=1e-7, atol=1e-10)
    assert float(estimate @ estimate) <= float(exact @ exact) * (1 + 1e-9)  # never longer than the gradient
    if k == len(exact):
        torch.testing.assert_close(estimate, exact, rtol=1e-7, atol=1e-10)


def check_momentum_blend(make, monkeypatch):
    """Algorithm 1, lines 6-14, with the two draws pinned: v̂ = γ v₁ + (1 − γ) v₂ with γ = d_t^(t mod fix_gap),
    d_t = decay_rate squared once per decrease_gap steps; the estimate is (g·v̂) v̂ at every step, whether ∇f·v̂
    comes from the checkpoint's backprop or from a forward-mode pass. (``make`` builds fix_gap=4, decrease_gap=3,
    decay_rate=0.8.)"""
    net, x, labels = tiny_problem()
    exact = flat(net.loss_and_grad(x, labels)[2])
    ranked = torch.linspace(-2, 2, len(exact), dtype=torch.float64)  # stands for v₁
    fresh = torch.arange(len(exact), dtype=torch.float64).cos()  # stands for v₂
    monkeypatch.setattr(MomentumForwardGradient, "_ranked_noise", lambda self, like, groups: ranked.clone())
    monkeypatch.setattr(MomentumForwardGradient, "randn", lambda self, *shape, like: fresh.clone())
    estimator = make(seed=0)
    for step in range(12):
        decay = 0.8 ** (2 ** (step // 3))
        gamma = decay ** (step % 4)
        direction = gamma * ranked + (1 - gamma) * fresh
        estimate = estimator.estimate(net, x, labels, step)
        torch.testing.assert_close(flat(estimate.grads), (exact @ direction) * direction, msg=f"step {step}")
    monkeypatch.undo()


MOMENTUM_BLEND = registered("momentum", fix_gap=4, decrease_gap=3, decay_rate=0.8, shuffle_ratio=0.3)


def test_momentum_blends_ranked_and_fresh_noise_with_the_decay_schedule(monkeypatch):
    check_momentum_blend(MOMENTUM_BLEND, monkeypatch)


def test_partition_with_one_part_per_parameter_is_exact():
    net, x, labels = tiny_problem()
    n = sum(p.numel() for p in net.parameters())
    exact = net.loss_and_grad(x, labels)[2]
    for assignment in ("contiguous", "random"):
        estimate = Partition(k=n, assignment=assignment).estimate(net, x, labels, 0)
        for name in exact:
            torch.testing.assert_close(estimate.grads[name], exact[name])
    with pytest.raises(ValueError, match=f"k={n + 1} is larger than the number of parameters"):
        Partition(k=n + 1).validate(net)


@pytest.mark.parametrize("make, message", [
    (lambda: MultiDirection(k=0), "k=0"),
    (lambda: MultiDirection(k=-3), "k=-3"),
    (lambda: Partition(k=0), "k=0"),
    (lambda: Partition(k=2, assignment="striped"), "assignment='striped'"),
    (lambda: MomentumForwardGradient(shuffle_ratio=1.5), "shuffle_ratio=1.5"),
    (lambda: MomentumForwardGradient(shuffle_ratio=-0.1), "shuffle_ratio=-0.1"),
    (lambda: MomentumForwardGradient(decay_rate=0.0), "decay_rate=0.0"),
    (lambda: MomentumForwardGradient(decay_rate=1.2), "decay_rate=1.2"),
    (lambda: MomentumForwardGradient(fix_gap=0), "fix_gap=0"),
    (lambda: MomentumForwardGradient(decrease_gap=-1), "decrease_gap=-1"),
    (lambda: MomentumForwardGradient(ranking="layer"), "ranking='layer'"),
    (lambda: InputApprox(scale="huge"), "scale='huge'"),
    (lambda: InputApprox(scale=-1.0), "scale=-1.0"),
    (lambda: NaiveForwardGradient(seed="x"), "seed='x'"),
])
def test_bad_arguments_name_the_value(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        make()


def test_momentum_follows_algorithm_1():
    net, x, labels = tiny_problem()
    estimator = MomentumForwardGradient(fix_gap=4, decrease_gap=3, decay_rate=0.9, shuffle_ratio=0.0)
    assert [estimator.decay_at(t) for t in (0, 2, 3, 5, 6, 9)] == pytest.approx(
        [0.9, 0.9, 0.81, 0.81, 0.81**2, 0.81**4])
    assert estimator.decay_at(10**6) == 0.0 and MomentumForwardGradient(decay_rate=1.0).decay_at(10**6) == 1.0
    flags = [estimator.estimate(net, x, labels, t).exact for t in range(9)]
    assert flags == [True, False, False, False, True, False, False, False, True]

    exact = flat(net.loss_and_grad(x, labels)[2])
    ranks = exact.argsort()
    # decay_rate 1, shuffle 0: the direction is ranked exactly like the gradient, at a checkpoint and after it
    ranked = MomentumForwardGradient(fix_gap=5, decay_rate=1.0, shuffle_ratio=0.0)
    for step in range(3):
        estimate = flat(ranked.estimate(net, x, labels, step).grads)
        assert (estimate[ranks].diff() >= 0).all()
    # shuffle 0.5: two segments, shuffled within, never across
    halves = MomentumForwardGradient(fix_gap=5, decay_rate=1.0, shuffle_ratio=0.5)
    n, shuffled_somewhere = len(exact), False
    for step in range(3):
        estimate = flat(halves.estimate(net, x, labels, step).grads)[ranks]
        half = round(0.5 * n)
        assert estimate[:half].max() < estimate[half:].min()
        shuffled_somewhere |= bool((estimate.diff() < 0).any())
    assert shuffled_somewhere
    # the checkpoint's estimate uses backprop's gradient for ∇f·v̂: the same as a forward-mode pass along v̂
    # (a twin whose fix_gap makes step 5 an ordinary step draws the same v̂ and takes the forward-mode path)
    twin = copy.deepcopy(ranked)
    twin.fix_gap = 1000
    estimate, via_jvp = ranked.estimate(net, x, labels, 5), twin.estimate(net, x, labels, 5)
    assert estimate.exact and not via_jvp.exact
    torch.testing.assert_close(flat(estimate.grads), flat(via_jvp.grads))


def test_input_approx_scale_matches_the_gradient_scale_better_than_the_batch_size():
    """E[ĝ_W]'s projection on G over |G|² (exact, from E[x xᵀ] = M) per layer: the effective-rank scale puts it near 1,
    the paper's β far above it."""
    net, x, labels = small_problem(n=256, features=20)
    _, _, grads = net.loss_and_grad(x, labels)
    inputs = {}
    net.jvp(x, labels, lambda name, layer, u: inputs.setdefault(name, u.clone()) is None or {
        p: torch.zeros(1, *t.shape) for p, t in layer.named_parameters()})
    for layer in ("fc1", "fc2"):
        u, g = inputs[layer], grads[f"{layer}.weight"]
        unit = u / u.norm(dim=1, keepdim=True)
        second_moment = unit.t() @ unit / len(u)  # M = E[x xᵀ]
        projection = float((g @ second_moment * g).sum() / g.square().sum())
        effective = float(InputApprox.effective_rank(u)) * projection
        assert 0.2 < effective < 3, (layer, effective)
        assert len(u) * projection > 5 * effective, (layer, len(u) * projection)


# --- training on real data ------------------------------------------------------------------------------------------



# Each registry record's `training` (SGD learning rate, steps, how the result compares with the exact gradient at that
# rate) for a 784-64-10 MLP on Fashion-MNIST, batch 128; why each is what it is: fg_lightning/estimators/registry.py.
# The local estimators are compared with LocalBackprop on the same network with heads.
def held_out_loss_after(make, lr, steps, data):
    """Plain SGD through apply_estimate (as ForwardGradientModule trains), then the loss on the held-out images."""
    images, labels = data.train_set.tensors
    val_images, val_labels = data.val_set.tensors
    estimator = make(seed=0)
    net = MLP(hidden=(64,), seed=0, local_losses=estimator.needs_local_losses)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    for step in range(steps):
        rows = slice(step % 78 * 128, (step % 78 + 1) * 128)
        estimate = estimator.estimate(net, images[rows], labels[rows], step)
        apply_estimate(estimate, net, optimizer, step, estimator)
    return float(cross_entropy(net(val_images), val_labels))


def check_descent(name, make, data):
    lr, steps, versus_exact = dataclasses.astuple(REGISTRY[name].training)
    untrained = held_out_loss_after(make, 0.0, 0, data)  # what a zero update leaves
    loss = held_out_loss_after(make, lr, steps, data)
    if versus_exact == "stable where it diverges":
        with pytest.raises(DivergenceError):
            held_out_loss_after(registered("backprop"), lr, steps, data)
        print(f"{name}: held-out loss {untrained:.3f} -> {loss:.3f} (backprop diverges at lr {lr:g})")
        assert untrained - loss > 0.5, (untrained, loss)
        return
    exact = held_out_loss_after(registered("local_backprop" if local(make) else "backprop"), lr, steps, data)
    print(f"{name}: held-out loss {untrained:.3f} -> {loss:.3f} (backprop at lr {lr:g}: {exact:.3f})")
    assert untrained - loss > max(0.3 * (untrained - exact), 0.02), (untrained, loss, exact)
    if versus_exact == "beats":
        assert loss < exact - 0.2, (loss, exact)


def test_every_registered_estimator_has_a_training_setting_and_a_backward_class():
    assert all(spec.training.lr > 0 and spec.training.steps > 0 for spec in REGISTRY.values())
    assert {name for name, spec in REGISTRY.items() if spec.backward == "none"} == {
        "naive", "naive_replayed", "multi_direction", "orthogonal", "partition", "input_qr", "input_approx", "local_weight",
        "zeroth_order"}
    assert {name for name, spec in REGISTRY.items() if spec.backward == "layer"} == {
        "activity", "activity_recomputed", "local_activity"}


@needs_fashion
@pytest.mark.parametrize("name", REGISTRY)
def test_each_estimator_trains_on_fashion_mnist(name, fashion_flat):
    check_descent(name, registered(name), fashion_flat)


# --- cosine to the exact gradient on the paper's MLP, one batch of real data ---


def mean_cosine(estimator, net, x, labels, exact, draws, steps=None):
    steps = range(draws) if steps is None else steps
    return sum(cosine(estimator.estimate(net, x, labels, step).grads, exact) for step in steps) / len(steps)


@needs_fashion
def test_cosine_to_the_gradient_on_the_paper_mlp(fashion_flat):
    x, labels = next(iter(fashion_flat.train_dataloader()))
    net = MLP(seed=0)
    exact = net.loss_and_grad(x, labels)[2]
    n = sum(p.numel() for p in net.parameters())
    # In n = 1.86M dimensions |v|² ≈ n and the k directions are nearly orthogonal, so for the mean of k Gaussian
    # estimates cos ≈ sqrt(χ²_k / n): E[cos] = E[sqrt(χ²_k)] / sqrt(n), sqrt(2/π) for k = 1 and 3.94 for k = 16. The
    # windows are about four standard errors of the means drawn here (100 and 6 draws).
    naive = mean_cosine(NaiveForwardGradient(), net, x, labels, exact, 100)
    assert 0.7 < naive / math.sqrt(2 / (math.pi * n)) < 1.3, naive
    multi = mean_cosine(MultiDirection(k=16), net, x, labels, exact, 6)
    chi_16 = math.sqrt(2) * math.exp(math.lgamma(8.5) - math.lgamma(8))
    assert 0.7 < multi / (chi_16 / math.sqrt(n)) < 1.3, multi
    # Contiguous parts hold very unequal shares of |g|², so Partition has no such closed form; it still beats naive.
    partition = mean_cosine(Partition(k=16), net, x, labels, exact, 6)
    assert partition > 2 * naive, (partition, naive)
    # right after a checkpoint, decay_rate 1 and shuffle_ratio 0: the direction is ranked like the gradient
    momentum = mean_cosine(MomentumForwardGradient(decay_rate=1.0, shuffle_ratio=0.0), net, x, labels, exact, 3)
    assert momentum > 0.5 and momentum > 100 * naive, momentum
    # The paper's Fig. 7 claims the largest variance reduction for the input-generated directions. Measured (300
    # draws): InputApprox ~10x naive's cosine, close to MultiDirection(100); InputQR only ~1.3x naive, its cosine
    # heavy-tailed (a few Q columns, the first above all, carry most of G). So the approximation is far better
    # aligned than the exact QR version, not "very similar" (Fig. 8).
    qr = mean_cosine(InputQR(), net, x, labels, exact, 100)
    approx = mean_cosine(InputApprox(), net, x, labels, exact, 40)
    assert approx > multi, (approx, multi)
    assert 0.8 * naive < qr < approx / 3, (qr, naive, approx)


# --- the mutants the tests above must catch -------------------------------------------------------------------------


@pytest.mark.parametrize("name", REGISTRY)
def test_a_wrong_reported_loss_is_caught(name):
    with pytest.raises(AssertionError):
        check_reports_the_network_loss(mutant(registered(name), "loss_of_0.5"), *small_problem(local=local(registered(name))))


@pytest.mark.parametrize("name", UNBIASED_REGISTERED)
def test_an_estimate_scaled_by_1_1_is_caught(name, monkeypatch):
    scaled = mutant(registered(name), "scaled_by_1.1")
    with pytest.raises(AssertionError):
        check_unbiased(scaled, THEORY_VAR.get(name))
    if name == "input_qr":
        expectation, exact = input_qr_expectation(scaled, 8, monkeypatch)
        assert not torch.allclose(expectation, exact, rtol=0.05)


@needs_fashion
@pytest.mark.parametrize("name", REGISTRY)
def test_a_zero_update_is_caught(name, fashion_flat):
    with pytest.raises(AssertionError):
        check_descent(name, mutant(registered(name), "zeros"), fashion_flat)


def test_momentum_without_updates_between_checkpoints_is_caught(monkeypatch):
    with pytest.raises(AssertionError):
        check_momentum_blend(mutant(MOMENTUM_BLEND, "zeros_between_exact_steps"), monkeypatch)


def test_an_estimator_defined_outside_the_package_is_taken_by_registering_it():
    """Adding an estimator as docs/estimators.md says: its class and one register() call. fg-bench offers it, the
    accuracy leaderboard has its grid, and it passes the contract and unbiasedness checks every registered estimator
    passes."""
    from external_estimator import SPEC

    from fg_lightning.bench.accuracy import lr_grid
    from fg_lightning.bench.cli import parser
    from fg_lightning.estimators.registry import register

    register(SPEC)
    try:
        args = parser().parse_args(["speed", "--estimators", "rademacher", "naive"])
        assert args.estimators == ["rademacher", "naive"]
        assert lr_grid("rademacher", None) == [1e-4, 3e-4, 1e-3]
        for problem in (small_problem, small_cnn_problem):
            net, x, labels = problem()
            SPEC.make().validate(net)
            check_contract(SPEC.make, net, x, labels)
            check_reports_the_network_loss(SPEC.make, net, x, labels)
        check_unbiased(SPEC.make, lambda g: g.square().sum() - g.square())  # its variance: Σ_{j≠i} g_j²
        for model in ("mlp", "cnn"):  # and it takes the union batch's update on two ranks
            check_two_ranks_take_the_union_batch_update("rademacher", model)
        with pytest.raises(AssertionError):  # and the checks see its mistakes
            check_unbiased(mutant(SPEC.make, "scaled_by_1.1"))
    finally:
        del REGISTRY["rademacher"]


def test_a_variant_that_gives_another_estimators_numbers_names_one_registered_before_it():
    """``same_as``: the benches of numbers (quality, stability, accuracy) leave such a variant out by default, the
    benches of cost time it; naming nothing registered is refused, naming the variant itself too."""
    from fg_lightning.bench.cli import parser
    from fg_lightning.estimators.registry import EstimatorSpec, register

    assert REGISTRY["naive_replayed"].same_as == "naive" and REGISTRY["activity_recomputed"].same_as == "activity"
    for command, variants_in in (("accuracy", False), ("quality", False), ("stability", False), ("speed", True),
                                 ("memory", True), ("depth", True)):
        estimators = parser().parse_args([command]).estimators
        assert ("activity_recomputed" in estimators) == variants_in and "activity" in estimators, command
    for same_as in ("nothing", "loop"):
        with pytest.raises(ValueError, match=f"loop: same_as='{same_as}' names no estimator registered before it"):
            register(EstimatorSpec("loop", NaiveForwardGradient, same_as=same_as))
    assert "loop" not in REGISTRY


@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
@pytest.mark.parametrize("aggregation", ["mean", "orthogonal"])
def test_replayed_tangents_give_the_stored_paths_estimates_at_the_same_seed(aggregation, chunked):
    """MultiDirection(tangents="replayed") keeps none of its directions through the pass and draws them again from
    the generator state recorded before the pass drew them: the stored path's estimates (exactly), step after step
    (the estimator's generator advancing as the stored path's does), in one pass and in chunks of directions."""
    net, x, labels = small_problem()
    net.tangent_memory_mb = 1e-3 if chunked else None
    estimators = [MultiDirection(k=4, aggregation=aggregation, tangents=t, seed=3) for t in ("replayed", "stored")]
    for step in range(3):
        got, want = (estimator.estimate(net, x, labels, step).grads for estimator in estimators)
        assert set(got) == set(want)
        for name, grad in want.items():
            assert torch.equal(got[name], grad), (step, name)
    assert not torch.equal(got["fc1.weight"], estimators[0].estimate(net, x, labels, 3).grads["fc1.weight"])


def count_parts_as_formed(monkeypatch) -> tuple[list[int], list[list[str]]]:
    """Patch ``UpdateAsFormed`` to record each applied part's parameter names (``parts``) and the most formed parts
    alive at once (``most[0]``)."""
    import weakref

    from fg_lightning.estimators import UpdateAsFormed

    alive, most, parts = [], [0], []
    original = UpdateAsFormed.__call__

    def counted(self, grads, checked=False):
        alive[:] = [ref for ref in alive if ref() is not None] + [weakref.ref(g) for g in grads.values()]
        most[0] = max(most[0], len(alive))
        parts.append(list(grads))
        return original(self, grads, checked)

    monkeypatch.setattr(UpdateAsFormed, "__call__", counted)
    return most, parts


@pytest.mark.parametrize("tangents", ["stored", "replayed"])
@pytest.mark.parametrize("aggregation", ["mean", "orthogonal"])
def test_random_directions_under_plain_sgd_are_applied_one_parameter_at_a_time(aggregation, tangents, monkeypatch):
    """Under plain SGD ``training_step`` applies each parameter's part of a random-direction estimate as it is formed
    (UpdateAsFormed): the parameters of the kept estimate's ``.grad`` path, no ``.grad`` written, one parameter per
    part, and never more than one formed part alive at a time (an estimate that forms every part first fails)."""
    from fg_lightning.estimators import AppliedGrads, training_step

    most, parts = count_parts_as_formed(monkeypatch)

    def trained(keep, steps=3):
        net, x, labels = small_problem()
        estimator = MultiDirection(k=4, aggregation=aggregation, tangents=tangents, seed=3)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        for step in range(steps):
            estimate = training_step(estimator, net, x, labels, step, optimizer, ONE_PROCESS, keep_estimate=keep)
            assert isinstance(estimate.grads, AppliedGrads) != keep
        return net

    fused = trained(keep=False)
    assert most[0] == 1 and len(parts) == 3 * len(list(fused.parameters())) and all(len(p) == 1 for p in parts)
    assert all(p.grad is None for p in fused.parameters())
    reference = trained(keep=True)
    moved = small_problem()[0]
    for (name, got), want, start in zip(fused.named_parameters(), reference.parameters(), moved.parameters()):
        assert not torch.equal(got, start), name
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)


def test_replayed_estimate_is_checked_for_divergence_by_its_weights():
    net, x, labels = small_problem()
    estimator = NaiveForwardGradient(tangents="replayed")
    estimate = estimator.estimate(net, x, labels, 0)
    estimate.grads.weights = torch.tensor([float("inf")])
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(DivergenceError, match="direction weights"):
        apply_estimate(estimate, net, torch.optim.SGD(net.parameters(), lr=0.1), 0, estimator)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_direction_weights_too_large_for_their_draws_are_refused():
    """Finite weights whose product with a Gaussian draw could overflow (|w| sum above max/16) are refused: the
    estimate they form would not be finite."""
    from fg_lightning.estimators.base import weights_finite

    big = torch.finfo(torch.float32).max
    assert bool(weights_finite(torch.tensor([big / 32]))["direction weights"])
    assert not bool(weights_finite(torch.tensor([big / 8]))["direction weights"])
    assert torch.isinf(torch.tensor([big / 8]) * 9).all()  # a draw of 9 overflows such a weight


# --- the protocols say the whole contract ---------------------------------------------------------------------------

class Recorder:
    """A network seen through a proxy that records every attribute an estimator reads on it."""

    def __init__(self, network, seen):
        object.__setattr__(self, "_network", network)
        object.__setattr__(self, "_seen", seen)

    def __getattr__(self, name):
        self._seen.add(name)
        return getattr(self._network, name)

    def __call__(self, x):
        self._seen.add("__call__")
        return self._network(x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_member_an_estimator_reads_on_a_network_is_declared_in_a_protocol(name):
    """Through validate, the estimate (streamed under plain SGD, and kept), the exact gradient and the compile check,
    on the engine's MLP and CNN and on the torch backend: whatever an estimator asks of a network is declared in a
    protocol of ``fg_lightning.estimators.base`` (a capability), so a third backend knows what to offer."""
    from fg_lightning.engine import to_torch
    from fg_lightning.estimators import base, training_step
    from fg_lightning.estimators.compiled import compile_refusal
    from fg_lightning.torch_network import TorchNetwork

    protocols = (base.ForwardModel, base.ActivityModel, base.LocalLossModel, base.RecomputableModel,
                 base.LayeredBlocksModel, base.CompilableModel, base.WrapperModel)
    declared = set().union(*(base._members(protocol) for protocol in protocols))
    make = CASES[name]
    nets = [small_problem(local=local(make)), small_cnn_problem(local=local(make))]
    if not local(make):  # the torch backend has no local-loss heads
        net, x, labels = small_problem()
        nets.append((TorchNetwork(to_torch(net)), x, labels))
    seen: set[str] = set()
    for net, x, labels in nets:
        proxy = Recorder(net, seen)
        estimator = make()
        estimator.validate(proxy)
        compile_refusal(estimator, proxy)
        estimator.exact_gradient(proxy, x, labels)
        for step, optimizer in enumerate((torch.optim.SGD(net.parameters(), lr=1e-3),
                                          torch.optim.Adam(net.parameters(), lr=1e-3))):
            training_step(estimator, proxy, x, labels, step, optimizer, Collective())
    assert seen and seen <= declared, sorted(seen - declared)


@pytest.mark.parametrize("name", sorted(n for n, spec in REGISTRY.items() if not spec.needs_local_losses))
def test_every_estimator_trains_a_network_composed_with_a_new_layer(name):
    """Layers added in layers.py alone (LayerNorm, GELU) need nothing of the estimators: each lowers the loss of a
    Network composed by hand with them, on the toy task, in 60 steps (measured at seeds 0-5: by 0.10-0.25 at lr 1e-2,
    momentum and orthogonal by 0.86-1.03; a zero update lowers it by 0)."""
    from fg_lightning.engine import GELU, LayerNorm, Linear, Network
    from fg_lightning.estimators import training_step

    _, x, labels = small_problem()
    torch.manual_seed(SEED)
    net = Network([("fc1", Linear(10, 16)), ("norm", LayerNorm(16)), ("gelu", GELU()), ("fc2", Linear(16, 3))],
                  input_shape=(10,))
    estimator = registered(name)(seed=SEED)
    estimator.validate(net)
    optimizer = torch.optim.SGD(net.parameters(), lr={"orthogonal": 10.0}.get(name, 1e-2))
    before = float(net.loss_and_grad(x, labels)[0])
    for step in range(60):
        training_step(estimator, net, x, labels, step, optimizer, Collective())
    assert float(net.loss_and_grad(x, labels)[0]) < before - 0.02, name

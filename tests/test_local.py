"""Local losses and activity perturbation (Ren et al. 2023) and local guesses (Fournier et al. 2023): the engine's
local backprop against autograd with ``detach()`` at the block boundaries, the local and per-example forward-mode
derivatives against autograd, the ReLU mask, the guess's projection, and what the estimators refuse. Unbiasedness,
the contract, resume and training on Fashion-MNIST run for every registered estimator in test_estimators.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from idx_files import needs_fashion
from test_estimators import SEED

from fg_lightning.engine import CNN, MLP, ActivitySource, GivenTangents, to_torch
from fg_lightning.estimators import (
    REGISTRY, ActivityPerturbation, Backprop, LocalActivityPerturbation, LocalBackprop, LocalGuess,
    LocalWeightPerturbation, MultiDirection, NaiveForwardGradient, cosine,
)
from fg_lightning.estimators.base import draw_

NETS = {
    "mlp": (lambda local: MLP(in_features=12, hidden=(7, 6), num_classes=4, seed=1, local_losses=local), (5, 12)),
    "cnn": (lambda local: CNN(channels=(2, 3, 4), hidden=5, num_classes=4, seed=1, local_losses=local), (3, 1, 28, 28)),
}


def problem(model, local=True, seed=0):
    make, shape = NETS[model]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return make(local).double(), x, torch.randint(0, 4, (shape[0],), generator=gen)


def autograd_local_grads(net, x, labels):
    """Autograd on the torch twins: each block's loss from its head, ``detach()`` between blocks."""
    body = to_torch(net)
    heads = {head: to_torch(net.get_submodule(head)) for _, head in net.blocks if head}
    h, total, losses = x, 0, []
    for names, head in net.blocks:
        for name in names:
            h = body.get_submodule(name)(h)
        loss = F.cross_entropy(heads[head](h) if head else h, labels)
        losses.append(loss.detach())
        total = total + loss
        h = h.detach()
    total.backward()
    twin = dict(body.named_parameters()) | {
        f"{head}.{n}": p for head, module in heads.items() for n, p in module.named_parameters()}
    return {name: twin[name].grad for name, _ in net.named_parameters()}, losses


@pytest.mark.parametrize("model", NETS)
def test_local_backprop_equals_autograd_with_detach_at_block_boundaries(model):
    net, x, labels = problem(model)
    loss, logits, grads, losses = net.local_loss_and_grad(x, labels)
    expected, expected_losses = autograd_local_grads(net, x, labels)
    assert list(grads) == [name for name, _ in net.named_parameters()] and len(losses) == len(net.blocks) > 1
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected_losses))
    torch.testing.assert_close(loss, F.cross_entropy(net(x), labels))
    torch.testing.assert_close(logits, net(x))


@pytest.mark.parametrize("model", NETS)
def test_heads_leave_the_network_and_its_gradient_unchanged(model):
    local, x, labels = problem(model)
    plain = NETS[model][0](False).double()
    torch.testing.assert_close(local(x), plain(x))
    _, _, grads = local.loss_and_grad(x, labels)
    _, _, plain_grads = plain.loss_and_grad(x, labels)
    assert list(grads) == list(plain_grads)  # the heads are not in the network's loss
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name])


@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
@pytest.mark.parametrize("model", NETS)
def test_local_jvp_gives_each_blocks_local_derivatives(model, chunked):
    """``block_derivs[i][k]`` = (block i's local-loss gradient) · (direction k restricted to block i)."""
    net, x, labels = problem(model)
    if chunked:
        net.tangent_memory_mb = 1e-6  # one direction per pass
    gen = torch.Generator().manual_seed(3)
    tangents = {name: torch.randn(3, *p.shape, generator=gen, dtype=p.dtype) for name, p in net.named_parameters()}
    result = net.jvp(x, labels, GivenTangents(tangents), "local")  # the tangent stops at each block boundary
    grads = net.local_loss_and_grad(x, labels)[2]
    for names, derivs in zip(net.block_parameters(), result.block_derivs):
        expected = sum(torch.einsum("k...,...->k", tangents[n], grads[n]) for n in names)
        torch.testing.assert_close(derivs, expected)
    torch.testing.assert_close(result.dir_derivs, result.block_derivs[-1])
    torch.testing.assert_close(result.loss, F.cross_entropy(net(x), labels))


def recorded_activities(net, x, labels, k, local=False):
    """A forward-mode pass with Gaussian activity tangents on every parameterised layer; returns the per-example
    derivatives and the tangents (layer name -> (K, B, ...))."""
    gen = torch.Generator().manual_seed(4)
    activities = {}

    class Activities(ActivitySource):
        def activity(self, name, layer, layer_input, output):
            activities[name] = torch.randn(k, *output.shape, generator=gen, dtype=output.dtype)
            return activities[name].clone()  # the pass owns what it is given

    return net.jvp(x, labels, Activities(), "local" if local else "loss", "example"), activities


def autograd_output_grads(net, x, labels):
    """∂L/∂z for every parameterised layer's output z (network loss), by autograd on the twin."""
    body, outputs, h = to_torch(net), {}, x
    for name, module in body.named_children():
        h = module(h)
        if any(True for _ in module.parameters()):
            h.retain_grad()
            outputs[name] = h
            h = h * 1  # keep z itself out of the in-place ReLU that follows
    F.cross_entropy(h, labels).backward()
    return {name: z.grad for name, z in outputs.items()}


@pytest.mark.parametrize("model", NETS)
def test_activity_derivatives_are_per_example_and_match_autograd(model):
    net, x, labels = problem(model, local=False)
    result, activities = recorded_activities(net, x, labels, k=3)
    grads = autograd_output_grads(net, x, labels)
    expected = sum(torch.einsum("kb...,b...->kb", activities[name], grads[name]) for name in grads)
    assert result.dir_derivs.shape == (3, x.shape[0])
    torch.testing.assert_close(result.dir_derivs, expected)


@pytest.mark.parametrize("asked, refusal", [
    (dict(objective="global"), "objective must be 'loss' or 'local', got objective='global'"),
    (dict(reduction="sum"), "reduction must be 'batch' or 'example', got reduction='sum'"),
    (dict(objective="local", network="plain"), "objective='local' .* needs a network with local-loss heads"),
    (dict(objective="local", network="torch"), "the torch backend has no local-loss heads"),
])
def test_a_pass_asked_for_what_it_cannot_differentiate_is_refused_in_one_line(asked, refusal):
    from fg_lightning.torch_network import TorchNetwork

    net, x, labels = problem("mlp", local=asked.pop("network", "local") == "local")
    net = TorchNetwork(to_torch(net)) if refusal.startswith("the torch") else net
    tangents = {name: torch.zeros(1, *p.shape, dtype=p.dtype) for name, p in net.named_parameters()}
    with pytest.raises(ValueError, match=refusal):
        net.jvp(x, labels, GivenTangents(tangents), **asked)


def test_per_example_derivatives_sum_to_the_batch_derivatives():
    net, x, labels = problem("cnn", local=False)
    gen = torch.Generator().manual_seed(2)
    tangents = {name: torch.randn(2, *p.shape, generator=gen, dtype=p.dtype) for name, p in net.named_parameters()}
    torch.testing.assert_close(net.jvp(x, labels, GivenTangents(tangents), reduction="example").dir_derivs.sum(1),
                               net.jvp(x, labels, GivenTangents(tangents)).dir_derivs)


def sample_variance(estimator, net, x, labels, draws=1500):
    samples = torch.stack([torch.cat([g.flatten() for g in estimator.estimate(net, x, labels, s).grads.values()])
                           for s in range(draws)])
    return samples.mean(0), samples.var(0).sum()


@pytest.mark.parametrize("cls", [ActivityPerturbation, LocalActivityPerturbation])
def test_relu_mask_keeps_the_mean_and_lowers_the_variance(cls):
    """Unbiasedness with and without the mask is tested for every estimator in test_estimators.py; here the
    total variance drops. The exact gradient's zero entries under an inactive ReLU stay exact zeros with the mask."""
    net, x, labels = problem("mlp", local=cls.needs_local_losses)
    masked_mean, masked = sample_variance(cls(relu_mask=True, seed=1), net, x, labels)
    plain_mean, plain = sample_variance(cls(relu_mask=False, seed=1), net, x, labels)
    assert masked < 0.9 * plain, (float(masked), float(plain))
    exact = torch.cat([g.flatten() for g in cls().exact_gradient(net, x, labels).values()])
    spread = (plain / len(exact) / 1500) ** 0.5
    assert float((masked_mean - exact).abs().max()) < 6 * spread and float((plain_mean - exact).abs().max()) < 6 * spread


@pytest.mark.parametrize("model", NETS)
def test_local_guess_projects_the_global_gradient_on_each_blocks_local_gradient(model):
    net, x, labels = problem(model)
    estimate = LocalGuess().estimate(net, x, labels, 0).grads
    local = net.local_loss_and_grad(x, labels)[2]
    exact = net.loss_and_grad(x, labels)[2]  # the network's gradient: the blocks' parameters only
    for (names, head), params in zip(net.blocks, net.block_parameters()):
        guessed = [p for p in params if p in exact]
        dot = sum((exact[p] * local[p]).sum() for p in guessed)
        sq = sum(local[p].square().sum() for p in guessed)
        for p in params:
            torch.testing.assert_close(estimate[p], local[p] * (dot / sq if p in exact else 1), msg=p)
        if head is None:  # the last block's guess is the global gradient itself
            for p in guessed:
                torch.testing.assert_close(estimate[p], exact[p])


@pytest.mark.parametrize("estimator", [LocalActivityPerturbation(), LocalWeightPerturbation(), LocalBackprop(),
                                       LocalGuess()], ids=lambda e: type(e).__name__)
def test_local_estimators_refuse_a_network_without_heads(estimator):
    with pytest.raises(ValueError, match="local_losses=True"):
        estimator.validate(MLP(seed=0))


@pytest.mark.parametrize("estimator", [Backprop(), ActivityPerturbation(), NaiveForwardGradient(), MultiDirection(k=2)],
                         ids=lambda e: type(e).__name__)
def test_global_estimators_refuse_a_network_with_heads(estimator):
    with pytest.raises(ValueError, match="heads untrained"):
        estimator.validate(MLP(seed=0, local_losses=True))


@pytest.mark.parametrize("make, message", [
    (lambda: ActivityPerturbation(k=0), "k=0"),
    (lambda: LocalActivityPerturbation(relu_mask="yes"), "relu_mask='yes'"),
    (lambda: LocalWeightPerturbation(k=-1), "k=-1"),
    (lambda: ActivityPerturbation(exact_output=1), "exact_output=1"),
    (lambda: LocalActivityPerturbation(distribution="uniform"), "distribution='uniform'"),
])
def test_bad_arguments_name_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("shape, transpose", [((64, 8), False), ((3, 5, 7), False), ((40, 24), True), ((1,), False)])
def test_rademacher_draws_are_fair_independent_signs_the_same_from_the_same_state(shape, transpose):
    """draw_(…, "rademacher"): every entry ±1; over many draws each position is +1 half the time and the positions
    are uncorrelated (each of a byte's 8 bits and the bytes of a 64-bit word alike: the identity covariance that makes
    the estimate unbiased), in any shape or layout; the same generator state gives the same numbers."""
    gen = torch.Generator().manual_seed(SEED)
    target = torch.empty(shape[::-1]).t() if transpose else torch.empty(shape)
    draws = torch.stack([draw_(target, "rademacher", gen).flatten().clone() for _ in range(4000)])  # (4000, n)
    assert set(draws.unique().tolist()) == {-1.0, 1.0}
    assert float(draws.mean(0).abs().max()) < 5.5 / 4000**0.5  # each mean ~ N(0, 1/4000): 5.5 sd over ≤ 1,000
    covariance = draws.T @ draws / len(draws) - torch.eye(draws.shape[1])
    assert float(covariance.abs().max()) < 6.5 / 4000**0.5  # ≤ 500,000 pairs, each ~ N(0, 1/4000)
    state = gen.get_state()
    first = draw_(target, "rademacher", gen).clone()
    gen.set_state(state)
    assert torch.equal(draw_(torch.empty(shape), "rademacher", gen), first.reshape(shape))




@needs_fashion
def test_activity_cosine_is_over_100_times_naives_on_the_paper_mlp(fashion):
    """The issue's target, on one real batch of 256: naive's cosine is about sqrt(2/(π n)) = 5.8e-4."""
    x, labels = next(iter(fashion.train_dataloader()))
    net = MLP(seed=0)
    exact = net.loss_and_grad(x, labels)[2]
    naive = sum(cosine(NaiveForwardGradient(seed=s).estimate(net, x, labels, 0).grads, exact) for s in range(30)) / 30
    def mean_cosine(**kwargs):
        return sum(cosine(ActivityPerturbation(seed=s, **kwargs).estimate(net, x, labels, 0).grads, exact)
                   for s in range(5)) / 5

    activity, every_layer = mean_cosine(), mean_cosine(exact_output=False)
    print(f"mean cosine: activity {activity:.4f} (every layer perturbed: {every_layer:.4f}), naive {naive:.2e}")
    assert activity > 100 * abs(naive) and activity > 100 * math.sqrt(2 / (math.pi * 1.86e6)), (activity, naive)
    assert every_layer < 0.6 * activity  # the logits' noise in every layer's estimate (measured: 0.020 vs 0.064)


def held_out_losses(net, estimator, lr, fashion, steps=100, batch=128):
    """``(held-out loss before, after)`` ``steps`` plain-SGD steps of ``estimator`` on the first ``steps`` batches of
    ``batch`` Fashion-MNIST training images."""
    from fg_lightning.estimators import apply_estimate

    x_val, labels_val = fashion.val_set.tensors
    x_all, labels_all = fashion.train_set.tensors
    untrained = float(F.cross_entropy(net(x_val), labels_val))
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    for step in range(steps):
        x, labels = x_all[step * batch:(step + 1) * batch], labels_all[step * batch:(step + 1) * batch]
        apply_estimate(estimator.estimate(net, x, labels, step), net, optimizer, step, estimator)
    return untrained, float(F.cross_entropy(net(x_val), labels_val))


# A small CNN, 100 steps of batch 128. Not here, measured: ActivityPerturbation on the CNN's own loss (its noise comes
# from every conv activation of an example: 2.317 -> 2.314 at lr 0.03, diverging at 0.1) and LocalWeightPerturbation
# (2.31 -> 2.304 at lr 0.03); both train the MLP (test_estimators.py).
# local_activity at 0.2: at 0.3 a rounding-level change (1e-6 in the estimate) left the seed-0 run stuck at 2.317
# (measured with seeds 0, 1, 2: 0.2 lowers the held-out loss by 0.48-0.55 at each, 0.3 by 0 to 0.58).
CNN_LR = {"local_activity": 0.2, "local_backprop": 0.3, "local_guess": 0.3, "local_guess_example": 0.3}


@needs_fashion
@pytest.mark.parametrize("name", CNN_LR)
def test_new_estimators_train_the_cnn_on_fashion_mnist(name, fashion):
    estimator = REGISTRY[name].make(k=1, seed=0)
    net = CNN(channels=(4, 8, 8), hidden=16, seed=0, local_losses=estimator.needs_local_losses)
    untrained, loss = held_out_losses(net, estimator, CNN_LR[name], fashion)
    print(f"{name}: held-out loss {untrained:.3f} -> {loss:.3f} after 100 steps")
    assert untrained - loss > 0.05, (untrained, loss)

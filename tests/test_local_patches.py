"""Patch-wise replicated local losses (Ren et al. 2023, Sec. 4; ``CNN(patches=P)``): the switch and its refusals,
which conv output elements reach which (group, patch) replica, each replica's forward-mode derivative against
``torch.func.jvp`` of a torch twin with ``detach()`` on every other cell, the exact local gradient against autograd
of the documented objective (Σ over cells of the replicas for the blocks' layers, the head's own loss for the heads),
and the local estimators unbiased for it with less variance on the patched layers. The cosine floor with patches is
in test_cosine_floor.py."""

from __future__ import annotations

import pytest
import torch
from test_estimators import SEED, in_threads
from test_local_groups import Replicas, twin_local_grads, twin_name

from fg_lightning.engine import CNN, MLP, GivenTangents, GlobalAvgPool, Linear, Network, ReLU
from fg_lightning.estimators import (
    LocalActivityPerturbation, LocalBackprop, LocalGuess, LocalWeightPerturbation,
)


def make(**kwargs):
    """Two conv stages on 14×14 inputs: pooled maps 7×7 and 3×3 (the second conv's 7×7 output has a last row and
    column that no pooling window covers), a linear head on fc1 too (``block_size=1``), which has no patches."""
    return CNN(channels=(4, 6), image_size=14, hidden=6, num_classes=4, seed=1, local_losses=True,
               **({"block_size": 1, "patches": 2} | kwargs))


VARIANTS = {
    "patches": {},
    "groups-patches": {"groups": 2},
    "groups-norm-patches": {"groups": 2, "norm": True},  # the norm's statistics within each cell
    "patches=3": {"patches": 3, "groups": 3},
}


def problem(variant="groups-patches", seed=0, batch=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 14, 14, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (batch,), generator=gen)
    return make(**VARIANTS[variant]).double(), x, labels


@pytest.mark.parametrize("kwargs, message", [
    ({"patches": 2}, r"patches=2 .* needs local_losses=True"),
    ({"local_losses": True, "patches": 0}, r"patches=0"),
    ({"local_losses": True, "patches": True}, r"patches=True"),
    ({"local_losses": True, "patches": 2.0}, r"patches=2\.0"),
    ({"local_losses": True, "patches": 4}, r"smallest pooled map's size 3, got patches=4"),
    ({"local_losses": True, "patches": 2, "block_size": 3}, r"patches=2 .* no block ends at a conv stage"),
])
def test_bad_patches_name_the_value_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        CNN(channels=(4, 6), image_size=14, hidden=6, **kwargs)
    assert "\n" not in str(error.value)


def test_patches_are_refused_on_the_mlp_and_on_heads_without_a_feature_map():
    with pytest.raises(ValueError, match=r"patches=2 .* MLP"):
        MLP(in_features=12, hidden=(6,), local_losses=True, patches=2)
    linear_head = {"relu1": [("fc", Linear(6, 4))]}
    with pytest.raises(ValueError, match=r"patches=2 .* GlobalAvgPool"):
        Network([("fc1", Linear(12, 6)), ("relu1", ReLU()), ("fc2", Linear(6, 4))], (12,), heads=linear_head, patches=2)


def test_the_conv_heads_have_patches_and_each_conv_output_element_its_cell():
    net = make(groups=2)
    assert [getattr(net, head).patches for _, head in net.blocks if head] == [2, 2, 1]  # fc1's head is linear
    # conv1: 14×14 -> pooled 7×7, bands of 4 and 3 pooled rows, so conv rows 0-7 and 8-13; cells g·4 + i·2 + j
    cells = net.output_cells("conv1", (3, 4, 14, 14))
    assert cells[0, :, 0].tolist() == [0] * 8 + [2] * 6 and cells[0, 0, :].tolist() == [0] * 8 + [1] * 6
    assert cells[:, 13, 13].tolist() == [3, 3, 7, 7]  # channels 0-1 group 0, 2-3 group 1
    # conv2: 7×7 -> pooled 3×3, bands of 2 and 1 pooled rows; row and column 6 are in no pooling window
    cells = net.output_cells("conv2", (3, 6, 7, 7))
    assert cells[0, :, 0].tolist() == [0, 0, 0, 0, 2, 2, -1] and cells[0, 0, :].tolist() == [0, 0, 0, 0, 1, 1, -1]
    assert cells[:, 5, 5].tolist() == [3, 3, 3, 7, 7, 7]
    assert net.output_cells("fc1", (3, 6)) is None and net.output_cells("head1.fc", (3, 4)) is None
    # with norm, the statistics are taken within each cell (bands 8, 6 and 4, 3): the uncovered row joins the last
    normed = make(groups=2, norm=True)
    assert (normed.norm1.bands, normed.norm2.bands) == ((8, 6), (4, 3))
    assert normed.output_cells("conv2", (3, 6, 7, 7))[0, :, 0].tolist() == [0, 0, 0, 0, 2, 2, 2]
    # a norm over each group's whole map joins the patches: no cell, the group's derivative instead
    joined = make(groups=2, norm=True)
    joined.norm2.bands = None
    assert joined.output_cells("conv2", (3, 6, 7, 7)) is None and joined.output_groups("conv2") is not None


def check_replica_derivs(net, x, labels, per_example, directions=3):
    """The engine's forward-mode pass along random tangents: each cell's and each group's replica derivative
    (``patch_derivs``, ``group_derivs``) against ``torch.func.jvp`` of the twin's replicas, direction by direction.
    Returns the pass's result and the tangents."""
    gen = torch.Generator().manual_seed(3)
    tangents = {name: torch.randn(directions, *p.shape, generator=gen, dtype=p.dtype)
                for name, p in net.named_parameters()}
    result = net.jvp(x, labels, GivenTangents(tangents), "local", "example" if per_example else "batch")
    params = {twin_name(net, n): p.detach() for n, p in net.named_parameters()}
    cells, groups = Replicas(net, cells=True), Replicas(net)
    for k in range(directions):
        direction = {twin_name(net, n): t[k] for n, t in tangents.items()}
        for twin, derivs in ((cells, result.patch_derivs), (groups, result.group_derivs)):
            _, expected = torch.func.jvp(lambda p: torch.func.functional_call(twin, p, (x, labels, per_example)),
                                         (params,), (direction,))
            assert len(expected) == len(derivs) == len(net.blocks)
            for index, want in enumerate(expected):
                torch.testing.assert_close(derivs[index][k], want, msg=f"block {index}, direction {k}")
    return result, tangents


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
@pytest.mark.parametrize("per_example", [False, True], ids=["batch", "per-example"])
def test_patch_derivs_are_each_replicas_jvp(per_example, chunked, variant):
    net, x, labels = problem(variant)
    if chunked:
        net.tangent_memory_mb = 1e-6  # one direction per pass
    result, tangents = check_replica_derivs(net, x, labels, per_example)
    assert [tuple(d.shape[-2:]) for d in result.patch_derivs] == [
        (net.head1.groups, net.head1.patches ** 2), (net.head2.groups, net.head2.patches ** 2), (net.head3.groups, 1),
        (1, 1)]
    grads = net.local_loss_and_grad(x, labels)[2]  # the block's loss: all of the tangent, the head's own once
    for names, derivs in zip(net.block_parameters(), result.block_derivs):
        expected = sum(torch.einsum("k...,...->k", tangents[n], grads[n]) for n in names)
        torch.testing.assert_close(derivs.sum(1) if per_example else derivs, expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_local_backprop_is_the_gradient_of_the_patch_wise_objective(variant):
    """Autograd of Σ_{g,p} L_{g,p} (each replica with ``detach()`` outside its cell, the heads' parameters frozen)
    for the blocks' layers, and of each head's own loss for the heads: the engine's local gradient, in float64."""
    net, x, labels = problem(variant)
    twin = twin_local_grads(net, Replicas(net, cells=True), x, labels)
    grads = net.local_loss_and_grad(x, labels)[2]
    assert set(grads) == {name for name, _ in net.named_parameters()}
    for name in grads:
        torch.testing.assert_close(grads[name], twin[twin_name(net, name)].grad, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(LocalBackprop().estimate(net, x, labels, 0).grads, grads, rtol=0, atol=0)


def samples(estimator, net, x, labels, draws):
    return torch.stack([torch.cat([g.flatten() for g in estimator.estimate(net, x, labels, s).grads.values()])
                        for s in range(draws)])


def patched_rows(net):
    """Which coordinates of a flat estimate belong to a layer whose output elements take their cell's derivative."""
    shapes = {"conv1": (1, 4, 14, 14), "conv2": (1, 6, 7, 7)}
    layers = [name.rpartition(".")[0] for name, _ in net.named_parameters()]
    return torch.cat([torch.full((p.numel(),), layer in shapes and net.output_cells(layer, shapes[layer]) is not None)
                      for layer, (_, p) in zip(layers, net.named_parameters())])


@pytest.mark.parametrize("cls, variant, draws", [
    (LocalActivityPerturbation, "groups-patches", 250),
    (LocalActivityPerturbation, "groups-norm-patches", 250),
    (LocalWeightPerturbation, "groups-norm-patches", 250),
])
def test_patched_estimates_are_unbiased(cls, variant, draws):
    """The mean of the estimates (k = 8 each) is the exact local gradient (the patch-wise objective's) within 6
    standard errors of the sample mean on every coordinate, and its gain on it is 1 within 6 standard errors, at any
    seed (``FG_TEST_SEED``): a coordinate is off by 6 of its standard errors about once in 10⁸ runs of the test,
    where a patch's dropped loss, a wrong patch membership or a 10 % scale is off by tens of them."""
    net, x, labels = problem(variant)
    exact = torch.cat([g.flatten() for g in cls().exact_gradient(net, x, labels).values()])
    draws_ = samples(cls(k=8, seed=SEED), net, x, labels, draws)
    mean, var = draws_.mean(0), draws_.var(0)
    z = (mean - exact).abs() / (var / draws).sqrt().clamp_min(1e-12)
    assert float(z.max()) < 6, (float(z.max()), int(z.argmax()))
    gain = float(mean @ exact / exact.square().sum())
    assert abs(gain - 1) < 6 * float((var.sum() / draws).sqrt() / exact.norm()), gain


def test_patches_lower_local_activitys_variance_on_the_patched_layers():
    """An element's estimate has the noise of its own cell's tangents only: on the conv layers the summed variance
    with 2×2 patches (and 2 groups) is well under that with the 2 groups alone (measured: 0.33)."""
    net, x, labels = problem("groups-patches")
    grouped = make(groups=2, patches=1).double()
    rows = patched_rows(net)
    assert int(rows.sum()) == sum(p.numel() for n, p in net.named_parameters() if n.startswith("conv"))
    var = samples(LocalActivityPerturbation(k=8, seed=SEED), net, x, labels, 100).var(0)
    grouped_var = samples(LocalActivityPerturbation(k=8, seed=SEED), grouped, x, labels, 100).var(0)
    ratio = float(var[rows].sum() / grouped_var[rows].sum())
    print(f"local_activity: variance on the patched layers, 2×2 patches and 2 groups against 2 groups: {ratio:.3f}")
    assert ratio < 0.6, ratio


def test_default_cnn_takes_patches_on_28x28_inputs():
    """The ablation's network: pooled maps 14, 7 and 3, every conv block's head with 2×2 patches."""
    net = CNN(seed=0, local_losses=True, groups=8, norm=True, patches=2)
    assert [getattr(net, h).patches for _, h in net.blocks if h] == [2, 2, 2]
    assert isinstance(net.head1.pool, GlobalAvgPool)
    assert [net.get_submodule(f"norm{i}").bands for i in (1, 2, 3)] == [(14, 14), (8, 6), (4, 3)]
    x, labels = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    local = net.local_loss_and_grad(x, labels)[2]
    for estimator in (LocalActivityPerturbation(seed=0), LocalWeightPerturbation(seed=0), LocalGuess(),
                      LocalGuess(projection="example")):
        estimator.validate(net)
        grads = estimator.estimate(net, x, labels, 0).grads
        assert all(torch.isfinite(g).all() for g in grads.values()), estimator
        if isinstance(estimator, LocalGuess):  # the heads follow the (unchanged) local gradient
            torch.testing.assert_close(grads["head1.fc.weight"], local["head1.fc.weight"])


def test_a_chunked_pass_gives_local_activity_the_same_estimate():
    """In chunks of directions the blocks' weight steps run after the pass, from ``JvpResult.patch_derivs``; in one
    pass, as each head is evaluated: the same estimate."""
    net, x, labels = problem("groups-norm-patches")
    one_pass = LocalActivityPerturbation(k=3, seed=5).estimate(net, x, labels, 0).grads
    net.tangent_memory_mb = 1e-6  # one direction per pass
    chunked = LocalActivityPerturbation(k=3, seed=5).estimate(net, x, labels, 0).grads
    torch.testing.assert_close(chunked, one_pass, rtol=1e-12, atol=1e-14)


def test_two_ranks_mean_the_patch_derivatives_over_the_union_batch():
    net, x, labels = problem("groups-patches", batch=4)
    gen = torch.Generator().manual_seed(3)
    tangents = {name: torch.randn(2, *p.shape, generator=gen, dtype=p.dtype) for name, p in net.named_parameters()}

    def jvp(rows, comm=None):
        result = net.jvp(x[rows], labels[rows], GivenTangents(tangents), "local")
        return result if comm is None else comm.mean_derivatives(len(x[rows]), result)

    rank0, rank1 = in_threads(lambda comm: jvp(slice(2 * comm.rank, 2 * comm.rank + 2), comm))
    single = jvp(slice(None))
    for index, expected in enumerate(single.patch_derivs):
        for rank in (rank0, rank1):
            torch.testing.assert_close(rank.patch_derivs[index], expected, msg=f"block {index}")
    assert single.patch_derivs[0].shape[-2:] == (2, 4)

"""Blocks as fine as one layer and group-wise replicated local losses (Ren et al. 2023, Sec. 4): the switches on MLP
and CNN, each replica's forward-mode derivative against ``torch.func.jvp`` with ``detach()`` on the other groups, the
exact local gradient against autograd of the group-wise objective, and the local estimators with groups: unbiased
for that gradient, and with less variance than without groups. The cosine floors with groups are in
test_cosine_floor.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from idx_files import needs_fashion
from test_local import held_out_losses
from torch import nn

from fg_lightning.engine import CNN, MLP, GivenTangents, to_torch
from fg_lightning.estimators import LocalActivityPerturbation, LocalWeightPerturbation

NETS = {
    "mlp": (lambda **kw: MLP(in_features=12, hidden=(6, 4), num_classes=4, seed=1, local_losses=True, **kw), (5, 12)),
    "cnn": (lambda **kw: CNN(channels=(4, 6, 4), image_size=12, hidden=6, num_classes=4, seed=1, local_losses=True,
                             **kw),
            (3, 1, 12, 12)),
}


def problem(model, seed=0, **kwargs):
    make, shape = NETS[model]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (shape[0],), generator=gen)
    return make(**({"block_size": 1, "groups": 3} | kwargs)).double(), x, labels


def test_block_size_one_gives_every_parameterised_hidden_layer_its_own_head():
    cnn = CNN(channels=(4, 6, 4), hidden=6, seed=1, local_losses=True, block_size=1)
    assert [(names[-1], head) for names, head in cnn.blocks] == [
        ("pool1", "head1"), ("pool2", "head2"), ("pool3", "head3"), ("relu4", "head4"), ("fc2", None)]
    assert [n for n, _ in cnn.head_layers("head4")] == ["head4.fc"] and cnn.head4.fc.in_features == 6
    default = CNN(channels=(4, 6, 4), hidden=6, seed=1, local_losses=True)
    assert [head for _, head in default.blocks] == ["head1", "head2", "head3", None]  # fc1 in the last block
    mlp = MLP(in_features=3, hidden=(4, 4, 4, 4), seed=0, local_losses=True, block_size=2)
    assert [names[-1] for names, _ in mlp.blocks] == ["relu2", "relu4", "fc5"]
    # the network's own layers and the conv heads are drawn as without the new head
    plain = CNN(channels=(4, 6, 4), hidden=6, seed=1)
    ours = dict(cnn.named_parameters())
    for name, param in [*plain.named_parameters(), *default.named_parameters()]:
        torch.testing.assert_close(ours[name], param, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"groups": 2}, "need local_losses=True"),
    ({"block_size": 1}, "need local_losses=True"),
    ({"local_losses": True, "block_size": 0}, "block_size=0"),
    ({"local_losses": True, "groups": 0}, "groups=0"),
    ({"local_losses": True, "groups": 5}, "groups=5"),  # the first head's input has 4 channels
])
def test_bad_switches_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CNN(channels=(4, 6, 4), hidden=6, **kwargs)


def test_output_groups_are_the_last_layer_of_each_grouped_block():
    net = problem("cnn")[0]
    assert net.output_groups("conv1") == [slice(0, 2), slice(2, 3), slice(3, 4)]  # as torch.tensor_split
    assert net.output_groups("fc1") == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert net.output_groups("fc2") is None and net.output_groups("head1.fc") is None
    two_layer = MLP(in_features=3, hidden=(4, 4), seed=0, local_losses=True, block_size=2, groups=2)
    assert two_layer.output_groups("fc1") is None and two_layer.output_groups("fc2") == [slice(0, 2), slice(2, 4)]
    normed = problem("cnn", groups=2, norm=True)[0]  # conv, GroupNorm over the head's groups, ReLU, pool
    assert [n for n, _ in normed.named_layers()][:4] == ["conv1", "norm1", "relu1", "pool1"]
    assert normed.output_groups("conv1") == [slice(0, 2), slice(2, 4)]


class Replicas(nn.Module):
    """The torch twin of every block's replicated losses: block ``i`` from its input detached, then for each group
    the head's loss of the block output with ``detach()`` on every other group's channels, ``(..., G)``; with
    ``cells=True``, for each cell of the head input (a group's channels in one patch, ``patches=P``) the head's loss
    with ``detach()`` on everything outside the cell, ``(..., G, P²)``."""

    def __init__(self, net, cells=False):
        super().__init__()
        self.net, self.body, self.cells = [net], to_torch(net), cells
        self.heads = nn.ModuleDict({head: to_torch(net.get_submodule(head)) for _, head in net.blocks if head})

    def forward(self, x, labels, per_example):
        reduce = (lambda loss: loss / len(labels)) if per_example else (lambda loss: loss.mean())
        h, out = x, []
        for names, head in self.net[0].blocks:
            h = h.detach()
            for name in names:
                h = self.body.get_submodule(name)(h)
            if head is None:
                loss = reduce(F.cross_entropy(h, labels, reduction="none"))
                out.append(loss[..., None, None] if self.cells else loss[..., None])
                continue
            module = self.net[0].get_submodule(head)
            if self.cells and module.patches > 1:
                cells = module.cells(h.shape[1:])
            else:
                cells = [(part,) for part in module.group_slices(h.shape[1])]
            replicas = []
            for cell in cells:
                mask = torch.zeros(h.shape[1:], dtype=h.dtype)
                mask[cell] = 1
                h_c = h * mask + h.detach() * (1 - mask)  # the tangent of this cell (or group) only
                replicas.append(reduce(F.cross_entropy(self.heads[head](h_c), labels, reduction="none")))
            stacked = torch.stack(replicas, -1)
            out.append(stacked.unflatten(-1, (module.groups, -1)) if self.cells else stacked)
        return out


def twin_name(net, name):
    return f"heads.{name}" if name.split(".")[0] in {h for _, h in net.blocks if h} else f"body.{name}"


VARIANTS = {"groups": {}, "groups-norm": {"groups": 2, "norm": True}}  # norm: a GroupNorm in every block


def twin_local_grads(net, replicas, x, labels):
    """The twin's parameters, each with its autograd gradient of the local objective: Σ of the replicas' losses
    (``replicas(x, labels, False)``, the heads' parameters frozen) for the blocks' layers, and each head's own loss of
    its block's detached output for the heads."""
    frozen = {f"heads.{n}": p.detach() for n, p in replicas.heads.named_parameters()}
    sum(d.sum() for d in torch.func.functional_call(replicas, frozen, (x, labels, False), strict=False)).backward()
    h = x
    for names, head in net.blocks:  # each head on its own loss of the block output, detached
        for name in names:
            h = replicas.body.get_submodule(name)(h).detach()
        if head:
            F.cross_entropy(replicas.heads[head](h), labels).backward()
    return dict(replicas.named_parameters())


def check_group_derivs(net, x, labels, per_example, directions):
    """The engine's forward-mode pass along random tangents: each group replica's derivative (``group_derivs``)
    against ``torch.func.jvp`` of the twin's replicas, direction by direction. Returns the pass's result and the
    tangents."""
    gen = torch.Generator().manual_seed(3)
    tangents = {name: torch.randn(directions, *p.shape, generator=gen, dtype=p.dtype)
                for name, p in net.named_parameters()}
    result = net.jvp(x, labels, GivenTangents(tangents), "local", "example" if per_example else "batch")
    replicas = Replicas(net)
    params = {twin_name(net, n): p.detach() for n, p in net.named_parameters()}
    for k in range(directions):
        direction = {twin_name(net, n): t[k] for n, t in tangents.items()}
        _, expected = torch.func.jvp(
            lambda p: torch.func.functional_call(replicas, p, (x, labels, per_example)), (params,), (direction,))
        for index, derivs in enumerate(expected):
            torch.testing.assert_close(result.group_derivs[index][k], derivs, msg=f"block {index}, direction {k}")
    return result, tangents


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
@pytest.mark.parametrize("per_example", [False, True], ids=["batch", "per-example"])
@pytest.mark.parametrize("model", NETS)
def test_group_derivs_are_each_replicas_jvp(model, per_example, chunked, variant):
    net, x, labels = problem(model, **VARIANTS[variant])
    if chunked:
        net.tangent_memory_mb = 1e-6  # one direction per pass
    result, tangents = check_group_derivs(net, x, labels, per_example, directions=3)
    # the block's loss: the head's own tangents once, the whole output tangent (test_local.py checks it ungrouped)
    grads = net.local_loss_and_grad(x, labels)[2]
    for names, derivs in zip(net.block_parameters(), result.block_derivs):
        expected = sum(torch.einsum("k...,...->k", tangents[n], grads[n]) for n in names)
        torch.testing.assert_close(derivs.sum(1) if per_example else derivs, expected)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", NETS)
def test_local_backprop_is_the_gradient_of_the_group_wise_objective(model, variant):
    """Autograd of Σ_g L_g (each replica with ``detach()`` on the other groups, the heads' parameters frozen) for the
    blocks' layers, and of each head's own loss for the heads: the engine's local gradient, unchanged by groups."""
    net, x, labels = problem(model, **VARIANTS[variant])
    replicas = Replicas(net)
    heads = {name for name, _ in replicas.heads.named_parameters()}
    twin = twin_local_grads(net, replicas, x, labels)
    grads = net.local_loss_and_grad(x, labels)[2]
    for name in grads:
        expected = twin[twin_name(net, name)].grad
        assert (twin_name(net, name) in {f"heads.{n}" for n in heads}) == name.startswith("head")
        torch.testing.assert_close(grads[name], expected, rtol=1e-10, atol=1e-12, msg=name)


def sample_mean_and_variance(estimator, net, x, labels, draws):
    samples = torch.stack([torch.cat([g.flatten() for g in estimator.estimate(net, x, labels, s).grads.values()])
                           for s in range(draws)])
    return samples.mean(0), samples.var(0)


@pytest.mark.parametrize("cls, model, draws", [(LocalActivityPerturbation, "cnn", 1000),
                                               (LocalWeightPerturbation, "mlp", 2000)])
def test_grouped_estimates_are_unbiased(cls, model, draws):
    """On one-layer blocks with 3 groups, the mean of the estimates is the exact local gradient (the group-wise
    objective's) within 6 standard errors per coordinate, and its gain on it is 1."""
    net, x, labels = problem(model)
    exact = torch.cat([g.flatten() for g in cls().exact_gradient(net, x, labels).values()])
    mean, var = sample_mean_and_variance(cls(seed=1), net, x, labels, draws)
    assert float(((mean - exact).abs() / (var / draws).sqrt().clamp_min(1e-12)).max()) < 6
    gain = float(mean @ exact / exact.square().sum())
    assert abs(gain - 1) < 6 * float((var.sum() / draws).sqrt() / exact.norm()), gain


@pytest.mark.parametrize("cls, model, bound", [(LocalActivityPerturbation, "cnn", 0.7),
                                               (LocalWeightPerturbation, "mlp", 0.85)])
def test_groups_lower_the_variance_on_the_grouped_layers(cls, model, bound):
    """A group's estimate has the noise of that group's tangents only: on the grouped layers (each block's last) the
    summed variance with 3 groups is well under the variance without groups (measured: 0.40 for local_activity on the
    CNN, 0.69 for local_weight on the MLP, whose head's tangents add to every group's noise)."""
    net, x, labels = problem(model)
    plain = problem(model, groups=1)[0]
    _, var = sample_mean_and_variance(cls(seed=1), net, x, labels, 600)
    _, plain_var = sample_mean_and_variance(cls(seed=1), plain, x, labels, 600)
    rows = torch.cat([torch.full((p.numel(),), net.output_groups(n.rpartition(".")[0]) is not None)
                      for n, p in net.named_parameters()])
    ratio = float(var[rows].sum() / plain_var[rows].sum())
    print(f"{cls.__name__}: variance on the grouped layers, 3 groups against none: {ratio:.3f}")
    assert ratio < bound, ratio


@needs_fashion
def test_groups_and_one_layer_blocks_train_the_cnn_with_local_activity(fashion):  # noqa: F811
    """100 steps of batch 128 of LocalActivityPerturbation (k = 4) on a small CNN with one-layer blocks and 4 groups.
    Measured (Gaussian draws at each site, before the draws moved past the max-pools), held-out loss from 2.306 after
    100 steps at k = 1 and lr 0.1 / 0.2 / 0.3: without the switches 1.60 / 2.04 / 3.42 (diverging), block_size=1 1.71
    / 2.15 / 2.23, groups=4 1.76 / 1.90 / 1.63, both 1.55 / 1.54 / 1.75. At k = 1 a run is a matter of luck (both
    draws and both placements left one of seeds 0-1 near 2.37 at lr 0.2); at k = 4, lr 0.1, Rademacher draws past the
    pools: 1.47 / 1.48 at seeds 0 / 1 (and 2.27 at seed 2, whose initial weights train no better with Gaussian draws at
    each site, 2.25)."""
    net = CNN(channels=(8, 16, 16), hidden=32, seed=0, local_losses=True, block_size=1, groups=4)
    untrained, loss = held_out_losses(net, LocalActivityPerturbation(k=4, seed=0), 0.1, fashion)
    print(f"block_size=1, groups=4: held-out loss {untrained:.3f} -> {loss:.3f} after 100 steps")
    assert untrained - loss > 0.4, (untrained, loss)

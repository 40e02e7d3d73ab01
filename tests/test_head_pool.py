"""``CNN(head_pool=S)``: conv heads that average their block's output over an S×S grid before the classifier. The
switch and its refusals, the exact local gradient and each group replica's forward-mode derivative against autograd
of the twin (test_local_groups.py's oracles). The layer's own VJP and JVP are checked in test_engine.py; the activity
mask with pooled heads and the local activity estimate's mean, in test_activity_site.py."""

from __future__ import annotations

import pytest
import torch
from test_local_groups import Replicas, check_group_derivs, twin_local_grads, twin_name

from fg_lightning.engine import CNN, AdaptiveAvgPool2d, Flatten, GlobalAvgPool


def problem(seed=0, **kwargs):
    """A small CNN on 16×16 inputs (pooled maps 8, 4 and 2), one-layer blocks, groups, norm and a 2×2 head pool."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 16, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (3,), generator=gen)
    net = CNN(**({"channels": (4, 6, 4), "image_size": 16, "hidden": 6, "num_classes": 4, "seed": 1,
                  "local_losses": True, "block_size": 1, "groups": 2, "norm": True, "head_pool": 2} | kwargs))
    return net.double(), x, labels


def test_conv_heads_pool_to_a_grid_and_the_network_is_drawn_as_without():
    net = problem()[0]
    assert [type(layer) for _, layer in net.head_layers("head1")][:2] == [AdaptiveAvgPool2d, Flatten]
    assert [net.get_submodule(f"head{i}").fc.in_features for i in (1, 2, 3, 4)] == [16, 24, 16, 6]  # head4: fc1's
    assert isinstance(problem(head_pool=1)[0].head1.pool, GlobalAvgPool)
    plain = dict(problem(head_pool=1)[0].named_parameters())
    for name, param in net.named_parameters():
        if not name.startswith("head"):
            torch.testing.assert_close(param, plain[name], rtol=0, atol=0)
    assert CNN(local_losses=True, head_pool=3).head3.fc.in_features == 64 * 9  # the default CNN: maps 14, 7, 3


@pytest.mark.parametrize("kwargs, message", [
    ({"head_pool": 0}, r"head_pool=0\b"),
    ({"head_pool": 2.0}, r"head_pool=2\.0"),
    ({"head_pool": True}, r"head_pool=True"),
    ({"head_pool": 3}, r"smallest pooled map's size 2, got head_pool=3"),
    ({"head_pool": 2, "patches": 2}, r"patches=2 .* head_pool=2 .* choose one"),
    ({"head_pool": 2, "local_losses": False, "block_size": None, "groups": 1}, r"head_pool=2 .* local_losses=True"),
])
def test_bad_head_pool_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        problem(**kwargs)


def test_local_backprop_is_autograds_gradient_of_the_pooled_heads_objective():
    net, x, labels = problem()
    replicas = Replicas(net)
    twin = twin_local_grads(net, replicas, x, labels)
    grads = net.local_loss_and_grad(x, labels)[2]
    assert {n for n in grads if n.startswith("head1")} == {"head1.fc.weight", "head1.fc.bias"}
    for name in grads:
        torch.testing.assert_close(grads[name], twin[twin_name(net, name)].grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("groups", [1, 2])  # one replica: the head's JVP; more: its VJP
@pytest.mark.parametrize("per_example", [False, True], ids=["batch", "per-example"])
def test_group_derivs_are_each_replicas_jvp(per_example, groups):
    net, x, labels = problem(groups=groups)
    check_group_derivs(net, x, labels, per_example, directions=2)

"""Ren et al.'s LocalMixer in the engine (``Mixer``): its layers and blocks, its refusals in one line, each replica's
forward-mode derivative against ``torch.func.jvp`` of the twin with ``detach()`` outside its cell, the local gradient
against autograd of the replicated objective, the local estimators unbiased on it, and every registered estimator
training it. Its layers against autograd and ``torch.func``: test_engine.py; its activity sites: test_activity_site.py;
its per-example guesses: test_local_guess.py; its torch twin: test_torch_network.py."""

from __future__ import annotations

import pytest
import torch
from test_estimators import SEED
from test_local_groups import Replicas, twin_local_grads, twin_name
from test_local_patches import check_replica_derivs

from fg_lightning.engine import Mixer
from fg_lightning.estimators import REGISTRY, training_step
from fg_lightning.estimators.collective import Collective


def problem(seed=0, batch=3, **kwargs):
    """A Mixer on 8×8 images in 2×2 patches: 4×4 tokens, 6 channels, 3 blocks, with its residual, in float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=gen, dtype=torch.float64)
    net = Mixer(image_size=8, patch_size=2, channels=6, blocks=3, num_classes=4, seed=1, residual=True, **kwargs)
    return net.double(), x, torch.randint(0, 4, (batch,), generator=gen)


def test_the_default_mixer_and_its_blocks():
    net = Mixer(seed=0)
    names = [name for name, _ in net.named_layers()]
    assert names[:9] == ["embed1", "embed1_norm", "embed1_relu", "channel1", "channel1_norm", "channel1_relu",
                         "token2", "token2_norm", "token2_relu"]
    assert names[-5:] == ["channel3b", "channel3b_norm", "channel3b_relu", "pool", "fc"]
    residual = Mixer(seed=0, residual=True)  # block 3's input added back before its last ReLU
    names = [name for name, _ in residual.named_layers()]
    assert names[6:8] == ["skip2", "token2"] and names[-6:-2] == ["channel3b", "channel3b_norm", "skip3_add",
                                                                   "channel3b_relu"]
    assert residual.skip3_add.link is residual.skip3.link and dict(residual.named_parameters()).keys() == dict(
        net.named_parameters()).keys()
    assert (net.embed1.kernel_size, net.embed1.stride, net.token2.tokens) == (4, 4, 49)
    assert net.token2.bias is None and net.embed1_norm.bands == (1,) * 7
    assert sum(p.numel() for p in net.parameters()) == 2 * 49 * 49 + 2048 + 128 + 5 * (128 * 128 + 128) + 1290
    local = Mixer(seed=0, local_losses=True, groups=16, patches=7)
    assert [(names[-1], head) for names, head in local.blocks] == [
        ("channel1_relu", "head1"), ("channel2b_relu", "head2"), ("channel3b_relu", "head3"), ("fc", None)]
    assert (local.head1.groups, local.head1.patches, local.channel2a_norm.groups) == (16, 7, 16)
    plain = dict(net.named_parameters())  # the network's own layers are drawn as without heads
    assert all(torch.equal(plain[name], p) for name, p in local.named_parameters() if not name.startswith("head"))
    # a replica per group and token: channel c of token (i, j) reaches cell (c // 8)·49 + 7i + j alone
    cells = local.output_cells("channel1", (2, 128, 7, 7))
    assert int(cells[0, 2, 3]) == 17 and int(cells[127, 6, 6]) == 15 * 49 + 48 and int(cells.min()) == 0
    assert local.output_groups("channel3b") == [slice(8 * g, 8 * g + 8) for g in range(16)]
    assert local.output_cells("token2", (2, 128, 7, 7)) is None  # a layer inside the block: its derivative
    assert Mixer(seed=0, local_losses=True, block_size=2).blocks[0][0][-1] == "channel2b_relu"
    pooled = Mixer(seed=0, local_losses=True, groups=16, head_pool=3)  # each head reads a 3×3 grid of token averages
    assert [name for name, _ in pooled.head_layers("head2")] == ["head2.pool", "head2.flatten", "head2.fc"]
    assert pooled.head2.fc.in_features == 128 * 9 and pooled.output_groups("channel2b") == local.output_groups(
        "channel2b")


@pytest.mark.parametrize("kwargs, message", [
    ({"patch_size": 5}, r"a patch_size dividing image_size, .*patch_size=5"),
    ({"blocks": 0}, r"positive sizes and .*blocks=0"),
    ({"groups": 2}, r"groups=2 .* need local_losses=True"),
    ({"patches": 2}, r"patches=2 .* needs local_losses=True"),
    ({"local_losses": True, "patches": 8}, r"tokens' side 7, got patches=8"),
    ({"local_losses": True, "groups": 3}, r"dividing channels=128, got groups=3"),
    ({"head_pool": 3}, r"head_pool=3 .* needs local_losses=True"),
    ({"local_losses": True, "head_pool": 8}, r"tokens' side 7, got head_pool=8"),
    ({"local_losses": True, "head_pool": 2, "patches": 7}, r"patches=7 .* head_pool=2 .* choose one"),
])
def test_bad_switches_name_the_value_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        Mixer(**kwargs)
    assert "\n" not in str(error.value)


VARIANTS = {"groups": {"groups": 2}, "groups-patches": {"groups": 3, "patches": 2},
            "a-replica-per-token": {"groups": 2, "patches": 4}, "groups-head-pool": {"groups": 2, "head_pool": 2}}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("per_example", [False, True], ids=["batch", "per-example"])
def test_each_replicas_derivative_is_its_jvp(variant, per_example):
    check_replica_derivs(*problem(local_losses=True, **VARIANTS[variant]), per_example, directions=2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_local_backprop_is_the_gradient_of_the_replicated_objective(variant):
    net, x, labels = problem(local_losses=True, **VARIANTS[variant])
    twin = twin_local_grads(net, Replicas(net, cells=True), x, labels)
    grads = net.local_loss_and_grad(x, labels)[2]
    assert set(grads) == {name for name, _ in net.named_parameters()}
    for name in grads:
        torch.testing.assert_close(grads[name], twin[twin_name(net, name)].grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", ["local_activity", "local_weight"])
def test_local_estimates_on_the_mixer_are_unbiased(name):
    """The mean of the estimates (k = 8 each) with groups and patches is the exact local gradient within 6 standard
    errors of the sample mean on every coordinate, and its gain on it is 1 within 6 standard errors, at any seed
    (``FG_TEST_SEED``)."""
    net, x, labels = problem(local_losses=True, groups=3, patches=2)
    exact = torch.cat([g.flatten() for g in REGISTRY[name].make().exact_gradient(net, x, labels).values()])
    estimator, draws = REGISTRY[name].make(k=8, seed=SEED), 250
    samples = torch.stack([torch.cat([g.flatten() for g in estimator.estimate(net, x, labels, s).grads.values()])
                           for s in range(draws)])
    mean, var = samples.mean(0), samples.var(0)
    z = (mean - exact).abs() / (var / draws).sqrt().clamp_min(1e-12)
    assert float(z.max()) < 6, (float(z.max()), int(z.argmax()))
    gain = float(mean @ exact / exact.square().sum())
    assert abs(gain - 1) < 6 * float((var.sum() / draws).sqrt() / exact.norm()), gain


# measured at seeds 11, 0, 1, 2 (k = 32, 100 steps): every estimator's loss falls by 0.02 to 1.1 at these rates
LRS = {"naive": 0.05, "naive_replayed": 0.05, "input_qr": 0.02, "input_approx": 0.05, "momentum": 0.001,
       "orthogonal": 5.0}
STEPS = 100


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_estimator_lowers_the_mixers_loss(name):
    """Every registered estimator, through the one training step, lowers the loss of a small Mixer (its residual;
    local losses, groups and a replica per token where it needs them; k = 32 where it takes one) on a learnable toy
    task of 8×8 images, in 100 steps; a zero update lowers it by 0."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=gen)
    labels = (x.flatten(1) @ torch.randn(64, 4, generator=gen)).argmax(1)
    spec = REGISTRY[name]
    estimator = spec.make(**({"k": 32} if spec.takes_k else {}), seed=SEED)
    local = estimator.needs_local_losses
    net = Mixer(image_size=8, patch_size=2, channels=8, blocks=2, num_classes=4, seed=SEED, local_losses=local,
                residual=True, **({"groups": 2, "patches": 4} if local else {}))
    estimator.validate(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=LRS.get(name, 0.3))
    before = float(net.loss(x, labels))
    for step in range(STEPS):
        training_step(estimator, net, x, labels, step, optimizer, Collective())
    after = float(net.loss(x, labels))
    print(f"{name}: loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.01, (name, before, after)

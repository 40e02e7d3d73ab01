"""Where activity perturbation perturbs and what it masks (``network.activity_norms``, ``network.activity_mask``):
past a layer's normalisations, as Ren et al.'s code does, with the tangent zeroed wherever the loss's derivative is
known to be zero (a following ReLU off, a following max-pool's unpicked positions). The mask against autograd's
derivative, the estimators through the normalisation unbiased, and the variance that the mask past it removes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_local_groups import sample_mean_and_variance

from fg_lightning.engine import CNN, MLP, Mixer
from fg_lightning.estimators import ActivityPerturbation, LocalActivityPerturbation
from fg_lightning.estimators import local as local_module
from fg_lightning.estimators.collective import ONE_PROCESS

NETS = {
    "mlp": (lambda **kw: MLP(in_features=12, hidden=(16, 12), num_classes=4, seed=1, **kw), (5, 12)),
    "cnn": (lambda **kw: CNN(channels=(4, 6, 4), image_size=16, hidden=6, num_classes=4, seed=1, **kw), (5, 1, 16, 16)),
    "mixer": (lambda **kw: Mixer(image_size=8, patch_size=2, channels=4, blocks=3, num_classes=4, seed=1, residual=True,
                                 **kw),
              (5, 1, 8, 8)),
}
VARIANTS = {
    "mlp": {"plain": {}, "norm": {"norm": True},
            "local-groups-norm": {"local_losses": True, "groups": 2, "norm": True}},
    "cnn": {"plain": {}, "norm": {"norm": True}, "local-groups-norm": {"local_losses": True, "groups": 2, "norm": True},
            "local-patches-norm": {"local_losses": True, "groups": 2, "norm": True, "patches": 2},
            "local-head-pool-norm": {"local_losses": True, "groups": 2, "norm": True, "head_pool": 2}},
    "mixer": {"plain": {}, "local-groups-norm": {"local_losses": True, "groups": 2},  # its norms are its own
              "local-patches-norm": {"local_losses": True, "groups": 2, "patches": 2}},
}
CASES = [(model, variant) for model in NETS for variant in VARIANTS[model]]


def problem(model, variant, seed=0):
    make, shape = NETS[model]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return make(**VARIANTS[model][variant]).double(), x, torch.randint(0, 4, (shape[0],), generator=gen)


def sites(net, x):
    """``(name, site)`` of every perturbed layer (not the logit layers): its output past its normalisations."""
    outputs = net.logit_layers()
    for name, layer, _, output in net.primal_calls(x):
        if name not in outputs:
            site = output.clone()  # the in-place ReLU overwrites the output once the pass goes on
            for norm in net.activity_norms(name):
                site = norm(site)
            yield name, site


def downstream_derivative(net, name, site, labels):
    """Autograd's derivative, at ``site``, of every loss that it reaches (the network's and the heads'), through the
    engine layers' own forwards from there on."""
    names = [n for n, _ in net.named_layers()]
    heads = {block[-1]: head for block, head in net.blocks if head}
    leaf = site.detach().clone().requires_grad_()
    x, loss = leaf * 1, 0
    for after in names[names.index(name) + 1 + len(net.activity_norms(name)):]:
        x = getattr(net, after)(x)
        if after in heads:
            loss = loss + F.cross_entropy(getattr(net, heads[after])(x), labels)
    (loss + F.cross_entropy(x, labels)).backward()
    return leaf.grad


@pytest.mark.parametrize("model, variant", CASES)
def test_the_mask_is_where_autograds_derivative_is_not_zero(model, variant):
    """Off exactly where the derivative is zero: never where it is not (that would bias the estimate), and, on these
    generic inputs, nowhere else (every zero it misses is noise kept)."""
    net, x, labels = problem(model, variant)
    seen = 0
    for name, site in sites(net, x):
        mask = net.activity_mask(name, site)
        nonzero = downstream_derivative(net, name, site, labels) != 0
        assert mask is not None and mask.shape == site.shape, name
        assert torch.equal(mask, nonzero), (name, int((mask & ~nonzero).sum()), int((nonzero & ~mask).sum()))
        seen += 1
        if name.startswith("conv"):  # a max-pool follows
            assert float(mask.double().mean()) <= 0.25, name  # one position in four at most, the ReLU's off too
    assert seen == len([n for n, layer in net.named_layers() if layer.has_parameters]) - 1


def test_layers_followed_by_a_norm_are_perturbed_past_it():
    net = CNN(channels=(4, 6, 4), image_size=16, hidden=6, num_classes=4, seed=1, norm=True)
    assert [type(norm).__name__ for norm in net.activity_norms("conv1")] == ["GroupNorm"]
    assert net.activity_norms("fc1") == [net.norm4] and net.activity_norms("fc2") == []
    plain = CNN(channels=(4, 6, 4), image_size=16, hidden=6, num_classes=4, seed=1)
    assert plain.activity_norms("conv1") == [] and plain.activity_mask("fc2", torch.ones(2, 4)) is None


def test_with_the_mask_a_conv_is_drawn_past_its_relu_and_a_tiling_max_pool_only():
    """``activity_past``: the CNN's convolutions (ReLU, then a 2×2 pool of stride 2), past their norm too; no layer
    where no pool follows (the MLP, the Mixer, the CNN's fc1), or where the pool's windows overlap (a position in two
    windows would take two draws); and the estimator draws there only with the mask."""
    for net in (CNN(channels=(4, 6, 4), image_size=16, hidden=6, num_classes=4, seed=1),
                CNN(channels=(4, 6, 4), image_size=16, hidden=6, num_classes=4, seed=1, norm=True)):
        assert [type(layer).__name__ for layer in net.activity_past("conv2")] == ["ReLU", "MaxPool2d"]
        assert net.activity_past("fc1") == [] and net.activity_past("fc2") == []
        x, labels = torch.randn(2, 1, 16, 16), torch.randint(0, 4, (2,))
        norms = len(net.activity_norms("conv2"))
        for relu_mask, site in ((True, norms + 2), (False, norms)):
            source = local_module._ActivityTangents(ActivityPerturbation(relu_mask=relu_mask), net, labels,
                                                    ONE_PROCESS)
            assert source.activity_site("conv2") == site
    overlapping = CNN(channels=(4, 6, 4), image_size=16, hidden=6, num_classes=4, seed=1)
    overlapping.pool2.kernel_size = 3  # windows of 3, stride 2
    assert not overlapping.pool2.tiles and overlapping.activity_past("conv2") == []
    for make, _ in (NETS["mlp"], NETS["mixer"]):
        net = make()
        assert all(net.activity_past(name) == [] for name, layer in net.named_layers() if layer.has_parameters)


@pytest.mark.parametrize("model, variant", [(m, v) for m, v in CASES if v != "plain"])
def test_estimates_through_the_norm_are_unbiased(model, variant):
    """The mean of the estimates is the exact gradient (each block's local one with local losses) within 6 standard
    errors per coordinate, and its gain on it is 1."""
    net, x, labels = problem(model, variant)
    cls = LocalActivityPerturbation if net.has_local_losses else ActivityPerturbation
    exact = torch.cat([g.flatten() for g in cls().exact_gradient(net, x, labels).values()])
    draws = 1000
    mean, var = sample_mean_and_variance(cls(k=2, seed=1), net, x, labels, draws)
    assert float(((mean - exact).abs() / (var / draws).sqrt().clamp_min(1e-12)).max()) < 6
    gain = float(mean @ exact / exact.square().sum())
    assert abs(gain - 1) < 6 * float((var.sum() / draws).sqrt() / exact.norm()), gain


@pytest.mark.parametrize("model", NETS)
def test_the_mask_past_the_norm_lowers_the_variance(model):
    """With a GroupNorm between each layer and its ReLU, the ReLU's mask (and the max-pool's) applies only because the
    tangent is added past the norm: the total variance falls well below the unmasked estimate's."""
    net, x, labels = problem(model, "local-groups-norm")
    masked = sample_mean_and_variance(LocalActivityPerturbation(seed=1), net, x, labels, 400)[1].sum()
    plain = sample_mean_and_variance(LocalActivityPerturbation(relu_mask=False, seed=1), net, x, labels, 400)[1].sum()
    assert masked < (0.5 if model == "cnn" else 0.8) * plain, (float(masked), float(plain))  # cnn: max-pools too

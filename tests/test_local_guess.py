"""LocalGuess(projection="example") (Fournier et al. 2023): each example's gradient projected on its own local-gradient
guess, against a brute-force oracle (per-example gradients by torch.autograd, one example at a time, float64) on the
MLP and the CNN with local losses and on networks that take its other code paths; what it refuses. The contract
(two ranks, resume), unbiasedness flags, the cosine floor and the Fashion-MNIST training run for every registered
estimator, ``local_guess_example`` among them (test_estimators.py, test_cosine_floor.py, test_local.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_local import autograd_local_grads

from fg_lightning.engine import CNN, MLP, Conv2d, GlobalAvgPool, Linear, Mixer, Network, ReLU, to_torch
from fg_lightning.estimators import REGISTRY, LocalGuess
from fg_lightning.torch_network import TorchNetwork


def custom_cnn():
    """A stride-2 padded convolution, a conv and a linear layer without bias, a GlobalAvgPool head and a linear one."""
    layers = [("conv1", Conv2d(1, 3, 3, stride=2, padding=1)), ("relu1", ReLU(inplace=True)),
              ("conv2", Conv2d(3, 2, 3, bias=False)), ("relu2", ReLU(inplace=True)),
              ("pool", GlobalAvgPool()), ("fc1", Linear(2, 5, bias=False)), ("relu3", ReLU(inplace=True)),
              ("fc2", Linear(5, 4))]
    heads = {"relu1": [("pool", GlobalAvgPool()), ("fc", Linear(3, 4))], "relu3": [("fc", Linear(5, 4))]}
    return Network(layers, input_shape=(1, 9, 9), heads=heads)


NETS = {
    "mlp": (lambda: MLP(in_features=12, hidden=(7, 6), num_classes=4, seed=1, local_losses=True), (5, 12)),
    "cnn": (lambda: CNN(channels=(2, 3, 4), hidden=5, num_classes=4, seed=1, local_losses=True), (3, 1, 28, 28)),
    # fc1 guessed too (its input a Flatten's), GroupNorm and groups in the blocks
    "cnn_block1_norm": (lambda: CNN(image_size=12, channels=(4, 4), hidden=6, num_classes=4, seed=2, local_losses=True,
                                    block_size=1, groups=2, norm=True), (4, 1, 12, 12)),
    # two layers per block (a single Linear layer's per-example scale cancels in its projection), groups, GroupNorm
    "mlp_block2_groups": (lambda: MLP(in_features=8, hidden=(6, 6, 4, 4), num_classes=4, seed=3, local_losses=True,
                                      block_size=2, groups=2, norm=True), (6, 8)),
    "custom_cnn": (lambda: (torch.manual_seed(4), custom_cnn())[1], (5, 1, 9, 9)),
    # TokenMixing's per-example gradients, 1×1 convolutions, per-token GroupNorm over groups
    "mixer": (lambda: Mixer(image_size=8, patch_size=2, channels=4, blocks=3, num_classes=4, seed=5, local_losses=True,
                            groups=2, residual=True), (4, 1, 8, 8)),
}


def problem(model, seed=0):
    make, shape = NETS[model]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return make().double(), x, torch.randint(0, 4, (shape[0],), generator=gen)


def oracle(net, x, labels):
    """The issue's formula by brute force: for each block but the last, (1/B) Σ_b (∇ℓ_b·v_b / |v_b|²) v_b,
    ∇ℓ_b example b's gradient of the network's loss, v_b its gradient of the block's local loss (the block's own
    parameters, detached at the block's input), both by autograd on the torch twins, one example at a time; the
    heads and the last block: the local gradient (the network's for the last)."""
    body = to_torch(net)
    heads = {head: to_torch(net.get_submodule(head)) for _, head in net.blocks if head}
    expected, _ = autograd_local_grads(net, x, labels)
    params = dict(body.named_parameters())
    sums = {}
    for b in range(len(x)):
        xb, yb = x[b:b + 1], labels[b:b + 1]
        grad = dict(zip(params, torch.autograd.grad(F.cross_entropy(body(xb), yb), list(params.values()))))
        h = xb
        for names, head in net.blocks[:-1]:
            h = h.detach()
            for name in names:
                h = body.get_submodule(name)(h)
            own = [n for n in params if n.split(".")[0] in names]
            guess = dict(zip(own, torch.autograd.grad(F.cross_entropy(heads[head](h), yb), [params[n] for n in own])))
            scale = sum((grad[n] * guess[n]).sum() for n in own) / sum(guess[n].square().sum() for n in own)
            for n in own:
                sums[n] = sums.get(n, 0) + scale * guess[n] / len(x)
    return expected | sums


@pytest.mark.parametrize("model", NETS)
def test_per_example_projection_equals_the_brute_force_oracle(model):
    net, x, labels = problem(model)
    estimate = LocalGuess(projection="example").estimate(net, x, labels, 0)
    expected = oracle(net, x, labels)
    assert list(estimate.grads) == [name for name, _ in net.named_parameters()]
    for name, value in expected.items():
        torch.testing.assert_close(estimate.grads[name], value, rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(estimate.loss, F.cross_entropy(net(x), labels))
    torch.testing.assert_close(estimate.logits, net(x))
    # not the batch projection: the per-example estimate differs from it on every guessed block
    batch = LocalGuess().estimate(net, x, labels, 0).grads
    for names, head in net.blocks[:-1]:
        own = [n for n in estimate.grads if n.split(".")[0] in names]
        gap = sum((estimate.grads[n] - batch[n]).square().sum() for n in own).sqrt()
        assert gap > 1e-3 * sum(batch[n].square().sum() for n in own).sqrt(), (model, names)


def test_one_example_is_the_batch_projection():
    net, x, labels = problem("cnn")
    x, labels = x[:1], labels[:1]
    example = LocalGuess(projection="example").estimate(net, x, labels, 0).grads
    batch = LocalGuess().estimate(net, x, labels, 0).grads
    for name, value in batch.items():
        torch.testing.assert_close(example[name], value, rtol=1e-9, atol=1e-12, msg=name)


def test_a_chunked_pass_gives_the_same_estimate():
    """The forward-mode pass in chunks of directions (one block's guess per pass) and the Conv2d per-example weight
    gradients in batch chunks of one example."""
    import fg_lightning.engine.layers as layers

    net, x, labels = problem("cnn")
    whole = LocalGuess(projection="example").estimate(net, x, labels, 0).grads
    net.tangent_memory_mb = 1e-6
    chunk = layers.CHUNK_ELEMENTS
    layers.CHUNK_ELEMENTS = 1
    try:
        chunked = LocalGuess(projection="example").estimate(net, x, labels, 0).grads
    finally:
        layers.CHUNK_ELEMENTS = chunk
    for name, value in whole.items():
        torch.testing.assert_close(chunked[name], value, rtol=1e-12, atol=1e-14, msg=name)


def test_an_example_whose_guess_is_zero_takes_no_step():
    """All of the first block's ReLUs off for every example: its guesses are zero, and so is its update (no NaN)."""
    net, x, labels = problem("mlp")
    with torch.no_grad():
        net.fc1.bias.fill_(-100.0)
    grads = LocalGuess(projection="example").estimate(net, x, labels, 0).grads
    assert all(torch.equal(grads[n], torch.zeros_like(grads[n])) for n in ("fc1.weight", "fc1.bias"))
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_registered_with_its_projection():
    spec = REGISTRY["local_guess_example"]
    estimator = spec.make(k=4, seed=3)
    assert isinstance(estimator, LocalGuess) and estimator.projection == "example" and estimator.seed == 3
    assert spec.backward == "block" and spec.needs_local_losses and not spec.unbiased
    assert REGISTRY["local_guess"].make().projection == "batch"
    assert "projection='example'" in repr(estimator)


@pytest.mark.parametrize("projection", ["examples", "Example", "", None, 1])
def test_a_bad_projection_is_refused_naming_the_value(projection):
    with pytest.raises(ValueError, match=f"projection={projection!r}") as info:
        LocalGuess(projection=projection)
    assert "\n" not in str(info.value)


def test_the_torch_backend_is_refused_in_one_line():
    estimator = LocalGuess(projection="example")
    with pytest.raises(ValueError) as info:
        estimator.validate(TorchNetwork(to_torch(MLP(in_features=4, hidden=(3,), num_classes=2, seed=0))))
    assert "\n" not in str(info.value) and "LocalGuess" in str(info.value), str(info.value)
    estimator.validate(MLP(in_features=4, hidden=(3,), num_classes=2, seed=0, local_losses=True))
    estimator.validate(CNN(image_size=8, channels=(2,), hidden=3, seed=0, local_losses=True))


def test_a_network_without_the_engines_layer_passes_is_refused_in_one_line():
    """A local-loss model that is not the engine's Network (no blocks, no head layers)."""
    net = MLP(in_features=4, hidden=(3,), num_classes=2, seed=0, local_losses=True)

    class Opaque:  # every LocalLossModel member, forwarded; not the engine's blocks
        has_local_losses, num_classes = True, 2

        def __getattr__(self, name):
            if name in ("blocks", "head_layers"):
                raise AttributeError(name)
            return getattr(net, name)

    with pytest.raises(ValueError, match=r"^LocalGuess\(projection='example'\) [^\n]*lacks blocks, head_layers"):
        LocalGuess(projection="example").validate(Opaque())
    LocalGuess().validate(Opaque())  # the batch projection needs none of it

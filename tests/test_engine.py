"""The engine's hand-written passes against torch.autograd and torch.func.jvp (the oracles), in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fg_lightning.engine import (
    CNN, GELU, MLP, AdaptiveAvgPool2d, Conv2d, Flatten, GlobalAvgPool, GroupNorm, LayerNorm, Linear, MaxPool2d, Network,
    Mixer, OuterTangent, ReLU, TokenMixing,
    cross_entropy_and_grad, cross_entropy_jvp, to_torch, weighted_sum,
)


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """Every oracle comparison here is in float64, from a fixed seed."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, expected, rtol=kw.get("rtol", 1e-9), atol=kw.get("atol", 1e-10))


def stock_of(layer):
    return to_torch(Network([("layer", layer)], input_shape=(1,)))[0]


def randomised(layer):
    """``layer`` with random parameters (a LayerNorm starts at w = 1, b = 0, where a missing factor of w would pass)."""
    for param in layer.parameters():
        param.data.copy_(torch.randn_like(param))
    return layer


LAYER_CASES = [
    ("linear", lambda: Linear(5, 4), (6, 5)),
    ("linear-no-bias", lambda: Linear(5, 3, bias=False), (2, 5)),
    ("conv-no-padding", lambda: Conv2d(2, 3, 3), (2, 2, 7, 7)),
    ("conv-padding-stride", lambda: Conv2d(2, 3, 3, stride=2, padding=1), (3, 2, 8, 9)),
    ("conv-5x5", lambda: Conv2d(3, 2, 5, padding=2), (2, 3, 6, 5)),
    ("relu", lambda: ReLU(), (4, 6)),
    ("relu-4d", lambda: ReLU(), (2, 3, 4, 5)),
    ("maxpool-odd", lambda: MaxPool2d(2), (2, 3, 7, 5)),
    ("maxpool-overlap", lambda: MaxPool2d(3, stride=2), (2, 2, 9, 8)),
    ("flatten", lambda: Flatten(), (2, 3, 4, 5)),
    ("global-avg-pool", lambda: GlobalAvgPool(), (2, 3, 4, 5)),
    ("adaptive-avg-pool-overlap", lambda: AdaptiveAvgPool2d(2), (2, 3, 7, 5)),  # windows 0-3 and 3-6 share row 3
    ("adaptive-avg-pool-3", lambda: AdaptiveAvgPool2d(3), (2, 2, 3, 6)),
    ("group-norm", lambda: GroupNorm(3, 6), (4, 6)),
    ("group-norm-4d", lambda: GroupNorm(2, 4, eps=1e-3), (3, 4, 3, 5)),
    ("layer-norm-4d", lambda: GroupNorm(1, 3), (2, 3, 4, 4)),
    ("group-norm-bands", lambda: GroupNorm(2, 4, bands=(3, 2)), (3, 4, 5, 5)),  # CNN(norm=True, patches=2)
    ("layer-norm-affine", lambda: randomised(LayerNorm(6)), (4, 6)),
    ("layer-norm-tokens", lambda: randomised(LayerNorm(5, eps=1e-3)), (2, 3, 5)),  # (B, tokens, channels)
    ("gelu", lambda: GELU(), (4, 6)),
    ("gelu-4d", lambda: GELU(), (2, 3, 4, 5)),
    ("token-mixing", lambda: TokenMixing(3, 4), (2, 5, 3, 4)),  # (B, C, H, W): 12 tokens
    ("token-mixing-no-bias", lambda: TokenMixing(2, 2, bias=False), (3, 2, 2, 2)),
]


@pytest.mark.parametrize("make_layer, x_shape", [c[1:] for c in LAYER_CASES], ids=[c[0] for c in LAYER_CASES])
def test_layer_vjp_matches_autograd(make_layer, x_shape):
    layer = make_layer().double()
    stock = stock_of(layer)
    x = torch.randn(x_shape)
    y, saved = layer.primal(x.clone())
    dy = torch.randn_like(y)
    dx, grads = layer.vjp(saved, dy.clone())

    x_ref = x.clone().requires_grad_()
    y_ref = stock(x_ref)
    y_ref.backward(dy)
    close(y, y_ref.detach())
    close(dx, x_ref.grad)
    assert set(grads) == {name for name, _ in stock.named_parameters()}
    for name, param in stock.named_parameters():
        close(grads[name], param.grad)
    no_dx, same_grads = layer.vjp(layer.primal(x.clone())[1], dy.clone(), need_input_grad=False)
    assert no_dx is None
    for name in grads:
        close(same_grads[name], grads[name])


def reference_jvp(stock, x, dx, param_tangents):
    """K separate torch.func.jvp calls, stacked: the oracle for one batched engine pass."""
    names = [name for name, _ in stock.named_parameters()]
    params = [param.detach() for _, param in stock.named_parameters()]

    def f(x_in, *param_values):
        return torch.func.functional_call(stock, dict(zip(names, param_values)), (x_in,))

    outs = []
    for k in range(len(dx)):
        tangents = [param_tangents.get(name, torch.zeros((len(dx), *p.shape)))[k] for name, p in zip(names, params)]
        y, dy = torch.func.jvp(f, (x, *params), (dx[k], *tangents))
        outs.append(dy)
    return y, torch.stack(outs)


# (a layer without parameters and without an input tangent has nothing to differentiate: not a case)
JVP_CASES = [(name, make, shape, with_dx) for name, make, shape in LAYER_CASES for with_dx in (True, False)
             if with_dx or any(True for _ in make().parameters())]


@pytest.mark.parametrize("make_layer, x_shape, with_input_tangent", [c[1:] for c in JVP_CASES],
                         ids=[f"{c[0]}-{'dx' if c[3] else 'no-dx'}" for c in JVP_CASES])
def test_layer_jvp_matches_torch_func(make_layer, x_shape, with_input_tangent):
    layer = make_layer().double()
    params = dict(layer.named_parameters())
    stock = stock_of(layer)
    num_dirs = 3
    x = torch.randn(x_shape)
    dx = torch.randn(num_dirs, *x_shape)
    tangents = {name: torch.randn(num_dirs, *p.shape) for name, p in params.items()}
    y, dy = layer.jvp(x.clone(), dx.clone() if with_input_tangent else None, tangents)
    y_ref, dy_ref = reference_jvp(stock, x, dx if with_input_tangent else torch.zeros_like(dx), tangents)
    close(y, y_ref)
    close(dy, dy_ref)


def _scaled(method):
    """``method`` (a layer's ``vjp`` or ``jvp``) with every derivative it returns scaled by 1.1."""
    def scaled(self, *args, **kwargs):
        first, second = method(self, *args, **kwargs)
        if method.__name__ == "jvp":  # (y, dy)
            return first, None if second is None else second * 1.1
        return None if first is None else first * 1.1, {name: grad * 1.1 for name, grad in second.items()}
    return scaled


@pytest.mark.parametrize("make_layer, x_shape", [c[1:] for c in LAYER_CASES], ids=[c[0] for c in LAYER_CASES])
def test_a_layer_pass_scaled_by_1_1_is_caught(make_layer, x_shape, monkeypatch):
    """Each layer's VJP and JVP, scaled by 1.1, fail the checks above against autograd and ``torch.func.jvp``."""
    cls = type(make_layer())
    for method, check in (("vjp", lambda: test_layer_vjp_matches_autograd(make_layer, x_shape)),
                          ("jvp", lambda: test_layer_jvp_matches_torch_func(make_layer, x_shape, True))):
        with monkeypatch.context() as patch:
            patch.setattr(cls, method, _scaled(getattr(cls, method)))
            with pytest.raises(AssertionError):
                check()


@pytest.mark.parametrize("with_input_tangent", [True, False], ids=["dx", "no-dx"])
def test_linear_jvp_with_outer_tangent_matches_dense(with_input_tangent):
    layer = Linear(6, 4).double()
    x, dx = torch.randn(5, 6), torch.randn(3, 5, 6)
    outer = OuterTangent(torch.randn(3, 4), torch.randn(3, 6))
    bias = torch.randn(3, 4)
    y, dy = layer.jvp(x, dx.clone() if with_input_tangent else None, {"weight": outer, "bias": bias})
    y_ref, dy_ref = layer.jvp(x, dx.clone() if with_input_tangent else None, {"weight": outer.dense(), "bias": bias})
    close(y, y_ref)
    close(dy, dy_ref)
    weights = torch.randn(3)
    close(weighted_sum(weights, outer), weighted_sum(weights, outer.dense()))


def test_missing_parameter_tangent_is_zero():
    layer = Linear(4, 3).double()
    x, dx = torch.randn(2, 4), torch.randn(2, 2, 4)
    weight_tangent = torch.randn(2, 3, 4)
    _, dy = layer.jvp(x, dx.clone(), {"weight": weight_tangent})
    _, dy_ref = layer.jvp(x, dx.clone(), {"weight": weight_tangent, "bias": torch.zeros(2, 3)})
    close(dy, dy_ref)


def small_mlp():
    return MLP(in_features=12, hidden=(9, 7), num_classes=5).double()


def small_cnn():
    return CNN(in_channels=2, image_size=12, channels=(3, 4, 5), hidden=6, num_classes=4).double()


def gelu_mlp():
    """A network composed from the engine's layers by hand: LayerNorm and GELU need nothing of the network."""
    return Network([("fc1", Linear(12, 9)), ("norm1", randomised(LayerNorm(9))), ("gelu1", GELU()),
                    ("fc2", Linear(9, 7)), ("gelu2", GELU()), ("fc3", Linear(7, 5))], input_shape=(12,)).double()


NETWORKS = [
    ("mlp", small_mlp, (8, 12)),
    ("mlp-gelu", gelu_mlp, (8, 12)),
    ("mlp-image-input", small_mlp, (8, 3, 2, 2)),
    ("cnn", small_cnn, (6, 2, 12, 12)),
    ("mlp-norm", lambda: MLP(in_features=12, hidden=(9, 7), num_classes=5, norm=True).double(), (8, 12)),
    ("cnn-norm", lambda: CNN(in_channels=2, image_size=12, channels=(3, 4, 5), hidden=6, num_classes=4,
                             norm=True).double(), (6, 2, 12, 12)),
    ("mixer", lambda: Mixer(in_channels=2, image_size=8, patch_size=2, channels=6, blocks=3, num_classes=4).double(),
     (5, 2, 8, 8)),
    ("mixer-residual", lambda: Mixer(image_size=8, patch_size=2, channels=6, blocks=3, num_classes=4,
                                     residual=True).double(), (5, 1, 8, 8)),
]


def batch_for(net, x_shape):
    num_classes = net(torch.zeros(x_shape)).shape[1]
    return torch.randn(x_shape), torch.randint(0, num_classes, (x_shape[0],))


def gaussian_tangent_fn(num_dirs, record=None):
    def tangent_fn(name, layer, layer_input):
        if record is not None:
            record[name] = layer_input.clone()
        return {param: torch.randn(num_dirs, *p.shape) for param, p in layer.named_parameters()}

    return tangent_fn


def stock_loss_fn(stock, x, labels):
    names = [name for name, _ in stock.named_parameters()]

    def loss(*param_values):
        return F.cross_entropy(torch.func.functional_call(stock, dict(zip(names, param_values)), (x,)), labels)

    return names, loss


@pytest.mark.parametrize("make_net, x_shape", [c[1:] for c in NETWORKS], ids=[c[0] for c in NETWORKS])
def test_network_loss_and_grad_matches_autograd(make_net, x_shape):
    net = make_net()
    x, labels = batch_for(net, x_shape)
    loss, logits, grads = net.loss_and_grad(x, labels)
    stock = to_torch(net)
    logits_ref = stock(x)
    loss_ref = F.cross_entropy(logits_ref, labels)
    loss_ref.backward()
    close(loss, loss_ref.detach())
    close(logits, logits_ref.detach())
    assert list(grads) == [name for name, _ in net.named_parameters()]
    for name, param in stock.named_parameters():
        close(grads[name], param.grad)


@pytest.mark.parametrize("make_net, x_shape", [c[1:] for c in NETWORKS], ids=[c[0] for c in NETWORKS])
def test_network_jvp_matches_torch_func_and_finite_differences(make_net, x_shape):
    net = make_net()
    x, labels = batch_for(net, x_shape)
    num_dirs = 4
    layer_inputs = {}
    result = net.jvp(x, labels, gaussian_tangent_fn(num_dirs, layer_inputs))
    assert result.dir_derivs.shape == (num_dirs,)
    assert list(result.tangents) == [name for name, _ in net.named_parameters()]

    stock = to_torch(net)
    names, loss = stock_loss_fn(stock, x, labels)
    params = [p.detach() for p in stock.parameters()]
    close(result.loss, loss(*params))
    close(result.logits, stock(x).detach())
    for k in range(num_dirs):
        tangent_k = [result.tangents[name][k] for name in names]
        _, dir_deriv = torch.func.jvp(loss, tuple(params), tuple(tangent_k))
        close(result.dir_derivs[k], dir_deriv)
        eps = 1e-6
        plus = loss(*[p + eps * t for p, t in zip(params, tangent_k)])
        minus = loss(*[p - eps * t for p, t in zip(params, tangent_k)])
        close(result.dir_derivs[k], (plus - minus) / (2 * eps), rtol=1e-5, atol=1e-7)

    # tangent_fn saw each parameterised layer's actual input
    activations = {}
    hooks = [module.register_forward_hook(lambda m, inp, out, n=n: activations.__setitem__(n, inp[0].detach().clone()))
             for n, module in stock.named_children()]
    stock(x)
    for hook in hooks:
        hook.remove()
    assert set(layer_inputs) == {name.rsplit(".", 1)[0] for name in names}
    for name, seen in layer_inputs.items():
        close(seen, activations[name].reshape(seen.shape))


@pytest.mark.parametrize("make_net, x_shape", [c[1:] for c in NETWORKS], ids=[c[0] for c in NETWORKS])
def test_batched_directions_equal_separate_passes(make_net, x_shape):
    net = make_net()
    x, labels = batch_for(net, x_shape)
    torch.manual_seed(1)
    batched = net.jvp(x, labels, gaussian_tangent_fn(5))
    for k in range(5):
        single = net.jvp(x, labels, lambda name, layer, inp: {
            param: batched.tangents[f"{name}.{param}"][k : k + 1] for param, _ in layer.named_parameters()
        })
        close(single.dir_derivs, batched.dir_derivs[k : k + 1])
        close(single.loss, batched.loss)


@pytest.mark.parametrize("outer", [False, True], ids=["dense", "outer-tangent"])
@pytest.mark.parametrize("make_net, x_shape", [c[1:] for c in NETWORKS], ids=[c[0] for c in NETWORKS])
def test_directions_in_chunks_equal_one_pass(make_net, x_shape, outer):
    """Under a tangent memory budget the K directions go in chunks (one primal pass each); tangent_fn is still asked
    once per layer, with the layer's input, and the result is the single pass's."""
    net = make_net()
    x, labels = batch_for(net, x_shape)
    num_dirs = 7

    def tangent_fn(name, layer, layer_input):
        calls.append((name, layer_input.clone()))
        gen = torch.Generator().manual_seed(len(calls))
        tangents = {param: torch.randn(num_dirs, *p.shape, generator=gen) for param, p in layer.named_parameters()}
        if outer and isinstance(layer, Linear):
            tangents["weight"] = OuterTangent(torch.randn(num_dirs, layer.out_features, generator=gen),
                                              torch.randn(num_dirs, layer.in_features, generator=gen))
        return tangents

    calls = []
    net.tangent_memory_mb = None
    whole = net.jvp(x, labels, tangent_fn)
    whole_calls, calls = calls, []
    per_direction = x.shape[0] * net.widest_activation(x.shape[1:]) * x.element_size() / 2**20
    net.tangent_memory_mb = 2.5 * per_direction
    assert net.directions_per_pass(x, num_dirs) == 2  # 4 passes: 2 + 2 + 2 + 1 directions
    chunked = net.jvp(x, labels, tangent_fn)
    assert [name for name, _ in calls] == [name for name, _ in whole_calls]
    for (_, seen), (_, expected) in zip(calls, whole_calls):
        close(seen, expected)
    close(chunked.dir_derivs, whole.dir_derivs)
    close(chunked.loss, whole.loss)
    close(chunked.logits, whole.logits)
    assert chunked.dir_derivs.shape == (num_dirs,)


def test_exact_gradient_from_coordinate_directions():
    """With the n basis vectors as directions, the K derivatives are the gradient (K = n, Section III-C)."""
    net = MLP(in_features=3, hidden=(4,), num_classes=2).double()
    x, labels = torch.randn(5, 3), torch.randint(0, 2, (5,))
    _, _, grads = net.loss_and_grad(x, labels)
    sizes = {name: p.numel() for name, p in net.named_parameters()}
    total = sum(sizes.values())
    basis = torch.eye(total)
    offsets, start = {}, 0
    for name, size in sizes.items():
        offsets[name] = start
        start += size

    def tangent_fn(name, layer, inp):
        out = {}
        for param, p in layer.named_parameters():
            full = f"{name}.{param}"
            out[param] = basis[:, offsets[full] : offsets[full] + p.numel()].reshape(total, *p.shape)
        return out

    derivs = net.jvp(x, labels, tangent_fn).dir_derivs
    close(derivs, torch.cat([grads[name].flatten() for name in sizes]))


@pytest.mark.parametrize("make_net, x_shape", [c[1:] for c in NETWORKS], ids=[c[0] for c in NETWORKS])
def test_no_autograd_graph(make_net, x_shape):
    net = make_net()
    x, labels = batch_for(net, x_shape)
    assert not any(p.requires_grad for p in net.parameters())
    for mode in (torch.inference_mode, torch.enable_grad):
        with mode():
            loss, logits, grads = net.loss_and_grad(x, labels)
            result = net.jvp(x, labels, gaussian_tangent_fn(2))
        for tensor in [loss, logits, *grads.values(), result.loss, result.logits, result.dir_derivs]:
            assert tensor.grad_fn is None and not tensor.requires_grad


def test_loss_is_finite_for_huge_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [5e3, 1e4, -1e4]])
    labels = torch.tensor([1, 2, 0])
    loss, grad = cross_entropy_and_grad(logits, labels)
    expected = logits.clone().requires_grad_()
    F.cross_entropy(expected, labels).backward()
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    close(loss, F.cross_entropy(logits, labels))
    close(grad, expected.grad)
    _, derivs = cross_entropy_jvp(logits, labels, torch.randn(2, 3, 3))
    assert torch.isfinite(derivs).all()
    for dtype in (torch.float32, torch.float64):
        assert torch.isfinite(cross_entropy_and_grad(logits.to(dtype), labels)[0])

    net = small_mlp()
    with torch.no_grad():
        net.fc3.bias.copy_(torch.tensor([1e4, -1e4, 0.0, 0.0, 0.0]))
    x, labels = torch.randn(4, 12), torch.tensor([1, 2, 3, 4])
    assert torch.isfinite(net.loss_and_grad(x, labels)[0])
    assert torch.isfinite(net.jvp(x, labels, gaussian_tangent_fn(2)).dir_derivs).all()


def test_wrong_input_shape_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(B, 784\)"):
        MLP(hidden=(8,))(torch.zeros(2, 10))
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        CNN(channels=(2, 2, 2), hidden=4)(torch.zeros(2, 784))
    assert MLP(hidden=(8,))(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    net = small_mlp()
    with pytest.raises(ValueError, match="int64 labels"):
        net.loss_and_grad(torch.zeros(3, 12), torch.zeros(3))
    with pytest.raises(ValueError, match="labels of shape"):
        net.jvp(torch.zeros(3, 12), torch.zeros(4, dtype=torch.long), gaussian_tangent_fn(1))


def test_bad_tangents_are_rejected():
    net = small_mlp()
    x, labels = torch.randn(3, 12), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"'fc1.weight' has shape \(2, 9, 11\)"):
        net.jvp(x, labels, lambda n, layer, i: {"weight": torch.zeros(2, 9, 11)})

    def mixed_k(name, layer, inp):
        k = 2 if name == "fc1" else 3
        return {param: torch.zeros(k, *p.shape) for param, p in layer.named_parameters()}

    with pytest.raises(ValueError, match="K=2"):
        net.jvp(x, labels, mixed_k)
    with pytest.raises(ValueError, match="not a parameter"):
        net.jvp(x, labels, lambda n, layer, i: {"kernel": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match="no tangent"):
        net.jvp(x, labels, lambda n, layer, i: {})


def test_factories_match_torch_default_init_and_are_seeded():
    torch.set_default_dtype(torch.float32)
    net = MLP(seed=7)
    assert [n for n, _ in net.named_parameters()] == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    assert tuple(net.fc1.weight.shape) == (1024, 784) and tuple(net.fc3.weight.shape) == (10, 1024)
    torch.manual_seed(7)
    stock = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    for ours, theirs in zip(net.parameters(), stock.parameters()):
        torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=0)
    for a, b in zip(MLP(seed=7).parameters(), net.parameters()):
        assert torch.equal(a, b)
    state = torch.random.get_rng_state()
    CNN(seed=3)
    assert torch.equal(state, torch.random.get_rng_state()), "a seeded factory must not touch the global RNG"
    conv = CNN(seed=3)
    assert [n for n, _ in conv.named_layers()] == [
        "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "conv3", "relu3", "pool3",
        "flatten", "fc1", "relu4", "fc2"]
    assert conv(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert all(not p.requires_grad for p in conv.parameters())


def test_paper_sized_networks_match_autograd_in_float32():
    torch.set_default_dtype(torch.float32)
    for net, x in ((MLP(seed=0), torch.randn(16, 784)), (CNN(seed=0), torch.randn(4, 1, 28, 28))):
        labels = torch.randint(0, 10, (len(x),))
        loss, _, grads = net.loss_and_grad(x, labels)
        stock = to_torch(net)
        F.cross_entropy(stock(x), labels).backward()
        for name, param in stock.named_parameters():
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6)


def test_invalid_sizes_raise():
    with pytest.raises(ValueError, match="kernel_size"):
        Conv2d(1, 2, 0)
    with pytest.raises(ValueError, match="too small"):
        CNN(image_size=4)
    with pytest.raises(ValueError, match="hidden"):
        MLP(hidden=(0,))


@pytest.mark.parametrize("make_layer, x_shape", [
    (lambda: ReLU(), (5, 3, 4)), (lambda: MaxPool2d(2), (5, 2, 7, 6)), (lambda: MaxPool2d(3, stride=2), (5, 2, 9, 8)),
    (lambda: Conv2d(2, 3, 3, padding=1), (5, 2, 4, 4)), (lambda: Conv2d(2, 3, 3, stride=2), (5, 2, 7, 6)),
], ids=["relu", "maxpool", "maxpool-overlap", "conv", "conv-stride"])
def test_batch_chunked_jvp_matches_torch_func(make_layer, x_shape, monkeypatch):
    """Large activations go through ReLU, max-pool and convolution a batch slice at a time; force that path."""
    import fg_lightning.engine.layers as layers

    monkeypatch.setattr(layers, "CHUNK_ELEMENTS", 20)  # slices of one or two samples
    layer = make_layer().double()
    assert len(layers._batch_chunks(x_shape[0], math.prod(x_shape[1:]))) > 2
    x, dx = torch.randn(x_shape), torch.randn(3, *x_shape)
    tangent_sets = [{}]
    if isinstance(layer, Conv2d):
        tangent_sets = [{name: torch.randn(3, *p.shape) for name, p in layer.named_parameters()}, {}, {"bias": torch.randn(3, 3)}]
    for tangents in tangent_sets:
        for input_tangent in (dx, None) if tangents else (dx,):
            y, dy = layer.jvp(x.clone(), None if input_tangent is None else input_tangent.clone(), tangents)
            y_ref, dy_ref = reference_jvp(stock_of(layer), x, torch.zeros_like(dx) if input_tangent is None else dx, tangents)
            close(y, y_ref)
            close(dy, dy_ref)


def test_engine_and_estimators_import_with_torch_alone():
    """The engine and the estimators are pure torch: importing them pulls in no Lightning, torchmetrics or torchvision."""
    import subprocess
    import sys

    code = ("import sys, fg_lightning.engine, fg_lightning.estimators; "
            "print(sorted(m for m in ('lightning', 'torchmetrics', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout

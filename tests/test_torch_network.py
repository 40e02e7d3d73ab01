"""The torch backend: any torch.nn classifier behind the estimators' protocol (forward_ad, no backward pass)."""

from __future__ import annotations


import lightning.pytorch as pl
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
import yaml
from config_files import load_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from user_models import CalledTwice, OutputLayerTwice, Recurrent, ReusedOutside, TiedThroughAView, UserCNN

from fg_lightning.cli import main as fg_cli
from fg_lightning.engine import CNN, MLP, ActivitySource, Mixer, to_torch
from fg_lightning.estimators import (
    REGISTRY, DivergenceError, ForwardModel, MultiDirection, NaiveForwardGradient, apply_estimate,
)
from fg_lightning.estimators import local as local_module
from fg_lightning.module import ForwardGradientModule
from fg_lightning.torch_network import TorchBackendError, TorchNetwork

SUPPORTED = [name for name, spec in REGISTRY.items() if not spec.needs_local_losses]


TWINS = {
    "mlp": lambda: MLP(in_features=12, hidden=(10, 8), num_classes=4, seed=1),
    "cnn": lambda: CNN(image_size=8, channels=(2, 3, 3), hidden=6, num_classes=4, seed=1),
    "mixer": lambda: Mixer(image_size=8, patch_size=2, channels=8, blocks=2, num_classes=4, seed=1, residual=True),
}


def engine_and_twin(model):
    net = TWINS[model]().double()
    return net, TorchNetwork(to_torch(net))


def batches(model, steps=3):
    generator = torch.Generator().manual_seed(0)
    shape = (12,) if model == "mlp" else (1, 8, 8)
    return [(torch.randn(9, *shape, generator=generator, dtype=torch.float64),
             torch.randint(0, 4, (9,), generator=generator)) for _ in range(steps)]


# The Mixer's activity estimates differ by design: the engine perturbs past each layer's per-token norm (Ren et al.'s
# placement, Network.activity_norms), the torch backend each module's own output; both are unbiased, not the same draws.
PAST_NORMS = {("mixer", name) for name, spec in REGISTRY.items() if spec.backward == "layer"}
# With the mask, the engine draws a CNN convolution's tangent past its ReLU and max-pool (Network.activity_past), at a
# quarter of the positions, the torch backend at the module's output: the same law, not the same draws. Without the
# mask both draw at the output, so the twins are compared there.
PAST_POOLS = {("cnn", name): {"relu_mask": False} for name, spec in REGISTRY.items() if spec.backward == "layer"}


@pytest.mark.parametrize("name, model", [(n, m) for m in TWINS for n in SUPPORTED if (m, n) not in PAST_NORMS])
def test_torch_backend_gives_the_engines_estimate_on_the_twin(name, model):
    """Same seed, same batches: every step's estimate on the torch twin equals the engine's (float64, 1e-5 relative
    as the issue asks; in fact ~1e-14), through three SGD steps (momentum: a checkpoint and two forward steps)."""
    engine, twin = engine_and_twin(model)
    kwargs = {"fix_gap": 3} if name == "momentum" else PAST_POOLS.get((model, name), {})
    estimators = [REGISTRY[name].make(k=3, seed=5, **kwargs) for _ in range(2)]
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1) for net in (engine, twin)]
    for step, (x, labels) in enumerate(batches(model)):
        estimates = [est.estimate(net, x, labels, step) for est, net in zip(estimators, (engine, twin))]
        assert list(estimates[1].grads) == [n for n, _ in engine.named_parameters()]
        torch.testing.assert_close(estimates[1].loss, estimates[0].loss, rtol=1e-12, atol=0)
        for param, grad in estimates[0].grads.items():
            torch.testing.assert_close(estimates[1].grads[param], grad, rtol=1e-5, atol=1e-5 * grad.abs().max(),
                                       msg=f"step {step}, {param}")
        for est, estimate, net, opt in zip(estimators, estimates, (engine, twin), optimizers):
            apply_estimate(estimate, net, opt, step, est)


@pytest.mark.parametrize("name", [n for n in REGISTRY if n not in SUPPORTED])
def test_estimators_the_torch_backend_cannot_run_say_so_naming_the_model(name):
    twin = TorchNetwork(UserCNN())
    with pytest.raises(ValueError, match="UserCNN"):
        REGISTRY[name].make(k=2).validate(twin)


def test_dropout_and_batch_norm_in_train_mode():
    """Every direction differentiates the same function (the same dropout mask, batch statistics from the same
    buffers), the derivatives are ∇L·v_k from autograd with that mask, and the running statistics move once."""
    torch.manual_seed(0)
    user = UserCNN(dropout=0.5).double().train()
    net = TorchNetwork(user)
    x, labels = torch.randn(6, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (6,))
    directions = {n: torch.randn(4, *p.shape, dtype=torch.float64) for n, p in net.named_parameters()}
    before = {n: b.clone() for n, b in user.named_buffers()}
    rng = torch.get_rng_state()
    result = net.jvp(x, labels, lambda name, layer, _: {p: directions[f"{name}.{p}"]
                                                        for p, _ in layer.named_parameters()})
    after = {n: b.clone() for n, b in user.named_buffers()}
    assert int(after["1.num_batches_tracked"]) == 1
    for n, b in user.named_buffers():  # reference: one ordinary training forward with the same random state
        b.copy_(before[n])
    torch.set_rng_state(rng)
    loss, _, grads = net.loss_and_grad(x, labels)
    for n, b in user.named_buffers():
        torch.testing.assert_close(b, after[n], rtol=0, atol=0)
    torch.testing.assert_close(result.loss, loss, rtol=1e-12, atol=0)
    exact = torch.stack([sum((grads[n] * directions[n][k]).sum() for n in grads) for k in range(4)])
    torch.testing.assert_close(result.dir_derivs, exact, rtol=1e-10, atol=1e-12)
    assert torch.equal(torch.get_rng_state(), torch.random.get_rng_state())  # state left as after one forward
    assert all(isinstance(p, nn.Parameter) for p in user.parameters())  # the dual tensors are gone


def test_the_input_a_tangent_sees_is_the_layers_input():
    user = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    net, seen = TorchNetwork(user), {}
    x = torch.randn(7, 5)

    def tangent_fn(name, layer, layer_input):
        seen[name] = layer_input
        return {p: torch.zeros(1, *v.shape) for p, v in layer.named_parameters()}

    net.jvp(x, torch.randint(0, 3, (7,)), tangent_fn)
    assert torch.equal(seen["0"], x) and torch.equal(seen["2"], torch.relu(user[0](x)).detach())


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


class Skips(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x)


class WithIndex(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.index = nn.Parameter(torch.arange(3), requires_grad=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.count += 1
        return self.fc(x)[:, self.index]


def test_unsupported_models_are_refused_clearly_and_buffers_and_frozen_integers_work():
    """(torch refuses an integer parameter that requires grad, so integer parameters are frozen ones.)"""
    with pytest.raises(ValueError, match="b.weight and a.weight are one shared parameter"):
        TorchNetwork(Tied())
    with pytest.raises(ValueError, match="never ran the forward of 'unused'"):
        NaiveForwardGradient().estimate(TorchNetwork(Skips()), torch.randn(4, 3), torch.randint(0, 3, (4,)), 0)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        TorchNetwork(nn.Sequential(nn.Linear(3, 3).requires_grad_(False)))
    with pytest.raises(ValueError, match="num_classes"):
        TorchNetwork(nn.Sequential(nn.Conv2d(1, 2, 3)))
    model = WithIndex()  # an int64 parameter kept frozen and an int64 buffer
    net = TorchNetwork(model)
    assert [n for n, _ in net.named_parameters()] == ["fc.weight", "fc.bias"]
    estimate = MultiDirection(k=3).estimate(net, torch.randn(4, 3), torch.randint(0, 3, (4,)), 0)
    assert set(estimate.grads) == {"fc.weight", "fc.bias"} and int(model.count) == 1


def test_both_backends_implement_the_one_protocol():
    engine, twin = engine_and_twin("mlp")
    assert isinstance(engine, ForwardModel) and isinstance(twin, ForwardModel)
    assert not isinstance(nn.Linear(2, 2), ForwardModel)


def test_the_module_wraps_any_nn_module_and_refuses_a_loss_for_the_engine():
    module = ForwardGradientModule(UserCNN(), MultiDirection(k=2), loss=nn.CrossEntropyLoss())
    assert isinstance(module.network, TorchNetwork) and module.network.num_classes == 10
    with pytest.raises(ValueError, match="leave loss, num_classes and trainable out"):
        ForwardGradientModule(MLP(hidden=(8,)), MultiDirection(k=2), loss=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="LocalBackprop trains each block on its local loss"):
        ForwardGradientModule(UserCNN(), REGISTRY["local_backprop"].make())


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Sequential(nn.Linear(3, 4), nn.ReLU()), nn.Linear(4, 2)

    def forward(self, x):
        return 2 * self.fc(self.body(x))


def test_activity_perturbation_on_a_users_model():
    """On UserCNN (batch norm, dropout): refused in one line naming the batch norm while it is in training mode (its
    batch statistics mix the examples); with the norm in eval mode the estimate is unbiased for the gradient at the
    step's dropout mask: its mean over draws (same mask: the global generator is reset) approaches autograd's
    gradient; an output layer whose output is changed before the loss is refused with exact_output=True and fine
    without it."""
    torch.manual_seed(0)
    net = TorchNetwork(UserCNN(dropout=0.3).double())
    x, labels = torch.randn(8, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (8,))
    with pytest.raises(TorchBackendError, match=r"^UserCNN: '1' \(BatchNorm2d\) mixes the examples of a batch[^\n]*$"):
        REGISTRY["activity"].make().estimate(net, x, labels, 0)
    net.module[1].eval()
    state, buffers = torch.get_rng_state(), [b.clone() for b in net.module.buffers()]

    def rewind():
        torch.set_rng_state(state)
        for buffer, saved in zip(net.module.buffers(), buffers):
            buffer.copy_(saved)

    rewind()
    _, _, exact = net.loss_and_grad(x, labels)
    estimator, total = REGISTRY["activity"].make(k=50, seed=1), None
    for _ in range(40):
        rewind()
        grads = estimator.estimate(net, x, labels, 0).grads
        total = grads if total is None else {n: total[n] + g for n, g in grads.items()}
    flat_mean = torch.cat([total[n].flatten() / 40 for n in exact])
    flat_exact = torch.cat([g.flatten() for g in exact.values()])
    assert torch.nn.functional.cosine_similarity(flat_mean, flat_exact, dim=0) > 0.9
    assert abs(float(flat_mean @ flat_exact / (flat_exact @ flat_exact)) - 1) < 0.05  # the gain: 1.00 ± 0.003 at seeds 0-3
    torch.testing.assert_close(total["6.weight"] / 40, exact["6.weight"])  # the output layer: exact
    scaled = TorchNetwork(Scaled())
    with pytest.raises(ValueError, match="changes its output before the loss"):
        REGISTRY["activity"].make().estimate(scaled, torch.randn(5, 3), torch.randint(0, 2, (5,)), 0)
    REGISTRY["activity"].make(exact_output=False).estimate(scaled, torch.randn(5, 3), torch.randint(0, 2, (5,)), 0)



class KeywordInputs(nn.Module):
    """A classifier called with keyword arguments: ``features (B, 6)`` and ``keep (B, 6)``, an integer 0/1 mask of the
    features it uses."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), norm, nn.Linear(8, 3)

    def forward(self, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(features * keep)).relu())


def test_activity_perturbation_on_a_dict_input():
    """A dict input (a float and an integer tensor, the examples along dim 0 of both) through activity perturbation's
    passes: the examples-apart check names a batch norm in training mode; with a layer norm the output layer's
    gradient is autograd's."""
    generator = torch.Generator().manual_seed(0)
    x = {"features": torch.randn(6, 6, generator=generator, dtype=torch.float64),
         "keep": torch.randint(0, 2, (6, 6), generator=generator)}
    labels = torch.randint(0, 3, (6,), generator=generator)
    torch.manual_seed(0)
    mixing = TorchNetwork(KeywordInputs(nn.BatchNorm1d(8)).double())
    with pytest.raises(TorchBackendError, match=r"^KeywordInputs: 'norm' \(BatchNorm1d\) mixes the examples[^\n]*$"):
        REGISTRY["activity"].make().estimate(mixing, x, labels, 0)
    net = TorchNetwork(KeywordInputs(nn.LayerNorm(8)).double())
    _, _, exact = net.loss_and_grad(x, labels)
    grads = REGISTRY["activity"].make(k=2).estimate(net, x, labels, 0).grads
    torch.testing.assert_close(grads["fc2.weight"], exact["fc2.weight"], rtol=1e-12, atol=1e-14)
    assert not torch.equal(grads["fc1.weight"], exact["fc1.weight"])


def test_a_dict_batch_trains_through_the_module_and_its_nan_is_named_as_the_datas():
    """Dict inputs through the default collate and ForwardGradientModule's step under a Trainer: two steps train; a
    NaN in one of the dict's tensors is named as the input batch's, not the learning rate's."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    keep, labels = torch.randint(0, 2, (8, 6), generator=generator), torch.randint(0, 3, (8,), generator=generator)

    def fit(features):
        examples = [({"features": features[i], "keep": keep[i]}, labels[i]) for i in range(8)]
        module = ForwardGradientModule(KeywordInputs(nn.LayerNorm(8)).double(), MultiDirection(k=2))
        pl.Trainer(max_steps=2, logger=False, enable_model_summary=False, enable_checkpointing=False,
                   enable_progress_bar=False, accelerator="cpu").fit(
            module, torch.utils.data.DataLoader(examples, batch_size=4))
        return module

    assert fit(features).global_step == 2
    features[5, 1] = float("nan")
    with pytest.raises(DivergenceError, match="input batch of step 1 holds NaN or infinite values"):
        fit(features)


def test_a_users_sequential_cnn_trains_with_multi_direction_through_fg_cli(idx_root, tmp_path):
    """A config naming the user's own nn.Sequential (batch norm and dropout in train mode) trains with
    MultiDirection: the training loss falls well below its start, and the run's checkpoint resumes."""
    config = load_config("torch_resnet_multi_direction")
    config["model"]["network"] = {"class_path": "user_models.UserCNN", "init_args": {"channels": 4}}
    config["model"]["estimator"]["init_args"]["k"] = 4
    config["model"]["optimizer"]["init_args"]["lr"] = 0.003
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(config))
    fg_cli(["fit", "--config", str(path), "--data.root", idx_root, "--data.download", "false", "--data.batch_size",
            "16", "--data.val_size", "16", "--trainer.max_steps", "40", "--trainer.enable_progress_bar", "false",
            "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "tb")])
    folder = tmp_path / "tb" / "torch_resnet_multi_direction" / "version_0"
    losses = {}
    for events_file in folder.glob("events.out.tfevents.*"):
        events = EventAccumulator(str(events_file))
        events.Reload()
        losses.update({e.step: e.value for e in events.Scalars("train/loss")})
    first, last = [losses[s] for s in sorted(losses)[:5]], [losses[s] for s in sorted(losses)[-5:]]
    assert sum(last) / 5 < 0.7 * sum(first) / 5, losses
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 40 and checkpoint["fg_lightning"]["network"] == "UserCNN"


# -- models the forward-mode pass could get wrong: every use of a parameter gets its tangent, or the model is refused

def _exact_and_forward_mode_gradient(net, x, labels):
    """Autograd's gradient, and forward mode's own: MultiDirection(k=n, orthogonal) projects the gradient forward mode
    sees on n independent directions, i.e. it is that gradient."""
    torch.manual_seed(0)
    _, _, exact = net.loss_and_grad(x, labels)
    n = sum(p.numel() for p in net.parameters())
    estimate = MultiDirection(k=n, aggregation="orthogonal", seed=3).estimate(net, x, labels, 0)
    flat = torch.cat([g.flatten() for g in exact.values()])
    error = torch.cat([(estimate.grads[name] - g).flatten() for name, g in exact.items()])
    return float(error.norm() / flat.norm())


def test_a_parameter_used_outside_its_modules_forward_is_refused_naming_it_and_the_use():
    net = TorchNetwork(ReusedOutside().double())
    x, labels = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    for name in ("naive", "multi_direction", "orthogonal", "input_qr", "momentum"):
        estimator = REGISTRY[name].make(k=2)
        if name == "momentum":
            estimator.estimate(net, x, labels, 0)  # a backprop checkpoint: exact, autograd
        with pytest.raises(ValueError, match=r"fc1\.weight.*linear.*outside the forward of 'fc1'"):
            estimator.estimate(net, x, labels, 1)
    assert all(isinstance(p, nn.Parameter) for p in net.module.parameters())  # the pass left the model as it was


def test_a_module_called_twice_gets_its_tangent_at_every_call(monkeypatch):
    """fc1 runs twice per forward: weight perturbation carries the same tangent into both calls (forward mode's own
    gradient equals autograd's); activity perturbation perturbs each call with its own tangent and takes each call's
    own input for the weight step: with k = 10 tangents that form a scaled basis of both calls' outputs (5 + 5
    coordinates per example), Σ_k u_k u_kᵀ = k·I and its estimate is the exact gradient. Input-generated directions,
    drawn from one call's input, are refused."""
    torch.manual_seed(0)
    net = TorchNetwork(CalledTwice().double())
    x, labels = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert _exact_and_forward_mode_gradient(net, x, labels) < 1e-6
    _, _, exact = net.loss_and_grad(x, labels)
    basis = (10**0.5 * torch.eye(10, dtype=torch.float64)).unsqueeze(1).expand(10, 6, 10)
    order: list = []  # the calls as the pass meets them: fc1's first, its second (fc2, the output, is exact)

    def draws(noise, into=None):  # the same tangents in the pass and again in the weight step
        call = noise.call
        if not any(seen is call for seen in order):
            order.append(call)
        return iter([[(slice(None), u)] for u in (basis[..., :5] if order[0] is call else basis[..., 5:])])

    with monkeypatch.context() as patched:
        patched.setattr(local_module._Noise, "draws", draws)
        grads = REGISTRY["activity"].make(k=10).estimate(net, x, labels, 0).grads
    for name, grad in exact.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="'fc1' is called more than once"):
        REGISTRY["input_qr"].make().estimate(net, x, labels, 0)
    twice_at_the_end = TorchNetwork(OutputLayerTwice().double())  # the output layer's exact step takes one call
    with pytest.raises(ValueError, match="output layer 'fc2' is called more than once"):
        REGISTRY["activity"].make().estimate(twice_at_the_end, x, labels, 0)
    REGISTRY["activity"].make(exact_output=False).estimate(twice_at_the_end, x, labels, 0)


def test_a_module_whose_output_is_a_tuple_works_with_weight_perturbation_and_is_refused_by_activity():
    net = TorchNetwork(Recurrent().double())
    x, labels = torch.randn(5, 6, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert _exact_and_forward_mode_gradient(net, x, labels) < 1e-6
    with pytest.raises(ValueError, match=r"'lstm' \(LSTM\) returns a tuple"):
        REGISTRY["activity"].make().estimate(net, x, labels, 0)


def test_a_use_the_tracking_cannot_see_is_caught_by_the_first_pass_check():
    """A weight read through a view made at construction escapes the tracking of parameter uses; the one-time check
    on the first batch (forward mode's derivative against autograd's along random directions) refuses the model."""
    net = TorchNetwork(TiedThroughAView(dtype=torch.float64))
    x, labels = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="differs from autograd's"):
        NaiveForwardGradient().estimate(net, x, labels, 0)
    control = TorchNetwork(CalledTwice().double())
    NaiveForwardGradient().estimate(control, torch.randn(6, 5, dtype=torch.float64), labels % 3, 0)


def test_fg_cli_refuses_a_model_with_an_untracked_use_in_one_line(idx_root, tmp_path, capsys):
    """The model that trained silently with exit 0: refused at its first step, before any update, in one line."""
    config = load_config("torch_resnet_multi_direction")
    config["model"]["network"] = {"class_path": "user_models.ReusedOutside",
                                  "init_args": {"features": 784, "classes": 10}}
    config["model"]["estimator"]["init_args"]["k"] = 2
    path = tmp_path / "reused.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        fg_cli(["fit", "--config", str(path), "--data.root", idx_root, "--data.download", "false",
                "--data.batch_size", "8", "--data.val_size", "16", "--trainer.max_steps", "3",
                "--trainer.enable_progress_bar", "false",
                "--trainer.logger.init_args.save_dir", str(tmp_path / "tb")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fg-cli:")]
    assert exit_info.value.code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "TorchBackendError" in lines[0] and "'fc1.weight' is used by linear" in lines[0]
    assert not list(tmp_path.glob("tb/**/*.ckpt"))


LINEAR_CASES = {  # input, weight, bias; how the call is written
    "2d": ((5, 7), (4, 7), (4,), lambda x, w, b: F.linear(x, w, b)),
    "3d-no-bias": ((3, 5, 7), (4, 7), None, lambda x, w, b: F.linear(x, w)),
    "transposed-input": ((7, 5), (4, 7), (4,), lambda x, w, b: F.linear(x.t(), w, bias=b)),
}
CONV_CASES = {
    "conv1d-groups-stride": ((2, 4, 9), (6, 2, 3), (6,), lambda x, w, b: F.conv1d(x, w, b, 2, 1, 1, 2)),
    "conv2d-same-dilated": ((2, 3, 8, 8), (4, 3, 3, 3), (4,), lambda x, w, b: F.conv2d(x, w, b, padding="same",
                                                                                        dilation=2)),
    "conv2d-no-bias-kwargs": ((2, 3, 8, 8), (4, 3, 3, 3), None, lambda x, w, b: F.conv2d(x, weight=w, stride=2)),
    "conv3d": ((1, 2, 5, 5, 5), (3, 2, 2, 2, 2), (3,), lambda x, w, b: F.conv3d(x, w, b, (1, 2, 1))),
}


@pytest.mark.parametrize("case, tangents", [
    (case, tangents) for case, (_, _, bias, _) in {**LINEAR_CASES, **CONV_CASES}.items()
    for tangents in ("x", "w", "b", "xw", "xb", "wb", "xwb") if bias is not None or "b" not in tangents])
def test_the_lean_forward_rules_give_torch_func_jvps_derivative(case, tangents, monkeypatch):
    """The torch backend's own rules for F.linear and F.conv{1,2,3}d (one output-sized buffer for the tangent where
    torch's rule allocates each term) against torch.func.jvp, float64, on random inputs: every combination of which
    of input, weight and bias carries a tangent, N-d and transposed inputs, no bias, options given by position and by
    keyword. A spy proves the lean rule ran; with grad mode on it stands aside and torch's rule gives the same."""
    from fg_lightning import torch_network as tn

    x_shape, w_shape, b_shape, call = {**LINEAR_CASES, **CONV_CASES}[case]
    generator = torch.Generator().manual_seed(sum(map(ord, case + tangents)))
    primals = [None if s is None else torch.randn(s, generator=generator, dtype=torch.float64)
               for s in (x_shape, w_shape, b_shape)]
    directions = [None if p is None or name not in tangents else torch.randn_like(p)
                  for name, p in zip("xwb", primals)]
    given = [p for p in primals if p is not None]
    expected_out, expected = torch.func.jvp(
        lambda *ps: call(*ps, *[None] * (3 - len(ps))), tuple(given),
        tuple(torch.zeros_like(p) if d is None else d for p, d in zip(primals, directions) if p is not None))
    rule = tn._LinearJvp if case in LINEAR_CASES else tn._ConvJvp
    calls = []
    jvp = rule.jvp
    given_tangents = [d is not None for d in directions]
    first = 1 if rule is tn._LinearJvp else 2  # (ctx, dx, dW, db) or (ctx, d conv, dx, dW, db, d options...)
    monkeypatch.setattr(rule, "jvp", staticmethod(
        lambda *args: calls.append([a is not None for a in args[first:first + 3]]) or jvp(*args)))
    for grad_mode, lean_calls in ((False, [given_tangents]), (True, [])):
        calls.clear()
        with fwAD.dual_level(), torch.set_grad_enabled(grad_mode), tn._LeanRules():
            duals = [p if d is None else fwAD.make_dual(p, d) for p, d in zip(primals, directions)]
            out, tangent = fwAD.unpack_dual(call(*duals))
        assert calls == lean_calls  # and a missing tangent came as None, not as zeros to multiply
        torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
        torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-12)


def test_the_lean_rules_stand_aside_under_autocast_and_for_plain_tensors(monkeypatch):
    from fg_lightning import torch_network as tn

    called = []
    apply = tn._LinearJvp.apply
    monkeypatch.setattr(tn._LinearJvp, "apply", lambda *args: called.append(1) or apply(*args))
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    with fwAD.dual_level(), torch.no_grad(), tn._LeanRules():
        dual = fwAD.make_dual(x, torch.randn(3, 4))
        assert fwAD.unpack_dual(F.linear(x, w)).tangent is None  # no tangent anywhere: torch's own call
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = F.linear(dual, w)
        assert out.dtype == torch.bfloat16 and fwAD.unpack_dual(out).tangent is not None
    assert called == []


class _DoubledInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(2)


@pytest.mark.parametrize("k", [1, 2])
def test_an_in_place_op_after_a_layer_leaves_the_sources_activity_tangent_as_drawn(k):
    """The pass owns the activity tangent a source returns (the check's source returns copies of its draws): an
    in-place op after the module (here ``mul_(2)``, which doubles the tangent in place too) changes the pass's
    tensor, not the draws the source keeps, and the derivative is autograd's Σ_c ∂L/∂z_c · u_c. The first layer's
    output has no tangent of its own (no weight tangents): the source's tangent is the whole of it."""
    from fg_lightning.torch_network import _ActivityDraws

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), _DoubledInPlace(), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    x, labels = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    draws = [torch.randn(k, 7, 5, dtype=torch.float64), torch.randn(k, 7, 3, dtype=torch.float64)]
    drawn = [u.clone() for u in draws]
    result = TorchNetwork(model).jvp(x, labels, _ActivityDraws({}, list(draws)))
    for u, before in zip(draws, drawn):
        assert torch.equal(u, before)
    zeros = [torch.zeros(7, n, dtype=torch.float64, requires_grad=True) for n in (5, 3)]
    hooks = [model[i].register_forward_hook(lambda m, a, out, e=e: out + e) for i, e in zip((0, 3), zeros)]
    loss = F.cross_entropy(model(x), labels)
    for hook in hooks:
        hook.remove()
    grads = torch.autograd.grad(loss, zeros)
    expected = sum((g * u).flatten(1).sum(1) for g, u in zip(grads, drawn))
    torch.testing.assert_close(result.dir_derivs, expected, rtol=1e-12, atol=1e-12)


LAYERS = {
    "linear": (lambda: nn.Linear(7, 4), (5, 7)),
    "linear-3d-no-bias": (lambda: nn.Linear(7, 4, bias=False), (3, 5, 7)),
    "linear-frozen-bias": (lambda: nn.Linear(7, 4), (5, 7)),
    "conv1d-groups-stride": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 9)),
    "conv2d-dilated-no-bias": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2, bias=False), (2, 3, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (1, 2, 5, 5, 5)),
}


@pytest.mark.parametrize("case", LAYERS)
def test_a_layers_own_vjp_is_autograds(case):
    """activity perturbation's one-layer weight step on the torch backend: for a plain nn.Linear or nn.Conv*d from its
    formula (no second forward of the layer), equal to autograd's VJP through the layer, float64; a frozen parameter
    gets none."""
    from fg_lightning.torch_network import _layer_vjp

    make, shape = LAYERS[case]
    torch.manual_seed(sum(map(ord, case)))
    layer = make()
    if case == "linear-frozen-bias":
        layer.bias.requires_grad_(False)
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    g = torch.randn_like(layer(x))
    trained = {name: p for name, p in layer.named_parameters() if p.requires_grad}
    expected = dict(zip(trained, torch.autograd.grad(layer(x), list(trained.values()), g)))
    got = _layer_vjp(layer, x, g)
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-12)


def test_a_layers_own_vjp_leaves_other_modules_to_autograd():
    from fg_lightning.torch_network import _layer_vjp

    class MyLinear(nn.Linear):  # a subclass may change forward
        def forward(self, x):
            return super().forward(x) * 2

    x2, x3 = torch.randn(2, 3, 8, 8), torch.randn(3, 8, 8)
    for layer, x in ((nn.Conv2d(3, 4, 3, padding="same"), x2),
                     (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), x2),
                     (nn.Conv2d(3, 4, 3), x3), (MyLinear(8, 2), x2), (nn.BatchNorm2d(3), x2)):
        assert _layer_vjp(layer, x, torch.randn_like(layer(x))) is None


class _Masks(ActivitySource):
    """An activity source that keeps what ``network.activity_mask`` gives for each perturbed call."""

    def __init__(self, network):
        self.network, self.masks, self.sites = network, {}, {}

    def activity(self, name, layer, layer_input, output):
        self.masks[name], self.sites[name] = self.network.activity_mask(name, output), output.clone()
        return torch.randn(1, *output.shape, dtype=output.dtype)


class _FunctionalPool(nn.Module):
    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.skip, self.conv, self.fc = skip, nn.Conv2d(2, 3, 3, padding=1), nn.Linear(15 if skip else 12, 3)

    def forward(self, x):
        r = F.relu(self.conv(x))
        pooled = F.max_pool2d(r, 2).flatten(1)
        return self.fc(torch.cat([pooled, r.mean((2, 3))], 1) if self.skip else pooled)


def _skip_past_relu():
    seq = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    return seq, lambda x: seq[2](seq[1](z := seq[0](x)) + z)


@pytest.mark.parametrize("case", ["sequential", "in_place", "skip", "pool", "pool_skipped"])
def test_activity_masks_come_from_the_uses_the_model_makes(case):
    """The mask of a perturbed output is ``z > 0`` where a ReLU is its one use (in a Sequential or in place), and
    also off a max-pool's unpicked positions where that pool is the ReLU output's one use; all True where the output
    has another use (a skip past the ReLU), the pool's part dropped where the ReLU's output has another."""
    torch.manual_seed(0)
    if case in ("sequential", "in_place"):
        model, x, name = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=case == "in_place"), nn.Linear(6, 3)), \
            torch.randn(5, 4), "0"
    elif case == "skip":
        seq, forward = _skip_past_relu()
        model = type("Skip", (nn.Module,), {"forward": lambda self, x: forward(x)})()
        model.seq, x, name = seq, torch.randn(5, 4), "seq.0"
    else:
        model, x, name = _FunctionalPool(skip=case == "pool_skipped"), torch.randn(5, 2, 5, 5), "conv"
    network = TorchNetwork(model)
    source = _Masks(network)
    network._jvp(x, torch.randint(0, 3, (5,)), source)
    mask, z = source.masks[name], source.sites[name]
    expected = {"skip": torch.ones_like(z, dtype=torch.bool)}.get(case, z > 0)
    if case == "pool":
        _, indices = F.max_pool2d(z.clamp(min=0), 2, return_indices=True)
        picked = torch.zeros(z.shape[:2].numel(), z.shape[2:].numel(), dtype=torch.bool)
        expected = expected & picked.scatter_(1, indices.flatten(2).flatten(0, 1), True).view(z.shape)
    assert torch.equal(mask, expected)
    assert 0 < int(mask.sum()) < mask.numel() or case == "skip"


@pytest.mark.parametrize("seed", range(4))
def test_the_first_pass_check_takes_rounding_from_the_least_precise_dtype(seed):
    """A bfloat16 model (whose rounding errs by about 1e-2 of the gradient, over float32's tolerance of 1e-3) is
    accepted by the forward-mode check, with weight and activity tangents."""
    torch.manual_seed(seed)
    x, labels = torch.randn(16, 5), torch.randint(0, 3, (16,))
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).bfloat16()
    for name in ("naive", "activity"):
        grads = REGISTRY[name].make(k=2).estimate(TorchNetwork(model), x.bfloat16(), labels, 0).grads
        assert all(torch.isfinite(g).all() for g in grads.values())


def _replay_problem(model):
    torch.manual_seed(0)
    module = UserCNN() if model == "cnn" else CalledTwice()
    shape, classes = ((1, 28, 28), 10) if model == "cnn" else ((5,), 3)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, *shape, generator=generator)
    return module, x, torch.randint(0, classes, (6,), generator=generator)


@pytest.mark.parametrize("model", ["cnn", "called_twice"])
@pytest.mark.parametrize("aggregation", ["mean", "orthogonal"])
def test_torch_backend_replayed_tangents_give_the_stored_estimate_bit_for_bit(model, aggregation):
    """On the torch backend a replayed source is asked again at every call of every pass and only that direction's
    slice is kept: the loss and the estimate are the stored path's, exactly (the same numbers as before the backend
    stopped keeping all K), step after step, with dropout and batch norm in train mode and for a module called twice
    in a forward."""
    module, x, labels = _replay_problem(model)
    nets = [TorchNetwork(module), TorchNetwork(type(module)())]
    nets[1].load_state_dict(nets[0].state_dict())
    estimators = [MultiDirection(k=4, aggregation=aggregation, tangents=t, seed=3) for t in ("replayed", "stored")]
    for step in range(3):
        got, want = [(torch.manual_seed(step), est.estimate(net, x, labels, step))[1]  # the same dropout masks
                     for est, net in zip(estimators, nets)]
        assert torch.equal(got.loss, want.loss)
        for name, grad in want.grads.items():
            assert torch.equal(got.grads[name], grad), (step, name)
        for net, estimate in zip(nets, (got, want)):  # the next step from moved parameters
            with torch.no_grad():
                for name, param in net.named_parameters():
                    param.sub_(0.01 * estimate.grads[name])
    assert estimators[0].generator(x.device).get_state().equal(estimators[1].generator(x.device).get_state())


def test_torch_backend_holds_one_modules_replayed_tangents_at_a_time():
    """A replayable source on the torch backend is asked again at each module call of each of the K passes, and
    what it gave is released before the next ask: no (K, *shape) tangent outlives its module's call, and the result
    keeps none (a backend that kept every module's K directions through the passes, as for a stored source, fails
    here)."""
    import weakref

    from fg_lightning.estimators.base import ReplayedGaussianTangents

    module, x, labels = _replay_problem("cnn")
    net = TorchNetwork(module)
    net.jvp(x, labels, ReplayedGaussianTangents(MultiDirection(k=1), 1))  # the first call's check, out of the count
    k, given, most_alive, asks = 4, [], [0], []

    class Watched(ReplayedGaussianTangents):
        def weights(self, name, layer, layer_input, params):
            most_alive[0] = max(most_alive[0], sum(ref() is not None for ref in given))
            tangents = super().weights(name, layer, layer_input, params)
            asks.append(name)
            given.extend(weakref.ref(t) for t in tangents.values())
            return tangents

    owners = [name for name, _ in net._layers().values()]
    result = net.jvp(x, labels, Watched(MultiDirection(k=k), k))
    assert most_alive[0] == 0, f"{most_alive[0]} tangents given earlier were alive at a later ask"
    assert asks == owners * k  # every module, in every pass
    assert result.dir_derivs.shape == (k,) and result.tangents == {}
    assert all(ref() is None for ref in given)

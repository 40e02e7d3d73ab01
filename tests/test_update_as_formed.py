"""Activity perturbation under plain SGD applies each layer's update as it forms it (UpdateAsFormed), keeping no
parameter-sized estimate, and without local losses it recomputes the layers' inputs instead of keeping them through
its forward-mode pass (ActivityPerturbation(recompute=True), network.primal_calls). Here: the parameters are those of
the kept-estimate path, bit for bit; each layer is applied once, as one part, and each block before the pass draws
the next block's tangents; the recomputed inputs give the kept inputs' estimate, and no input is kept; a non-finite
part is refused before it is applied, naming the parts already applied; through Lightning, a GradientCosine step
keeps its estimate and the others do not, with the same parameters as a run that keeps every estimate."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from fg_lightning.callbacks import GradientCosine, UpdateCallback
from fg_lightning.data import MNISTDataModule
from fg_lightning.engine import CNN, MLP
from fg_lightning.estimators import (
    ActivityPerturbation, AppliedGrads, DivergenceError, LocalActivityPerturbation, UpdateAsFormed, training_step,
)
from fg_lightning.estimators import local as local_module
from fg_lightning.estimators.collective import ONE_PROCESS
from fg_lightning.module import ForwardGradientModule

NETS = {
    "mlp": (lambda **kw: MLP(in_features=12, hidden=(6, 8, 4), num_classes=4, seed=1, **kw), (6, 12)),
    "cnn": (lambda **kw: CNN(channels=(4, 6, 4), image_size=12, hidden=6, num_classes=4, seed=1, **kw), (4, 1, 12, 12)),
}
VARIANTS = {
    "global": (ActivityPerturbation, {}),
    "global-recomputed": (lambda **kw: ActivityPerturbation(recompute=True, **kw), {}),
    "local": (LocalActivityPerturbation, {"local_losses": True}),
    "local-groups-norm": (LocalActivityPerturbation, {"local_losses": True, "block_size": 1, "groups": 2, "norm": True}),
}


def batch(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen), torch.randint(0, 4, (shape[0],), generator=gen)


def layer_of(name):
    return name.rpartition(".")[0]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", NETS)
def test_applied_as_formed_gives_the_kept_estimates_parameters_one_layer_at_a_time(model, variant, monkeypatch):
    make, shape = NETS[model]
    cls, switches = VARIANTS[variant]
    parts = []
    call = UpdateAsFormed.__call__
    monkeypatch.setattr(UpdateAsFormed, "__call__", lambda self, grads: parts.append(list(grads)) or call(self, grads))

    def trained(keep, steps=3):
        net, estimator = make(**switches), cls(k=2, seed=5)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(steps):
            x, labels = batch(shape, step)
            estimate = training_step(estimator, net, x, labels, step, optimizer, ONE_PROCESS, keep_estimate=keep)
        return net, estimate

    kept, kept_estimate = trained(keep=True)
    assert not parts and isinstance(kept_estimate.grads, dict)
    applied, estimate = trained(keep=False)
    assert isinstance(estimate.grads, AppliedGrads) and set(estimate.grads) == dict(applied.named_parameters()).keys()
    with pytest.raises(RuntimeError, match="keep_estimate=True"):
        estimate.grads[next(iter(estimate.grads))]
    # every step: each layer once, as one part of its own parameters
    names = [name for name, _ in applied.named_parameters()]
    layers = {layer_of(name) for name in names}
    assert len(parts) == 3 * len(layers)
    assert all(len({layer_of(n) for n in part}) == 1 for part in parts)
    assert sorted(n for part in parts[:len(layers)] for n in part) == sorted(names)
    start = make(**switches)
    for (name, got), want, before in zip(applied.named_parameters(), kept.parameters(), start.parameters()):
        assert got.grad is None, name
        assert not torch.equal(got, before), name
        assert torch.equal(got, want), name


def test_each_blocks_update_is_applied_before_the_pass_draws_the_next_block(monkeypatch):
    net = MLP(in_features=12, hidden=(8, 8, 8), num_classes=4, seed=1, local_losses=True)
    x, labels = batch((6, 12))
    events = []
    call = UpdateAsFormed.__call__

    def drawn(used):  # the pass's draws: whole, into the output's tangent, or streamed into the head
        def draw(noise, *args):
            events.append(("draw", noise.source.block_of[noise.call.name]))
            return used(noise, *args)
        return draw

    def applied(self, grads):
        events.extend(("apply", block) for block in {block_of[layer_of(n)] for n in grads})
        return call(self, grads)

    block_of = local_module._block_of_layers(net)
    for use in ("dense", "add_to", "cell_dots"):
        monkeypatch.setattr(local_module._Noise, use, drawn(getattr(local_module._Noise, use)))
    monkeypatch.setattr(UpdateAsFormed, "__call__", applied)
    training_step(LocalActivityPerturbation(k=2), net, x, labels, 0, torch.optim.SGD(net.parameters(), lr=0.1),
                  ONE_PROCESS)
    blocks = len(net.blocks)
    assert {block for kind, block in events if kind == "apply"} == set(range(blocks))
    for block in range(blocks - 1):  # the last draw of block i comes before its first apply, which comes before any
        # draw of a later block
        first_apply = events.index(("apply", block))
        assert max(i for i, e in enumerate(events) if e == ("draw", block)) < first_apply
        assert all(first_apply < i for i, (kind, later) in enumerate(events) if kind == "draw" and later > block)


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
@pytest.mark.parametrize("model", NETS)
def test_recomputed_inputs_give_the_kept_inputs_estimate_and_none_is_kept(model, chunked, norm, monkeypatch):
    """With ``norm``, each hidden layer is perturbed past its GroupNorm: the kept path keeps the layer's output (for
    the norm's VJP) and its mask, the recomputed path computes both again."""
    make, shape = NETS[model]
    net = make(tangent_memory_mb=1e-4 if chunked else None, norm=norm)
    x, labels = batch(shape)
    held = []
    block_done = local_module._ActivityTangents.block_done

    def done(self, index, *args, **kwargs):
        held.extend(call.layer_input is not None for calls in self.pending.values() for call in calls)
        held.extend((call.output is not None) == (norm or call.state is None)
                    and (call.mask is not None or call.site is not None)
                    for calls in self.pending.values() for call in calls if call.state is not None)
        return block_done(self, index, *args, **kwargs)

    monkeypatch.setattr(local_module._ActivityTangents, "block_done", done)
    recomputed = ActivityPerturbation(k=3, seed=2, recompute=True).estimate(net, x, labels, 0)
    assert held and not any(held)  # the pass kept no layer input
    held.clear()
    kept = ActivityPerturbation(k=3, seed=2, recompute=False).estimate(net, x, labels, 0)
    assert held and all(held)
    for name, grad in kept.grads.items():
        assert torch.equal(recomputed.grads[name], grad), name
    with pytest.raises(ValueError, match="recompute=1"):
        ActivityPerturbation(recompute=1)


def test_a_non_finite_part_is_refused_before_it_is_applied_naming_the_parts_applied():
    net = MLP(in_features=12, hidden=(8, 8), num_classes=4, seed=1, local_losses=True)
    with torch.no_grad():
        net.fc2.weight[0, 0] = float("inf")  # block 1's layer: block 0 is finite and applied first
    x, labels = batch((6, 12))
    before = {name: p.clone() for name, p in net.named_parameters()}
    first, second = net.block_parameters()[:2]
    assert "fc1.weight" in first and "fc2.weight" in second
    with pytest.raises(DivergenceError, match="non-finite update of") as info:
        training_step(LocalActivityPerturbation(k=2), net, x, labels, 0, torch.optim.SGD(net.parameters(), lr=0.1),
                      ONE_PROCESS)
    bad, applied = str(info.value).split("non-finite update of ")[1].split("already applied")[0].split("; the update of ")
    assert set(applied.split(" was")[0].split(", ")) == set(first) and set(bad.split(")")[0].split(", ")) <= set(second)
    changed = {name for name, p in net.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(first)
    # without local losses the loss is known before any part is formed: nothing is applied
    net = MLP(in_features=12, hidden=(8, 8), num_classes=4, seed=1)
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(DivergenceError, match="non-finite update") as info:
        training_step(ActivityPerturbation(k=2), net, torch.full((6, 12), float("nan")), labels, 0,
                      torch.optim.SGD(net.parameters(), lr=0.1), ONE_PROCESS)
    assert "already applied" not in str(info.value)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


class Grads(UpdateCallback):
    def __init__(self):
        self.kinds = []

    def on_after_update(self, trainer, pl_module, estimate):
        self.kinds.append(type(estimate.grads).__name__)


def test_through_lightning_a_cosine_step_keeps_its_estimate_and_the_parameters_are_the_same(idx_root, tmp_path):
    def fit(every):
        module = ForwardGradientModule(MLP(hidden=(16,), seed=0), ActivityPerturbation(k=2, seed=1),
                                       lambda p: torch.optim.SGD(p, lr=0.05))
        grads = Grads()
        run = pl.Trainer(max_steps=4, callbacks=[GradientCosine(every_n_steps=every, histograms=False), grads],
                         logger=False, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                         enable_checkpointing=False, default_root_dir=str(tmp_path))
        run.fit(module, datamodule=MNISTDataModule(root=idx_root, download=False, batch_size=8, val_size=16, seed=3))
        assert run.global_step == 4
        return module, grads.kinds

    applied, kinds = fit(every=2)
    assert kinds == ["dict", "AppliedGrads", "dict", "AppliedGrads"]
    kept, kinds = fit(every=1)
    assert kinds == ["dict"] * 4
    for (name, got), want in zip(applied.network.named_parameters(), kept.network.parameters()):
        assert torch.equal(got, want), name


def test_a_ctrl_c_inside_an_update_applied_as_formed_lands_after_the_step(idx_root, tmp_path, monkeypatch):
    """SIGINT raised after the first layer's part of step 2 is applied: the module holds it until the step is whole
    and marked done, so training stops after 3 whole steps (as a run of 3 steps ends), not inside a half-applied
    update that a resumed run would apply again."""
    import signal

    call, sent = UpdateAsFormed.__call__, []

    def interrupting(self, grads):
        call(self, grads)
        if self.step == 2 and not sent:
            sent.append(True)
            signal.raise_signal(signal.SIGINT)

    def fit(module, max_steps):
        run = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
                         limit_val_batches=0, enable_checkpointing=False, default_root_dir=str(tmp_path))
        run.fit(module, datamodule=MNISTDataModule(root=idx_root, download=False, batch_size=8, val_size=16, seed=3))
        return run

    def module():
        return ForwardGradientModule(MLP(hidden=(16, 16), seed=0), ActivityPerturbation(k=2, seed=1),
                                     lambda p: torch.optim.SGD(p, lr=0.05))

    handler = signal.getsignal(signal.SIGINT)
    interrupted = module()
    monkeypatch.setattr(UpdateAsFormed, "__call__", interrupting)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever an earlier run left
    try:
        fit(interrupted, 6)
        exited = False
    except SystemExit:  # Lightning's graceful shutdown on KeyboardInterrupt
        exited = True
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT once it has shut down on one
    assert exited, (f"no shutdown: SIGINT sent {bool(sent)}, {interrupted.trainer.global_step} steps, SIGINT's "
                    f"handler before the test {handler!r}")
    assert sent and interrupted.trainer.global_step == 3
    monkeypatch.undo()
    straight = module()
    fit(straight, 3)
    for (name, got), want in zip(interrupted.network.named_parameters(), straight.network.parameters()):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("tangents", ["stored", "replayed"])
def test_random_directions_refuse_non_finite_weights_before_any_part_is_applied(tangents):
    from fg_lightning.estimators import NaiveForwardGradient

    net = MLP(in_features=12, hidden=(8, 8), num_classes=4, seed=1)
    x, labels = batch((6, 12))
    x[0, 0] = float("nan")
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(DivergenceError, match="non-finite update of direction weights") as info:
        training_step(NaiveForwardGradient(tangents=tangents), net, x, labels, 0,
                      torch.optim.SGD(net.parameters(), lr=0.1), ONE_PROCESS)
    assert "already applied" not in str(info.value)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_a_module_called_twice_on_the_torch_backend_is_applied_once_with_both_calls(monkeypatch):
    """The torch backend keeps each call's input (no recompute there); fc1, called twice in one forward, is one part
    applied once its two calls' estimates are summed: the kept estimate's parameters (float64)."""
    from user_models import CalledTwice

    from fg_lightning.torch_network import TorchNetwork

    parts = []
    call = UpdateAsFormed.__call__
    monkeypatch.setattr(UpdateAsFormed, "__call__", lambda self, grads: parts.append(list(grads)) or call(self, grads))

    def trained(keep):
        torch.manual_seed(0)
        net, estimator = TorchNetwork(CalledTwice().double()), ActivityPerturbation(k=3, seed=4)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(2):
            x, labels = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
            training_step(estimator, net, x, labels, step, optimizer, ONE_PROCESS, keep_estimate=keep)
        return net

    applied, kept = trained(keep=False), trained(keep=True)
    assert sorted(map(sorted, parts)) == sorted([["fc1.bias", "fc1.weight"], ["fc2.bias", "fc2.weight"]] * 2)
    for (name, got), want in zip(applied.named_parameters(), kept.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14, msg=name)

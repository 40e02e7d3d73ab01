"""Activity perturbation keeps no tangent: the pass drops each call's tangents and the estimate draws them again from
the generator state recorded before the draw (seed replay), and with local losses each block's weight steps run as
soon as its head is evaluated, releasing its inputs. Here: the estimate is the one formed from the very tangents the
pass used (recorded as it ran), in one pass and in chunks, with and without local losses and groups; and a block's
inputs are released before the next block's head."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fg_lightning.engine import CNN, MLP
from fg_lightning.estimators import ActivityPerturbation, LocalActivityPerturbation
from fg_lightning.estimators import local as local_module

NETS = {
    "mlp": (lambda **kw: MLP(in_features=12, hidden=(6, 8, 4), num_classes=4, seed=1, **kw), (5, 12)),
    "cnn": (lambda **kw: CNN(channels=(4, 6, 4), image_size=12, hidden=6, num_classes=4, seed=1, **kw), (3, 1, 12, 12)),
}
VARIANTS = {
    "global": (ActivityPerturbation, {}),
    "local": (LocalActivityPerturbation, {"local_losses": True}),
    "local-groups": (LocalActivityPerturbation, {"local_losses": True, "block_size": 1, "groups": 2}),
}


def recording(monkeypatch):
    """Records every perturbed call's tangents as the pass draws them ((name, layer input, u)) and the pass's
    result."""
    calls, results = [], []
    add_activity = local_module._ActivityTangents.add_activity  # activity() too, which asks it with no tangent

    def record(self, name, layer, layer_input, output, tangent=None, site=None, **kwargs):
        # the tangent the pass adds to the output's (the engine's pass hands that in to add to, where it has one),
        # masked as the estimate masks it (the pass leaves that to the layers that follow); drawn past the site at a
        # max-pool's output (network.activity_past), zero where the ReLU is off there, and the estimate taken back
        # to the site by the pool's VJP at the site's picks
        outputs = self.network.logit_layers() if self.estimator.exact_output else set()
        back = lambda g_z: g_z  # noqa: E731
        if site is not None:
            pool, mask = self.network.activity_past(name)[-1], output > 0
            shape, picks = pool.primal(site)[1]
            back = lambda g_z: pool.vjp((shape, picks), g_z)[0]  # noqa: E731
        else:
            mask = self.network.activity_mask(name, output) if name not in outputs else None
        before = None if tangent is None else tangent.clone()
        out = add_activity(self, name, layer, layer_input, output, tangent,
                           **kwargs, **({} if site is None else {"site": site}))
        if out is not None and name not in outputs:  # an output layer: no noise, the tangent as it came
            u = out.clone() if before is None else out - before
            if site is not None:  # the pass's tangent past the pool is the site's: zero where the ReLU is off
                assert not u.masked_select(~mask.expand_as(u)).any(), f"{name}: noise where the pool's output is 0"
            calls.append((name, layer, layer_input.clone(), u if mask is None else u * mask, back))
        return out

    monkeypatch.setattr(local_module._ActivityTangents, "add_activity", record)
    return calls, results


@pytest.mark.parametrize("draws", ["whole", "by-rows"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-pass", "chunked"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", NETS)
def test_the_estimate_is_formed_from_the_tangents_the_pass_used(model, variant, chunked, draws, monkeypatch):
    """``chunked``: the directions in several passes; ``by-rows``: the noise drawn (in the pass, added to the output's
    tangent, and again in the weight step) a few examples at a time."""
    if draws == "by-rows":
        monkeypatch.setattr(local_module._ActivityTangents, "DRAW_ELEMENTS", {"cpu": 100})
    cls, switches = VARIANTS[variant]
    make, shape = NETS[model]
    net = make(**switches, tangent_memory_mb=1e-4 if chunked else None).double()
    gen = torch.Generator().manual_seed(0)
    x, labels = torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randint(0, 4, (shape[0],), generator=gen)
    calls, _ = recording(monkeypatch)
    jvp, results = net.jvp, []
    monkeypatch.setattr(net, "jvp", lambda *args: results.append(jvp(*args)) or results[-1])
    estimator = cls(k=3, seed=7)
    estimate = estimator.estimate(net, x, labels, step=0)

    # the estimate as the stored-tangent path formed it: ĝ_z = (1/K) Σ_k d_k u_k with each call's recorded u
    (result,) = results
    block_of = local_module._block_of_layers(net) if net.has_local_losses else {}
    expected = {}
    for name, layer, layer_input, u, back in calls:
        block = block_of.get(name, 0)
        derivs = result.block_derivs[block] if net.has_local_losses else result.dir_derivs
        groups = net.output_groups(name) if net.has_local_losses else None
        if groups is None:
            g_z = torch.einsum("kb,kb...->b...", derivs, u)
        else:
            group_derivs = result.group_derivs[block]
            g_z = torch.cat([torch.einsum("kb,kb...->b...", group_derivs[..., g], u[:, :, part])
                             for g, part in enumerate(groups)], 1)
        for param, grad in net.layer_grads(name, layer, layer_input, back(g_z) / 3).items():
            expected[f"{name}.{param}"] = grad + expected.get(f"{name}.{param}", 0)
    assert expected and (variant != "local-groups" or any(net.output_groups(n) for n, *_ in calls))
    for name, grad in expected.items():
        torch.testing.assert_close(estimate.grads[name], grad, msg=name)


def test_each_blocks_inputs_are_released_before_the_next_blocks_head(monkeypatch):
    """With local losses, one block's inputs are alive at a time: after block i's weight steps (run by the pass as its
    head is evaluated, before the pass goes on), no input of block i's own layers is referenced any more."""
    net = MLP(in_features=12, hidden=(8, 8, 8, 8), num_classes=4, seed=1, local_losses=True)
    x, labels = torch.randn(16, 12), torch.randint(0, 4, (16,))
    inputs: dict[int, list] = {}
    activity, block_done = local_module._ActivityTangents.activity, local_module._ActivityTangents.block_done
    alive_after: dict[int, int] = {}
    drawn_later: dict[int, list[int]] = {}

    def watch(self, name, layer, layer_input, output, **kwargs):
        if layer_input is not x and not name.startswith("head"):  # the caller holds the batch; a head's input is
            # the block's output, the next block's input
            inputs.setdefault(self.block_of[name], []).append(weakref.ref(layer_input))
        return activity(self, name, layer, layer_input, output, **kwargs)

    def done(self, index, derivs, group_derivs):
        if index not in alive_after:  # its first call: the pass has not reached a later block yet
            drawn_later[index] = sorted(b for b in self.pending if b > index)
        block_done(self, index, derivs, group_derivs)
        gc.collect()
        alive_after.setdefault(index, sum(ref() is not None for ref in inputs.get(index, [])))

    monkeypatch.setattr(local_module._ActivityTangents, "activity", watch)
    monkeypatch.setattr(local_module._ActivityTangents, "block_done", done)
    LocalActivityPerturbation(k=2).estimate(net, x, labels, step=0)
    hidden_blocks = range(len(net.blocks) - 1)
    assert all(inputs.get(i) for i in hidden_blocks[1:])  # each later hidden block's layers were watched
    assert alive_after == {i: 0 for i in range(len(net.blocks))}
    assert drawn_later == {i: [] for i in range(len(net.blocks))}


def test_where_an_in_place_relu_follows_the_kept_call_holds_its_output_as_the_mask_not_a_mask_beside_it(monkeypatch):
    """The kept path (the default) holds what backprop holds: for a layer an in-place ReLU follows, the site, which
    the ReLU overwrites with its output, the next layer's input (one storage), and no mask; where a max-pool follows
    too (the CNN's convolutions), the pool's output, the next layer's input, and the pool's picks (int32, a quarter of
    the site's elements), no mask."""
    held = {}
    block_done = local_module._ActivityTangents.block_done

    def done(self, index, *args, **kwargs):
        calls = [call for block in self.pending.values() for call in block]
        for call, after in zip(calls, calls[1:]):
            if call.state is not None:
                shared = call.site is not None and call.site.data_ptr() == after.layer_input.data_ptr()
                picks = None if call.picks is None else call.picks[1].dtype
                held[model, call.name] = (shared, call.mask is not None, picks)
        return block_done(self, index, *args, **kwargs)

    monkeypatch.setattr(local_module._ActivityTangents, "block_done", done)
    for model in NETS:
        make, shape = NETS[model]
        ActivityPerturbation(k=2).estimate(make(), torch.randn(*shape), torch.randint(0, 4, (shape[0],)), step=0)
    assert held == {**{("mlp", f"fc{i}"): (True, False, None) for i in (1, 2, 3)},  # the MLP's hidden layers
                    **{("cnn", f"conv{i}"): (True, False, torch.int32) for i in (1, 2, 3)},
                    ("cnn", "fc1"): (True, False, None)}


@pytest.mark.parametrize("model", NETS)
def test_a_last_pass_with_fewer_directions_than_a_chunk_gives_the_one_pass_estimate(model):
    """K = 3 directions two to a pass (the second pass carries one), with group-wise local losses: the estimate is the
    one-pass estimate's (the same draws), the heads' derivatives sized to each pass's directions."""
    make, shape = NETS[model]
    gen = torch.Generator().manual_seed(0)
    x, labels = torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randint(0, 4, (shape[0],), generator=gen)
    whole = make(local_losses=True, block_size=1, groups=2).double()
    per_direction = shape[0] * whole.widest_activation(shape[1:]) * 8
    chunked = make(local_losses=True, block_size=1, groups=2, tangent_memory_mb=2.5 * per_direction / 2**20).double()
    assert chunked.directions_per_pass(x, 3) == 2
    one, two = (LocalActivityPerturbation(k=3, seed=4).estimate(net, x, labels, 0).grads for net in (whole, chunked))
    for name, grad in one.items():
        torch.testing.assert_close(two[name], grad, msg=name)

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

from fg_lightning.engine import CNN, MLP, GroupNorm
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
    """Records every perturbed call's tangents as the pass uses them ((name, layer, layer input, u, back)): drawn whole,
    added to the output's tangent, or streamed into the head's cell sums, whose result is checked against the sums of
    the recorded u (drawn whole from the same generator state, then the state put back)."""
    calls = []
    noise_class = local_module._Noise

    def record(noise, u):
        call = noise.call
        back = lambda g_z: g_z  # noqa: E731
        if call.past:  # drawn past the site at a max-pool's output (network.activity_past): zero where the ReLU is off
            # there, and the estimate taken back to the site by the pool's VJP at the site's picks
            pool, (shape, picks) = noise.source.network.activity_past(call.name)[-1], call.picks
            assert not u.masked_select(noise.output.expand_as(u) <= 0).any(), f"{call.name}: noise where the pool's " \
                                                                             "output is 0"
            back = lambda g_z: pool.vjp((shape, picks.long()), g_z)[0]  # noqa: E731
            mask = None
        else:  # masked as the estimate masks it (the pass leaves that to the layers that follow)
            mask = noise.source.network.activity_mask(call.name, noise.output)
        calls.append((call.name, call.layer, call.layer_input.clone(), u if mask is None else u * mask, back))

    def dense(noise):
        u = dense_(noise)
        record(noise, u.clone())
        return u

    def add_to(noise, tangent):
        before = tangent.clone()
        out = add_to_(noise, tangent)
        record(noise, out - before)
        return out

    def cell_dots(noise, weights, cell_sums):
        state = noise.generator.get_state()
        u = dense_(noise)
        noise.generator.set_state(state)
        expected = cell_sums(u * weights)
        dots = cell_dots_(noise, weights, cell_sums)
        torch.testing.assert_close(dots, expected)
        record(noise, u)
        return dots

    dense_, add_to_, cell_dots_ = noise_class.dense, noise_class.add_to, noise_class.cell_dots
    monkeypatch.setattr(noise_class, "dense", dense)
    monkeypatch.setattr(noise_class, "add_to", add_to)
    monkeypatch.setattr(noise_class, "cell_dots", cell_dots)
    return calls


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
    calls = recording(monkeypatch)
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
    stream, block_done = local_module._ActivityTangents.stream_activity, local_module._ActivityTangents.block_done
    alive_after: dict[int, int] = {}
    drawn_later: dict[int, list[int]] = {}

    def watch(self, name, layer, layer_input, output, **kwargs):
        if layer_input is not x and not name.startswith("head"):  # the caller holds the batch; a head's input is
            # the block's output, the next block's input
            inputs.setdefault(self.block_of[name], []).append(weakref.ref(layer_input))
        return stream(self, name, layer, layer_input, output, **kwargs)

    def done(self, index, derivs, group_derivs):
        if index not in alive_after:  # its first call: the pass has not reached a later block yet
            drawn_later[index] = sorted(b for b in self.pending if b > index)
        block_done(self, index, derivs, group_derivs)
        gc.collect()
        alive_after.setdefault(index, sum(ref() is not None for ref in inputs.get(index, [])))

    monkeypatch.setattr(local_module._ActivityTangents, "stream_activity", watch)
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


TWO_STAGES = (lambda **kw: CNN(channels=(4, 6), image_size=14, hidden=6, num_classes=4, seed=1, **kw), (5, 1, 14, 14))
STREAMED = {
    "mlp-local": (NETS["mlp"], {"local_losses": True}, {}),
    "mlp-groups-norm": (NETS["mlp"], {"local_losses": True, "groups": 2, "norm": True}, {}),
    "mlp-no-mask": (NETS["mlp"], {"local_losses": True, "groups": 2, "norm": True}, {"relu_mask": False}),
    "mlp-noisy-heads": (NETS["mlp"], {"local_losses": True, "groups": 2}, {"exact_output": False}),
    "cnn-groups-norm-grid": (TWO_STAGES, {"local_losses": True, "groups": 2, "norm": True, "head_pool": 2}, {}),
    "cnn-patches": (TWO_STAGES, {"local_losses": True, "groups": 2, "norm": True, "patches": 2}, {}),
    "cnn-block-size-1": (NETS["cnn"], {"local_losses": True, "block_size": 1, "groups": 2}, {}),
}


@pytest.mark.parametrize("case", STREAMED)
def test_a_tangent_streamed_into_its_head_gives_what_the_drawn_tangent_gives(case, monkeypatch):
    """Where a block's activity tangent is all its head sees, one pass draws it a chunk at a time against the head's
    derivative back at the site (``_Noise.cell_dots``) and never whole: its blocks' derivatives, each group's and
    cell's, and the estimate are those of the pass that draws it whole and carries it through the layers (directions
    in chunks, where nothing streams), from the same draws."""
    (make, shape), switches, options = STREAMED[case]
    gen = torch.Generator().manual_seed(0)
    x, labels = torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randint(0, 4, (shape[0],), generator=gen)
    used = {"cell_dots": 0, "dense": 0}
    for method in used:
        original = getattr(local_module._Noise, method)
        monkeypatch.setattr(local_module._Noise, method, lambda self, *a, _f=original, _m=method: (
            used.__setitem__(_m, used[_m] + 1), _f(self, *a))[1])
    runs = []
    for memory in (None, 1e-6):  # one pass (streams); one direction per pass (draws whole)
        net = make(**switches, tangent_memory_mb=memory).double()
        jvp, results = net.jvp, []
        monkeypatch.setattr(net, "jvp", lambda *args, _jvp=jvp, _r=results: _r.append(_jvp(*args)) or _r[-1])
        grads = LocalActivityPerturbation(k=3, seed=2, **options).estimate(net, x, labels, 0).grads
        runs.append((results[0], grads, dict(used)))
        used.update(cell_dots=0, dense=0)
    (streamed, streamed_grads, streamed_used), (drawn, drawn_grads, drawn_used) = runs
    heads = sum(head is not None for _, head in net.blocks)
    assert streamed_used["cell_dots"] == heads and drawn_used["cell_dots"] == 0 and drawn_used["dense"] >= heads
    for field in ("block_derivs", "group_derivs", "patch_derivs"):
        for ours, theirs in zip(getattr(streamed, field), getattr(drawn, field)):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14, msg=field)
    torch.testing.assert_close(streamed_grads, drawn_grads, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("model", NETS)
def test_the_weight_step_takes_the_normalisations_state_from_the_pass(model, monkeypatch):
    """A layer perturbed past its GroupNorm takes its estimate back through the norm's VJP; the pass hands the norm's
    primal state to the source (what backprop keeps: the layer's output, which the call keeps anyway, and two numbers
    per example and group), so the norm runs once a step, not again in the weight step; the estimate is the one that
    runs it again."""
    make, shape = NETS[model]
    gen = torch.Generator().manual_seed(0)
    x, labels = torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randint(0, 4, (shape[0],), generator=gen)
    net = make(local_losses=True, block_size=1, groups=2, norm=True).double()
    norms = sum(isinstance(layer, GroupNorm) for _, layer in net.named_layers())
    net.widest_activation(shape[1:])  # once per network: a sample through its layers
    runs, primal = [], GroupNorm.primal
    monkeypatch.setattr(GroupNorm, "primal", lambda self, x: runs.append(1) or primal(self, x))
    kept = LocalActivityPerturbation(k=3, seed=2).estimate(net, x, labels, 0).grads
    assert norms and len(runs) == norms
    monkeypatch.setattr(local_module._Call, "norm_states", property(lambda self: None, lambda self, value: None))
    again = LocalActivityPerturbation(k=3, seed=2).estimate(net, x, labels, 0).grads
    assert len(runs) == 3 * norms  # the pass, then the weight step again
    torch.testing.assert_close(kept, again, rtol=0, atol=0)

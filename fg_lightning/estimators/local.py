r"""The field's answers to the variance of weight-perturbed forward gradients: activity perturbation and local losses
(Ren, Kornblith, Liao, Hinton, "Scaling Forward Gradient With Local Losses", ICLR 2023) and local-gradient guesses
(Fournier, Rivaud, Belilovsky, Eickenberg, Oyallon, "Can Forward Gradient Match Backpropagation?", ICML 2023).

Activity perturbation draws a tangent :math:`u` on a layer's *output* :math:`z = W h + b` (per example, shape
``(B, out)``) instead of on its weights. One forward-mode pass gives each example's directional derivative
:math:`d_b = \partial L / \partial z_b \cdot u_b`; then :math:`\hat g_{z_b} = d_b u_b` is an unbiased estimate of
:math:`\partial L / \partial z_b` and the layer's own VJP with its saved input turns it into the weight estimate
:math:`\hat g_W = \sum_b \hat g_{z_b} h_b^\top`, :math:`\hat g_b = \sum_b \hat g_{z_b}` — a one-layer step, no
backward pass through the network. The noise scales with the width of the perturbed activations, not with the number
of weights, and independent per-example draws average it over the batch.

With local losses the network is cut into blocks, each with a small classifier head; no derivative crosses a block
boundary and each block (with its head) learns from its own head's loss: what these estimators estimate is
:class:`LocalBackprop`'s gradient.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor

from fg_lightning.engine import (
    GivenTangents, Layer, StreamedSource, StreamedTangent, full_name, weighted_sum,
)
from fg_lightning.engine.layers import relu_grad_
from fg_lightning.estimators.base import (
    ActivityModel, Estimate, GaussianTangents, GradientEstimator, LocalLossModel, RecomputableModel, UpdateAsFormed,
    batch_size, check_distribution, check_positive_int, draw_,
)
from fg_lightning.estimators.collective import ONE_PROCESS, Collective
from fg_lightning.estimators.per_example import ExampleGuesses, local_backward, unsupported


def _block_of_layers(network: LocalLossModel) -> dict[str, int]:
    """Block index of every parameterised layer (full name, heads' layers included)."""
    return {name.rsplit(".", 1)[0]: index for index, names in enumerate(network.block_parameters()) for name in names}


class _ActivityPerturbation(GradientEstimator):
    unbiased = True
    recompute: bool = False  # the layers' inputs computed again once the loss is known (ActivityPerturbation's)
    requires: ClassVar[type] = ActivityModel

    def __init__(self, k: int = 1, relu_mask: bool = True, exact_output: bool = True, seed: int = 0,
                 distribution: str = "rademacher") -> None:
        super().__init__(seed)
        self.k = check_positive_int("k", k)
        self.distribution = check_distribution(distribution)
        for arg, value in (("relu_mask", relu_mask), ("exact_output", exact_output)):
            if not isinstance(value, bool):
                raise ValueError(f"{arg} must be True or False, got {arg}={value!r}")
        self.relu_mask, self.exact_output = relu_mask, exact_output

    def estimate(self, network: ActivityModel, x: Tensor, labels: Tensor, step: int,
                 comm: Collective = ONE_PROCESS, update: UpdateAsFormed | None = None) -> Estimate:
        recompute = self.recompute and isinstance(network, RecomputableModel)
        source = _ActivityTangents(self, network, labels, comm, update, x if recompute else None)
        result = network.jvp(x, labels, source, "local" if self.needs_local_losses else "loss", "example")
        if source.exact and not any(_unchanged(kept, result.logits) for kept in source.exact.values()):
            raise ValueError(f"{type(self).__name__}(exact_output=True) took {sorted(source.exact)} for the output "
                             "layer, but the network changes its output before the loss: use exact_output=False")
        # the blocks the pass did not finish as it went: the network's loss, the only block without local losses;
        # every block when the pass ran in chunks of directions
        if self.needs_local_losses:
            for index, (derivs, groups, cells) in enumerate(zip(result.block_derivs, result.group_derivs,
                                                                 result.patch_derivs)):
                source.block_done(index, derivs, groups, **({"patch_derivs": cells} if cells.shape[-1] > 1 else {}))
        else:
            source.block_done(0, result.dir_derivs, None)
        if update is not None:  # every layer's update is applied
            return update.done(comm.batch_mean([result.loss], batch_size(x))[0], result.logits)
        # data parallel: each weight's estimate sums over its rank's examples; one all-reduce of the gradient
        loss, grads = comm.mean_gradient(batch_size(x), result.loss,
                                         {name: source.grads[name] for name, _ in network.named_parameters()})
        return Estimate(loss, result.logits, grads)

    def validate(self, network: ActivityModel) -> None:
        super().validate(network)
        layers = len({name.rpartition(".")[0] for name, _ in network.named_parameters()})  # those owning parameters
        if self.exact_output and layers < 2:
            raise ValueError(f"{type(self).__name__}(exact_output=True) has no layer to perturb in a network with one "
                             "parameterised layer: its gradient is exact; use Backprop")


def _unchanged(kept: tuple[Tensor, int], logits: Tensor) -> bool:
    """Whether the loss took the output layer's output as the layer gave it: the same memory, shape and strides, and
    no in-place change since (its version counter, which views share)."""
    output, version = kept
    return (output.data_ptr() == logits.data_ptr() and output.shape == logits.shape
            and output.stride() == logits.stride() and output._version == version)


@dataclass
class _Call:
    """One call of a parameterised layer in an activity-perturbed pass: what its weight step needs once its block's
    loss derivatives are known. ``state``: the generator's state before its tangents were drawn (None for an output
    layer, which is not perturbed); ``output``: its output, kept for an output layer's logits or for the VJP of the
    normalisations it is perturbed past; ``mask``: where its tangent is kept (``network.activity_mask``), or ``site``:
    the perturbed point itself, where an in-place ReLU leaves the mask in it (``network.activity_mask_in_site``)."""

    name: str
    layer: Layer
    layer_input: Tensor
    output: Tensor | None
    mask: Tensor | None = None
    state: Tensor | None = None
    shape: torch.Size = torch.Size()  # of its output; ``like``: an empty tensor of its device and dtype
    like: Tensor | None = None
    site: Tensor | None = None
    past: int = 0  # drawn this many layers after the layer's output: at a tiling max-pool's output, whose ``picks``
    picks: tuple[torch.Size, Tensor] | None = None  # are (the site's shape, each window's pick there)
    norm_states: list | None = None  # the normalisations' primal states from the pass (else computed again)


def _through_norms(norms: list[Layer], output: Tensor) -> tuple[Tensor, list]:
    """``output`` through the normalisations ``norms``: the point perturbed, and what their VJPs need."""
    saved = []
    for norm in norms:
        output, state = norm.primal(output)
        saved.append(state)
    return output, saved


class _Noise(StreamedTangent):
    """One call's ``k`` tangents, drawn from ``generator`` (where the call's recorded state leaves it) when the pass
    uses them: whole (:meth:`dense`), into the output's tangent (:meth:`add_to`) or a chunk at a time against the
    head's derivative (:meth:`cell_dots`). Drawn past the site (at a tiling max-pool's output), the tangent is zero
    where the ReLU is off at the window's pick (``output ≤ 0``), as the site's tangent comes out of the ReLU and the
    pool (past the site no layer masks it)."""

    def __init__(self, source: _ActivityTangents, call: _Call, generator: torch.Generator, output: Tensor) -> None:
        self.source, self.call, self.generator, self.output = source, call, generator, output
        self.num_dirs = source.estimator.k

    def draws(self, into: Tensor | None = None) -> Iterator[Iterator[tuple[slice, Tensor]]]:
        """The call's ``k`` tangents ``(B, ...)`` from the generator, one direction at a time, each as ``(rows,
        part)`` pairs: rows ``rows`` of this rank's batch take ``part``. The noise is per example and drawn for the
        union batch (the same on every rank), in chunks of whole examples of about
        ``_ActivityTangents.DRAW_ELEMENTS`` elements, and this rank's rows taken; so a pass uses its tangent without a
        whole activation of noise beside it. The pass draws them from the estimator's generator, the weight step
        again from a copy of its state before that draw, in the same chunks: the same numbers. Each part is valid
        until the next is drawn (one buffer, reused), or, where a chunk is this rank's rows only, drawn into
        ``into[j, rows]``. Consume them in order, each direction's chunks before the next direction."""
        call, generator, source = self.call, self.generator, self.source
        rest, like, offset, total = call.shape[1:], call.like, source.offset, source.total
        elements = source.DRAW_ELEMENTS.get(like.device.type, source.DRAW_ELEMENTS_ELSEWHERE)
        step = max(1, elements // max(1, rest.numel()))
        buffer: list[Tensor] = []

        def chunks(j: int) -> Iterator[tuple[slice, Tensor]]:
            for start in range(0, total, step):
                size = min(step, total - start)
                low, high = max(start, offset), min(start + size, offset + call.shape[0])
                if into is not None and (low, high) == (start, start + size):
                    target = into[j, low - offset:high - offset]
                else:
                    if not buffer:
                        buffer.append(like.new_empty((min(step, total), *rest)))
                    target = buffer[0][:size]
                draw_(target, source.estimator.distribution, generator)
                if low < high:
                    yield slice(low - offset, high - offset), target[low - start:high - start]

        for j in range(self.num_dirs):
            yield chunks(j)

    def dense(self) -> Tensor:
        tangent = self.output.new_empty((self.num_dirs, *self.call.shape))
        for direction, chunks in zip(tangent, self.draws(into=tangent)):
            for rows, part in chunks:
                if part.data_ptr() != direction[rows].data_ptr():
                    direction[rows].copy_(part)
        return relu_grad_(tangent, self.output) if self.call.past else tangent

    def add_to(self, tangent: Tensor) -> Tensor:
        """``tangent`` (the output's, all directions) with the noise added, in place."""
        for direction, chunks in zip(tangent, self.draws()):
            for rows, part in chunks:
                direction[rows].add_(part)
        return relu_grad_(tangent, self.output) if self.call.past else tangent

    def cell_dots(self, weights: Tensor, cell_sums: Callable[[Tensor], Tensor]) -> Tensor:
        if self.call.past:
            relu_grad_(weights, self.output)
        dots = None
        for j, chunks in enumerate(self.draws()):
            for rows, part in chunks:
                sums = cell_sums(part.mul_(weights[rows])[None])[0]
                if dots is None:
                    dots = sums.new_empty(self.num_dirs, len(weights), sums.shape[-1])
                dots[j, rows] = sums
        return dots


class _ActivityTangents(StreamedSource):
    """Activity perturbation's tangents: ``k`` tangents per example (``estimator.distribution``) on the output of
    each call of every parameterised layer but the output layers (with ``exact_output``), past the normalisations
    that follow it, zero where the loss's derivative there is known to be zero (with ``relu_mask``: a following ReLU
    off, a following max-pool's unpicked positions, ``network.activity_mask``; drawn past a ReLU and a tiling max-pool
    where they follow, ``network.activity_past``); and the one-layer weight steps that turn them into the estimate
    (:meth:`block_done`).

    No tangent is kept: each call's noise (:class:`_Noise`) is drawn a chunk of examples at a time where the pass
    uses it (added to the layer's output tangent, or, where it is all its block's head sees, streamed into the head's
    cell sums and never whole) and dropped, and :meth:`block_done` draws it again, one direction at a time, from the
    generator state recorded before the draw (seed replay). What a call keeps until its block's derivatives are known
    is what backprop keeps: the layer's input, its mask (one byte an element; nothing more where an in-place ReLU
    leaves the mask in the site, the next layer's input, ``network.activity_mask_in_site``) and, where normalisations
    follow, its output (and their statistics); or, given the batch as ``inputs``, nothing: a second primal pass
    (``network.primal_calls``) computes them again when the weight steps run. With local losses the engine calls
    :meth:`block_done` as it evaluates each block's head, so that one block's inputs are alive at a time. Given
    ``update`` (:class:`UpdateAsFormed`), each layer's estimate is applied and dropped as soon as it is whole."""

    # elements of noise drawn at a time: 1 MiB of float32 on the CPU, 16 MiB elsewhere (a GPU, where each chunk
    # costs two kernel launches)
    DRAW_ELEMENTS = {"cpu": 1 << 18}
    DRAW_ELEMENTS_ELSEWHERE = 1 << 22

    def __init__(self, estimator: _ActivityPerturbation, network: ActivityModel, labels: Tensor, comm: Collective,
                 update: UpdateAsFormed | None = None, inputs: Tensor | None = None) -> None:
        self.estimator, self.network, self.labels, self.comm, self.update = estimator, network, labels, comm, update
        self.offset, self.total = comm.batch_rows(len(labels))  # this rank's rows of the union batch
        self.inputs = inputs  # the batch, when the layers' inputs are recomputed (network.primal_calls), not kept
        self.local_losses = estimator.needs_local_losses
        self._outputs: set[str] | None = None if estimator.exact_output else set()
        self.block_of = _block_of_layers(network) if self.local_losses else {}
        self.pending: dict[int, list[_Call]] = {}  # per block, its calls in order
        self.exact: dict[str, tuple[Tensor, int]] = {}  # output layer -> its output (the logits of a loss), version
        self.grads: dict[str, Tensor] = {}  # the estimate, summed over each layer's calls (those not yet applied)

    def activity_site(self, name: str) -> int:
        """Past layer ``name``'s normalisations, and with the mask past the ReLUs and the tiling max-pool after them
        (``network.activity_past``), where the mask's zeros and the pool's picks are what the pass's tangent is."""
        past = self.network.activity_past(name) if self.estimator.relu_mask else []
        return len(self.network.activity_norms(name)) + len(past)

    def activity(self, name: str, layer: Layer, layer_input: Tensor, output: Tensor, **extra: Any) -> Tensor | None:
        """The call's own tangent, a new tensor that the source does not keep (the noise is drawn again)."""
        noise = self.stream_activity(name, layer, layer_input, output, **extra)
        return None if noise is None else noise.dense()

    def add_activity(self, name: str, layer: Layer, layer_input: Tensor, output: Tensor, tangent: Tensor,
                     **extra: Any) -> Tensor:
        """The noise drawn into ``tangent`` (the output's, all directions) a chunk of examples at a time."""
        noise = self.stream_activity(name, layer, layer_input, output, **extra)
        return tangent if noise is None else noise.add_to(tangent)

    def stream_activity(self, name: str, layer: Layer, layer_input: Tensor, output: Tensor,
                        layer_output: Tensor | None = None, site: Tensor | None = None,
                        saved: tuple[torch.Size, Tensor] | None = None, norm_states: list | None = None,
                        ) -> _Noise | None:
        """The call's noise, recorded (:class:`_Call`) and not yet drawn; ``None`` for an output layer's call."""
        calls = self.pending.setdefault(self.block_of.get(name, 0), [])
        if self._outputs is None:  # asked as the pass starts: the torch backend's check has seen the model's calls
            self._outputs = self.network.logit_layers()
        if name in self._outputs:  # the loss's derivative is exact there: no noise
            if name in self.exact:
                raise ValueError(f"{type(self.estimator).__name__}(exact_output=True): the output layer {name!r} is "
                                 "called more than once in one forward, so its output is not only the logits: use "
                                 "exact_output=False")
            self.exact[name] = (output, output._version)
            calls.append(_Call(name, layer, layer_input if self.inputs is None else None, output))
            return None
        generator = self.estimator.generator(output.device)
        kept = self.inputs is None  # else recomputed, mask included, when the weight steps run
        # Drawn past the site, at a tiling max-pool's output (``network.activity_past``): the output, the next layer's
        # input, is zero exactly where the ReLU before the pool is off at the window's pick, and the picks take the
        # estimate back to the site (the pool's VJP).
        past = 0 if site is None else self.activity_site(name)
        if past and kept:  # the pool's primal state (x.shape, indices), from the pass where it ran the pool
            shape, indices = saved if saved is not None else self.network.activity_past(name)[-1].primal(site)[1]
            picks = (shape, indices.int())  # half the memory of the int64 indices, until the weight step
        else:
            picks = None
        in_site = past > 0 or (kept and self.estimator.relu_mask and isinstance(self.network, RecomputableModel)
                               and self.network.activity_mask_in_site(name))
        # The pass does not mask its tangent: the layers that mask the site zero the tangent there anyway (the mask
        # is ĝ_z's); where the site keeps the mask, it is read from it then.
        mask = self.network.activity_mask(name, output) if kept and self.estimator.relu_mask and not in_site else None
        call = _Call(name, layer, layer_input if kept else None, layer_output if kept else None, mask,
                     generator.get_state(), output.shape, output.new_empty(0), output if in_site and kept else None,
                     past, picks, norm_states if kept else None)
        calls.append(call)
        return _Noise(self, call, generator, output)

    def block_done(self, index: int, derivs: Tensor, group_derivs: Tensor | None,
                   patch_derivs: Tensor | None = None) -> None:
        """Block ``index``'s loss derivatives are known (``(K, B)``; ``(K, B, G)`` for its G group losses, ``(K, B, G,
        P²)`` for its group and patch losses): each of
        its calls' weight estimate, from ``ĝ_z = (1/K) Σ_k d_k u_k`` (the tangents drawn again) and the layer's own
        VJP at its input (a one-layer step), or for an output layer from the loss's derivative. Each call is
        released once used; a block is done once."""
        calls = self.pending.pop(index, [])
        left = collections.Counter(call.name for call in calls)  # a layer's calls are all in its block
        for call in self._with_inputs(calls):
            if call.state is None:  # an output layer: the loss's derivative comes with the forward pass
                g_z = self.network.logits_grad(call.output, self.labels)
            else:
                g_z = self.output_estimate(call, derivs, group_derivs, patch_derivs)
            keys = []
            for param, grad in self.network.layer_grads(call.name, call.layer, call.layer_input, g_z).items():
                keys.append(key := full_name(call.name, param))
                self.grads[key] = grad if key not in self.grads else self.grads[key] + grad
            left[call.name] -= 1
            if self.update is not None and not left[call.name]:  # the layer's estimate is whole: applied, dropped
                # (data parallel: over the union batch, one all-reduce per layer)
                mean = self.comm.batch_mean([self.grads.pop(key) for key in keys], len(self.labels))
                self.update(dict(zip(keys, mean)))
            del call, g_z

    def _with_inputs(self, calls: list[_Call]) -> Iterator[_Call]:
        """``calls`` with their layer inputs (and outputs, where kept), each released once used: the last first when
        the pass kept them; in the order of the pass when they are recomputed (``network.primal_calls``), each call's
        as the recomputed pass reaches it, before its layer's update is applied."""
        if self.inputs is None:
            while calls:
                yield calls.pop()
            return
        replayed = self.network.primal_calls(self.inputs)
        for call in calls:
            name, _, layer_input, output = next(replayed)
            if name != call.name:
                raise RuntimeError(f"the recomputed pass reached {name!r} where the forward-mode pass called "
                                   f"{call.name!r}")
            call.layer_input = layer_input
            if call.state is None:  # an output layer's logits
                call.output = output
            else:
                norms = self.network.activity_norms(name)
                call.output = output if norms else None
                if call.past:  # the pool's output is where the ReLU is off at its picks (the max ≤ 0 there)
                    site = _through_norms(norms, output)[0]
                    call.site, call.picks = self.network.activity_past(name)[-1].primal(site)
                elif self.estimator.relu_mask:
                    call.mask = self.network.activity_mask(name, _through_norms(norms, output)[0])
            del layer_input, output
            yield call
            call.layer_input = call.output = call.mask = None
        calls.clear()

    def output_estimate(self, call: _Call, derivs: Tensor, group_derivs: Tensor | None,
                        patch_derivs: Tensor | None = None) -> Tensor:
        """``ĝ_z = (1/K) Σ_k d_k u_k`` of one call, its tangents drawn again one at a time. For a layer whose output
        channels are its block's groups (``network.output_groups``), each group's channels take the derivative of
        that group's replicated loss, ``group_derivs[..., g]``; with patch-wise losses, each output element whose
        group and patch are known (``network.output_cells``) that cell's replica's, ``patch_derivs[..., g, p]`` (0
        for an element that reaches no loss)."""
        cells = None if patch_derivs is None else self.network.output_cells(call.name, call.shape, call.past)
        groups = self.network.output_groups(call.name) if self.local_losses and cells is None else None
        if cells is not None:  # per direction (B, C, H, W): each element with its cell's derivative, or 0
            flat = torch.cat([patch_derivs.flatten(-2), patch_derivs.new_zeros(*patch_derivs.shape[:-2], 1)], -1)
            cells = cells.masked_fill(cells < 0, flat.shape[-1] - 1).to(flat.device)
            derivs = (d[:, cells] for d in flat)
        split = None  # equal groups: the channels seen as (G, C/G), each group's derivative broadcast over its own
        if groups is not None and len({part.stop - part.start for part in groups}) == 1:
            split, derivs = (len(groups), groups[0].stop - groups[0].start), group_derivs
        elif groups is not None:  # (K, B, C): each channel with its group's derivative
            derivs = torch.cat([group_derivs[..., g, None].expand(-1, -1, part.stop - part.start)
                                for g, part in enumerate(groups)], -1)
        generator = torch.Generator(device=call.like.device)
        generator.set_state(call.state)
        g_z = call.like.new_zeros(call.shape)
        target = g_z if split is None else g_z.unflatten(1, split)
        for d, chunks in zip(derivs, _Noise(self, call, generator, call.like).draws()):
            d = d.view(*d.shape, *[1] * (target.dim() - d.dim()))
            for rows, part in chunks:
                target[rows].addcmul_(d[rows], part if split is None else part.unflatten(1, split))
            del d
        if call.site is not None:  # the ReLU's output now (the next layer's input): zero where it is, then let go
            relu_grad_(g_z, call.site)
            call.site = None
        elif call.mask is not None:
            g_z.mul_(call.mask)
        if call.picks is not None:  # from the pool's output back to the site, each window's value to its pick
            shape, picks = call.picks
            g_z = self.network.activity_past(call.name)[-1].vjp((shape, picks.long()), g_z)[0]
            call.picks = None
        norms = self.network.activity_norms(call.name)
        if norms:  # back through the normalisations (their VJP at the layer's output) to the layer's output
            saved = call.norm_states or _through_norms(norms, call.output)[1]
            call.norm_states = None
            for norm, state in zip(reversed(norms), reversed(saved)):
                g_z = norm.vjp(state, g_z)[0]
        return g_z.div_(self.estimator.k)


class ActivityPerturbation(_ActivityPerturbation):
    r"""Forward gradient with activity perturbation on the network's own loss (Ren et al. 2023, "FG-A").

    Every parameterised layer's output gets ``k`` independent tangents per example, all in one forward-mode pass;
    the directional derivatives come back per example, :math:`d_{kb} = \sum_\ell \partial L/\partial z_{\ell b}
    \cdot u_{\ell kb}`, and each layer's output estimate is :math:`\hat g_{z_\ell} = \frac1k\sum_k d_k u_{\ell k}`,
    unbiased since the draws are independent with identity covariance. Its variance per output coordinate is about
    :math:`\frac1k(\sum_\ell |\partial L/\partial z_{\ell b}|^2 + \dots)`: it grows with the number of perturbed
    activations per example (2058 on the paper's MLP), where weight perturbation's grows with the number of weights
    (1.9M). ``relu_mask`` zeroes :math:`\hat g_z` (as if :math:`u`: :math:`d` does not see :math:`u` there) wherever
    :math:`\partial L/\partial z = 0` is known from the layers that follow (``network.activity_mask``): where the
    following ReLU is off, and, where a max-pool follows it, at every position its window does not pick (three in four
    on the paper's CNN): the mean is unchanged, the variance lower. With the mask, where a ReLU and a max-pool whose
    windows tile follow a layer (the CNN's convolutions, ``network.activity_past``), the engine draws the tangent at
    the pool's output instead, one draw per window, zeroed where the ReLU is off at its pick: what the site's tangent
    comes out of the ReLU and the pool as, the same law for a quarter of the draws and no tangent through the ReLU's
    and the pool's JVPs; the estimate goes back to the site by the pool's VJP.
    A layer followed by a normalisation (``norm=True``: ``GroupNorm`` between it and its ReLU) is perturbed past it,
    :math:`\hat z = \mathrm{norm}(z)`, as in Ren et al.'s code, where the ReLU mask applies, and its estimate taken back
    to :math:`z` by the normalisation's VJP (per example, no parameters) before the layer's own: perturbed before it,
    no mask would apply.

    ``exact_output`` (default): the output layer is not perturbed; its gradient is exact, from the loss's derivative
    with respect to the logits, which every forward pass has (a one-layer local step, no backward pass). All layers'
    perturbations share one derivative per example, so a perturbed logit layer, whose gradient is the largest, would
    put its noise into every other layer's estimate: on the paper's MLP (one Fashion-MNIST batch of 256, k = 1) the
    mean cosine to the gradient is 0.064 with it exact and 0.020 with it perturbed (``exact_output=False``, every
    layer perturbed as in Ren et al.'s FG-A), against naive's 0.00047. The weight step needs each layer's input:
    by default kept until the end of the pass, as backprop keeps its activations (and no more than backprop keeps:
    where an in-place ReLU follows, its output, the next layer's input, stands for the layer's mask); or, with
    ``recompute`` (the engine's networks; registered as ``activity_recomputed``), computed again by a second primal
    pass once the loss's derivatives are known, each layer's step formed (and, under plain SGD, applied) as that pass
    reaches it: memory flat in depth, for one more primal pass (about 1.5× the kept step's time on the paper's MLP).
    The torch backend keeps the inputs. Ren et al. report MNIST test error 3.24 % (backprop 2.66 %, weight-perturbed
    forward gradient 9.25 %).

    ``distribution``: the tangents' law, ``"rademacher"`` (the default: signs ±1, 64 of them from one 64-bit draw, a
    tenth of a Gaussian draw's time on the CPU, where Gaussian draws were 64 % of the recipe CNN's step at k = 10) or
    ``"gaussian"`` (Ren et al.'s). Both have identity covariance, so the estimate is unbiased under either, and
    Rademacher's variance is the lower: per coordinate of one example's :math:`\hat g_z = (g \cdot u) u`,
    :math:`|g|^2 - g_i^2` against :math:`|g|^2 + g_i^2` (a sign's fourth moment is 1, a Gaussian's 3).
    """

    def __init__(self, k: int = 1, relu_mask: bool = True, exact_output: bool = True, recompute: bool = False,
                 seed: int = 0, distribution: str = "rademacher") -> None:
        super().__init__(k, relu_mask, exact_output, seed, distribution)
        if not isinstance(recompute, bool):
            raise ValueError(f"recompute must be True or False, got recompute={recompute!r}")
        self.recompute = recompute


class LocalActivityPerturbation(_ActivityPerturbation):
    r""":class:`ActivityPerturbation` with local losses (Ren et al. 2023, "LG-FG-A"): the tangent stops at each block
    boundary, and each block's layers (its head's included) are estimated from that block's local loss, so the noise
    of one block's estimate comes only from that block's activations. Unbiased for :class:`LocalBackprop`'s gradient.
    Ren et al. report MNIST test error 2.55 % (local backprop 2.41 %) and CIFAR-10 30.68 % (33.62 %).

    With group-wise losses (``MLP``/``CNN(groups=G)``, Ren et al. Sec. 4) the block's loss is replicated over G groups
    of its output channels, replica :math:`L_g` seeing only group g's tangent. For the layer whose output channels are
    those groups (``network.output_groups``: a block's last, before only ReLU, max-pool, GroupNorm), group g's
    channels take :math:`\hat g_{z_g} = d_g u_g`, :math:`d_g = \partial L_g/\partial z \cdot u` (the pass's
    ``group_derivs``): unbiased, since :math:`\partial L_g/\partial z_g = \partial L/\partial z_g`, with the noise
    of group g's tangents only (not the whole layer's). The block's other layers take the block loss's derivative,
    :math:`\sum_g d_g`. The target is unchanged: :math:`\nabla \sum_g L_g` is the plain local gradient. On the
    small CNN of tests/test_cosine_floor.py with one-layer blocks the mean cosine rises from 0.55–0.60 to 0.79–0.80
    with 4 groups, and to 0.89–0.93 with the GroupNorm too (the mask past it). (The pass forms :math:`d_g` with the
    head's VJP: one step back through the head, besides the output layers' one-layer steps.)"""

    needs_local_losses: ClassVar[bool] = True


class LocalWeightPerturbation(GradientEstimator):
    r"""Weight-perturbed forward gradient with local losses (Ren et al. 2023, "LG-FG-W"): ``k`` Gaussian directions
    over all parameters, one forward-mode pass in which the tangent stops at each block boundary, and each block's
    parameters estimated from the derivatives of that block's local loss,
    :math:`\hat g_{B} = \frac1k \sum_k (\nabla_{B} L_B \cdot v_{Bk})\, v_{Bk}`. Unbiased for :class:`LocalBackprop`'s
    gradient; the variance of a block's estimate grows with that block's parameter count only. With group-wise
    losses (``groups=G``), the rows of the grouped layer's weight and bias that make group g's channels reach only
    replica :math:`L_g` and take its derivative (which sees those rows' tangents, the block's earlier layers' and the
    head's, not the other groups' rows) instead of the block loss's: unbiased, with less noise (measured: 0.7 of the
    variance on those rows with 3 groups on a small MLP)."""

    unbiased = True
    needs_local_losses: ClassVar[bool] = True

    def __init__(self, k: int = 1, seed: int = 0) -> None:
        super().__init__(seed)
        self.k = check_positive_int("k", k)

    def estimate(self, network: LocalLossModel, x: Tensor, labels: Tensor, step: int,
                 comm: Collective = ONE_PROCESS) -> Estimate:
        result = comm.mean_derivatives(batch_size(x),
                                       network.jvp(x, labels, GaussianTangents(self, self.k), "local"))
        grads = {}
        for names, derivs, groups in zip(network.block_parameters(), result.block_derivs, result.group_derivs):
            for name in names:
                tangent, parts = result.tangents[name], network.output_groups(name.rpartition(".")[0])
                if parts is None or not isinstance(tangent, Tensor):
                    grads[name] = weighted_sum(derivs / self.k, tangent)
                else:  # the rows of a group's channels reach only that group's replicated loss
                    grads[name] = torch.cat([weighted_sum(groups[:, g] / self.k, tangent[:, part])
                                             for g, part in enumerate(parts)])
        return Estimate(result.loss, result.logits, {name: grads[name] for name, _ in network.named_parameters()})


class LocalBackprop(GradientEstimator):
    """Backprop of each block's local loss through that block and its head only (Ren et al.'s "LG-BP"): the exact
    gradient the local forward-gradient estimators estimate, and their fair baseline. Runs through the engine's
    hand-written VJPs with one block's activations alive at a time."""

    unbiased = True
    needs_local_losses: ClassVar[bool] = True

    def estimate(self, network: LocalLossModel, x: Tensor, labels: Tensor, step: int,
                 comm: Collective = ONE_PROCESS) -> Estimate:
        loss, logits, grads, _ = network.local_loss_and_grad(x, labels)
        loss, grads = comm.mean_gradient(batch_size(x), loss, grads)  # data parallel: one all-reduce of the gradient
        return Estimate(loss, logits, grads)


class LocalGuess(GradientEstimator):
    r"""Local-gradient guesses (Fournier et al. 2023): each block's guess direction :math:`v_B` is the exact gradient
    of its local loss (a VJP through the block and its head only); one forward-mode pass of the *network's* loss with
    one tangent per block gives :math:`d_B = \nabla L \cdot v_B`, and the block's update is the projection of the
    global gradient on its guess, :math:`\hat g_B = (d_B / |v_B|^2)\, v_B`. The heads follow their local gradient.
    For the last block the guess is the global gradient itself, taken as it is. Biased (a projection), but far better aligned than a
    random direction; Fournier et al. find it closes much of the gap to backprop, with an overhead of a local backward
    and a forward-mode pass with a tangent per block but the last.

    ``projection="example"`` projects each *example's* gradient on that example's guess, as Fournier et al. do:
    :math:`\hat g_B = \frac1B \sum_b (\nabla \ell_b \cdot v_{B,b} / |v_{B,b}|^2)\, v_{B,b}`, :math:`v_{B,b}` example
    :math:`b`'s local-loss gradient of block :math:`B`'s parameters, :math:`\ell_b` its network loss (the default,
    ``"batch"``, is the formula above with batch means). Its length on a block is at most the mean of the examples'
    gradient norms there, and it is exact where each example's guess is parallel to its gradient. Still one local
    backward, one forward-mode pass of K = blocks − 1 directions and no autograd
    (:mod:`fg_lightning.estimators.per_example`): each example's guess enters the pass as the activity tangent it
    gives its own example (for a ``Linear`` layer :math:`\delta_b (|h_b|^2 + 1)`, :math:`h_b` its input,
    :math:`\delta_b` its local output gradient), the pass's per-example derivatives are the
    :math:`\nabla \ell_b \cdot v_{B,b}`, and the update is each guessed layer's own weight VJP with the output
    gradient scaled per example, :math:`c_b \delta_b`. Its cost beyond ``"batch"``: that one weight VJP per guessed
    layer; the guessed layers' inputs and output gradients kept from the local backward to the end of the pass
    (about backprop's activations, where ``"batch"`` keeps one block's at a time); and a ``Conv2d``'s per-example
    weight gradients, materialised (``(out, in·k²)`` per example, with the unfolded input) a batch chunk of at most
    about 64 MB of float32 at a time, where a ``Linear`` layer's are never formed (closed forms). It needs the
    engine's network: the torch backend has no local losses, and ``validate()`` says so in one line."""

    unbiased = False
    needs_local_losses: ClassVar[bool] = True

    def __init__(self, projection: str = "batch", seed: int = 0) -> None:
        super().__init__(seed)
        if not isinstance(projection, str) or projection not in ("batch", "example"):
            raise ValueError(f"projection must be 'batch' or 'example', got projection={projection!r}")
        self.projection = projection

    def validate(self, network: LocalLossModel) -> None:
        super().validate(network)
        why = unsupported(network) if self.projection == "example" else None
        if why is not None:
            raise ValueError(f"LocalGuess(projection='example') forms per-example local gradients: {why}")

    def exact_gradient(self, network: LocalLossModel, x: Tensor, labels: Tensor,
                       comm: Collective = ONE_PROCESS) -> dict[str, Tensor]:
        loss, _, grads = network.loss_and_grad(x, labels)  # it projects the network loss's gradient
        return comm.mean_gradient(batch_size(x), loss, grads)[1]

    def estimate(self, network: LocalLossModel, x: Tensor, labels: Tensor, step: int,
                 comm: Collective = ONE_PROCESS) -> Estimate:
        if self.projection == "example":
            return self._example_estimate(network, x, labels, comm)
        loss, _, local, _ = network.local_loss_and_grad(x, labels)
        # data parallel: the guesses are the union batch's local gradients (one all-reduce), the same on every rank
        _, local = comm.mean_gradient(batch_size(x), loss, local)
        main = {name for name, _ in network.named_layers()}
        # The last block's local loss is the network's: its guess is the gradient itself and needs no projection.
        guessed = [[n for n in names if n.split(".")[0] in main] for names in network.block_parameters()[:-1]]
        block_of = {name: index for index, names in enumerate(guessed) for name in names}

        # direction i is block i's guess, zero on the other blocks
        guesses = {}
        for name, index in block_of.items():
            guesses[name] = local[name].new_zeros(len(guessed), *local[name].shape)
            guesses[name][index] = local[name]
        result = comm.mean_derivatives(batch_size(x), network.jvp(x, labels, GivenTangents(guesses)))
        sq_norms = torch.stack([sum(local[n].square().sum() for n in names) for names in guessed])
        scale = torch.where(sq_norms > 0, result.dir_derivs / sq_norms.clamp_min(torch.finfo(sq_norms.dtype).tiny),
                            torch.zeros_like(sq_norms))
        grads = dict(local)  # the heads and the last block follow their local gradient
        for name, index in block_of.items():
            grads[name] = local[name] * scale[index]
        return Estimate(result.loss, result.logits, grads)

    def _example_estimate(self, network: LocalLossModel, x: Tensor, labels: Tensor, comm: Collective) -> Estimate:
        """``projection="example"``: each example's gradient projected on its own guess, averaged."""
        grads, taps = local_backward(network, x, labels)  # the heads and the last block keep their local gradient
        source = ExampleGuesses(taps, len(network.block_parameters()) - 1)
        result = network.jvp(x, labels, source, reduction="example")  # (K, B): ∇(ℓ_b / B) · v_{i,b}
        sq_norms = source.sq_norms
        scale = torch.where(sq_norms > 0, result.dir_derivs / sq_norms.clamp_min(torch.finfo(sq_norms.dtype).tiny),
                            torch.zeros_like(sq_norms))  # c_b: with the output gradients' 1/B, Σ_b c_b v_b is the mean
        for name in list(taps):
            tap = taps.pop(name)
            per_example = scale[tap.block].view(-1, *[1] * (tap.out_grad.dim() - 1))
            d_output = tap.out_grad * per_example  # c_b δ_b: Σ_b c_b v_b from the layer's own VJP
            for param, grad in network.layer_grads(name, tap.layer, tap.layer_input, d_output).items():
                grads[f"{name}.{param}"] = grad
            del tap
        # data parallel: every part is a mean over this rank's examples; one all-reduce of the gradient
        loss, grads = comm.mean_gradient(batch_size(x), result.loss,
                                         {name: grads[name] for name, _ in network.named_parameters()})
        return Estimate(loss, result.logits, grads)

r"""Per-example local gradients without autograd, for :class:`~fg_lightning.estimators.local.LocalGuess`'s
per-example projection (Fournier et al. 2023).

Example :math:`b`'s gradient of a layer's parameters is fixed by two per-example tensors that backprop of the block's
(mean) local loss has anyway: the layer's input :math:`h_b` and the loss's gradient with respect to the layer's
output, :math:`\delta_b`. For a ``Linear`` layer it is :math:`v_b = (\delta_b h_b^\top, \delta_b)` (weight, bias),
and everything the projection needs has a closed form, nothing of the weight's size per example:

- the output tangent it gives example :math:`b`, :math:`v_b` applied to :math:`h_b`:
  :math:`\delta_b h_b^\top h_b + \delta_b = \delta_b (|h_b|^2 + 1)`, which a forward-mode pass carries as an
  *activity* tangent on example :math:`b`'s output: the pass's per-example derivative of the network's loss along it
  is :math:`\nabla \ell_b \cdot v_b`, each example along its own direction;
- :math:`|v_b|^2 = |\delta_b|^2 (|h_b|^2 + 1)`;
- the estimate :math:`\sum_b c_b v_b = (\sum_b c_b \delta_b h_b^\top, \sum_b c_b \delta_b)`: the layer's own VJP at
  its input with the output gradient :math:`c_b \delta_b` (``network.layer_grads``).

A ``Conv2d``'s per-example weight gradient :math:`\sum_p \delta_{b,p}\, \mathrm{patch}_{b,p}^\top` (a sum over
output positions :math:`p`) has no such cheap form (its norm and its output tangent need each example's
positions × positions Gram matrix), so it is materialised, ``(out, in·k²)`` per example, from the unfolded input, a
batch chunk at a time (at most about ``CHUNK_ELEMENTS`` elements of temporaries: 64 MB in float32); its output
tangent is then one batched matrix product with the patches. The bias part is :math:`\sum_p \delta_{b,p}` per
channel. Each layer forms its own (:meth:`~fg_lightning.engine.Layer.example_tangent`: ``Linear``, ``Conv2d``,
``TokenMixing``); a block with another parameterised layer is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import Tensor

from fg_lightning.engine import ActivitySource
from fg_lightning.estimators.base import LayeredBlocksModel


def _has_parameters(layer: Any) -> bool:
    return any(True for _ in layer.parameters(recurse=False))


def unsupported(network: Any) -> str | None:
    """Why per-example local gradients cannot be formed on ``network`` (one line), or None: it needs the engine's
    :class:`~fg_lightning.engine.Network` with local-loss heads (its blocks, its heads' layers, the layers' own
    passes), and only ``Linear`` and ``Conv2d`` layers with parameters in the blocks that are guessed (all but the
    last)."""
    if not isinstance(network, LayeredBlocksModel):
        lacks = [member for member in ("blocks", "head_layers") if not hasattr(network, member)]
        return (f"{type(network).__name__} lacks {', '.join(lacks)}: the per-example local gradients come from the "
                "engine's hand-written layer passes, MLP(local_losses=True) / CNN(local_losses=True)")
    layers = dict(network.named_layers())
    for names, _ in network.blocks[:-1]:
        for name in names:
            layer = layers[name]
            if _has_parameters(layer) and not getattr(layer, "forms_example_grads", False):
                return (f"layer {name!r} is a {type(layer).__name__}, whose per-example gradients are not formed "
                        "(the engine's Linear, Conv2d and TokenMixing form them)")
    return None


@dataclass
class Tap:
    """What a guessed layer's per-example gradients are made of: the layer, its block, its input ``(B, ...)`` and
    the gradient of its block's (mean) local loss with respect to its output ``(B, ...)``."""

    layer: Any
    block: int
    layer_input: Tensor
    out_grad: Tensor


def _backward(layers: Sequence[tuple[str, Any]], inputs: list, saved: list, d: Tensor, grads: dict[str, Tensor],
              taps: dict[str, Tap] | None, block: int, need_input_grad: bool) -> Tensor | None:
    """The layers' VJPs in reverse; parameter gradients into ``grads`` by full name; for each parameterised layer,
    when ``taps`` is given, its input and output gradient. The input gradient only where a layer below needs it."""
    for index in range(len(layers) - 1, -1, -1):
        name, layer = layers[index]
        if taps is not None and inputs[index] is not None:
            taps[name] = Tap(layer, block, inputs[index], d)
        need = need_input_grad or any(_has_parameters(below) for _, below in layers[:index])
        d, layer_grads = layer.vjp(saved[index], d, need_input_grad=need)
        grads.update({f"{name}.{param}": grad for param, grad in layer_grads.items()})
        if d is None:
            break
    return d


def _primal(layers: Sequence[tuple[str, Any]], h: Tensor) -> tuple[Tensor, list, list]:
    """``(output, each parameterised layer's input (None for the others), what each layer's VJP needs)``."""
    inputs, saved = [], []
    for _, layer in layers:
        inputs.append(h if _has_parameters(layer) else None)  # a parameterised layer does not change its input
        h, layer_saved = layer.primal(h)
        saved.append(layer_saved)
    return h, inputs, saved


def local_backward(network: Any, x: Tensor, labels: Tensor) -> tuple[dict[str, Tensor], dict[str, Tap]]:
    """Backprop of each block's local loss through the block and its head only, with the layers' hand-written
    passes, one block's activations alive at a time besides the taps (as ``network.local_loss_and_grad``):
    ``({param name: gradient of its block's loss}, {layer name: Tap})``, a tap for each parameterised layer of every
    block but the last (the guessed ones)."""
    grads: dict[str, Tensor] = {}
    taps: dict[str, Tap] = {}
    layers = dict(network.named_layers())
    blocks = network.blocks
    h = x
    for index, (names, head) in enumerate(blocks):
        block = [(name, layers[name]) for name in names]
        h, inputs, saved = _primal(block, h)
        if head is None:  # the last block: its loss is the network's
            d = network.logits_grad(h, labels)
        else:
            head_layers = network.head_layers(head)
            logits, head_inputs, head_saved = _primal(head_layers, h)
            d = _backward(head_layers, head_inputs, head_saved, network.logits_grad(logits, labels), grads, None,
                          index, need_input_grad=True)
            del logits, head_inputs, head_saved
        _backward(block, inputs, saved, d, grads, taps if head is not None else None, index, need_input_grad=False)
        del inputs, saved, d
    return grads, taps


class ExampleGuesses(ActivitySource):
    """The per-example guesses as tangents of one forward-mode pass of the network's loss: direction ``i`` is block
    ``i``'s guess, on example ``b`` that example's local gradient ``v_{i,b}``. A weight tangent is shared by the
    batch, so each is given as the output tangent it gives its own example (an activity tangent,
    :meth:`~fg_lightning.engine.Layer.example_tangent`), formed as the pass reaches the layer; the pass's
    per-example derivatives are then ``∇(ℓ_b / B) · v_{i,b}``. ``sq_norms`` ``(K, B)``: each ``|v_{i,b}|²``, summed
    over the block's layers as the pass goes."""

    def __init__(self, taps: dict[str, Tap], num_blocks: int) -> None:
        self.taps, self.num_blocks = taps, num_blocks
        self.sq_norms: Tensor | None = None

    def activity(self, name: str, layer: Any, layer_input: Tensor, output: Tensor) -> Tensor | None:
        tap = self.taps.get(name)
        if tap is None:  # a layer of the last block: its guess is the gradient itself, taken as it is
            return None
        tangent, sq_norms = tap.layer.example_tangent(tap.layer_input, tap.out_grad)
        if self.sq_norms is None:
            self.sq_norms = sq_norms.new_zeros(self.num_blocks, len(sq_norms))
        self.sq_norms[tap.block] += sq_norms
        directions = tangent.new_zeros(self.num_blocks, *tangent.shape)  # zero on the other blocks' directions
        directions[tap.block] = tangent
        return directions

"""``Network``: ordered layers plus mean softmax cross-entropy, and the paper's two networks (Section IV)."""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from fg_lightning.engine.layers import (
    AddSkip, AdaptiveAvgPool2d, Conv2d, Flatten, GlobalAvgPool, Grads, GroupNorm, Layer, Linear, MaxPool2d, ReLU, Skip,
    TokenMixing, picked,
)
from fg_lightning.engine.loss import cross_entropy, cross_entropy_and_grad, cross_entropy_jvp
from fg_lightning.engine.tangents import (
    ActivitySource, ReplayedSource, StreamedSource, StreamedTangent, Tangent, TangentSource, as_source,
    check_objective, directions,
)

TangentFn = Callable[[str, Layer, Tensor], Mapping[str, Tangent]]
"""``tangent_fn(name, layer, layer_input) -> {param: tangent (K, *param.shape)}`` for one parameterised layer: the
simplest tangent source (:class:`~fg_lightning.engine.tangents.WeightTangents`)."""


@dataclass
class JvpResult:
    """One forward-mode pass: the loss, the logits ``(B, C)``, ``dir_derivs`` = ``∇f·v_k`` for each of the
    K directions (``(K,)``, or ``(K, B)`` per example), and the weight tangents used, keyed by full parameter name
    (``"fc1.weight"``). With local losses, ``block_derivs[i]`` holds the derivatives of block ``i``'s local loss
    (the last block's loss is the network's, so ``block_derivs[-1]`` is ``dir_derivs``), and ``group_derivs[i]``
    (``(*block_derivs[i].shape, G)``) those of its G replicated group losses (Ren et al. 2023, Sec. 4): group ``g``'s
    entry sees only the tangent of the head input's group ``g`` (and the head's own parameter tangents), so
    ``block_derivs[i]`` is their sum with the head's share counted once; with G = 1 (the last block, and any block
    of a network without groups) ``group_derivs[i][..., 0]`` is ``block_derivs[i]``. ``patch_derivs[i]``
    (``(*block_derivs[i].shape, G, P²)``) refines them with patch-wise losses (``CNN(patches=P)``): entry ``[..., g,
    p]`` is the replica of group ``g`` and patch ``p`` (row-major in the P×P grid of the head input's positions),
    which sees only the tangent of that cell of the head input (and the head's own parameter tangents); P² = 1 for a
    block whose head has no patches (then it is ``group_derivs[i][..., None]``)."""

    loss: Tensor
    logits: Tensor
    dir_derivs: Tensor
    tangents: dict[str, Tangent]
    block_derivs: list[Tensor] | None = None
    group_derivs: list[Tensor] | None = None
    patch_derivs: list[Tensor] | None = None


def bands(size: int, parts: int) -> list[int]:
    """The sizes of ``parts`` contiguous bands of ``size`` positions, as ``torch.tensor_split`` cuts them (the first
    ``size % parts`` one longer)."""
    return [size // parts + (index < size % parts) for index in range(parts)]


class Head(nn.Module):
    """A local-loss head: layers applied in order to a block's output, giving that block's logits (Ren et al. 2023:
    a linear classifier, after a spatial average on feature maps).

    ``groups`` (Ren et al. 2023, Sec. 4, group-wise losses) splits the head input's channels (axis 1) into that many
    contiguous groups, as ``torch.tensor_split`` does, each with a replica of the head's loss: the same value, but
    group ``g``'s replica sees only group ``g``'s tangent (a stop-gradient on the other groups).

    ``patches`` P (Ren et al. 2023, Sec. 4, patch-wise losses), for a head that starts with a :class:`GlobalAvgPool`
    of a feature map ``(B, C, H, W)``: its rows and its columns are cut into P bands each (as ``torch.tensor_split``
    does), and each of the G·P² cells (group ``g``'s channels in patch ``p``, :meth:`cells`) has its own replica of
    the head's loss, which sees only that cell's tangent. As in Ren et al.'s code, a replica is the loss of the
    average over *all* positions (not of its patch's average): the same value for every cell, the stop-gradient on
    the other cells being what makes it local."""

    def __init__(self, layers: Sequence[tuple[str, Layer]], groups: int = 1, patches: int = 1) -> None:
        super().__init__()
        for name, layer in layers:
            if not isinstance(layer, Layer):
                raise TypeError(f"head layer {name!r} is a {type(layer).__name__}, not an fg_lightning.engine Layer")
            self.add_module(name, layer)
        first = next((layer for _, layer in layers if layer.has_parameters), None)
        width = first.in_features if isinstance(first, Linear) else getattr(first, "in_channels", None)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or (width and groups > width):
            raise ValueError(f"groups must be an int from 1 to the head input's width {width}, got groups={groups!r}")
        if isinstance(patches, bool) or not isinstance(patches, int) or patches < 1:
            raise ValueError(f"patches must be a positive int, got patches={patches!r}")
        if patches > 1 and not (layers and isinstance(layers[0][1], GlobalAvgPool)):
            raise ValueError(f"patches={patches} cuts the positions of a feature map: it needs a head that starts with "
                             "a GlobalAvgPool")
        self.groups, self.patches = groups, patches

    def group_slices(self, width: int) -> list[slice]:
        """The channels of each group, for a head input of ``width`` channels."""
        return self._slices(bands(width, self.groups))

    def cells(self, shape: Sequence[int]) -> list[tuple[slice, slice, slice]]:
        """``(channels, rows, columns)`` of each replica of a head input of ``shape`` ``(C, H, W)``, the G·P² cells in
        the order of ``JvpResult.patch_derivs``' last two axes flattened: cell ``g·P² + i·P + j`` is group ``g``,
        row band ``i``, column band ``j``."""
        height, width = shape[1:]
        if self.patches > min(height, width):
            raise ValueError(f"patches={self.patches} needs a head input of at least {self.patches}×{self.patches} "
                             f"positions, got {height}×{width}")
        rows, cols = (self._slices(bands(size, self.patches)) for size in (height, width))
        return [(group, row, col) for group in self.group_slices(shape[0]) for row in rows for col in cols]

    def cell_sums(self, t: Tensor, per_example: bool) -> Tensor:
        """``t`` ``(K, B, C, ...)`` summed over each replica's cell (each group's channels, and with patches each
        patch's positions), in :meth:`cells`' order: ``(K, B, G·P²)``, or ``(K, G·P²)`` summed over the batch too
        unless ``per_example``; one contraction with the cells' memberships, not a sum per cell. The map is taken to fit
        the patches (:meth:`cells` refuses one that does not)."""
        def member(sizes: Sequence[int]) -> Tensor:  # (positions, parts): 1 where a position is in a part
            return torch.repeat_interleave(torch.eye(len(sizes), dtype=t.dtype, device=t.device),
                                           torch.tensor(sizes, device=t.device), dim=0)
        sizes = [part.stop - part.start for part in self.group_slices(t.shape[2])]
        if self.patches == 1 and len(set(sizes)) == 1:  # equal groups: a sum over a reshape, no product with a map
            summed = (t.flatten(3).sum(3) if t.dim() > 3 else t).unflatten(2, (len(sizes), sizes[0])).sum(3)
            return summed if per_example else summed.sum(1)
        groups = member(sizes)
        out = "kb" if per_example else "k"
        if self.patches == 1:
            return torch.einsum(f"kbc,cg->{out}g", t.flatten(3).sum(3) if t.dim() > 3 else t, groups)
        rows, cols = (member(bands(size, self.patches)) for size in t.shape[3:])
        return torch.einsum(f"kbchw,cg,hp,wq->{out}gpq", t, groups, rows, cols).flatten(-3)

    @staticmethod
    def _slices(sizes: Sequence[int]) -> list[slice]:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [slice(start, start + size) for start, size in zip(starts, sizes)]

    def named_layers(self) -> Iterator[tuple[str, Layer]]:
        return self.named_children()  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.children():
            x = layer(x)
        return x


class Network(nn.Module):
    """Layers applied in order, then mean softmax cross-entropy.

    Each layer is registered under its name, so ``f"{name}.{param}"`` are the keys of ``named_parameters()``.
    ``input_shape`` is the shape of one sample; a network whose first layer is :class:`Flatten` accepts any
    sample shape with that many elements (the MLP takes ``(B, 784)`` and ``(B, 1, 28, 28)``).

    ``tangent_memory_mb`` bounds the forward-mode pass: when K directions of the widest layer's tangent
    ``(K, B, ...)`` would take more than this, :meth:`jvp` carries them in chunks of directions, one primal pass per
    chunk, with the same result (``None``: always one pass).

    ``heads`` cuts the network into blocks for local losses (Ren et al. 2023): ``{layer name: head layers}`` ends a
    block after that layer and puts a :class:`Head` (registered as ``head1``, ``head2``, … in order) on its output;
    the block's local loss is the cross-entropy of the head's logits. The last block ends at the logits and its local
    loss is the network's loss. ``forward``, :meth:`loss` and :meth:`loss_and_grad` are those of the network without
    its heads; :meth:`local_loss_and_grad` and ``jvp`` with a local tangent source train each block on its own loss, with no
    derivative crossing a block boundary.

    ``groups`` (G) replicates each head's loss over G groups of its input's channels (see :class:`Head`): the
    forward-mode pass then gives each group's derivative (``JvpResult.group_derivs``), and :meth:`output_groups` says
    which layers' outputs are split into those groups. The objective is ``Σ_g L_g`` for the block's layers, ``L_g``
    the head's loss with a stop-gradient on every group but ``g``, and the head's own loss for the head. Its exact
    gradient is the plain local gradient, since each group reaches the loss only through its own replica
    (``∂L_g/∂h_g = ∂L/∂h_g``, ``∂L_g/∂h_g' = 0``): :meth:`local_loss_and_grad` is unchanged; what
    changes is the variance of a forward-mode estimate, whose noise for a group's activities comes from that group
    alone.

    ``patches`` (P) further replicates the loss of each head that starts with a :class:`GlobalAvgPool` over the
    P×P patches of its input's positions (see :class:`Head`): G·P² replicas ``L_{g,p}``, each with a stop-gradient
    on every cell of the head input but (group ``g``, patch ``p``); the forward-mode pass gives each one's derivative
    (``JvpResult.patch_derivs``), and :meth:`output_cells` says which output elements of a block's last layer reach
    which replica. The objective is ``Σ_{g,p} L_{g,p}`` for the block's layers (the sum, as Ren et al.'s code) and
    the head's own loss for the head; as with groups its exact gradient is the plain local gradient
    (``∂L_{g,p}/∂h_{g,p} = ∂L/∂h_{g,p}``, and a cell reaches no other replica), so :meth:`local_loss_and_grad` is
    unchanged.
    """

    compilable = True  # its step runs under torch.compile (the torch backend's forward_ad pass does not)

    def __init__(
        self, layers: Sequence[tuple[str, Layer]], input_shape: Sequence[int], tangent_memory_mb: float | None = 256.0,
        heads: Mapping[str, Sequence[tuple[str, Layer]]] | None = None, groups: int = 1, patches: int = 1,
    ) -> None:
        super().__init__()
        if not layers:
            raise ValueError("Network needs at least one layer")
        if tangent_memory_mb is not None and not tangent_memory_mb > 0:
            raise ValueError(f"tangent_memory_mb must be positive or None, got tangent_memory_mb={tangent_memory_mb!r}")
        for name, layer in layers:
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {name!r} is a {type(layer).__name__}, not an fg_lightning.engine Layer")
            self.add_module(name, layer)
        self._layer_names = [name for name, _ in layers]
        heads = dict(heads or {})
        if groups != 1 and not heads:
            raise ValueError(f"groups={groups!r} replicates the local losses of heads: it needs heads")
        if patches != 1 and not any(layers and isinstance(layers[0][1], GlobalAvgPool) for layers in heads.values()):
            raise ValueError(f"patches={patches!r} replicates the local losses of heads over the patches of a feature "
                             "map: it needs a head that starts with a GlobalAvgPool")
        unknown = sorted(set(heads) - set(self._layer_names[:-1]))
        if unknown:
            raise ValueError(f"heads must follow a layer other than the last, got heads after {unknown}")
        # blocks: (layer names, head module name or None for the last block)
        self._blocks: list[tuple[list[str], str | None]] = []
        current: list[str] = []
        for name in self._layer_names:
            current.append(name)
            if name in heads:
                head_name = f"head{len(self._blocks) + 1}"
                spatial = bool(heads[name]) and isinstance(heads[name][0][1], GlobalAvgPool)
                self.add_module(head_name, Head(heads[name], groups, patches if spatial else 1))
                self._blocks.append((current, head_name))
                current = []
        self._blocks.append((current, None))
        self.input_shape = tuple(input_shape)
        self.tangent_memory_mb = tangent_memory_mb
        self._widest: dict[tuple[int, ...], int] = {}  # sample shape -> most elements of any layer's input or output

    def named_layers(self) -> Iterator[tuple[str, Layer]]:
        """The network's layers in order (not its heads)."""
        return ((name, getattr(self, name)) for name in self._layer_names)

    @property
    def has_local_losses(self) -> bool:
        return len(self._blocks) > 1

    @property
    def blocks(self) -> list[tuple[list[str], str | None]]:
        """``(layer names, head name)`` per block, in order; the last block's head is ``None`` (its loss is the
        network's). A network without heads is one block."""
        return [(list(names), head) for names, head in self._blocks]

    def block_parameters(self) -> list[list[str]]:
        """Full names of the parameters of each block, its head's included, in ``named_parameters`` order."""
        owner = {}
        for index, (names, head) in enumerate(self._blocks):
            for module in names + ([head] if head else []):
                owner[module] = index
        blocks: list[list[str]] = [[] for _ in self._blocks]
        for name, _ in self.named_parameters():
            blocks[owner[name.split(".")[0]]].append(name)
        return blocks

    def head_layers(self, head: str) -> list[tuple[str, Layer]]:
        """A head's layers with their full names (``"head1.fc"``)."""
        return [(f"{head}.{name}", layer) for name, layer in getattr(self, head).named_layers()]

    def logit_layers(self) -> set[str]:
        """Full names of the layers whose output is the logits of a loss: the network's last parameterised layer and
        each head's."""
        bodies = [list(self.named_layers())] + [self.head_layers(head) for _, head in self._blocks if head]
        return {[name for name, layer in layers if layer.has_parameters][-1] for layers in bodies}

    def output_groups(self, name: str) -> list[slice] | None:
        """For the last parameterised layer of a block whose head has groups, when only layers that keep the groups
        apart (``Layer.keeps_groups``: ReLU, max-pool, a GroupNorm over those groups) lie between it and the head: the
        slices of its output channels (axis 1 of its output, axis 0 of its weight and bias) that make each group of
        the head's input. Group ``g``'s slice reaches only group ``g``'s replicated loss. ``None`` for any other
        layer."""
        for names, head in self._blocks:
            head_groups = None if head is None else getattr(self, head).groups
            if head_groups in (None, 1) or name not in names:
                continue
            layers = [getattr(self, n) for n in names[names.index(name):]]
            if not isinstance(layers[0], (Linear, Conv2d)) or not all(layer.keeps_groups(head_groups)
                                                                      for layer in layers[1:]):
                return None
            width = layers[0].out_features if isinstance(layers[0], Linear) else layers[0].out_channels
            return getattr(self, head).group_slices(width)
        return None

    def output_cells(self, name: str, shape: Sequence[int], after: int = 0) -> Tensor | None:
        """For the last parameterised layer of a block whose head has patches (``patches=P``), when every layer between
        it and the head keeps the head's cells apart: the replica each element of its output (or of the output of the
        ``after``-th layer after it; of ``shape``, ``(B, C, H, W)``) reaches alone, a ``(C, H, W)`` int64 tensor (on
        the CPU) of indices into ``JvpResult.patch_derivs``' last two axes flattened (:meth:`Head.cells`), −1 for an
        element that reaches no loss. Each layer takes patch membership back through itself (``Layer.cells_after``,
        ``Layer.cells_before``): a ReLU keeps it, a max-pool whose windows do not overlap gives an input position its
        window's output's cell (an input row or column that no window covers, −1), and a :class:`GroupNorm` gives
        every element of a group (within a cell of its ``bands``) the one cell its outputs reach (its statistics join
        them). ``None`` when an element would reach two replicas (say a GroupNorm over a whole map, whose mean mixes
        the patches: then the block's layers take the group's or the block's derivative, :meth:`output_groups`), and
        for any other layer."""
        for names, head in self._blocks:
            if head is None or name not in names:
                continue
            module = getattr(self, head)
            if module.patches == 1 or not isinstance(getattr(self, name), Conv2d) or len(shape) != 4:
                return None
            layers = [getattr(self, n) for n in names[names.index(name) + after:]]
            shapes = [tuple(shape[1:])]  # each layer's output, per example
            for layer in layers[1:]:
                shapes.append(layer.cells_after(shapes[-1]))
                if shapes[-1] is None:
                    return None
            cell = torch.full(shapes[-1], -1, dtype=torch.long)
            for index, part in enumerate(module.cells(shapes[-1])):
                cell[part] = index
            for layer, layer_shape in zip(reversed(layers[1:]), reversed(shapes[:-1])):
                cell = layer.cells_before(cell, layer_shape)
                if cell is None:
                    return None
            return cell
        return None

    def primal_calls(self, x: Tensor) -> Iterator[tuple[str, Layer, Tensor, Tensor]]:
        """The primal pass of the network's own layers again, yielding each call of a layer with parameters as ``(name,
        layer, input, output)`` before it goes on from ``output``: what a one-layer weight step needs, recomputed
        instead of kept (activity perturbation's). Only the current call's input and output are alive; the caller may
        update the layer's parameters before asking for the next call, since its output is already computed."""
        for name, layer in self.named_layers():
            if layer.has_parameters:
                output = layer(x)
                yield name, layer, x, output
                x = output
            else:
                x = layer(x)

    def _after(self, name: str) -> tuple[list[Layer], list[Layer]]:
        """The parameter-free layers right after body layer ``name``: its normalisations (``GroupNorm``, per example),
        then the ReLU and max-pool layers that follow them (up to and including the first max-pool)."""
        layers = [layer for _, layer in self.named_layers()]
        after = layers[self._layer_names.index(name) + 1:] if name in self._layer_names else []
        norms = list(itertools.takewhile(lambda layer: isinstance(layer, GroupNorm), after))
        masking = []
        for layer in after[len(norms):]:
            if not isinstance(layer, (ReLU, MaxPool2d, AddSkip)):
                break
            masking.append(layer)
            if isinstance(layer, MaxPool2d):  # a zero past it would have to be mapped back through its windows
                break
        return norms, masking

    def activity_norms(self, name: str) -> list[Layer]:
        """The per-example normalisations right after layer ``name`` (``norm=True``): activity perturbation adds its
        tangent to their output, where the ReLU that follows masks it, and takes its estimate back through their VJP
        (Ren et al. 2023 perturb after the normalisation, and their code differentiates through it)."""
        return self._after(name)[0]

    def activity_past(self, name: str) -> list[Layer]:
        """The ReLUs and the max-pool right after layer ``name``'s normalisations when the pool's windows tile its input
        (:attr:`MaxPool2d.tiles`), else none: activity perturbation with the mask may draw its tangent past them, at the
        pool's output, where it is what the tangent drawn at the site comes out as there (one independent draw per
        window, at the position the window picks, zero where the ReLU is off), for a quarter of the draws of a 2×2
        pool and no tangent through the ReLU's and the pool's JVPs. Its estimate goes back by the pool's VJP at the
        pass's picks."""
        masking = self._after(name)[1]
        if (masking and isinstance(masking[-1], MaxPool2d) and masking[-1].tiles
                and all(isinstance(layer, ReLU) for layer in masking[:-1])):
            return masking
        return []

    def activity_mask(self, name: str, site: Tensor) -> Tensor | None:
        """Where the loss's derivative with respect to ``site`` (layer ``name``'s output, past its normalisations:
        the point that activity perturbation perturbs) can be non-zero, as far as the layers right after show: off
        where the following ReLU is off, and, where a max-pool follows, off at every position that is not the one
        its window takes (the indices its own JVP and VJP use). ``None`` when no ReLU or max-pool follows. Every path
        from ``site`` to any loss (the heads' included) goes through these layers, so the derivative is exactly zero
        wherever the mask is."""
        mask, x = None, site
        for layer in self._after(name)[1]:
            if isinstance(layer, AddSkip):  # the residual's sum: where the ReLU after it is off moves
                x = layer(x)
                continue
            if isinstance(layer, ReLU):
                keep, x = x > 0, x.clamp(min=0)
            else:
                keep = picked(x.shape, layer._pool_with_indices(x)[1])
            mask = keep if mask is None else mask.logical_and_(keep)
        return mask

    def activity_mask_in_site(self, name: str) -> bool:
        """Whether one in-place ReLU is all that masks layer ``name``'s activity site: the pass then leaves the site
        holding the ReLU's output, the next layer's input (kept for its weight step anyway), which is zero exactly
        where the site's mask is (``relu(s) > 0`` exactly where ``s > 0``), so the mask need not be kept beside it."""
        masking = self._after(name)[1]
        return len(masking) == 1 and isinstance(masking[0], ReLU) and masking[0].inplace

    @staticmethod
    def layer_grads(name: str, layer: Layer, layer_input: Tensor, d_output: Tensor) -> dict[str, Tensor]:
        """One layer's parameter gradients for the output gradient ``d_output``, from its hand-written VJP and its
        input: a one-layer local step, not a backward pass through the network."""
        return layer.vjp(layer_input, d_output, need_input_grad=False)[1]  # Linear and Conv2d save their input

    @staticmethod
    def fully_connected(layer: Layer) -> bool:
        """Whether ``layer``'s weight multiplies its input's last axis (``y = x Wᵀ + b``): input-generated directions
        (Section III-D) apply to it."""
        return isinstance(layer, Linear)

    @staticmethod
    def logits_grad(logits: Tensor, labels: Tensor) -> Tensor:
        """∂L/∂logits of the network's loss, ``(B, C)``."""
        return cross_entropy_and_grad(logits, labels)[1]

    @property
    def num_classes(self) -> int:
        """Width of the logits: the output size of the last layer with parameters."""
        last = [layer for _, layer in self.named_layers() if isinstance(layer, (Linear, Conv2d))][-1]
        return last.out_features if isinstance(last, Linear) else last.out_channels

    def _first_layer(self) -> Layer:
        return getattr(self, self._layer_names[0])

    def _check_input(self, x: Tensor, labels: Tensor | None = None) -> None:
        sample_shape = tuple(x.shape[1:])
        flat_ok = isinstance(self._first_layer(), Flatten) and math.prod(sample_shape) == math.prod(self.input_shape)
        if x.dim() < 2 or not (sample_shape == self.input_shape or flat_ok):
            expected = f"(B, {', '.join(map(str, self.input_shape))})"
            if isinstance(self._first_layer(), Flatten):
                expected += f" or any (B, ...) with {math.prod(self.input_shape)} elements per sample"
            raise ValueError(f"expected input of shape {expected}, got {tuple(x.shape)}")
        if labels is not None and (labels.shape != x.shape[:1] or labels.dtype != torch.long):
            raise ValueError(
                f"expected int64 labels of shape ({x.shape[0]},), got {labels.dtype} of shape {tuple(labels.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, C)``."""
        self._check_input(x)
        for _, layer in self.named_layers():
            x = layer(x)
        return x

    def logits_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The network's loss of given logits: mean softmax cross-entropy."""
        return cross_entropy(logits, labels)

    def loss(self, x: Tensor, labels: Tensor) -> Tensor:
        return cross_entropy(self(x), labels)

    @staticmethod
    def _backward(layers: Sequence[tuple[str, Layer]], saved: list, d_out: Tensor, grads: Grads,
                  need_input_grad: bool) -> Tensor | None:
        """VJPs through ``layers`` in reverse, popping ``saved``; parameter gradients go into ``grads`` by full name.
        The input gradient is computed only where a parameterised layer below still needs it."""
        first_param = next((i for i, (_, layer) in enumerate(layers) if layer.has_parameters), len(layers))
        stop = 0 if need_input_grad else first_param
        for index in range(len(layers) - 1, stop - 1, -1):
            name, layer = layers[index]
            d_out, layer_grads = layer.vjp(saved.pop(), d_out, need_input_grad=need_input_grad or index > first_param)
            for param, grad in layer_grads.items():
                grads[f"{name}.{param}"] = grad
        return d_out if need_input_grad else None

    @staticmethod
    def _primal(layers: Sequence[tuple[str, Layer]], x: Tensor) -> tuple[Tensor, list]:
        saved = []
        for _, layer in layers:
            x, layer_saved = layer.primal(x)
            saved.append(layer_saved)
        return x, saved

    def loss_and_grad(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Grads]:
        """Backprop with the layers' hand-written VJPs: ``(loss, logits, {param name: exact gradient})``, for the
        parameters the network's loss depends on (the heads of local losses are not among them)."""
        self._check_input(x, labels)
        layers = list(self.named_layers())
        logits, saved = self._primal(layers, x)
        loss, d_out = cross_entropy_and_grad(logits, labels)
        grads: Grads = {}
        self._backward(layers, saved, d_out, grads, need_input_grad=False)
        return loss, logits, {name: grads[name] for name, _ in self.named_parameters() if name in grads}

    def local_loss_and_grad(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Grads, list[Tensor]]:
        """Backprop of each block's local loss through that block and its head only (Ren et al.'s LG-BP), one block's
        activations alive at a time: ``(loss, logits, {param name: gradient of its block's loss}, local losses)``.
        ``loss`` and ``logits`` are the network's (the last block's)."""
        self._check_input(x, labels)
        grads: Grads = {}
        losses = []
        h = x
        for names, head in self._blocks:
            block = [(name, getattr(self, name)) for name in names]
            h, saved = self._primal(block, h)
            if head is None:
                block_loss, d_h = cross_entropy_and_grad(h, labels)
            else:
                head_layers = self.head_layers(head)
                head_logits, head_saved = self._primal(head_layers, h)
                block_loss, d_logits = cross_entropy_and_grad(head_logits, labels)
                d_h = self._backward(head_layers, head_saved, d_logits, grads, need_input_grad=True)
            self._backward(block, saved, d_h, grads, need_input_grad=False)
            losses.append(block_loss)
        return losses[-1], h, {name: grads[name] for name, _ in self.named_parameters()}, losses

    def widest_activation(self, sample_shape: Sequence[int]) -> int:
        """Most elements per sample of any layer's input or output (from a one-sample primal pass, cached)."""
        key = tuple(sample_shape)
        if key not in self._widest:
            param = next(self.parameters())
            x = torch.zeros(1, *key, device=param.device, dtype=param.dtype)
            widest = x.numel()
            for _, layer in self.named_layers():
                x = layer(x)
                widest = max(widest, x.numel())
            self._widest[key] = widest
        return self._widest[key]

    def directions_per_pass(self, x: Tensor, num_dirs: int) -> int:
        """How many of ``num_dirs`` directions one forward-mode pass over ``x`` carries within ``tangent_memory_mb``."""
        if self.tangent_memory_mb is None:
            return num_dirs
        per_direction = x.shape[0] * self.widest_activation(x.shape[1:]) * x.element_size()
        return max(1, min(num_dirs, int(self.tangent_memory_mb * 2**20 // per_direction)))

    def jvp(self, x: Tensor, labels: Tensor, tangents: TangentSource | TangentFn, objective: str = "loss",
            reduction: str = "batch") -> JvpResult:
        """Forward mode, the one primitive: the loss and its K directional derivatives along what ``tangents`` (a
        :class:`~fg_lightning.engine.tangents.TangentSource`, or a ``tangent_fn(name, layer, layer_input)``) gives.

        The source is asked for each parameterised layer's weight tangents once, in order, as the pass reaches it
        (and, for activity perturbation, for a tangent on each such layer's output). What the pass differentiates is
        asked of it, not of the source: ``objective="loss"``, the network's loss (the heads take no part), or
        ``"local"`` (a network with heads), the local losses: the tangent stops at each block boundary and each
        block's head is evaluated with its own tangents, ``block_derivs[i]`` holding the derivatives of block ``i``'s
        local loss; ``reduction="batch"``, the derivatives ``(K,)`` of the mean loss, or ``"example"``, ``(K, B)``:
        each example's term of it.

        Only the current layer's primal and tangent are alive at any time (besides the input ``x``, which the caller
        holds anyway and later chunks reuse). All K directions go through one primal pass, unless their widest
        tangent would exceed ``tangent_memory_mb``: then the directions are carried in chunks, one primal pass each
        (the source is still asked once per layer, in the first pass, so the directions and the result are those of
        a single pass).
        """
        self._check_input(x, labels)
        check_objective(objective, reduction)
        if objective == "local" and not self.has_local_losses:
            raise ValueError("objective='local' (the tangent stops at block boundaries) needs a network with "
                             "local-loss heads")
        return _ForwardPass(self, x, labels, as_source(tangents), objective == "local", reduction == "example").run()


class _TangentFlow:
    """The tangents of one :meth:`Network.jvp` through the layers: the source's, asked in the first pass and kept for
    later chunks of directions (one primal pass per chunk, usually one), and the activity tangents added where the
    source says."""

    def __init__(self, network: Network, x: Tensor, source: TangentSource) -> None:
        self.network, self.x, self.source = network, x, source
        self.activity_source = source if isinstance(source, ActivitySource) else None  # perturbs the outputs too
        self.tangents: dict[str, Tangent] = {}  # full parameter name -> all K directions
        self.activities: dict[str, Tensor] = {}  # full layer name -> all K activity tangents, when in chunks
        self.num_dirs: int | None = None
        self.chunk = 1  # directions per pass, decided once K is known
        self.start = 0  # the first direction of this pass
        self.stream_layer: str | None = None  # the block's layer whose activity tangent may stream into its head
        self.streamed: StreamedTangent | None = None  # that tangent, once the source gave it

    def check_dirs(self, what: str, shape: tuple[int, ...], expected_rest: tuple[int, ...]) -> None:
        if shape[1:] != expected_rest or (self.num_dirs is not None and shape[0] != self.num_dirs):
            k = "" if self.num_dirs is None else f"={self.num_dirs}"
            raise ValueError(f"{what} has shape {shape}, expected (K{k}, {', '.join(map(str, expected_rest))})")
        if self.num_dirs is None:  # the first tangent fixes K and so the directions per pass
            self.num_dirs, self.chunk = shape[0], self.network.directions_per_pass(self.x, shape[0])

    def part(self, tangent: Tangent) -> Tangent:
        """This pass's directions of a tangent (all of them in a single pass)."""
        return tangent if self.chunk >= self.num_dirs else directions(tangent, self.start, self.start + self.chunk)

    def layer_tangents(self, name: str, layer: Layer, layer_input: Tensor) -> dict[str, Tangent]:
        """This pass's directions of the layer's tangents. The source is asked once per layer, in the first pass, and
        its tangents kept for later chunks and the result; a :class:`ReplayedSource` is asked in every pass and nothing
        is kept, so only this layer's tangents are alive."""
        params = dict(layer.named_parameters(recurse=False))
        replay = isinstance(self.source, ReplayedSource)
        given: dict[str, Tangent] = {}
        if self.start == 0 or replay:
            for param, tangent in self.source.weights(name, layer, layer_input, params).items():
                full_name = f"{name}.{param}"
                if param not in params:
                    raise ValueError(f"the tangent source gave a tangent for {full_name!r}, which is not a parameter")
                self.check_dirs(f"tangent for {full_name!r}", tuple(tangent.shape), tuple(params[param].shape))
                given[param] = tangent
        if not replay:
            self.tangents.update({f"{name}.{param}": tangent for param, tangent in given.items()})
            given = {param: self.tangents[f"{name}.{param}"] for param in params if f"{name}.{param}" in self.tangents}
        return {param: self.part(tangent) for param, tangent in given.items()}

    def through(self, layers: Sequence[tuple[str, Layer]], carry: list) -> list:
        """``carry = [primal, tangent]`` through ``layers``. Both are popped before each layer's JVP so that only the
        layer holds them (see the ownership note in engine.layers). A parameterised layer's activity tangent is added
        to its output, or as many layers past it as the source's ``activity_site(name)`` says (past the
        normalisations that follow it, and the ReLU and max-pool after those)."""
        pending = None  # (name, layer, its input, its output, whether to ask): its activity tangent is still to come
        left = norms = 0  # layers to its activity site, to its normalisations' output
        site = saved = None  # the normalisations' output, where the site is past it; the last layer's primal state
        norm_states: list = []  # the normalisations' primal states, where no tangent went through them
        for name, layer in layers:
            if not layer.has_parameters:
                if left == 1 and norms < 1 and carry[1] is None and pending is not None and pending[-1]:
                    carry[0], saved = layer.primal(carry[0])  # the site's layer past the norms: what its VJP needs
                elif norms > 0 and carry[1] is None and pending is not None and pending[-1]:
                    carry[0], state = layer.primal(carry[0])  # a normalisation: what its VJP needs, for the source
                    norm_states.append(state)
                else:
                    carry = list(layer.jvp(carry.pop(0), carry.pop(0), {}))
                left, norms = left - 1, norms - 1
            else:
                chosen = self.layer_tangents(name, layer, carry[0])
                ask = self.activity_source is not None and self.start == 0
                layer_input = carry[0] if ask else None
                carry = list(layer.jvp(carry.pop(0), carry.pop(0), chosen))
                left = self.activity_source.activity_site(name) if self.activity_source is not None else 0
                norms = len(self.network.activity_norms(name)) if left else 0
                pending = (name, layer, layer_input, carry[0] if ask and norms else None, ask)
                layer_input, norm_states = None, []
            if pending is not None and norms == 0 and left > 0 and pending[-1]:
                site = carry[0]
            if pending is not None and left <= 0:
                self.add_activity(carry, *pending, site=site, saved=saved, norm_states=norm_states)
                pending = site = saved = None
                norm_states = []
        if pending is not None:
            raise RuntimeError(f"the layers given end inside {pending[0]!r}'s normalisations")
        return carry

    def block(self, layers: Sequence[tuple[str, Layer]], carry: list, headed: bool,
              ) -> tuple[list, tuple[StreamedTangent, Sequence[tuple[str, Layer]], list] | None]:
        """``carry`` through a block's ``layers``, and the activity tangent left undrawn for the block's head, if any:
        ``(tangent, the elementwise layers from its site to the block's output, their primal states)``. It is the
        block's last parameterised layer's, where the block has a head, the source streams (:class:`StreamedSource`),
        only elementwise layers follow its site, no tangent precedes it in the block and one pass carries every
        direction."""
        last = max((i for i, (_, layer) in enumerate(layers) if layer.has_parameters), default=None)
        cut = len(layers)
        if headed and isinstance(self.source, StreamedSource) and not self.start and last is not None:
            cut = last + 1 + self.source.activity_site(layers[last][0])
            if cut > len(layers) or not all(layer.elementwise for _, layer in layers[cut:]):
                cut = len(layers)
            else:
                self.stream_layer = layers[last][0]
        carry = self.through(layers[:cut], carry)
        streamed, self.streamed, self.stream_layer = self.streamed, None, None
        if streamed is None:
            return self.through(layers[cut:], carry), None
        carry[0], saved = self.network._primal(layers[cut:], carry[0])  # the layers after the undrawn tangent's site
        return carry, (streamed, layers[cut:], saved)

    def add_activity(self, carry: list, name: str, layer: Layer, layer_input: Tensor | None,
                     layer_output: Tensor | None, ask: bool, site: Tensor | None = None, saved: Any = None,
                     norm_states: list | None = None) -> None:
        """Adds layer ``name``'s activity tangent (asked of the source in the first pass, kept for later chunks) to
        ``carry``'s tangent; ``carry``'s primal is where it goes (the layer's output, or past its normalisations,
        whose input ``layer_output`` then is, or past the layers after them, the normalisations' output ``site``, the
        last of those layers' primal state ``saved`` where no tangent went through it, and the normalisations' own,
        ``norm_states``, where none went through those). Where it is all the tangent the block's head will see and
        one pass carries every direction, it is kept undrawn for the head (``self.streamed``)."""
        activity, source = None, self.activity_source
        if ask:
            extra = {} if layer_output is None else {"layer_output": layer_output}
            if site is not None:
                extra.update(site=site, saved=saved)
            if norm_states:
                extra.update(norm_states=norm_states)
            if carry[1] is not None and self.chunk >= self.num_dirs:  # one pass carries every direction: the
                # source adds its own into the output's tangent
                carry[1] = source.add_activity(name, layer, layer_input, carry[0], carry[1], **extra)
                return
            if carry[1] is None and name == self.stream_layer:
                streamed = source.stream_activity(name, layer, layer_input, carry[0], **extra)
                if streamed is not None:
                    self.check_dirs(f"activity tangent of {name!r}", (streamed.num_dirs, *carry[0].shape),
                                    tuple(carry[0].shape))
                    if self.chunk >= self.num_dirs:
                        self.streamed = streamed
                        return
                    activity = streamed.dense()
            else:
                activity = source.activity(name, layer, layer_input, carry[0], **extra)
            if activity is not None:
                self.check_dirs(f"activity tangent of {name!r}", tuple(activity.shape), tuple(carry[0].shape))
                if self.chunk < self.num_dirs:  # kept for the later chunks' passes only
                    self.activities[name] = activity
                else:  # the output's tangent now: the pass owns what the source returns
                    carry[1] = activity
                    return
        activity = self.part(self.activities[name]) if name in self.activities else activity
        if activity is not None:
            carry[1] = activity.clone() if carry[1] is None else carry[1].add_(activity)


class _ForwardPass:
    """One :meth:`Network.jvp`: the objective asked (the network's loss or its local losses, each example's or the
    batch's) of the tangents that flow through the layers (:class:`_TangentFlow`)."""

    def __init__(self, network: Network, x: Tensor, labels: Tensor, source: TangentSource, local: bool,
                 per_example: bool) -> None:
        self.network, self.x, self.labels, self.source = network, x, labels, source
        self.local, self.per_example = local, per_example  # the objective and the reduction asked of the pass
        self.flow = _TangentFlow(network, x, source)

    def loss_jvp(self, logits: Tensor, d_logits: Tensor | None) -> tuple[Tensor, Tensor]:
        per_example = self.per_example
        if d_logits is None:  # this pass's directions: the last pass of several may have fewer than a chunk
            flow = self.flow
            dirs = flow.chunk if flow.num_dirs is None else min(flow.chunk, flow.num_dirs - flow.start)
            shape = (dirs, *logits.shape[:1]) if per_example else (dirs,)
            return cross_entropy(logits, self.labels), logits.new_zeros(shape)
        return cross_entropy_jvp(logits, self.labels, d_logits, per_example=per_example)

    def head_jvp(self, head: str, h: Tensor, d_h: Tensor | None,
                 streamed: tuple[StreamedTangent, Sequence[tuple[str, Layer]], list] | None = None,
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """A block's local loss, the tangent stopping at its output ``h``: ``(derivatives of the loss, those of each
        group's replica (..., G), those of each group and patch's replica (..., G, P²))``. Replica ``g`` sees the
        head's own parameter tangents (asked of the source here) and the tangent ``d_h`` on group ``g``'s channels
        only, replica ``(g, p)`` on those channels in patch ``p`` only; the loss sees them once and all of ``d_h``.

        The part of ``d_h`` is ``∂L/∂h · d_h`` summed over each cell, ``∂L/∂h`` (each example's, ``(B, C, ...)``)
        from the head's VJP: one step back through the small head instead of G·P² forward passes through it of a
        tangent as large as the block's output. ``streamed``: ``d_h`` undrawn, ``(tangent, the elementwise layers from
        its site to h, their primal states)``: ``∂L/∂h`` goes back through those layers to the site, where the tangent
        forms the cell sums a chunk at a time (exact: their Jacobian is diagonal)."""
        network = self.network
        layers = network.head_layers(head)
        module = getattr(network, head)
        groups = module.group_slices(h.shape[1])
        cells = module.cells(h.shape[1:]) if module.patches > 1 else [(part,) for part in groups]
        if len(cells) == 1 and streamed is None:  # one replica, the loss itself: one JVP through the head carries
            # d_h and its own tangents
            derivs = self.loss_jvp(*self.flow.through(layers, [h, d_h]))[1]
            return derivs, derivs[..., None], derivs[..., None, None]
        # a streamed tangent is drawn before the head's own tangents, as a tangent through the layers would be
        masked = None if streamed is None else self.streamed_cells(head, h, *streamed)
        logits, d_own = self.flow.through(layers, [h, None])  # the head's primal and its parameters' tangents
        own = self.loss_jvp(logits, d_own)[1]
        del d_own
        if masked is None and d_h is None:
            masked = own.new_zeros(*own.shape, len(cells))
        elif masked is None:
            masked = module.cell_sums(d_h.mul_(self.head_grad(layers, h, logits)), per_example=self.per_example)
        del logits
        masked = masked.view(*own.shape, len(groups), len(cells) // len(groups))
        grouped = masked.sum(-1)
        return own + grouped.sum(-1), grouped.add_(own[..., None]), masked.add_(own[..., None, None])

    def head_grad(self, layers: Sequence[tuple[str, Layer]], h: Tensor, logits: Tensor | None = None) -> Tensor:
        """``∂L/∂h`` of a head's loss (each example's), by the head's VJP."""
        network = self.network
        logits, saved = network._primal(layers, h) if logits is None else (logits, network._primal(layers, h)[1])
        return network._backward(layers, saved, network.logits_grad(logits, self.labels), {}, need_input_grad=True)

    def streamed_cells(self, head: str, h: Tensor, tangent: StreamedTangent, rest: Sequence[tuple[str, Layer]],
                       rest_saved: list) -> Tensor:
        """The cell sums of ``∂L/∂h · d_h`` for an undrawn ``d_h``: ``∂L/∂h`` back through the elementwise layers
        ``rest`` (from the tangent's site to ``h``; their primal states ``rest_saved``) to the site, where the tangent
        forms them a chunk at a time."""
        module = getattr(self.network, head)
        grad_h = self.head_grad(self.network.head_layers(head), h)
        grad_site = self.network._backward(rest, rest_saved, grad_h, {}, need_input_grad=True)
        del grad_h, rest_saved
        masked = tangent.cell_dots(grad_site, lambda t: module.cell_sums(t, per_example=True))
        return masked if self.per_example else masked.sum(1)

    def one_pass(self, block_derivs: list[list[Tensor]], group_derivs: list[list[Tensor]],
                 patch_derivs: list[list[Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """One primal pass with this chunk's directions: ``(loss, logits, derivatives)``; each head's local-loss
        derivatives are appended to ``block_derivs``, its groups' to ``group_derivs``, its cells' to
        ``patch_derivs``."""
        network = self.network
        blocks = network._blocks if self.local else [(network._layer_names, None)]
        carry: list = [self.x, None]  # (primal, tangent), held only here so a layer can release them early
        for index, (names, head) in enumerate(blocks):
            carry, streamed = self.flow.block([(name, getattr(network, name)) for name in names], carry,
                                              head is not None)
            if head is not None:  # the block's local loss; the tangent stops here
                derivs, groups, cells = self.head_jvp(head, carry[0], carry.pop(1), streamed)
                carry.append(None)
                streamed = None
                if self.flow.chunk >= self.flow.num_dirs:  # every direction in this pass: the block's derivatives
                    # are known (the cells' only where the head has patches: a source written before them is called
                    # as before)
                    self.source.block_done(index, derivs, groups, **({"patch_derivs": cells} if cells.shape[-1] > 1
                                                                     else {}))
                block_derivs[index].append(derivs)
                group_derivs[index].append(groups)
                patch_derivs[index].append(cells)
                del derivs, groups, cells
        if self.flow.num_dirs is None:
            raise ValueError("the tangent source gave no tangent for any parameter: there is no direction to "
                             "differentiate along")
        logits, d_logits = carry
        del carry
        loss, derivs = self.loss_jvp(logits, d_logits)
        block_derivs[-1].append(derivs)
        group_derivs[-1].append(derivs.unsqueeze(-1))
        patch_derivs[-1].append(derivs[..., None, None])
        return loss, logits, derivs

    def run(self) -> JvpResult:
        loss = logits = None
        dir_derivs: list[Tensor] = []
        block_derivs: list[list[Tensor]] = [[] for _ in self.network._blocks]
        group_derivs: list[list[Tensor]] = [[] for _ in self.network._blocks]
        patch_derivs: list[list[Tensor]] = [[] for _ in self.network._blocks]
        while True:  # one pass per chunk of directions; usually a single pass
            pass_loss, pass_logits, derivs = self.one_pass(block_derivs, group_derivs, patch_derivs)
            if loss is None:
                loss, logits = pass_loss, pass_logits
            del pass_logits
            dir_derivs.append(derivs)
            flow = self.flow
            flow.start += flow.chunk
            if flow.start >= flow.num_dirs:
                break
        local = self.local
        return JvpResult(loss=loss, logits=logits, dir_derivs=torch.cat(dir_derivs), tangents=flow.tangents,
                         block_derivs=[torch.cat(d) for d in block_derivs] if local else None,
                         group_derivs=[torch.cat(d) for d in group_derivs] if local else None,
                         patch_derivs=[torch.cat(d) for d in patch_derivs] if local else None)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _block_ends(hidden_layers: int, block_size: int | None, local_losses: bool, groups: int,
                default: Sequence[int]) -> list[int]:
    """Which of the hidden layers (numbered from 1) end a block with a head: ``default`` (the factory's own cut), or
    every ``block_size``-th; none without ``local_losses``."""
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got block_size={block_size!r}")
    if not local_losses and (block_size is not None or groups != 1):
        raise ValueError(f"block_size={block_size!r} and groups={groups!r} cut the network into local-loss blocks: "
                         "they need local_losses=True")
    if not local_losses:
        return []
    return list(default) if block_size is None else list(range(block_size, hidden_layers + 1, block_size))


def _norm(index: int, width: int, norm: bool, groups: int,
          bands: Sequence[int] | None = None) -> list[tuple[str, Layer]]:
    """``norm{index}``, a :class:`GroupNorm` over the network's groups of a hidden layer's ``width`` channels (within
    each cell of ``bands``' grid, given), when ``norm``; nothing otherwise."""
    if not isinstance(norm, bool):
        raise ValueError(f"norm must be True or False, got norm={norm!r}")
    return [(f"norm{index}", GroupNorm(groups, width, bands=None if bands is None else tuple(bands)))] if norm else []


class MLP(Network):
    """The paper's MLP (Section IV): 784-1024-1024-10 with ReLU after each hidden layer.

    Layers ``flatten, fc1, relu1, fc2, relu2, …, fc{n}``; PyTorch's default initialisation, drawn from the global
    RNG or, with ``seed``, from a private one (the global RNG is left untouched).

    ``local_losses=True`` (Ren et al. 2023) puts a linear classifier head (``head{i}.fc``) on each hidden block's
    output (after ``relu{i}``); the network's own layers are initialised as without heads. ``block_size`` n puts one
    after every n-th hidden layer only (default 1: every hidden layer); ``groups`` replicates each head's loss over
    that many groups of its input features (see :class:`Network`). ``norm=True`` puts a :class:`GroupNorm`
    (``norm{i}``, over the ``groups`` groups) between each hidden layer and its ReLU, as Ren et al. normalise inside
    each block; it has no parameters. ``patches`` (a CNN switch) is refused.
    """

    def __init__(
        self, in_features: int = 784, hidden: Sequence[int] = (1024, 1024), num_classes: int = 10, seed: int | None = None,
        tangent_memory_mb: float | None = 256.0, local_losses: bool = False, block_size: int | None = None,
        groups: int = 1, norm: bool = False, patches: int = 1,
    ) -> None:
        if patches != 1:
            raise ValueError(f"patches={patches!r} cuts a feature map's positions into patch-wise losses: the MLP has "
                             "no positions (a CNN switch)")
        sizes = [in_features, *hidden, num_classes]
        if any(size < 1 for size in sizes):
            raise ValueError(
                f"MLP needs positive sizes, got in_features={in_features}, hidden={tuple(hidden)}, num_classes={num_classes}"
            )
        ends = _block_ends(len(hidden), block_size, local_losses, groups, default=range(1, len(hidden) + 1))
        layers: list[tuple[str, Layer]] = [("flatten", Flatten())]
        with _seeded(seed):
            for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
                layers.append((f"fc{index}", Linear(fan_in, fan_out)))
                if index < len(sizes) - 1:
                    layers += [*_norm(index, fan_out, norm, groups), (f"relu{index}", ReLU(inplace=True))]
            # drawn after the network's own layers, so that they are initialised as without heads
            heads = {f"relu{i}": [("fc", Linear(width, num_classes))] for i, width in enumerate(hidden, start=1)}
        super().__init__(layers, input_shape=(in_features,), tangent_memory_mb=tangent_memory_mb,
                         heads={f"relu{i}": heads[f"relu{i}"] for i in ends}, groups=groups)


class CNN(Network):
    """The paper's CNN (Section IV): three ``kernel_size``×``kernel_size`` convolutions, each followed by ReLU and
    2×2 max-pooling, then two fully connected layers (``hidden`` units with ReLU, then ``num_classes``).

    The paper gives no channel counts, padding or hidden width; the defaults (32, 64, 64 channels, padding 1,
    128 hidden units) are this project's choice. On 28×28 inputs the feature maps are 28→14→7→3.
    Layers ``conv1, relu1, pool1, …, conv3, relu3, pool3, flatten, fc1, relu4, fc2``.

    ``local_losses=True`` (Ren et al. 2023) puts a head (``head{i}.pool``, a spatial average, then ``head{i}.fc``, a
    linear classifier) on each conv block's output (after ``pool{i}``); the last block is ``flatten … fc2``.
    ``block_size`` n instead puts a head after every n-th parameterised hidden layer, ``fc1`` counted (a linear
    head after ``relu{len(channels) + 1}``): ``block_size=1`` gives every hidden layer its own block. ``groups``
    replicates each head's loss over that many groups of its input channels (see :class:`Network`). ``norm=True``
    puts a :class:`GroupNorm` (``norm{i}``, over the ``groups`` groups of channels and their positions) between each
    hidden layer and its ReLU.

    ``patches=P`` (Ren et al. 2023, Sec. 4, patch-wise losses) cuts each conv block's head input (its pooled map)
    into a P×P grid of patches (``torch.tensor_split`` bands of rows and of columns) and replicates the head's loss
    over the G·P² cells of groups and patches (see :class:`Network`), so that an activity tangent at one position
    reaches only its own patch's replica. A conv output position belongs to the patch of the pooled position its
    2×2 window gives (the last row and column of an odd map, which no window covers, reach no loss). With ``norm``,
    each conv stage's GroupNorm takes its statistics within each cell (its bands: the pooled grid's, doubled, the
    uncovered row and column joining the last band), as Ren et al. normalise each token on its own; a norm over the
    whole map would join the patches. P must be at most the smallest pooled map's size (3 on 28×28 inputs), and
    needs a block that ends at a conv stage.

    ``head_pool=S`` makes each conv block's head average its input over an S×S grid of regions
    (:class:`AdaptiveAvgPool2d`, then ``head{i}.flatten``) before its linear classifier, instead of over the whole map:
    the local loss then rewards features that say where as well as what (a stronger local objective, as the auxiliary
    heads of Belilovsky et al. 2020 pool to 2×2). S must be at most the smallest pooled map's size; it excludes
    ``patches``, whose replicas are cut from the global average.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        channels: Sequence[int] = (32, 64, 64),
        kernel_size: int = 3,
        padding: int = 1,
        hidden: int = 128,
        num_classes: int = 10,
        seed: int | None = None,
        tangent_memory_mb: float | None = 256.0,
        local_losses: bool = False,
        block_size: int | None = None,
        groups: int = 1,
        norm: bool = False,
        patches: int = 1,
        head_pool: int = 1,
    ) -> None:
        ends = _block_ends(len(channels) + 1, block_size, local_losses, groups, default=range(1, len(channels) + 1))
        if len(channels) < 1 or any(c < 1 for c in channels) or hidden < 1 or num_classes < 1:
            raise ValueError(
                f"CNN needs positive sizes, got channels={tuple(channels)}, hidden={hidden}, num_classes={num_classes}"
            )
        size, conv_sizes = image_size, []
        for _ in channels:
            conv_sizes.append(size + 2 * padding - kernel_size + 1)
            size = conv_sizes[-1] // 2
            if size < 1:
                raise ValueError(
                    f"image_size={image_size} is too small for {len(channels)} conv+pool stages "
                    f"with kernel_size={kernel_size}, padding={padding}"
                )
        _check_conv_heads(patches, head_pool, size, local_losses, block_size,
                          conv_blocks=any(end <= len(channels) for end in ends))

        def cell_bands(conv: int) -> list[int] | None:  # a conv output's bands: its pooled map's, doubled
            if patches == 1:
                return None
            pooled = [2 * band for band in bands(conv // 2, patches)]
            return [*pooled[:-1], pooled[-1] + conv % 2]
        layers: list[tuple[str, Layer]] = []
        with _seeded(seed):
            for index, (c_in, c_out) in enumerate(zip([in_channels, *channels[:-1]], channels), start=1):
                layers += [
                    (f"conv{index}", Conv2d(c_in, c_out, kernel_size, padding=padding)),
                    *_norm(index, c_out, norm, groups, cell_bands(conv_sizes[index - 1])),
                    (f"relu{index}", ReLU(inplace=True)),
                    (f"pool{index}", MaxPool2d(2)),
                ]
            layers += [
                ("flatten", Flatten()),
                ("fc1", Linear(channels[-1] * size * size, hidden)),
                *_norm(len(channels) + 1, hidden, norm, groups),
                (f"relu{len(channels) + 1}", ReLU(inplace=True)),
                ("fc2", Linear(hidden, num_classes)),
            ]
            heads = _conv_heads(channels, hidden, num_classes, head_pool, fc_head=len(channels) + 1 in ends)
        super().__init__(layers, input_shape=(in_channels, image_size, image_size), tangent_memory_mb=tangent_memory_mb,
                         heads=dict(heads[i] for i in ends), groups=groups, patches=patches)


def _check_conv_heads(patches: int, head_pool: int, size: int, local_losses: bool, block_size: int | None,
                      conv_blocks: bool) -> None:
    """The CNN's switches on its conv blocks' heads (``size``: the smallest pooled map's), refused in one line."""
    for switch, value, what in (("patches", patches, "replicates the local losses of the conv blocks' heads"),
                                ("head_pool", head_pool, "pools the input of the local-loss heads")):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= size:
            raise ValueError(f"{switch} must be an int from 1 to the smallest pooled map's size {size}, "
                             f"got {switch}={value!r}")
        if value > 1 and not local_losses:
            raise ValueError(f"{switch}={value} {what}: it needs local_losses=True")
    if head_pool > 1 and patches > 1:
        raise ValueError(f"patches={patches} replicates a head's loss over the patches of its global average; "
                         f"head_pool={head_pool} pools each map to a grid instead: choose one")
    if patches > 1 and not conv_blocks:
        raise ValueError(f"patches={patches} cuts a conv block's head input: no block ends at a conv stage "
                         f"(block_size={block_size!r})")


def _conv_heads(channels: Sequence[int], hidden: int, num_classes: int, head_pool: int,
                fc_head: bool) -> dict[int, tuple[str, list[tuple[str, Layer]]]]:
    """The CNN's candidate heads by block end (1, 2, … for the conv stages, ``len(channels) + 1`` for fc1 where
    ``fc_head``): ``(the layer they follow, their layers)``, drawn in that order."""
    heads = {i: (f"pool{i}", [("pool", GlobalAvgPool()), ("fc", Linear(c, num_classes))] if head_pool == 1
                 else [("pool", AdaptiveAvgPool2d(head_pool)), ("flatten", Flatten()),
                       ("fc", Linear(c * head_pool ** 2, num_classes))])
             for i, c in enumerate(channels, start=1)}
    last = len(channels) + 1
    if fc_head:  # drawn after the others, so that they are initialised as without it
        heads[last] = (f"relu{last}", [("fc", Linear(hidden, num_classes))])
    return heads


class Mixer(Network):
    """Ren et al.'s LocalMixer (ICLR 2023, Sec. 4 and their code): an MLP-Mixer built for local learning, on a
    ``(B, C, n, n)`` feature map of ``n × n`` tokens.

    - Block 1 embeds each ``patch_size``² patch of the image (``embed1``, a :class:`Conv2d` with that kernel and
      stride: one linear map per patch) and mixes its channels (``channel1``, a 1×1 convolution).
    - Block ``i ≥ 2`` mixes the tokens (``token{i}``, :class:`TokenMixing`: one linear map over the ``n²`` positions,
      shared by the channels; without a bias, which the norm after it would take away), then the channels twice
      (``channel{i}a``, ``channel{i}b``, 1×1 convolutions).
    - Every linear layer is followed by a per-token normalisation (``{layer}_norm``, a :class:`GroupNorm` over
      ``groups`` groups of channels, each token on its own: 1×1 cells), then a ReLU (``{layer}_relu``): Ren et al.'s
      ``post_linear_ln``, where their activity perturbation adds its noise (:meth:`Network.activity_norms`).
    - ``residual=True`` (Ren et al.'s block) makes block ``i ≥ 2`` add its input back before its last ReLU
      (``skip{i}``, a :class:`Skip` at its start, and ``skip{i}_add``, its :class:`AddSkip`). Under local losses the
      block's input carries no tangent, so there the sum adds a constant; backprop differentiates through it. It is
      off by default: on Fashion-MNIST at 5 epochs backprop trained better without it (test accuracy 0.872 at lr 0.3,
      against 0.865 at the better of 0.1 and 0.3 with it), local_activity with it (0.737 against 0.713;
      ``results/cpu/mixer-residual-5epochs``).
    - The classifier averages the last block's tokens (``pool``) and reads them out (``fc``).

    ``local_losses=True`` puts a head (``head{i}.pool``, ``head{i}.fc``: the same average and linear classifier) on
    each block's output, ``block_size`` n on every n-th only; ``groups`` replicates each head's loss over that many
    groups of channels (and normalises each group on its own), ``patches`` P over a P×P grid of the tokens (P = n: a
    replica per token, Ren et al.'s ``spatial_loss``); see :class:`Network`. ``head_pool=S`` instead makes each head
    average the tokens over an S×S grid of regions before its classifier (as ``CNN(head_pool=S)``). The last block is
    then ``pool, fc`` alone, trained on its own loss, as Ren et al. read the final classifier out of stopped
    features.

    Where this differs from Ren et al.: their channel mixing's second map is block-diagonal over the groups (a group
    linear), here it is a full 1×1 convolution; their head input is normalised once more (``inter_ln``) where here it
    is the block's output as it is (normalised before its ReLU).

    Defaults: 4×4 patches of a 28×28 image (7 × 7 = 49 tokens of 16 pixels), 128 channels, 3 blocks (about 0.1 M
    parameters; a step costs about the paper's CNN's, 4.7 M multiply-adds per example against its 5.7 M).
    """

    def __init__(
        self, in_channels: int = 1, image_size: int = 28, patch_size: int = 4, channels: int = 128, blocks: int = 3,
        num_classes: int = 10, seed: int | None = None, tangent_memory_mb: float | None = 256.0,
        local_losses: bool = False, block_size: int | None = None, groups: int = 1, patches: int = 1,
        head_pool: int = 1, residual: bool = False,
    ) -> None:
        if not isinstance(residual, bool):
            raise ValueError(f"residual must be True or False, got residual={residual!r}")
        if min(in_channels, patch_size, channels, blocks, num_classes) < 1 or image_size % max(patch_size, 1):
            raise ValueError(f"Mixer needs positive sizes and a patch_size dividing image_size, got "
                             f"in_channels={in_channels}, image_size={image_size}, patch_size={patch_size}, "
                             f"channels={channels}, blocks={blocks}, num_classes={num_classes}")
        ends = _block_ends(blocks, block_size, local_losses, groups, default=range(1, blocks + 1))
        side = image_size // patch_size
        for switch, value, what in (("patches", patches, "replicates the local losses of the blocks' heads"),
                                    ("head_pool", head_pool, "pools the input of the local-loss heads")):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= side:
                raise ValueError(f"{switch} must be an int from 1 to the tokens' side {side}, got {switch}={value!r}")
            if value > 1 and not local_losses:
                raise ValueError(f"{switch}={value} {what}: it needs local_losses=True")
        if head_pool > 1 and patches > 1:
            raise ValueError(f"patches={patches} replicates a head's loss over the tokens of its average; "
                             f"head_pool={head_pool} pools the tokens to a grid instead: choose one")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or channels % groups:
            raise ValueError(f"groups must be a positive int dividing channels={channels}, got groups={groups!r}")

        def stage(name: str, layer: Layer, width: int) -> list[tuple[str, Layer]]:
            return [(name, layer), (f"{name}_norm", GroupNorm(groups, width, bands=(1,) * side)),
                    (f"{name}_relu", ReLU(inplace=True))]
        layers: list[tuple[str, Layer]] = []
        with _seeded(seed):
            layers += stage("embed1", Conv2d(in_channels, channels, patch_size, stride=patch_size), channels)
            layers += stage("channel1", Conv2d(channels, channels, 1), channels)
            for index in range(2, blocks + 1):
                skip = Skip() if residual else None
                layers += [(f"skip{index}", skip)] if skip is not None else []
                # no bias: a token's bias is the same on all its channels, which the norm over them takes away
                layers += stage(f"token{index}", TokenMixing(side, side, bias=False), channels)
                layers += stage(f"channel{index}a", Conv2d(channels, channels, 1), channels)
                last = stage(f"channel{index}b", Conv2d(channels, channels, 1), channels)
                layers += last[:2] + ([(f"skip{index}_add", AddSkip(skip))] if skip is not None else []) + last[2:]
            layers += [("pool", GlobalAvgPool()), ("fc", Linear(channels, num_classes))]
            last = {index: f"channel{index}b_relu" if index > 1 else "channel1_relu" for index in ends}
            # drawn after the network's own layers, so that they are initialised as without heads
            heads = {last[index]: [("pool", GlobalAvgPool()), ("fc", Linear(channels, num_classes))] if head_pool == 1
                     else [("pool", AdaptiveAvgPool2d(head_pool)), ("flatten", Flatten()),
                           ("fc", Linear(channels * head_pool ** 2, num_classes))] for index in ends}
        super().__init__(layers, input_shape=(in_channels, image_size, image_size), tangent_memory_mb=tangent_memory_mb,
                         heads=heads, groups=groups, patches=patches)

"""``Network``: ordered layers plus mean softmax cross-entropy, and the paper's two networks (Section IV)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from fg_lightning.engine.layers import Conv2d, Flatten, Grads, Layer, Linear, MaxPool2d, ReLU
from fg_lightning.engine.loss import cross_entropy, cross_entropy_and_grad, cross_entropy_jvp
from fg_lightning.engine.tangents import Tangent, directions

TangentFn = Callable[[str, Layer, Tensor], Mapping[str, Tangent]]
"""``tangent_fn(name, layer, layer_input) -> {param: tangent (K, *param.shape)}`` for one parameterised layer."""


@dataclass
class JvpResult:
    """One forward-mode pass: the loss, the logits ``(B, C)``, ``dir_derivs (K,)`` = ``∇f·v_k`` for each of the
    K directions, and the tangents used, keyed by full parameter name (``"fc1.weight"``)."""

    loss: Tensor
    logits: Tensor
    dir_derivs: Tensor
    tangents: dict[str, Tangent]


class Network(nn.Module):
    """Layers applied in order, then mean softmax cross-entropy.

    Each layer is registered under its name, so ``f"{name}.{param}"`` are the keys of ``named_parameters()``.
    ``input_shape`` is the shape of one sample; a network whose first layer is :class:`Flatten` accepts any
    sample shape with that many elements (the MLP takes ``(B, 784)`` and ``(B, 1, 28, 28)``).

    ``tangent_memory_mb`` bounds the forward-mode pass: when K directions of the widest layer's tangent
    ``(K, B, ...)`` would take more than this, :meth:`jvp` carries them in chunks of directions, one primal pass per
    chunk, with the same result (``None``: always one pass).
    """

    def __init__(
        self, layers: Sequence[tuple[str, Layer]], input_shape: Sequence[int], tangent_memory_mb: float | None = 256.0
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
        self.input_shape = tuple(input_shape)
        self.tangent_memory_mb = tangent_memory_mb
        self._widest: dict[tuple[int, ...], int] = {}  # sample shape -> most elements of any layer's input or output

    def named_layers(self) -> Iterator[tuple[str, Layer]]:
        return self.named_children()  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """Width of the logits: the output size of the last layer with parameters."""
        last = [layer for layer in self.children() if isinstance(layer, (Linear, Conv2d))][-1]
        return last.out_features if isinstance(last, Linear) else last.out_channels

    def _check_input(self, x: Tensor, labels: Tensor | None = None) -> None:
        sample_shape = tuple(x.shape[1:])
        flat_ok = isinstance(next(iter(self.children())), Flatten) and math.prod(sample_shape) == math.prod(
            self.input_shape
        )
        if x.dim() < 2 or not (sample_shape == self.input_shape or flat_ok):
            expected = f"(B, {', '.join(map(str, self.input_shape))})"
            if isinstance(next(iter(self.children())), Flatten):
                expected += f" or any (B, ...) with {math.prod(self.input_shape)} elements per sample"
            raise ValueError(f"expected input of shape {expected}, got {tuple(x.shape)}")
        if labels is not None and (labels.shape != x.shape[:1] or labels.dtype != torch.long):
            raise ValueError(
                f"expected int64 labels of shape ({x.shape[0]},), got {labels.dtype} of shape {tuple(labels.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, C)``."""
        self._check_input(x)
        for layer in self.children():
            x = layer(x)
        return x

    def loss(self, x: Tensor, labels: Tensor) -> Tensor:
        return cross_entropy(self(x), labels)

    def loss_and_grad(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Grads]:
        """Backprop with the layers' hand-written VJPs: ``(loss, logits, {param name: exact gradient})``."""
        self._check_input(x, labels)
        layers = list(self.named_layers())
        saved = []
        for _, layer in layers:
            x, layer_saved = layer.primal(x)
            saved.append(layer_saved)
        logits = x
        loss, d_out = cross_entropy_and_grad(logits, labels)
        grads: Grads = {}
        # The first layer's input gradient is never needed; nor is any before the first parameterised layer.
        first_param = next(i for i, (_, layer) in enumerate(layers) if any(True for _ in layer.parameters(False)))
        for index in range(len(layers) - 1, first_param - 1, -1):
            name, layer = layers[index]
            d_out, layer_grads = layer.vjp(saved.pop(), d_out, need_input_grad=index > first_param)
            for param, grad in layer_grads.items():
                grads[f"{name}.{param}"] = grad
        return loss, logits, {name: grads[name] for name, _ in self.named_parameters()}

    def widest_activation(self, sample_shape: Sequence[int]) -> int:
        """Most elements per sample of any layer's input or output (from a one-sample primal pass, cached)."""
        key = tuple(sample_shape)
        if key not in self._widest:
            param = next(self.parameters())
            x = torch.zeros(1, *key, device=param.device, dtype=param.dtype)
            widest = x.numel()
            for layer in self.children():
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

    def jvp(self, x: Tensor, labels: Tensor, tangent_fn: TangentFn) -> JvpResult:
        """Forward mode: the loss and its K directional derivatives.

        ``tangent_fn(name, layer, layer_input)`` is called once per parameterised layer, in order, as the pass reaches
        it, and returns that layer's tangents keyed by its own parameter names, each ``(K, *param.shape)``; a
        parameter it leaves out has a zero tangent. Only the current layer's primal and tangent are alive at any time
        (besides the input ``x``, which the caller holds anyway and later chunks reuse).

        All K directions go through one primal pass, unless their widest tangent would exceed ``tangent_memory_mb``:
        then the directions are carried in chunks, one primal pass each (``tangent_fn`` is still called once per
        layer, in the first pass, so the directions and the result are those of a single pass).
        """
        self._check_input(x, labels)
        tangents: dict[str, Tangent] = {}  # full parameter name -> all K directions
        num_dirs: int | None = None
        chunk: int | None = None  # directions per pass, decided once K is known

        def layer_tangents(name: str, layer: Layer, layer_input: Tensor) -> dict[str, Tangent]:
            nonlocal num_dirs
            params = dict(layer.named_parameters(recurse=False))
            if name not in asked:  # tangent_fn is asked once per layer, in the first pass
                asked.add(name)
                for param, tangent in tangent_fn(name, layer, layer_input).items():
                    full_name = f"{name}.{param}"
                    if param not in params:
                        raise ValueError(f"tangent_fn returned a tangent for {full_name!r}, which is not a parameter")
                    shape = tuple(tangent.shape)
                    if shape[1:] != tuple(params[param].shape) or (num_dirs is not None and shape[0] != num_dirs):
                        expected = f"(K{'' if num_dirs is None else '=' + str(num_dirs)}, {', '.join(map(str, params[param].shape))})"
                        raise ValueError(f"tangent for {full_name!r} has shape {shape}, expected {expected}")
                    num_dirs = shape[0]
                    tangents[full_name] = tangent
            return {param: tangents[f"{name}.{param}"] for param in params if f"{name}.{param}" in tangents}

        asked: set[str] = set()
        loss = logits = None
        dir_derivs: list[Tensor] = []
        start = 0
        while True:  # one pass per chunk of directions; usually a single pass
            carry: list = [x, None]  # (primal, tangent), held only here so a layer can release them early
            for name, layer in self.named_layers():
                chosen = {}
                if any(True for _ in layer.parameters(recurse=False)):
                    chosen = layer_tangents(name, layer, carry[0])
                    if chunk is None and num_dirs is not None:
                        chunk = self.directions_per_pass(x, num_dirs)
                    if chunk is not None and chunk < num_dirs:
                        chosen = {param: directions(t, start, start + chunk) for param, t in chosen.items()}
                # Pop both so that only the layer holds them (see the ownership note in engine.layers).
                carry = list(layer.jvp(carry.pop(0), carry.pop(0), chosen))
            pass_logits, d_logits = carry
            del carry
            if d_logits is None:
                raise ValueError("tangent_fn returned no tangent for any parameter: there is no direction to differentiate along")
            pass_loss, pass_derivs = cross_entropy_jvp(pass_logits, labels, d_logits)
            del d_logits
            if loss is None:
                loss, logits = pass_loss, pass_logits
            del pass_logits
            dir_derivs.append(pass_derivs)
            start += chunk
            if start >= num_dirs:
                break
        return JvpResult(loss=loss, logits=logits, dir_derivs=torch.cat(dir_derivs), tangents=tangents)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class MLP(Network):
    """The paper's MLP (Section IV): 784-1024-1024-10 with ReLU after each hidden layer.

    Layers ``flatten, fc1, relu1, fc2, relu2, …, fc{n}``; PyTorch's default initialisation, drawn from the global
    RNG or, with ``seed``, from a private one (the global RNG is left untouched).
    """

    def __init__(
        self, in_features: int = 784, hidden: Sequence[int] = (1024, 1024), num_classes: int = 10, seed: int | None = None,
        tangent_memory_mb: float | None = 256.0,
    ) -> None:
        sizes = [in_features, *hidden, num_classes]
        if any(size < 1 for size in sizes):
            raise ValueError(
                f"MLP needs positive sizes, got in_features={in_features}, hidden={tuple(hidden)}, num_classes={num_classes}"
            )
        layers: list[tuple[str, Layer]] = [("flatten", Flatten())]
        with _seeded(seed):
            for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
                layers.append((f"fc{index}", Linear(fan_in, fan_out)))
                if index < len(sizes) - 1:
                    layers.append((f"relu{index}", ReLU(inplace=True)))
        super().__init__(layers, input_shape=(in_features,), tangent_memory_mb=tangent_memory_mb)


class CNN(Network):
    """The paper's CNN (Section IV): three ``kernel_size``×``kernel_size`` convolutions, each followed by ReLU and
    2×2 max-pooling, then two fully connected layers (``hidden`` units with ReLU, then ``num_classes``).

    The paper gives no channel counts, padding or hidden width; the defaults (32, 64, 64 channels, padding 1,
    128 hidden units) are this project's choice. On 28×28 inputs the feature maps are 28→14→7→3.
    Layers ``conv1, relu1, pool1, …, conv3, relu3, pool3, flatten, fc1, relu4, fc2``.
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
    ) -> None:
        if len(channels) < 1 or any(c < 1 for c in channels) or hidden < 1 or num_classes < 1:
            raise ValueError(
                f"CNN needs positive sizes, got channels={tuple(channels)}, hidden={hidden}, num_classes={num_classes}"
            )
        size = image_size
        for _ in channels:
            size = (size + 2 * padding - kernel_size + 1) // 2
            if size < 1:
                raise ValueError(
                    f"image_size={image_size} is too small for {len(channels)} conv+pool stages "
                    f"with kernel_size={kernel_size}, padding={padding}"
                )
        layers: list[tuple[str, Layer]] = []
        with _seeded(seed):
            for index, (c_in, c_out) in enumerate(zip([in_channels, *channels[:-1]], channels), start=1):
                layers += [
                    (f"conv{index}", Conv2d(c_in, c_out, kernel_size, padding=padding)),
                    (f"relu{index}", ReLU(inplace=True)),
                    (f"pool{index}", MaxPool2d(2)),
                ]
            layers += [
                ("flatten", Flatten()),
                ("fc1", Linear(channels[-1] * size * size, hidden)),
                (f"relu{len(channels) + 1}", ReLU(inplace=True)),
                ("fc2", Linear(hidden, num_classes)),
            ]
        super().__init__(layers, input_shape=(in_channels, image_size, image_size), tangent_memory_mb=tangent_memory_mb)

"""Layers with hand-written primal, reverse-mode (VJP) and forward-mode (JVP) passes.

No ``torch.autograd`` anywhere: parameters are ``nn.Parameter(requires_grad=False)`` so that Lightning's summary,
checkpoints, device moves and torch optimizers see them, and every derivative is written out below.

Shapes: a primal ``x`` is ``(B, ...)``; a tangent ``dx`` is ``(K, B, ...)`` with a leading direction axis K;
a parameter tangent is ``(K, *param.shape)`` (or an :class:`~fg_lightning.engine.tangents.OuterTangent` for a
fully connected weight).

Ownership, for memory: ``vjp`` consumes ``dy`` and ``jvp`` consumes ``dx`` (both may be overwritten in place; the
network never reuses them). The network passes ``x`` and ``dx`` to ``jvp`` without keeping references of its own,
so a layer that drops them (``del``) as soon as it is done releases their memory inside the layer, before it
allocates its outputs. That keeps the forward-mode pass at one layer's primal and tangent, plus its outputs.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fg_lightning.engine.tangents import OuterTangent, Tangent

Grads = dict[str, Tensor]
Tangents = Mapping[str, Tangent]


def _frozen(tensor: Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


CHUNK_ELEMENTS = 1 << 24  # 64 MB of float32: a per-sample temporary above this is made a batch slice at a time


def _batch_chunks(batch: int, per_sample: int) -> list[slice]:
    """Batch slices whose temporaries of ``per_sample`` elements a sample stay near ``CHUNK_ELEMENTS``: the int64
    indices of a max-pool and a convolution's workspace would otherwise add up to a whole activation to the peak of
    the forward-mode pass."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_sample))
    return [slice(start, start + step) for start in range(0, batch, step)]


def _by_rows(compute: Callable[[slice], Tensor], batch: int, per_sample: int, batch_dim: int = 0) -> Tensor:
    """``compute(rows)`` over batch slices, assembled along ``batch_dim``; a single call when the result is small."""
    chunks = _batch_chunks(batch, per_sample)
    if len(chunks) == 1:
        return compute(slice(None))
    out = None
    for rows in chunks:
        part = compute(rows)
        if out is None:
            out = part.new_empty(*part.shape[:batch_dim], batch, *part.shape[batch_dim + 1 :])
        out.narrow(batch_dim, rows.start, part.shape[batch_dim]).copy_(part)
        del part
    return out


class Layer(nn.Module):
    """One differentiable tensor function with its three passes."""

    # Each output element a function of its own input element alone, no parameters: its Jacobian is diagonal, so its
    # VJP is its JVP (what a tangent comes out as, a derivative goes back as), and a head's cells are the same
    # elements before it and after it (the engine's pass streams an activity tangent past such layers).
    elementwise: bool = False

    @property
    def has_parameters(self) -> bool:
        return any(True for _ in self.parameters(recurse=False))

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - every layer overrides it
        raise NotImplementedError

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        """``y = layer(x)`` and what :meth:`vjp` needs saved."""
        raise NotImplementedError

    def vjp(self, saved: Any, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        """Reverse mode: ``(dy · ∂y/∂x, {param: dy · ∂y/∂param})``. ``dx`` is ``None`` when not needed."""
        raise NotImplementedError

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        """Forward mode: ``(y, dy)`` with ``dy[k] = ∂y/∂x · dx[k] + Σ_p ∂y/∂p · tangents[p][k]``.

        ``dx=None`` means the input carries no tangent; a parameter missing from ``tangents`` has a zero tangent.
        ``dy`` is ``None`` only when nothing carries a tangent.
        """
        raise NotImplementedError

    def example_tangent(self, h: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        """Each example's own gradient ``v_b`` of the layer's parameters, from its input ``h (B, ...)`` and output
        gradient ``d (B, ...)``, as ``(v_b applied to h_b, (B, *output)), |v_b|² (B,))``: what per-example local
        guesses (Fournier et al. 2023) carry. A layer that forms them overrides this."""
        raise TypeError(f"per-example gradients of a {type(self).__name__} are not formed")

    def keeps_groups(self, groups: int) -> bool:
        """Group-wise local losses (``Network.output_groups``): whether each output channel depends on the input
        channels of its own group alone, the channels cut into ``groups`` contiguous groups (default: no one has said
        so)."""
        return False

    def cells_after(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """Patch-wise local losses (``Network.output_cells``): the per-example shape of this layer's output for an
        input of ``shape`` when no output element mixes the elements of two cells of its input, else ``None`` (the
        default: a layer that mixes them, or that no one has said does not)."""
        return None

    def cells_before(self, cell: Tensor, shape: tuple[int, ...]) -> Tensor | None:
        """``cell`` (each output element's replica, −1 for none; ``cells_after(shape)``'s shape) taken back to an input
        of ``shape``: the replica each input element reaches alone, or ``None`` where one reaches two."""
        return None

    @property
    def forms_example_grads(self) -> bool:
        """Whether :meth:`example_tangent` is this layer's own."""
        return type(self).example_tangent is not Layer.example_tangent

    def stock(self) -> nn.Module:
        """The stock ``torch.nn`` module that computes the same function, its parameters named as this layer's (the
        oracle of the tests and the baseline of the benchmarks: :func:`~fg_lightning.engine.to_torch` copies the
        weights in)."""
        raise TypeError(f"no stock torch.nn equivalent for {type(self).__name__}")


class Linear(Layer):
    """``y = x Wᵀ + b`` with ``W: (out, in)``; initialised as ``torch.nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear needs positive sizes, got in_features={in_features}, out_features={out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = _frozen(torch.empty(out_features, in_features))
        self.bias = _frozen(torch.empty(out_features)) if bias else None
        # Same draws, in the same order, as torch.nn.Linear.reset_parameters.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def stock(self) -> nn.Module:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        return self.forward(x), x

    def vjp(self, saved: Tensor, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        x = saved  # (B, in); dy: (B, out)
        grads = {"weight": dy.t() @ x}  # Σ_b dy_b x_bᵀ: (out, in)
        if self.bias is not None:
            grads["bias"] = dy.sum(0)
        return (dy @ self.weight if need_input_grad else None), grads

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        d_weight, d_bias = tangents.get("weight"), tangents.get("bias")
        dy = None
        if dx is not None:  # ∂y/∂x · dx = dx Wᵀ, one (K·B, in) @ (in, out) matmul
            num_dirs = dx.shape[0]
            dy = (dx.reshape(-1, self.in_features) @ self.weight.t()).view(num_dirs, -1, self.out_features)
            del dx
        if isinstance(d_weight, OuterTangent):
            # x (a_k b_kᵀ)ᵀ = (x b_k) a_kᵀ: a (B, K) matvec and a rank-one update per direction.
            scores = (x @ d_weight.in_factor.t()).t().unsqueeze(2)  # (K, B, 1)
            out_factor = d_weight.out_factor.unsqueeze(1)  # (K, 1, out)
            dy = scores * out_factor if dy is None else dy.baddbmm_(scores, out_factor)
        elif d_weight is not None:  # x dW_kᵀ for every k: a batched (B, in) @ (in, out)
            x_k = x.expand(d_weight.shape[0], *x.shape)
            dy = torch.bmm(x_k, d_weight.transpose(1, 2)) if dy is None else dy.baddbmm_(x_k, d_weight.transpose(1, 2))
        if d_bias is not None:
            d_bias = d_bias.unsqueeze(1)  # (K, 1, out)
            dy = d_bias.expand(-1, x.shape[0], -1).clone() if dy is None else dy.add_(d_bias)
        return self.forward(x), dy

    def example_tangent(self, h: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        # v_b = (d_b h_bᵀ, d_b): v_b h_b = d_b (|h_b|² + 1), |v_b|² = |d_b|² (|h_b|² + 1); the 1: the bias, if any
        scale = h.square().sum(1).add_(float(self.bias is not None))
        return d * scale.unsqueeze(1), d.square().sum(1).mul_(scale)


class Conv2d(Layer):
    """2-D convolution (square kernel, stride, zero padding); initialised as ``torch.nn.Conv2d``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True
    ) -> None:
        super().__init__()
        for arg, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
            if value < low:
                raise ValueError(f"Conv2d needs {arg} >= {low}, got {arg}={value}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = _frozen(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = _frozen(torch.empty(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as torch.nn.Conv2d.reset_parameters
        if self.bias is not None:
            bound = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.kernel_size == 1 and self.stride == 1 and self.padding == 0:  # 1×1: a matmul per example, which on
            # the CPU takes about 0.6× the time of the convolution kernel (the Mixer's channel mixing)
            y = torch.matmul(weight.view(weight.shape[0], -1), x.flatten(2)).view(x.shape[0], -1, *x.shape[2:])
            return y if bias is None else y.add_(bias.view(-1, 1, 1))
        return F.conv2d(x, weight, bias, self.stride, self.padding)

    def stock(self) -> nn.Module:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         bias=self.bias is not None)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight, self.bias)

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        return self.forward(x), x

    def vjp(self, saved: Tensor, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        x = saved  # (B, in, H, W); dy: (B, out, H', W')
        grads = {"weight": torch.nn.grad.conv2d_weight(x, self.weight.shape, dy, self.stride, self.padding)}
        if self.bias is not None:
            grads["bias"] = dy.sum((0, 2, 3))
        dx = torch.nn.grad.conv2d_input(x.shape, self.weight, dy, self.stride, self.padding) if need_input_grad else None
        return dx, grads

    def _out_size(self, size: int) -> int:
        return (size + 2 * self.padding - self.kernel_size) // self.stride + 1

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        d_weight, d_bias = tangents.get("weight"), tangents.get("bias")
        present = [t for t in (dx, d_weight, d_bias) if t is not None]
        out_hw = (self._out_size(x.shape[2]), self._out_size(x.shape[3]))
        out_numel = self.out_channels * out_hw[0] * out_hw[1]

        def tangent(rows: slice) -> Tensor | None:  # dy for a slice of the batch: (K, b, out, H', W')
            dy = None
            if dx is not None:  # conv(dx_k, W) for all k as one convolution over a (K·b) batch
                dx_rows = dx[:, rows]
                dy = self._conv(dx_rows.reshape(-1, *dx.shape[2:]), self.weight)
                dy = dy.view(dx_rows.shape[0], dx_rows.shape[1], *dy.shape[1:])
            if d_weight is not None:  # conv(x, dW_k) for all k as one convolution with K·out output channels
                by_kernel = self._conv(x[rows], d_weight.reshape(-1, *d_weight.shape[2:]))  # (b, K·out, H', W')
                by_kernel = by_kernel.view(by_kernel.shape[0], -1, self.out_channels, *by_kernel.shape[2:]).transpose(0, 1)
                dy = by_kernel.contiguous() if dy is None else dy.add_(by_kernel)
            if d_bias is not None:
                d_bias_view = d_bias.view(d_bias.shape[0], 1, self.out_channels, 1, 1)
                if dy is None:
                    dy = d_bias_view.expand(-1, x[rows].shape[0], -1, *out_hw).clone()
                else:
                    dy.add_(d_bias_view)
            return dy

        dy = _by_rows(tangent, x.shape[0], present[0].shape[0] * out_numel, batch_dim=1) if present else None
        del dx  # before the primal output is allocated
        return _by_rows(lambda rows: self.forward(x[rows]), x.shape[0], out_numel), dy

    def example_tangent(self, h: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        """Each example's weight gradient ``Σ_p d_{b,p} patch_{b,p}ᵀ`` (a sum over output positions) has no cheap
        closed form, so it is materialised, ``(out, in·k²)`` per example, from the unfolded input, a batch slice at a
        time (about ``CHUNK_ELEMENTS`` elements of temporaries); its output tangent is one batched product with the
        patches."""
        k, batch, out = self.kernel_size, d.shape[0], d.shape[1]
        tangent, sq_norms = torch.empty_like(d), d.new_empty(batch)
        patch = h.shape[1] * k * k
        for rows in _batch_chunks(batch, out * patch + patch * d[0, 0].numel() + d[0].numel()):
            patches = F.unfold(h[rows], k, padding=self.padding, stride=self.stride)  # (b, in·k², positions)
            d_rows = d[rows].flatten(2)  # (b, out, positions)
            weight = torch.bmm(d_rows, patches.transpose(1, 2))  # (b, out, in·k²): each example's weight gradient
            sq_norms[rows] = weight.square().sum((1, 2))
            rows_tangent = torch.bmm(weight, patches)  # each example's weight gradient convolved with its own input
            del patches, weight
            if self.bias is not None:
                bias_grad = d_rows.sum(2)  # (b, out)
                rows_tangent.add_(bias_grad.unsqueeze(2))
                sq_norms[rows] += bias_grad.square().sum(1)
            tangent[rows] = rows_tangent.view_as(tangent[rows])
            del rows_tangent
        return tangent, sq_norms


class _SamePositions:
    """A layer whose every output element comes from the input element at its own channel and position: group-wise
    and patch-wise replicas reach through it unchanged (ReLU, AddSkip)."""

    def keeps_groups(self, groups: int) -> bool:
        return True

    def cells_after(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        return shape

    def cells_before(self, cell: Tensor, shape: tuple[int, ...]) -> Tensor | None:
        return cell


class ReLU(_SamePositions, Layer):
    """``y = max(x, 0)``. With ``inplace=True`` it overwrites its input, as ``torch.nn.ReLU(inplace=True)``.

    The factories use ``inplace=True``: every ReLU there follows a layer whose output nobody else holds.
    """

    elementwise = True

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return x.relu_() if self.inplace else x.relu()

    def stock(self) -> nn.Module:
        return nn.ReLU(inplace=self.inplace)

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        y = self.forward(x)
        return y, y  # y > 0 exactly where x > 0; y is saved anyway as the next layer's input

    def vjp(self, saved: Tensor, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        return (relu_grad_(dy, saved) if need_input_grad else None), {}

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        if dx is not None:  # x (B, ...) broadcast over the K directions
            relu_grad_(dx, x)
        return self.forward(x), dx


class LayerNorm(Layer):
    """``y = x̂ · w + b``, ``x̂ = (x − μ) / √(σ² + eps)`` with μ and σ² over the last axis (each example's features,
    or each token's channels): ``torch.nn.LayerNorm(features)``, learnt scale ``w`` and shift ``b`` (initialised to
    1 and 0, as torch's). As :class:`Linear`, it saves its input (the statistics are computed again from it), so that
    a one-layer step (activity perturbation's ``layer_grads``) gets its parameters' gradients from the input alone.

    With ``J d = (d − mean(d) − x̂ · mean(d x̂)) / σ`` (symmetric, means over the last axis): the VJP is
    ``dx = J(dy · w)``, ``dw = Σ dy · x̂``, ``db = Σ dy`` (sums over every axis but the last); the JVP is
    ``dy = J(dx) · w + x̂ · dw + db``."""

    def __init__(self, features: int, eps: float = 1e-5) -> None:
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"LayerNorm needs a positive number of features, got features={features!r}")
        self.features, self.eps = features, eps
        self.weight = _frozen(torch.ones(features))
        self.bias = _frozen(torch.zeros(features))

    def extra_repr(self) -> str:
        return f"{self.features}, eps={self.eps}"

    def _normalised(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x̂, 1/σ)``, ``1/σ`` with a last axis of 1."""
        var, mean = torch.var_mean(x, -1, correction=0, keepdim=True)
        inv_std = var.add_(self.eps).rsqrt_()
        return (x - mean).mul_(inv_std), inv_std

    def _through(self, normalised: Tensor, inv_std: Tensor, d: Tensor) -> Tensor:
        """``J d``, in place on ``d`` (``(..., features)``, any leading axes broadcast against ``x̂``'s)."""
        mean_d, mean_dx = d.mean(-1, keepdim=True), (d * normalised).mean(-1, keepdim=True)
        return d.sub_(mean_d).sub_(normalised * mean_dx).mul_(inv_std)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.features,), self.weight, self.bias, self.eps)

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        return self.forward(x), x

    def vjp(self, saved: Tensor, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        normalised, inv_std = self._normalised(saved)
        lead = tuple(range(dy.dim() - 1))
        grads = {"weight": (dy * normalised).sum(lead), "bias": dy.sum(lead)}
        return (self._through(normalised, inv_std, dy.mul_(self.weight)) if need_input_grad else None), grads

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        normalised, inv_std = self._normalised(x)
        y = normalised * self.weight + self.bias
        dy = None if dx is None else self._through(normalised, inv_std, dx).mul_(self.weight)
        extra = x.dim() - 1  # a parameter tangent (K, features) broadcast over x's leading axes
        for name, factor in (("weight", normalised), ("bias", None)):
            tangent = tangents.get(name)
            if tangent is None:
                continue
            term = tangent.reshape(tangent.shape[0], *([1] * extra), self.features)
            if factor is not None:
                term = term * factor  # (K, *x.shape)
            if dy is None:  # a tensor of its own: the next layer may change it in place
                dy = term if factor is not None else term.expand(tangent.shape[0], *x.shape).clone()
            else:
                dy.add_(term)
        return y, dy

    def stock(self) -> nn.Module:
        return nn.LayerNorm(self.features, eps=self.eps)


class GELU(Layer):
    """``y = x Φ(x)``, Φ the standard normal CDF: the exact GELU (Hendrycks & Gimpel 2016), ``torch.nn.GELU()``, the
    MLP-Mixer's activation. Elementwise, so both passes scale the incoming derivative by ``Φ(x) + x φ(x)`` (ATen's
    ``gelu_backward`` kernel, the one autograd runs), in place: the VJP its cotangent, the JVP each direction's
    tangent, ``x`` broadcast over the K directions."""

    elementwise = True

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x)

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        return F.gelu(x), x

    @staticmethod
    def slope(x: Tensor) -> Tensor:
        """``dy/dx = Φ(x) + x φ(x)``, elementwise."""
        return torch.ops.aten.gelu_backward(torch.ones_like(x), x)

    def vjp(self, saved: Tensor, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        return (dy.mul_(self.slope(saved)) if need_input_grad else None), {}

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        return F.gelu(x), (None if dx is None else dx.mul_(self.slope(x)))

    def stock(self) -> nn.Module:
        return nn.GELU()


class TokenMixing(Layer):
    """An MLP-Mixer's token mixing (Tolstikhin et al. 2021; Ren et al. 2023's LocalMixer): one linear map over a
    feature map's ``H·W`` positions (its tokens), the same for every channel: ``y[b, c] = W x[b, c] + bias`` with
    ``x[b, c]`` the channel's ``H·W`` values flattened row-major and ``W: (H·W, H·W)``. The feature-map layout
    ``(B, C, H, W)`` keeps the Mixer's channel mixing a 1×1 :class:`Conv2d` and its per-token normalisation a
    :class:`GroupNorm` over 1×1 cells. Initialised as ``torch.nn.Linear(H·W, H·W)``."""

    def __init__(self, height: int, width: int, bias: bool = True) -> None:
        super().__init__()
        if height < 1 or width < 1:
            raise ValueError(f"TokenMixing needs positive sizes, got height={height}, width={width}")
        self.height, self.width, self.tokens = height, width, height * width
        self.weight = _frozen(torch.empty(self.tokens, self.tokens))
        self.bias = _frozen(torch.empty(self.tokens)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as torch.nn.Linear.reset_parameters
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(self.tokens), 1 / math.sqrt(self.tokens))

    def extra_repr(self) -> str:
        return f"height={self.height}, width={self.width}, bias={self.bias is not None}"

    def _tokens(self, x: Tensor) -> Tensor:
        """``(..., C, H, W) -> (..., C, H·W)``, refusing a map of another size."""
        if tuple(x.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"TokenMixing({self.height}, {self.width}) needs a {self.height}×{self.width} feature "
                             f"map, got {tuple(x.shape)}")
        return x.flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._tokens(x), self.weight, self.bias).view(x.shape)

    def stock(self) -> nn.Module:
        return _TokenMixing(self.height, self.width, bias=self.bias is not None)

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        return self.forward(x), x

    def vjp(self, saved: Tensor, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        x, d = self._tokens(saved).reshape(-1, self.tokens), dy.reshape(-1, self.tokens)  # (B·C, T) each
        grads = {"weight": d.t() @ x}  # Σ_{b,c} dy_bc x_bcᵀ
        if self.bias is not None:
            grads["bias"] = d.sum(0)
        return ((d @ self.weight).view(dy.shape) if need_input_grad else None), grads

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        d_weight, d_bias = tangents.get("weight"), tangents.get("bias")
        if isinstance(d_weight, OuterTangent):
            d_weight = d_weight.dense()
        tokens = self._tokens(x)  # (B, C, T)
        dy = None
        if dx is not None:  # dx Wᵀ for every direction, one (K·B·C, T) @ (T, T) matmul
            dy = (dx.reshape(-1, self.tokens) @ self.weight.t()).view(dx.shape[0], *tokens.shape)
            del dx
        if d_weight is not None:  # x dW_kᵀ for every k: a batched (B·C, T) @ (T, T)
            flat = tokens.reshape(1, -1, self.tokens).expand(d_weight.shape[0], -1, -1)
            by_weight = torch.bmm(flat, d_weight.transpose(1, 2)).view(d_weight.shape[0], *tokens.shape)
            dy = by_weight if dy is None else dy.add_(by_weight)
        if d_bias is not None:
            d_bias = d_bias.view(d_bias.shape[0], *(1,) * (tokens.dim() - 1), self.tokens)
            dy = d_bias.expand(-1, *tokens.shape).clone() if dy is None else dy.add_(d_bias)
        return self.forward(x), (None if dy is None else dy.view(dy.shape[0], *x.shape))

    def example_tangent(self, h: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        """Example ``b``'s own gradient ``v_b = (Σ_c d_bc h_bcᵀ, Σ_c d_bc)`` applied to its input, and ``|v_b|²``
        (per-example local guesses): ``((B, C, H, W), (B,))``."""
        tokens, d_tokens = self._tokens(h), d.flatten(-2)  # (B, C, T)
        weight = torch.bmm(d_tokens.transpose(1, 2), tokens)  # (B, T, T): each example's weight gradient
        tangent = torch.bmm(tokens, weight.transpose(1, 2))
        sq_norms = weight.square().sum((1, 2))
        if self.bias is not None:
            bias = d_tokens.sum(1)  # (B, T)
            tangent.add_(bias.unsqueeze(1))
            sq_norms += bias.square().sum(1)
        return tangent.view(d.shape), sq_norms


class _TokenMixing(nn.Module):
    """:class:`TokenMixing`'s stock twin: ``torch.nn.functional.linear`` over the flattened positions."""

    def __init__(self, height: int, width: int, bias: bool = True) -> None:
        super().__init__()
        tokens = height * width
        self.weight = nn.Parameter(torch.empty(tokens, tokens))
        self.bias = nn.Parameter(torch.empty(tokens)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.flatten(-2), self.weight, self.bias).view(x.shape)


class _Link:
    """What a :class:`Skip` hands its :class:`AddSkip` within one pass: the saved input, its tangent, and on the way
    back the gradient that the sum sends to it."""

    def __init__(self) -> None:
        self.value: Tensor | None = None
        self.tangent: Tensor | None = None
        self.grad: Tensor | None = None
        self.stock: _Link | None = None  # the stock twins' own link


class Skip(Layer):
    """The start of a residual connection (He et al. 2016; Ren et al.'s LocalMixer block): the identity, which keeps
    its input for the :class:`AddSkip` it was made with (``AddSkip(skip)``), so that a chain of layers computes
    ``x + f(x)`` with ``f`` the layers between the two. Its VJP adds the gradient the sum sent back; its JVP keeps a
    copy of the input tangent (the next layer may overwrite its own). Within one pass the pair holds the input (and
    its tangent), as the chain's layers are called in order; without a tangent on the input (a local-loss block's
    input), the sum adds a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.link = _Link()

    def forward(self, x: Tensor) -> Tensor:
        self.link.value = x
        return x

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        return self.forward(x), None

    def vjp(self, saved: Any, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        back, self.link.grad = self.link.grad, None
        return ((dy if back is None else dy + back) if need_input_grad else None), {}

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        self.link.tangent = None if dx is None else dx.clone()
        return self.forward(x), dx

    def stock(self) -> nn.Module:
        return _StockSkip(self.link)


class AddSkip(_SamePositions, Layer):
    """The end of a residual connection: its input plus what its :class:`Skip` kept, ``y = x + skip``."""

    def __init__(self, skip: Skip) -> None:
        super().__init__()
        self.link = skip.link  # shared with the Skip

    def forward(self, x: Tensor) -> Tensor:
        if self.link.value is None or self.link.value.shape != x.shape:
            raise RuntimeError("AddSkip runs before its Skip, or on a tensor of another shape than the Skip's input")
        return x + self.link.value

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        return self.forward(x), None

    def vjp(self, saved: Any, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        self.link.grad = dy
        return (dy.clone() if need_input_grad else None), {}

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        kept, self.link.tangent = self.link.tangent, None
        dy = kept if dx is None else (dx if kept is None else dx.add_(kept))
        return self.forward(x), dy

    def stock(self) -> nn.Module:
        return _StockAddSkip(self.link)


class _StockSkip(nn.Module):
    """:class:`Skip`'s stock twin (autograd differentiates through the kept input). Its link is its own, handed to
    the :class:`AddSkip`'s twin made next (``to_torch`` makes the layers' twins in order)."""

    def __init__(self, link: _Link) -> None:
        super().__init__()
        self.link = link.stock = _Link()

    def forward(self, x: Tensor) -> Tensor:
        self.link.value = x
        return x


class _StockAddSkip(nn.Module):
    """:class:`AddSkip`'s stock twin."""

    def __init__(self, link: _Link) -> None:
        super().__init__()
        self.link = link.stock

    def forward(self, x: Tensor) -> Tensor:
        return x + self.link.value


def relu_grad_(grad: Tensor, x: Tensor) -> Tensor:
    """``grad`` zeroed in place where ``x ≤ 0`` (``x`` broadcast over ``grad``'s leading axes): a derivative through
    a ReLU at ``x``, or at its output. ATen's ``threshold_backward`` kernel, the one autograd's ReLU backward runs,
    called by hand: no mask is made, and on the CPU it is 10-40× faster than ``masked_fill_`` with ``x <= 0``."""
    return torch.ops.aten.threshold_backward.grad_input(grad, x, 0, grad_input=grad)


def picked(shape: torch.Size, indices: Tensor) -> Tensor:
    """The positions of a ``(B, C, H, W)`` input that a 2-d max-pool's windows pick (``indices``, ``(B, C, H', W')``
    into each H·W plane, as ``F.max_pool2d(..., return_indices=True)`` gives them): ``True`` there, ``False`` where
    the pool's derivative is zero."""
    keep = torch.zeros(shape[:2].numel(), shape[2] * shape[3], dtype=torch.bool, device=indices.device)
    return keep.scatter_(1, indices.flatten(2).flatten(0, 1), True).view(shape)


class MaxPool2d(Layer):
    """Max pooling over ``kernel_size × kernel_size`` windows (stride = kernel_size by default, floor mode)."""

    def __init__(self, kernel_size: int = 2, stride: int | None = None) -> None:
        super().__init__()
        if kernel_size < 1 or (stride is not None and stride < 1):
            raise ValueError(f"MaxPool2d needs kernel_size >= 1 and stride >= 1, got {kernel_size}, {stride}")
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def stock(self) -> nn.Module:
        return nn.MaxPool2d(self.kernel_size, self.stride)

    def _pool_with_indices(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.max_pool2d(x, self.kernel_size, self.stride, return_indices=True)

    def keeps_groups(self, groups: int) -> bool:
        return True

    def cells_after(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        if self.kernel_size > self.stride:
            return None  # overlapping windows: a position may reach two cells
        c, h, w = shape
        return c, (h - self.kernel_size) // self.stride + 1, (w - self.kernel_size) // self.stride + 1

    def cells_before(self, cell: Tensor, shape: tuple[int, ...]) -> Tensor | None:
        """An input position takes its window's output's cell; a row or column that no window covers, −1."""
        _, h, w = shape
        stride, kernel = self.stride, self.kernel_size
        rows, cols = torch.arange(h), torch.arange(w)
        row_ok = (rows // stride < cell.shape[1]) & (rows % stride < kernel)
        col_ok = (cols // stride < cell.shape[2]) & (cols % stride < kernel)
        cell = cell[:, (rows // stride).clamp(max=cell.shape[1] - 1)][:, :, (cols // stride).clamp(
            max=cell.shape[2] - 1)]
        cell[:, ~row_ok] = -1
        cell[:, :, ~col_ok] = -1
        return cell

    @property
    def tiles(self) -> bool:
        """Whether the windows tile the input (stride = kernel size): each input position is in one window at most."""
        return self.stride == self.kernel_size

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        y, indices = self._pool_with_indices(x)
        return y, (x.shape, indices)

    def vjp(self, saved: Any, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        if not need_input_grad:
            return None, {}
        x_shape, indices = saved  # indices: (B, C, H', W') into each H·W plane, from the primal
        # The scatter twin of the JVP's gather: each output's gradient goes back to the input it took its max from
        # (added up where overlapping windows share a max).
        dx = dy.new_zeros(*x_shape[:2], x_shape[2] * x_shape[3])
        return dx.scatter_add_(2, indices.flatten(2), dy.flatten(2)).view(x_shape), {}

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        if dx is None:
            return self.forward(x), None
        y = dy = None
        for rows in _batch_chunks(x.shape[0], x[0].numel()):
            y_rows, indices = self._pool_with_indices(x[rows])  # indices: (b, C, H', W') into each H·W plane
            if y is None:
                y = x.new_empty(x.shape[0], *y_rows.shape[1:])
                dy = dx.new_empty(dx.shape[0], *y.shape)
            y[rows] = y_rows
            flat_indices = indices.flatten(2).expand(dx.shape[0], -1, -1, -1)  # (K, b, C, H'·W')
            torch.gather(dx[:, rows].flatten(3), 3, flat_indices, out=dy[:, rows].flatten(3))
        return y, dy


class Flatten(Layer):
    """``(B, ...) -> (B, features)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def stock(self) -> nn.Module:
        return nn.Flatten()

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        return self.forward(x), x.shape

    def vjp(self, saved: torch.Size, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        return (dy.reshape(saved) if need_input_grad else None), {}

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        return self.forward(x), (None if dx is None else dx.flatten(2))


class GlobalAvgPool(Layer):
    """``(B, C, H, W) -> (B, C)``: the mean over each feature map (the CNN's local-loss heads start with it)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))

    def stock(self) -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        return self.forward(x), x.shape

    def vjp(self, saved: torch.Size, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        if not need_input_grad:
            return None, {}
        return (dy / (saved[2] * saved[3]))[:, :, None, None].expand(saved).contiguous(), {}

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        return self.forward(x), (None if dx is None else dx.mean((3, 4)))


class AdaptiveAvgPool2d(Layer):
    """``(B, C, H, W) -> (B, C, S, S)``: the mean over each of an S×S grid of regions of each feature map, as
    ``torch.nn.AdaptiveAvgPool2d(S)`` cuts them (a CNN head's ``head_pool=S``: its classifier sees where a feature
    lies, not only its map's mean). A linear map, so its JVP is itself on the tangent and its VJP is torch's
    backward kernel, called by hand."""

    def __init__(self, output_size: int) -> None:
        super().__init__()
        if isinstance(output_size, bool) or not isinstance(output_size, int) or output_size < 1:
            raise ValueError(f"output_size must be a positive int, got output_size={output_size!r}")
        self.output_size = output_size

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, self.output_size)

    def stock(self) -> nn.Module:
        return nn.AdaptiveAvgPool2d(self.output_size)

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        return self.forward(x), x

    def vjp(self, saved: Tensor, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        if not need_input_grad:
            return None, {}
        return torch.ops.aten._adaptive_avg_pool2d_backward(dy.contiguous(), saved), {}

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        return self.forward(x), (None if dx is None else self.forward(dx.flatten(0, 1)).unflatten(0, dx.shape[:2]))


class GroupNorm(Layer):
    """``y = (x − μ) / √(σ² + eps)``, μ and σ² over each example's ``groups`` groups of channels (and their spatial
    positions), without a learnt scale or shift: ``torch.nn.GroupNorm(groups, channels, affine=False)``; one group is
    a LayerNorm over the whole sample. Inside a local-loss block (Ren et al. 2023 normalise each block's activations)
    with the block's groups, it keeps each group of channels apart.

    Its Jacobian is symmetric, so VJP and JVP are the same map: ``(d − mean(d) − x̂·mean(d x̂)) / σ``, means over the
    group.

    ``bands`` (a feature map's, ``(B, C, H, W)``) cuts its rows and its columns into bands of those sizes (summing to
    H and to W): μ and σ² are then taken over each group's channels within each cell of that grid, so that the cells
    stay apart (the CNN's ``patches``, as Ren et al.'s LocalMixer normalises each token's group on its own)."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5, bands: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if groups < 1 or channels < 1 or channels % groups:
            raise ValueError(f"GroupNorm needs groups dividing channels, got groups={groups}, channels={channels}")
        if bands is not None and (not bands or any(size < 1 for size in bands)):
            raise ValueError(f"GroupNorm needs bands of positive sizes, got bands={bands!r}")
        self.groups, self.channels, self.eps = groups, channels, eps
        self.bands = None if bands is None else tuple(bands)
        if bands is not None:  # each position's band; not in the state dict
            self.register_buffer("band", torch.repeat_interleave(torch.arange(len(bands)), torch.tensor(bands)),
                                 persistent=False)

    def _cell_mean(self, t: Tensor) -> Tensor:
        """``t (..., G, C/G, H, W)``: the mean over each group's channels in each cell of the bands' grid, broadcast
        back to ``(..., G, 1, H, W)``."""
        height, width = t.shape[-2:]
        if sum(self.bands) != height or sum(self.bands) != width:
            raise ValueError(f"GroupNorm with bands {self.bands} needs a {sum(self.bands)}×{sum(self.bands)} feature "
                             f"map, got {height}×{width}")
        if len(self.bands) == height:  # cells of one position (a token each): the mean over the group's channels
            return t.mean(-3, keepdim=True)
        onehot = F.one_hot(self.band, len(self.bands)).to(t.dtype)  # (H, P): position -> its band
        counts = t.shape[-3] * torch.outer(onehot.sum(0), onehot.sum(0))  # (P, P): elements per cell and group
        means = (onehot.T @ t.sum(-3) @ onehot).div_(counts)  # (..., G, P, P)
        return means[..., self.band, :][..., self.band].unsqueeze(-3)

    def _grouped(self, x: Tensor, batch_dims: int) -> Tensor:
        """``(*lead, C, ...) -> (*lead, G, C/G · spatial)``, ``lead`` the first ``batch_dims`` axes."""
        return x.reshape(*x.shape[:batch_dims], self.groups, -1)

    def primal(self, x: Tensor) -> tuple[Tensor, Any]:
        if self.bands is not None:
            grouped = x.reshape(x.shape[0], self.groups, -1, *x.shape[2:])  # (B, G, C/G, H, W)
            mean = self._cell_mean(grouped)
            inv_std = (self._cell_mean((grouped - mean).square_()) + self.eps).rsqrt_()
            return ((grouped - mean) * inv_std).view(x.shape), (grouped, mean, inv_std)
        # torch's fused kernel (no autograd: its forward and, in vjp, its backward kernel called by hand)
        y, mean, inv_std = torch.native_group_norm(x, None, None, x.shape[0], self.channels, x[0, 0].numel(),
                                                   self.groups, self.eps)
        # x is saved, not x̂: the in-place ReLU after this layer overwrites the output
        return y, (self._grouped(x, 1), mean.unsqueeze(-1), inv_std.unsqueeze(-1))

    def forward(self, x: Tensor) -> Tensor:
        return self.primal(x)[0]

    def keeps_groups(self, groups: int) -> bool:
        return groups == self.groups  # normalised over the head's groups

    def cells_after(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        return shape

    def cells_before(self, cell: Tensor, shape: tuple[int, ...]) -> Tensor | None:
        """Every element of a group (within a cell of the bands' grid) the one cell its outputs reach: its
        statistics join them; ``None`` where they reach two (a norm over a whole map mixes the patches)."""
        starts = [0, *itertools.accumulate(self.bands)] if self.bands is not None else [0, None]
        spans = [slice(start, stop) for start, stop in zip(starts, starts[1:])]
        joined = cell.clone()
        for group in torch.arange(shape[0]).chunk(self.groups):
            for row in spans:
                for col in spans:
                    region = (slice(int(group[0]), int(group[-1]) + 1), row, col)
                    reached = cell[region].unique()
                    reached = reached[reached >= 0]
                    if len(reached) > 1:
                        return None
                    joined[region] = reached[0] if len(reached) else -1
        return joined

    def stock(self) -> nn.Module:
        if self.bands is None:
            return nn.GroupNorm(self.groups, self.channels, eps=self.eps, affine=False)
        return _BandedGroupNorm(self.groups, self.bands, self.eps)

    def _through(self, saved: tuple[Tensor, Tensor, Tensor], d: Tensor, batch_dims: int) -> Tensor:
        """The Jacobian times ``d`` (``(B, C, ...)``, or ``(K, B, C, ...)`` with ``batch_dims=2``)."""
        grouped, mean, inv_std = saved  # (B, G, n), (B, G, 1), (B, G, 1); with bands (B, G, C/G, H, W), (B, G, 1, H, W)
        normalised = (grouped - mean) * inv_std  # x̂
        shape = d.shape
        if self.bands is not None:
            d = d.reshape(*shape[:batch_dims], self.groups, -1, *shape[-2:])
            d = d - self._cell_mean(d) - normalised * self._cell_mean(d * normalised)
            return d.mul_(inv_std).view(shape)
        d = self._grouped(d, batch_dims)
        d = d - d.mean(-1, keepdim=True) - normalised * (d * normalised).mean(-1, keepdim=True)
        return d.mul_(inv_std).view(shape)

    def vjp(self, saved: Any, dy: Tensor, need_input_grad: bool = True) -> tuple[Tensor | None, Grads]:
        if not need_input_grad:
            return None, {}
        if self.bands is not None:
            return self._through(saved, dy, 1), {}
        grouped, mean, inv_std = saved  # the fused backward kernel: the same map as _through, one pass fewer
        x = grouped.view(dy.shape)
        return torch.ops.aten.native_group_norm_backward(
            dy.contiguous(), x, mean.squeeze(-1), inv_std.squeeze(-1), None, x.shape[0], self.channels,
            x[0, 0].numel(), self.groups, [True, False, False])[0], {}

    def jvp(self, x: Tensor, dx: Tensor | None, tangents: Tangents) -> tuple[Tensor, Tensor | None]:
        y, saved = self.primal(x)
        del x
        return y, (None if dx is None else self._through(saved, dx, 2))


class _BandedGroupNorm(nn.Module):
    """``GroupNorm(bands=...)``'s stock twin: ``F.group_norm`` on each cell of the bands' grid on its own."""

    def __init__(self, groups: int, bands: tuple[int, ...], eps: float) -> None:
        super().__init__()
        self.groups, self.bands, self.eps = groups, bands, eps

    def forward(self, x: Tensor) -> Tensor:
        rows = [torch.cat([F.group_norm(cell, self.groups, eps=self.eps) for cell in band.split(self.bands, 3)], 3)
                for band in x.split(self.bands, 2)]
        return torch.cat(rows, 2)

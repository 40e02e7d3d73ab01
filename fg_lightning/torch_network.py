r"""The torch backend: any ``torch.nn.Module`` classifier behind the protocol the estimators call
(:class:`~fg_lightning.estimators.ForwardModel`: ``named_parameters``, ``loss_and_grad``, ``jvp`` with a per-layer
tangent callback that sees the layer input, activity tangents), so that every estimator written for the hand-written
engine's :class:`~fg_lightning.engine.Network` runs on it unchanged.

Forward mode here is ``torch.autograd.forward_ad``: when a module's forward starts, its parameters are replaced by
dual tensors carrying their tangents, so a tangent may depend on the module's input (Section III-D) and no tangent
exists before its layer is reached. No backward pass through the network runs (activity perturbation's weight step is
the VJP of one module at its input). One pass carries one direction: K directions take K passes,
each from the same random state and buffers (dropout draws the same mask, batch-norm statistics are updated once), so
every direction differentiates the same function. The hand-written engine carries all K through one pass.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from fg_lightning.engine import JvpResult, OuterTangent

Loss = Callable[[Tensor, Tensor], Tensor]


def _last_linear_out_features(module: nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


class TorchNetwork(nn.Module):
    """Wraps ``module`` (any ``torch.nn.Module`` mapping a batch ``x`` to logits ``(B, C)``) and ``loss`` (default
    ``torch.nn.functional.cross_entropy``, a batch mean) for the estimators.

    The trained parameters are the module's parameters that require grad (frozen ones, integer ones among them, stay
    as they are), under the module's own names (``"0.weight"``, ``"fc.bias"``). Each must be owned by one module (no
    shared weights) and used inside the forward of the module that owns it, as every ``torch.nn`` layer does; buffers
    (batch-norm statistics) are updated as in an ordinary training step.

    Args:
        module: the classifier.
        loss: ``loss(logits, labels) -> scalar``, the mean over the batch.
        num_classes: for the accuracy metrics; default the ``out_features`` of the module's last ``nn.Linear``.
    """

    has_local_losses = False

    def __init__(self, module: nn.Module, loss: Loss | None = None, num_classes: int | None = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.loss_fn: Loss = nn.functional.cross_entropy if loss is None else loss
        num_classes = _last_linear_out_features(module) if num_classes is None else num_classes
        if num_classes is None:
            raise ValueError(f"{type(module).__name__} has no nn.Linear to take the number of classes from: "
                             "pass num_classes")
        self.num_classes = num_classes
        self._paused = False  # jvp's hooks stand aside while layer_grads runs a module within the pass
        self._check_parameters()

    def _check_parameters(self) -> None:
        name = type(self.module).__name__
        seen: dict[int, str] = {}
        for full, param in self.module.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                raise ValueError(f"{name}: {full} and {seen[id(param)]} are one shared parameter; the torch backend "
                                 "gives each parameter the tangent of the one module that owns it: untie them")
            seen[id(param)] = full
        if not any(True for _ in self.named_parameters()):
            raise ValueError(f"{name} has no parameter that requires grad: nothing to train")

    # -- the protocol --------------------------------------------------------------------------------------------
    def named_parameters(self, prefix: str = "", recurse: bool = True,  # type: ignore[override]
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """The trained parameters, under the module's own names."""
        for name, param in self.module.named_parameters(prefix=prefix, recurse=recurse):
            if param.requires_grad:
                yield name, param

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:  # type: ignore[override]
        for _, param in self.named_parameters(recurse=recurse):
            yield param

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)

    def logits_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fn(logits, labels)

    def loss_and_grad(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The loss, the logits and the exact gradient of every trained parameter, by ``torch.autograd``."""
        names, params = zip(*self.named_parameters())
        with torch.enable_grad():
            logits = self.module(x)
            loss = self.loss_fn(logits, labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return loss.detach(), logits.detach(), dict(zip(names, grads))

    def _layers(self) -> dict[nn.Module, tuple[str, list[str]]]:
        """Every module that owns trained parameters: its name and its own parameters' names."""
        layers = {}
        for name, module in self.module.named_modules():
            own = [p for p, param in module.named_parameters(recurse=False) if param.requires_grad]
            if own:
                layers[module] = (name, own)
        return layers

    def jvp(self, x: Tensor, labels: Tensor, tangent_fn: Callable[..., dict[str, Any]],
            activity_fn: Callable[..., Tensor | None] | None = None, local: bool = False,
            per_example: bool = False) -> JvpResult:
        """The loss and its directional derivative along each of the K directions, one forward-mode pass per direction
        (see the module docstring). ``tangent_fn(name, module, module_input)`` is asked once per module that owns
        trained parameters, for their tangents; ``activity_fn(name, module, module_input, output)``, if given, once
        per such module after its forward, for a ``(K, *output.shape)`` tangent added to its output (activity
        perturbation). ``per_example=True``: ``dir_derivs[k, b]`` is example ``b``'s term,
        ``∂L/∂logits_b · ∂logits_b``, so that ``dir_derivs.sum(1)`` is the ``(K,)`` result."""
        if local:
            raise ValueError("the torch backend has no local-loss heads: jvp(local=True) needs the engine's networks")
        layers = self._layers()
        tangents: dict[str, Any] = {}  # full parameter name -> as tangent_fn gave it
        dense: dict[str, Tensor] = {}  # full parameter name -> (K, *shape)
        activities: dict[str, Tensor] = {}  # module name -> (K, *output.shape)
        asked: set[str] = set()
        num_dirs: list[int] = []
        direction = 0
        swapped: dict[nn.Module, dict[str, Any]] = {}

        def check_dirs(what: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
            if shape[1:] != expected or (num_dirs and shape[0] != num_dirs[0]):
                raise ValueError(f"{what} has shape {shape}, expected (K{'=' + str(num_dirs[0]) if num_dirs else ''}, "
                                 f"{', '.join(map(str, expected))})")
            num_dirs[:] = [shape[0]]

        def before(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._paused:  # layer_grads runs a module inside the pass
                return
            name, own = layers[module]
            if name not in asked:  # the first pass asks, with the module's input
                asked.add(name)
                params = dict(module.named_parameters(recurse=False))
                for param, tangent in tangent_fn(name, module, _primal(args)).items():
                    full = f"{name}.{param}" if name else param
                    if param not in own:
                        raise ValueError(f"tangent_fn returned a tangent for {full!r}, which is not a trained parameter")
                    check_dirs(f"tangent for {full!r}", tuple(tangent.shape), tuple(params[param].shape))
                    tangents[full] = tangent
                    dense[full] = tangent.dense() if isinstance(tangent, OuterTangent) else tangent
            swapped[module] = dict(module._parameters)
            for param in own:
                full = f"{name}.{param}" if name else param
                value = module._parameters[param].detach()
                if full in dense:
                    value = fwAD.make_dual(value, dense[full][direction].to(value.dtype))
                module._parameters[param] = value  # a plain (dual) tensor for this forward only

        def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if self._paused:
                return None
            module._parameters.update(swapped.pop(module))
            if activity_fn is None or not isinstance(output, Tensor):
                return None
            name = layers[module][0]
            primal = fwAD.unpack_dual(output).primal
            if direction == 0 and name not in activities:
                activity = activity_fn(name, module, _primal(args), primal)
                if activity is None:
                    return None
                check_dirs(f"activity tangent of {name!r}", tuple(activity.shape), tuple(primal.shape))
                activities[name] = activity
            activity = activities.get(name)
            return None if activity is None else output + fwAD.make_dual(torch.zeros_like(primal), activity[direction])

        hooks = [h for module in layers for h in (module.register_forward_pre_hook(before),
                                                   module.register_forward_hook(after))]
        rng = _RandomState(x.device)
        buffers_before = [b.clone() for b in self.module.buffers()]
        derivs: list[Tensor] = []
        try:
            while True:
                with torch.no_grad(), fwAD.dual_level():
                    logits_dual = self.module(x)
                    loss_dual = self.loss_fn(logits_dual, labels)
                    logits_primal, logits_tangent = fwAD.unpack_dual(logits_dual)
                    primal, tangent = fwAD.unpack_dual(loss_dual)
                    if direction == 0:
                        loss, logits = primal, logits_primal
                        self._check_reached(layers, asked)
                        if not num_dirs:
                            raise ValueError("tangent_fn and activity_fn gave no tangent: nothing to differentiate along")
                        logits_grad = self.logits_grad(logits, labels) if per_example else None
                    if per_example:  # each example's term: ∂L/∂logits_b · ∂logits_b
                        derivs.append(torch.zeros(len(logits), dtype=logits.dtype, device=logits.device)
                                      if logits_tangent is None else (logits_grad * logits_tangent).flatten(1).sum(1))
                    else:
                        derivs.append(torch.zeros_like(primal) if tangent is None else tangent)
                direction += 1
                if direction >= num_dirs[0]:
                    break
                # the same dropout masks, the same batch statistics from the same buffers: each pass leaves the
                # buffers as one training forward does
                rng.restore()
                for buffer, saved in zip(self.module.buffers(), buffers_before):
                    buffer.copy_(saved)
        finally:
            for hook in hooks:
                hook.remove()
            for module, params in swapped.items():
                module._parameters.update(params)
        return JvpResult(loss, logits, torch.stack(derivs), tangents)

    # -- what activity perturbation asks besides jvp ---------------------------------------------------------------
    def relu_followed(self) -> set[str]:
        """Modules that own trained parameters and are followed by an ``nn.ReLU`` in an ``nn.Sequential`` (a ReLU
        called as a function is not seen: no mask there, which costs variance, not correctness)."""
        names = {module: name for module, (name, _) in self._layers().items()}
        followed = set()
        for parent in self.module.modules():
            if isinstance(parent, nn.Sequential):
                children = list(parent.children())
                followed |= {names[a] for a, b in zip(children, children[1:]) if a in names and isinstance(b, nn.ReLU)}
        return followed

    def logit_layers(self) -> set[str]:
        """The module taken to give the logits: the last, in registration order, that owns trained parameters
        (ActivityPerturbation with ``exact_output`` checks that its output is the logits)."""
        return {list(self._layers().values())[-1][0]}

    def layer_grads(self, name: str, layer: nn.Module, layer_input: Tensor, d_output: Tensor) -> dict[str, Tensor]:
        """One module's parameter gradients for the output gradient ``d_output``: the VJP of that module alone at its
        input (autograd through this one module; its buffers are copies, so batch-norm statistics do not move
        again)."""
        params = {p: v.detach().requires_grad_(True) for p, v in layer.named_parameters(recurse=False)
                  if v.requires_grad}
        state = {**{n: v.detach() for n, v in layer.named_parameters()},
                 **{n: v.clone() for n, v in layer.named_buffers()}, **params}
        self._paused = True
        try:
            with torch.enable_grad():
                output = torch.func.functional_call(layer, state, (layer_input,))
                grads = torch.autograd.grad(output, list(params.values()), d_output, allow_unused=True)
        finally:
            self._paused = False
        return {p: torch.zeros_like(v) if g is None else g for (p, v), g in zip(params.items(), grads)}

    def logits_grad(self, logits: Tensor, labels: Tensor) -> Tensor:
        """∂L/∂logits of the loss, ``(B, C)`` (a VJP through the loss function alone)."""
        with torch.enable_grad():
            z = logits.detach().requires_grad_(True)
            return torch.autograd.grad(self.loss_fn(z, labels), z)[0]

    def _check_reached(self, layers: dict[nn.Module, tuple[str, list[str]]], asked: set[str]) -> None:
        missed = [name for name, _ in layers.values() if name not in asked]
        if missed:
            raise ValueError(f"{type(self.module).__name__}: the forward pass never ran the forward of "
                             f"{', '.join(repr(m) for m in missed)}, whose parameters are trained; the torch backend "
                             "gives a parameter its tangent as its own module's forward runs (freeze unused "
                             "parameters with requires_grad=False)")

    def directions_per_pass(self, x: Tensor, num_dirs: int) -> int:
        return 1


def _primal(args: tuple[Any, ...]) -> Tensor | None:
    """A module's first input, without its tangent."""
    return fwAD.unpack_dual(args[0]).primal if args and isinstance(args[0], Tensor) else None


class _RandomState:
    """The global generators' state (CPU, and the device's on CUDA), to replay the same draws in each pass."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

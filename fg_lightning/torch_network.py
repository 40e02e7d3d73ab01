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
``F.linear`` and ``F.conv{1,2,3}d`` (every ``nn.Linear`` and ``nn.Conv*d``) take this backend's own forward-mode rules
(:class:`_LeanRules`): the output's tangent is built in one buffer, as the engine builds it, where torch's rules
allocate each term and their sum (on the paper's MLP at batch 4096, the naive step's peak falls from 1.8× stock
backprop's to 1.09×).

What could make a derivative silently wrong is refused instead, raising :class:`TorchBackendError` at the first
pass, before any update: a trained parameter used outside its own module's forward (a ``TorchFunctionMode`` sees every
use in the first of the K passes, about 5 µs per torch call), a model whose forward-mode derivative differs from
autograd's on the first batch, an input-generated direction for a module called more than once, and activity
perturbation on a module whose output is not one tensor (an LSTM's tuple).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map_only

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def _math_attention() -> contextlib.AbstractContextManager:
        return sdpa_kernel([SDPBackend.MATH])
except ImportError:  # pragma: no cover
    _math_attention = contextlib.nullcontext

from fg_lightning.engine import (
    ActivitySource, GivenTangents, JvpResult, OuterTangent, ReplayedSource, TangentSource, as_source, check_objective,
    full_name,
)
from fg_lightning.estimators.base import Inputs, Rewind, batch_size, rng_state, set_rng_state

Loss = Callable[[Tensor, Tensor], Tensor]


class TorchBackendError(ValueError):
    """The torch backend cannot give this model's forward-mode derivative as asked; raised during the first pass,
    before any update."""


_TORCH_LIMITS = (  # what torch itself cannot do for a model, by the words of its error, and what to do instead
    (r"use_reentrant=True, torch\.utils\.checkpoint is incompatible",
     "torch.utils.checkpoint(use_reentrant=True) works with .backward() alone and has no forward-mode rule: use "
     "checkpoint(use_reentrant=False), which the torch backend runs exactly"),
    (r"implement the jvp function for custom autograd\.Function|jvp is not implemented for",
     "a custom torch.autograd.Function in it has no forward-mode rule (jvp; checkpoint(use_reentrant=True) is one): "
     "give it a jvp and setup_context, or use checkpoint(use_reentrant=False)"),
    (r"forward AD with (\S+) that does not support it",
     "torch has no forward-mode formula for {0}, which it calls: replace that call, or train it with backprop"),
)


@contextlib.contextmanager
def _refusing(model: str) -> Iterator[None]:
    """Turns torch's own error for what it cannot differentiate in forward mode into a one-line refusal naming it."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as error:
        for pattern, reason in _TORCH_LIMITS:
            found = re.search(pattern, str(error))
            if found:
                raise TorchBackendError(f"{model}: {reason.format(*found.groups())}") from error
        raise


def _train_only(module: nn.Module, patterns: list[str]) -> None:
    """Freeze every parameter of ``module`` whose name matches none of ``patterns``."""
    if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"trainable must be a list of parameter names or patterns, got trainable={patterns!r}")
    names = [name for name, _ in module.named_parameters()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unmatched:
        raise ValueError(f"{type(module).__name__}: trainable pattern(s) {unmatched} match no parameter (its "
                         f"parameters are named like {names[:3]})")
    for name, param in module.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in patterns))


def _last_linear_out_features(module: nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


_PARAMETER_CONTAINERS = (nn.ParameterList, nn.ParameterDict)
_UNSEEN = object()


class TorchNetwork(nn.Module):
    """Wraps ``module`` (any ``torch.nn.Module`` mapping a batch ``x`` to logits ``(B, C)``) and ``loss`` (default
    ``torch.nn.functional.cross_entropy``, a batch mean) for the estimators.

    The trained parameters are the module's parameters that require grad (frozen ones, integer ones among them, stay
    as they are), under the module's own names (``"0.weight"``, ``"fc.bias"``). Each must be owned by one module (no
    shared weights) and used inside the forward of the module that owns it, as every ``torch.nn`` layer does; a
    module may be called several times. A use anywhere else would get no tangent, so the forward-mode pass watches
    every use and refuses the model naming the parameter and the use, and the first pass of each kind is compared
    with autograd (:meth:`check_forward_mode`) to catch what the watch cannot see. Buffers (batch-norm statistics) are
    updated as in an ordinary training step.

    Inputs and outputs pass one adapter, :meth:`forward`, which every pass calls (the forward-mode passes, autograd's
    ``loss_and_grad``, the checks, activity perturbation's): an input ``x`` that is a ``Mapping`` of tensors (a
    Hugging Face batch, ``{"input_ids": (B, T), "attention_mask": (B, T)}``) is passed as keyword arguments,
    ``module(**x)``, with the examples along dim 0 of every value (a disagreement is refused naming each key's size,
    :func:`~fg_lightning.estimators.base.batch_size`); any other input as ``module(x)``. Inputs carry no tangent
    (integer ones could not). What the module returns goes through :meth:`_logits` (a ``ModelOutput``'s ``logits``).

    Args:
        module: the classifier.
        loss: ``loss(logits, labels) -> scalar``, the mean over the batch.
        num_classes: for the accuracy metrics; default the ``out_features`` of the module's last ``nn.Linear``.
        trainable: train only these parameters: names or ``fnmatch`` patterns of the module's parameter names
            (``["head.*", "*.norm*.weight"]``); every other parameter is frozen (``requires_grad=False``: no tangent,
            no estimate, no optimizer state). None: the parameters that require grad now (a PEFT model's adapters
            alone, say). A pattern that matches no parameter is refused, naming it.
    """

    has_local_losses = False

    def __init__(self, module: nn.Module, loss: Loss | None = None, num_classes: int | None = None,
                 trainable: list[str] | None = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if trainable is not None:
            _train_only(module, trainable)
        self.module = module
        self.loss_fn: Loss = nn.functional.cross_entropy if loss is None else loss
        num_classes = _last_linear_out_features(module) if num_classes is None else num_classes
        if num_classes is None:
            raise ValueError(f"{type(module).__name__} has no nn.Linear to take the number of classes from: "
                             "pass num_classes")
        self.num_classes = num_classes
        self._checked: set[tuple[bool, tuple[bool, ...]]] = set()  # the kinds of pass compared with autograd (with
        # activity tangents or not, the modules' training flags)
        self._pass: _Tangents | None = None  # the forward-mode pass running, while it runs
        self._said_attention = False  # the math-kernel notice is given once
        self._logit_layer: Any = _UNSEEN  # the module whose output is the logits, once an activity check saw it
        self._check_parameters()
        with warnings.catch_warnings():  # torch's forward mode loads its decompositions through torch.jit.script, which
            warnings.simplefilter("ignore", FutureWarning)  # torch deprecates: load them now, without that warning
            fwAD._maybe_load_decompositions()

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

    def forward(self, x: Inputs) -> Tensor:
        """The module's logits for the input ``x``: the one adapter between the estimators and the module, which
        every pass goes through (see the class docstring)."""
        if isinstance(x, Mapping):
            batch_size(x)  # the values agree on the batch, or one line names each one's
            return self._logits(self.module(**x))
        return self._logits(self.module(x))

    @staticmethod
    def _logits(output: Any) -> Tensor:
        """The logits in what the module returns: a tensor as it is; a Hugging Face ``ModelOutput`` (or any object or
        mapping with ``logits``) its ``logits``; a tuple its first element. The one adapter between models whose
        outputs are not a tensor and the estimators."""
        if isinstance(output, Tensor):
            return output
        logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
        if logits is None and isinstance(output, (tuple, list)) and output:
            logits = output[0]
        if not isinstance(logits, Tensor):
            raise TypeError(f"the model returned a {type(output).__name__} without logits: return the logits, or an "
                            "output with a `logits` tensor")
        return logits

    def logits_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fn(logits, labels)

    def loss_and_grad(self, x: Inputs, labels: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The loss, the logits and the exact gradient of every trained parameter, by ``torch.autograd``."""
        names, params = zip(*self.named_parameters())
        # the kernel the forward-mode passes run: the same dropout
        with _refusing(type(self.module).__name__), torch.enable_grad(), _math_attention():
            logits = self.forward(x)
            loss = self.loss_fn(logits, labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return loss.detach(), logits.detach(), dict(zip(names, grads))

    READS_CHILDREN: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)
    """Modules whose forward reads their children's parameters itself instead of calling the children
    (``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward``): such a module owns
    its children's parameters too, and its forward is where they take their tangents. Add a class of your own here
    (``TorchNetwork.READS_CHILDREN += (MyBlock,)``) when its forward reads a child's weights in the same way. A
    parametrized module (``parametrizations.weight_norm``, ``spectral_norm``) owns its parametrizations' parameters in
    the same way: its ``weight`` is computed from them in its own forward."""

    def _layers(self) -> dict[nn.Module, tuple[str, list[str]]]:
        """Every module that owns trained parameters: its name and its own parameters' names (relative to it; a
        :attr:`READS_CHILDREN` module's include its children's, ``"out_proj.weight"``)."""
        layers: dict[nn.Module, tuple[str, list[str]]] = {}
        inside: str | None = None  # the READS_CHILDREN module being walked: its descendants own nothing themselves
        for name, module in self.module.named_modules():
            if inside is not None and (inside == "" or name.startswith(inside + ".")):
                continue
            inside = None
            if isinstance(module, _PARAMETER_CONTAINERS):  # no forward of their own: their parent owns them
                continue
            reads = isinstance(module, self.READS_CHILDREN) or parametrize.is_parametrized(module)
            own = [p for p, param in module.named_parameters(recurse=reads) if param.requires_grad]
            if not reads:
                own += [f"{child}.{p}" for child, held in module.named_children()
                        if isinstance(held, _PARAMETER_CONTAINERS)
                        for p, param in held.named_parameters() if param.requires_grad]
            if reads:
                inside = name
            if own:
                layers[module] = (name, own)
        return layers

    def jvp(self, x: Inputs, labels: Tensor, tangents: TangentSource | Callable[..., Any], objective: str = "loss",
            reduction: str = "batch") -> JvpResult:
        """The loss and its directional derivative along each of the K directions of ``tangents`` (a
        :class:`~fg_lightning.engine.tangents.TangentSource` or a ``tangent_fn``), one forward-mode pass per
        direction (see the module docstring). The source's ``weights(name, module, module_input)`` is asked once per
        module that owns trained parameters, at its first call (a :class:`ReplayedSource` at every call of every pass,
        only that direction's tangents kept, for that call: the result then carries no ``tangents``); an
        :class:`ActivitySource`'s ``activity(name, module, module_input, output)`` once per *call* of such a module
        (a module called twice gets two independent tangents). ``reduction="example"``: ``dir_derivs[k, b]`` is
        example ``b``'s term, ``∂L/∂logits_b · ∂logits_b``, so that ``dir_derivs.sum(1)`` is the ``(K,)`` result.
        ``objective`` is the network's loss: the local losses (``"local"``) are the engine's.

        Every use of a trained parameter gets its tangent or the pass raises :class:`TorchBackendError` naming the
        parameter and the use (:class:`_ParameterUses`); the first call of each kind (weight tangents, activity
        tangents) also compares forward mode with autograd on this batch (:meth:`check_forward_mode`)."""
        check_objective(objective, reduction)
        if objective == "local":
            raise ValueError("the torch backend has no local-loss heads: objective='local' needs the engine's "
                             "networks")
        source = as_source(tangents)
        activities = isinstance(source, ActivitySource)
        kind = (activities, tuple(m.training for m in self.module.modules()))
        with _refusing(type(self.module).__name__):
            if kind not in self._checked:
                self.check_forward_mode(x, labels, activities)
                self._checked.add(kind)
            return self._jvp(x, labels, source, reduction == "example")

    def _jvp(self, x: Inputs, labels: Tensor, source: TangentSource, per_example: bool = False) -> JvpResult:
        tangents = _Tangents(self, source, labels.device)
        rewind = Rewind(self.module, labels.device)
        derivs: list[Tensor] = []
        rules = _LeanRules({id(buffer) for buffer in self.module.buffers()})
        self._pass = tangents
        try:
            with tangents.hooked(), rules, _math_attention():
                while True:
                    with torch.no_grad(), fwAD.dual_level():
                        with tangents.uses if tangents.direction == 0 else contextlib.nullcontext():
                            logits_dual = self.forward(x)
                            loss_dual = self.loss_fn(logits_dual, labels)
                        logits_primal, logits_tangent = fwAD.unpack_dual(logits_dual)
                        primal, tangent = fwAD.unpack_dual(loss_dual)
                        if tangents.direction == 0:
                            loss, logits = primal, logits_primal
                            tangents.check_first_pass()
                            logits_grad = self.logits_grad(logits, labels) if per_example else None
                        if per_example:  # each example's term: ∂L/∂logits_b · ∂logits_b
                            derivs.append(torch.zeros(len(logits), dtype=logits.dtype, device=logits.device)
                                          if logits_tangent is None
                                          else (logits_grad * logits_tangent).flatten(1).sum(1))
                        else:
                            derivs.append(torch.zeros_like(primal) if tangent is None else tangent)
                    if not tangents.next_direction():
                        break
                    # the same dropout masks, the same batch statistics from the same buffers: each pass leaves the
                    # buffers as one training forward does
                    rewind()
        finally:
            self._pass = None
        if rules.attention and not self._said_attention:
            self._said_attention = True
            warnings.warn(f"{type(self.module).__name__}: scaled_dot_product_attention runs torch's math kernel in the "
                          "torch backend's passes (the fused kernels have no forward-mode formula): it costs the "
                          "memory and time of unfused attention", stacklevel=3)
        return JvpResult(loss, logits, torch.stack(derivs), tangents.given)

    def check_forward_mode(self, x: Inputs, labels: Tensor, activities: bool = False, directions: int = 2) -> None:
        """Raise :class:`TorchBackendError` unless forward mode's derivative of the loss on this batch equals
        autograd's, ``∇L·v`` (and ``Σ ∂L/∂z_c·u_c`` over every call's output ``z_c`` with ``activities``), along
        ``directions`` random directions. :meth:`jvp` runs it once per kind on its first batch (and again when a
        module's training flag changes), so that a use of a parameter the tracking cannot see (e.g. through a view
        taken before the pass) refuses the model before the first update instead of training on a wrong gradient.
        With ``activities``, also refuse a model whose modules mix the examples of a batch
        (:meth:`check_examples_apart`). The random state and buffers are put back: the run's numbers are the same
        with and without it. Costs one backward and ``directions`` forward passes (one more with ``activities``)."""
        rewind = Rewind(self.module, labels.device)
        params = dict(self.named_parameters())
        layers = self._layers() if activities else {}
        returned: list[tuple[nn.Module, Tensor]] = []  # every module call's output as the model got it, innermost
        # first (registered after _outputs_of's hooks: an owner's copy)
        with _outputs_of(layers, type(self.module).__name__) as outputs, torch.enable_grad(), _math_attention():
            hooks = [m.register_forward_hook(lambda m, a, out: returned.append((m, out)) if isinstance(out, Tensor)
                                             else None) for m in self.module.modules()] if activities else []
            try:
                logits = self.forward(x)
                loss = self.loss_fn(logits, labels)
            finally:
                for hook in hooks:
                    hook.remove()
        if activities:  # the innermost module that returned the logits: an owner is the output layer; a module
            # without trained parameters (a frozen head) leaves none; no module but the model itself (a change in
            # its forward) leaves the last owner, which exact_output then refuses
            caller = next((module for module, output in returned if output is logits
                           and (module is not self.module or module in layers)), None)
            self._logit_layer = (_UNSEEN if caller is None
                                 else layers[caller][0] if caller in layers else None)
        del returned
        wrt = [*params.values(), *outputs]
        grads = [torch.zeros_like(t) if g is None else g
                 for t, g in zip(wrt, torch.autograd.grad(loss, wrt, allow_unused=True))]
        rewind()
        generator = torch.Generator(labels.device).manual_seed(0)
        draws = [torch.randn((directions, *t.shape), generator=generator, device=t.device, dtype=t.dtype) for t in wrt]
        activity_draws = draws[len(params):]
        weight_draws = dict(zip(params, draws))
        result = self._jvp(x, labels, _ActivityDraws(weight_draws, activity_draws) if activity_draws
                           else GivenTangents(weight_draws))
        rewind()
        self._check_agreement(result.dir_derivs, grads, draws, [loss, *wrt], activities)
        if activities:
            self.check_examples_apart(x, labels)

    def _check_agreement(self, derivs: Tensor, grads: list[Tensor], draws: list[Tensor], tensors: list[Tensor],
                         activities: bool) -> None:
        """Forward mode's ``derivs`` against autograd's ``Σ grad·draw`` per direction, to within the rounding of the
        least precise floating dtype among ``tensors`` (the loss, the parameters, the outputs): a missed use errs by
        that use's whole share of the gradient."""
        expected = sum((g.double().unsqueeze(0) * d.double()).reshape(len(derivs), -1).sum(1)
                       for g, d in zip(grads, draws))
        scale = float(sum(g.double().square().sum() for g in grads).sqrt())
        error = float((derivs.double() - expected).abs().max())
        eps = max(torch.finfo(t.dtype).eps for t in tensors if t.dtype.is_floating_point)
        tolerance = 1e-8 if eps <= torch.finfo(torch.float64).eps else max(1e-3, 4 * eps)
        if error > tolerance * scale:
            raise TorchBackendError(
                f"{type(self.module).__name__}: forward mode's derivative of the loss along random "
                f"{'activity and ' if activities else ''}weight directions differs from autograd's (by {error:.3g}, "
                f"the gradient's norm is {scale:.3g}): its forward computes something forward mode cannot follow as "
                "autograd does: a trained parameter used through a tensor derived from it before the pass, a "
                "torch.no_grad block or a gradient hook inside the forward, a module's output reached other than "
                "through its return value. Use each parameter inside the forward of the module that owns it, and "
                "keep no_grad and hooks out of the forward")

    def check_examples_apart(self, x: Inputs, labels: Tensor) -> None:
        """Raise :class:`TorchBackendError`, naming the module, unless every module keeps the examples of the batch
        apart along the first axis of its output. Activity perturbation estimates ``∂L/∂z_b`` from example ``b``'s
        own term of the loss; a module that mixes examples (batch norm in training mode, any statistic over the
        batch) makes ``z_b`` reach the other examples' terms too, and the estimate would be biased. Forward-mode
        passes with a tangent on a set ``S`` of examples of every perturbed output: the first module whose inputs'
        tangents are zero off ``S`` and whose output's is not mixes them. The sets are the examples whose index has
        bit ``j`` set, and their complements: any two examples differ in some bit, so ``2⌈log₂ B⌉`` passes see
        every pair of examples one of which reaches the other."""
        batch = len(labels)
        names = {module: name for name, module in self.module.named_modules()}
        index = torch.arange(batch, device=labels.device)
        rewind = Rewind(self.module, labels.device)
        for bit in range(max(0, (batch - 1).bit_length())):
            for rows in ((index >> bit) & 1 == 1, (index >> bit) & 1 == 0):
                mixing: list[nn.Module] = []

                def watch(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
                    if not mixing and _apart((args, kwargs), rows) and not _apart(output, rows):
                        mixing.append(module)

                hooks = [module.register_forward_hook(watch, with_kwargs=True) for module in self.module.modules()]
                try:
                    self._jvp(x, labels, _SomeExamples(type(self.module).__name__, rows))
                finally:
                    for hook in hooks:
                        hook.remove()
                rewind()
                if mixing:
                    module = mixing[0]
                    what = (f"the forward of {type(module).__name__}" if module is self.module
                            else f"{names[module]!r} ({type(module).__name__})")
                    raise TorchBackendError(
                        f"{type(self.module).__name__}: {what} mixes the examples of a batch (an example's output "
                        f"depends on the other examples: batch statistics, say), so activity perturbation's "
                        f"per-example estimate would be biased: normalise with running statistics (eval mode, "
                        f"track_running_stats=True) or per example (LayerNorm, GroupNorm), or train with a "
                        f"weight-perturbation estimator (naive, multi_direction, ...)")

    # -- what activity perturbation asks besides jvp ---------------------------------------------------------------
    def activity_norms(self, name: str) -> list:
        """None: the torch backend perturbs each module's own output (the engine's networks perturb past their
        normalisations)."""
        return []

    def activity_past(self, name: str) -> list:
        """None: the torch backend draws each module's activity tangent at its output."""
        return []

    def activity_mask(self, name: str, site: Tensor) -> Tensor:
        """Where the loss's derivative with respect to the output ``site`` of the call being perturbed can be
        non-zero, from the calls the model makes on it in this pass (:class:`_Watch`): off where ``site < 0`` when a
        ReLU is its one use (``nn.ReLU``, ``F.relu``, in place or not) and, when a max-pool is that ReLU output's one
        use, at the positions its windows do not pick; all ``True`` elsewhere. Asked by the tangent source during the
        pass; the pass fills the returned mask in place as it sees the uses, before the weight step reads it."""
        if self._pass is None:
            raise RuntimeError("the torch backend's activity_mask is asked during its forward-mode pass")
        return self._pass.mask(site)

    def logit_layers(self) -> set[str]:
        """The module whose output is the logits, as the first activity pass's check saw it (the module's own return
        value, unchanged, is what the loss takes); none where no module that owns trained parameters gives them (a
        frozen head: every trained layer is perturbed). Before that check, the last module, in registration order,
        that owns trained parameters (ActivityPerturbation with ``exact_output`` checks that its output is the
        logits)."""
        if self._logit_layer is not _UNSEEN:
            return set() if self._logit_layer is None else {self._logit_layer}
        return {list(self._layers().values())[-1][0]}

    def layer_grads(self, name: str, layer: nn.Module, layer_input: RecordedCall | Tensor,
                    d_output: Tensor) -> dict[str, Tensor]:
        """One module's parameter gradients for the output gradient ``d_output``: the VJP of that module alone at the
        call the pass recorded (``layer_input``, a :class:`RecordedCall`: every argument, the random state): for a
        plain ``nn.Linear`` or ``nn.Conv*d`` from its formula (:func:`_layer_vjp`); otherwise autograd through that
        one module, the call replayed with its arguments and from its random state (a dropout inside draws the same
        mask), on copies of its buffers as the call found them (batch-norm statistics do not move again), the global
        random state put back afterwards; refused if it does not give the call's output again."""
        call = (layer_input if isinstance(layer_input, RecordedCall)
                else RecordedCall.of(layer, (layer_input,), {}, d_output.device,
                                      self._layers().get(layer, (name, []))[1]))
        call.check(type(self.module).__name__, name)
        if len(call.args) == 1 and not call.kwargs:
            direct = _layer_vjp(layer, call.args[0], d_output)
            if direct is not None:
                return direct
        params = {p: v.detach().requires_grad_(True) for p, v in layer.named_parameters() if p in call.own}
        state = {**{n: v.detach() for n, v in layer.named_parameters()},
                 **{n: v.clone() for n, v in call.buffers.items()}, **params}
        now = rng_state(d_output.device)
        try:
            set_rng_state(call.rng, d_output.device)
            with torch.enable_grad(), _math_attention():
                output = torch.func.functional_call(layer, state, call.args, call.kwargs)
                call.check_replay(type(self.module).__name__, name, output)
                grads = torch.autograd.grad(output, list(params.values()), d_output, allow_unused=True)
        finally:
            set_rng_state(now, d_output.device)
        return {p: torch.zeros_like(v) if g is None else g for (p, v), g in zip(params.items(), grads)}

    @staticmethod
    def fully_connected(module: nn.Module) -> bool:
        """Whether ``module``'s weight multiplies its input's last axis: an ``nn.Linear``."""
        return isinstance(module, nn.Linear)

    def logits_grad(self, logits: Tensor, labels: Tensor) -> Tensor:
        """∂L/∂logits of the loss, ``(B, C)`` (a VJP through the loss function alone)."""
        with torch.enable_grad():
            z = logits.detach().requires_grad_(True)
            return torch.autograd.grad(self.loss_fn(z, labels), z)[0]

    def directions_per_pass(self, x: Inputs, num_dirs: int) -> int:
        return 1


_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def _layer_vjp(layer: nn.Module, x: Tensor, d_output: Tensor) -> dict[str, Tensor] | None:
    """The parameter gradients of a plain ``nn.Linear`` or ``nn.Conv*d`` (zero padding given as numbers, a batched
    input) for the output gradient ``d_output``, from their formulas (``dW = gᵀx``, ATen's ``convolution_backward``)
    without running the layer again to build a graph; None for any other module, and for one whose call runs hooks
    (a forward hook that changes the output makes the site the hook's output: the replay differentiates it)."""
    dims = _CONVS.get(type(layer))
    if type(layer) is not nn.Linear and dims is None or _hooked(layer):
        return None
    wanted = [name for name, param in layer.named_parameters(recurse=False) if param.requires_grad]
    if type(layer) is nn.Linear:
        g = d_output.reshape(-1, layer.out_features)
        grads = {"weight": lambda: g.t().mm(x.reshape(-1, layer.in_features)), "bias": lambda: g.sum(0)}
        return {name: grads[name]() for name in wanted}
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str) or x.dim() != dims + 2:
        return None
    _, d_weight, d_bias = torch.ops.aten.convolution_backward(
        d_output, x, layer.weight.detach(), [layer.out_channels] if layer.bias is not None else None, layer.stride,
        layer.padding, layer.dilation, False, [0] * dims, layer.groups, [False, "weight" in wanted, "bias" in wanted])
    return {name: {"weight": d_weight, "bias": d_bias}[name] for name in wanted}


def _hooked(module: nn.Module) -> bool:
    from torch.nn.modules import module as hooks  # the global hooks every module call runs

    return bool(module._forward_hooks or module._forward_pre_hooks or hooks._global_forward_hooks
                or hooks._global_forward_pre_hooks)


def _primal(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """A module's first input (positional, or the first keyword argument), without its tangent."""
    first = args[0] if args else next(iter(kwargs.values()), None)
    return fwAD.unpack_dual(first).primal if isinstance(first, Tensor) else None


_RELUS = (F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_)
_MAX_POOLS = {pool: dims for dims in (1, 2, 3) for pool in (
    getattr(F, f"max_pool{dims}d"), getattr(F, f"max_pool{dims}d_with_indices"), getattr(torch, f"max_pool{dims}d"))}


@dataclass
class _Site:
    """A perturbed call's output ``z`` as the watch follows it through the first pass: its mask (``True`` where the
    loss's derivative may be non-zero), made ``z > 0`` when a ReLU is ``z``'s one use, and the positions the max-pool
    picks when that pool is the one use of the ReLU's output; put back to all ``True`` when a second use shows up."""

    mask: Tensor
    relu: bool = False
    z_uses: int = 0
    r_uses: int = 0
    picks: Tensor | None = None


class _Watch(TorchFunctionMode):
    """Watches every torch call of the first forward-mode pass, for two things module hooks cannot see.

    - A trained parameter object used outside its owner's forward is refused. Inside the forward of the module that
      owns it the pass has put a dual tensor (the value with its tangent) in the parameter's place, so the parameter
      object met anywhere else (``F.linear(h, self.fc.weight)`` outside ``fc``'s forward) enters the computation
      without a tangent, and the directional derivative would silently miss that use. Reading metadata (shape, dtype)
      and explicit stop-gradients (``detach()``, ``.data``), whose results carry no gradient in autograd either, are
      not uses.
    - The uses of each perturbed output ``z`` (:meth:`follow`), from which its activity mask comes: ``∂L/∂z = 0``
      where ``z < 0`` holds only when a ReLU is ``z``'s one use, whatever container the modules sit in and however
      the model calls them (``F.relu``, ``nn.ReLU``, in place); and off a max-pool's picks only when that pool is the
      ReLU output's one use. A skip past the ReLU, an in-place change, any second use: no mask there (variance, never
      bias). Objects are followed by weak reference: the watch keeps no activation alive."""

    STOP_GRADIENT = (torch.Tensor.detach, torch.Tensor.detach_, torch.Tensor.data.__get__)  # type: ignore[attr-defined]

    def __init__(self, model: str, params: dict[str, nn.Parameter],
                 layers: dict[nn.Module, tuple[str, list[str]]]) -> None:
        super().__init__()
        self.model = model
        self.params = {id(param): (name, param) for name, param in params.items()}
        self.owners = {full_name(name, p): name for name, own in layers.values() for p in own}
        self.running: list[str] = []  # the modules owning parameters whose forward is running, innermost last
        self.paused = 0  # > 0 while the estimator's own code (the tangent source) runs
        self.sites: dict[tuple[str, int], _Site] = {}
        self.followed: dict[int, tuple[weakref.ref, _Site, bool]] = {}  # id -> (the object, its site, is the ReLU's)

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def mask(self, key: tuple[str, int], site: Tensor) -> Tensor:
        """Call ``key``'s mask, all ``True`` until the pass shows a ReLU as its output's one use; filled in place."""
        self.sites[key] = found = _Site(torch.ones_like(site, dtype=torch.bool))
        return found.mask

    def follow(self, key: tuple[str, int], output: Tensor) -> None:
        found = self.sites.get(key)
        if found is not None:
            self.followed[id(output)] = (weakref.ref(output), found, False)

    def settle(self) -> None:
        """The first pass is over: a ReLU's mask takes the pool's picks where the pool stayed its output's one use."""
        for found in self.sites.values():
            if found.picks is not None and found.r_uses == 1:
                found.mask.logical_and_(found.picks)
            found.picks = None
        self.followed.clear()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.paused:
            return result
        leaves = tree_leaves((args, kwargs))
        if self.followed:
            for value in leaves:
                entry = self.followed.get(id(value)) if isinstance(value, Tensor) else None
                if entry is not None and entry[0]() is value:
                    self.used(entry[1], entry[2], func, args, kwargs, result)
        if any(func == stop for stop in self.STOP_GRADIENT):
            return result
        for value in leaves:
            found = self.params.get(id(value))
            if found is not None and found[1] is value and any(isinstance(r, Tensor) for r in tree_leaves(result)):
                self.refuse(found[0], func)
        return result

    def used(self, found: _Site, relu_output: bool, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             result: Any) -> None:
        """A use of a followed object: ``z`` (``relu_output`` False) or its ReLU's output."""
        if relu_output:
            found.r_uses += 1
            dims = _MAX_POOLS.get(func)
            if found.r_uses == 1 and dims is not None and found.mask.dim() == dims + 2:
                names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
                bound = {**dict(zip(names, args[1:])), **{k: v for k, v in kwargs.items() if k in names}}
                pool = getattr(F, f"max_pool{dims}d_with_indices")
                _, indices = pool(_primal_of(args[0]), **bound)
                found.picks = _picked(found.mask.shape, indices)
            return
        found.z_uses += 1
        if found.z_uses == 1 and func in _RELUS and isinstance(result, Tensor):
            found.relu = True
            torch.gt(_primal_of(result), 0, out=found.mask)
            # the ReLU's output followed too; an in-place ReLU's is z's own object, whose later uses are the ReLU's
            self.followed[id(result)] = (weakref.ref(result), found, True)
        elif found.relu:  # z has a use besides the ReLU: no mask
            found.relu = False
            found.mask.fill_(True)
            found.picks = None
            found.r_uses = 2

    def refuse(self, name: str, func: Any) -> None:
        owner = self.owners.get(name, name.rpartition(".")[0])
        what = getattr(func, "__name__", repr(func))
        if what == "__get__":  # a property, e.g. Tensor.T
            what = f"Tensor.{getattr(getattr(func, '__self__', None), '__name__', '?')}"
        inside = f" (within the forward of {self.running[-1]!r})" if self.running else ""
        raise TorchBackendError(
            f"{self.model}: parameter {name!r} is used by {what} outside the forward of {owner!r}, the module that "
            f"owns it{inside}; the torch backend gives a parameter its tangent only inside its own module's forward, "
            f"so this use would get none and the forward gradient would be wrong. Call the module instead of reading "
            f"its parameter, or freeze the parameter (requires_grad=False)")


def _picked(shape: torch.Size, indices: Tensor) -> Tensor:
    """The positions of a ``(B, C, *spatial)`` input that a max-pool's windows pick (``indices`` into each flattened
    spatial plane, as ``F.max_pool{1,2,3}d(..., return_indices=True)`` gives them)."""
    keep = torch.zeros(shape[:2].numel(), shape[2:].numel(), dtype=torch.bool, device=indices.device)
    return keep.scatter_(1, indices.flatten(2).flatten(0, 1), True).view(shape)


class _LinearJvp(torch.autograd.Function):
    """``F.linear`` whose forward-mode rule builds the output's tangent in one buffer: ``x·dWᵀ + db`` (or ``db``
    broadcast), then ``dx·Wᵀ`` added in place by ``addmm_``. Torch's own rule allocates each term and then their sum:
    three output-sized buffers where this holds one, the engine's ``Linear.jvp``."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_forward(inputs[0], inputs[1])
        ctx.set_materialize_grads(False)  # a missing tangent comes as None, not as a tensor of zeros to multiply
        ctx.out_shape = output.shape

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, d_weight: Tensor | None, d_bias: Tensor | None) -> Tensor:
        x, weight = ctx.saved_tensors
        if d_weight is not None:
            out = F.linear(x, d_weight, d_bias)
        elif d_bias is not None:
            out = d_bias.expand(ctx.out_shape).clone()
        else:
            return F.linear(dx, weight)
        if dx is not None:
            if out.is_contiguous():
                out.view(-1, out.shape[-1]).addmm_(dx.reshape(-1, dx.shape[-1]), weight.t())
            else:
                out.add_(F.linear(dx, weight))
        return out


class _ConvJvp(torch.autograd.Function):
    """``F.conv1d``/``conv2d``/``conv3d`` whose forward-mode rule adds ``conv(dx, W)`` into ``conv(x, dW) + db`` in
    place: two output-sized buffers where torch's rule holds three."""

    @staticmethod
    def forward(conv: Any, x: Tensor, weight: Tensor, bias: Tensor | None, *args: Any) -> Tensor:
        return conv(x, weight, bias, *args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_forward(inputs[1], inputs[2])
        ctx.set_materialize_grads(False)
        ctx.conv, ctx.args, ctx.out_shape = inputs[0], inputs[4:], output.shape

    @staticmethod
    def jvp(ctx: Any, _: None, dx: Tensor | None, d_weight: Tensor | None, d_bias: Tensor | None,
            *__: Any) -> Tensor:
        x, weight = ctx.saved_tensors
        out = None
        if d_weight is not None:
            out = ctx.conv(x, d_weight, d_bias, *ctx.args)
        elif d_bias is not None:
            out = d_bias.view(-1, *[1] * (len(ctx.out_shape) - 2)).expand(ctx.out_shape).clone()
        if dx is not None:
            by_input = ctx.conv(dx, weight, None, *ctx.args)
            out = by_input if out is None else out.add_(by_input)
        return out


class _LeanRules(TorchFunctionMode):
    """During the forward-mode passes, ``F.linear`` and ``F.conv{1,2,3}d`` calls whose input, weight or bias carries a
    tangent run :class:`_LinearJvp` / :class:`_ConvJvp`: the same primal, the same derivative (summed in another
    order), less memory. Elsewhere (grad mode on, autocast, other dtypes or layouts, no tangent) torch's own rule.
    ``attention``: whether the model called ``F.scaled_dot_product_attention`` (which the passes run on torch's math
    kernel, the one with a forward-mode formula).

    Two more rules make forward mode give autograd's derivative where torch's own would fail or differ:

    - an in-place or ``out=`` update of one of the model's ``buffers`` runs on the primals of its arguments: a
      buffer is state updated under ``torch.no_grad()`` (spectral norm's power iteration, a running average of
      activations), a constant to autograd, and so without a tangent here (forward mode ignores ``no_grad``, and
      the passes run under it anyway);
    - ``torch._weight_norm`` (``parametrizations.weight_norm``), whose fused kernel has no forward-mode formula, is
      ``v · g / ‖v‖`` written out."""

    CONVS = (F.conv1d, F.conv2d, F.conv3d)
    NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")

    def __init__(self, buffers: set[int] | None = None) -> None:
        super().__init__()
        self.attention = False
        self.buffers = buffers or set()  # ids of the model's buffers

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.attention = self.attention or func is F.scaled_dot_product_attention
        if self.buffers and self.updates_buffer(func, args, kwargs):
            args, kwargs = tree_map_only(Tensor, _untangled, (args, kwargs))
            return func(*args, **kwargs)
        if func is torch._weight_norm:
            bound = {**dict(zip(("v", "g", "dim"), args)), **kwargs}
            return bound["v"] * (bound["g"] / torch.norm_except_dim(bound["v"], 2, bound.get("dim", 0)))
        convolution = func in self.CONVS
        if (func is F.linear or convolution) and set(kwargs) <= set(self.NAMES[len(args):7 if convolution else 3]):
            bound = {**dict(zip(self.NAMES, args)), **kwargs}
            operands = [bound.get(name) for name in self.NAMES[:3]]
            if self.applies(operands):
                if not convolution:
                    return _LinearJvp.apply(*operands)
                options = [bound.get(name, default) for name, default in zip(self.NAMES[3:], (1, 0, 1, 1))]
                return _ConvJvp.apply(func, *operands, *options)
        return func(*args, **kwargs)

    def updates_buffer(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        out = kwargs.get("out")
        if isinstance(out, Tensor) and id(out) in self.buffers:
            return True
        name = getattr(func, "__name__", "")
        in_place = (name.endswith("_") and not name.endswith("__")) or (name.startswith("__i") and name.endswith("__"))
        return in_place and bool(args) and isinstance(args[0], Tensor) and id(args[0]) in self.buffers

    @staticmethod
    def applies(values: list[Any]) -> bool:
        tensors = [v for v in values if v is not None]
        return (values[0] is not None and values[1] is not None and values[1].dim() >= 2
                and all(type(t) in (Tensor, nn.Parameter) for t in tensors)
                and not torch.is_grad_enabled() and not torch._C._is_any_autocast_enabled()
                and all(t.layout == torch.strided and t.dtype == tensors[0].dtype and t.dtype.is_floating_point
                        for t in tensors)
                and any(fwAD.unpack_dual(t).tangent is not None for t in tensors))


@dataclass
class RecordedCall:
    """One call of a module that owns trained parameters, as activity perturbation's weight step replays it
    (:meth:`TorchNetwork.layer_grads`): its positional and keyword arguments (their primals), the version of each
    tensor among them (a later in-place change is refused, as autograd refuses it) and the global random state it
    started from (so that a dropout inside the module draws the same mask again), and its buffers as they were (a
    copy: spectral norm's power iteration and running statistics move during the call)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng: tuple[Tensor, Tensor | None]
    versions: list[tuple[Tensor, int]]
    buffers: dict[str, Tensor]
    own: list[str]  # the module's trained parameters (relative names, TorchNetwork._layers')
    sums: Tensor | None = None  # the output's sum and absolute sum (float64): the replay must give them again

    @classmethod
    def of(cls, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], device: torch.device,
           own: list[str]) -> "RecordedCall":
        args, kwargs = tree_map_only(Tensor, _primal_of, (args, kwargs))
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        buffers = {name: _primal_of(b).clone() for name, b in module.named_buffers()}
        return cls(args, kwargs, rng_state(device), [(t, t._version) for t in tensors], buffers, own)

    def check_replay(self, model: str, name: str, output: Any) -> None:
        if self.sums is None:
            return
        again = _sums(output) if isinstance(output, Tensor) else None
        if again is None or bool((again[0] - self.sums[0]).abs() > 1e-4 * self.sums[1] + 1e-30):
            raise TorchBackendError(
                f"{model}: activity perturbation's weight step runs {name!r} again on the arguments and the random "
                f"state of its call, and it does not give the output of that call (it depends on state the replay "
                f"cannot see: a generator of its own, a Python attribute it changes): train this model with a "
                f"weight-perturbation estimator (naive, multi_direction, ...)")

    def check(self, model: str, name: str) -> None:
        if any(t._version != version for t, version in self.versions):
            raise TorchBackendError(
                f"{model}: an input of {name!r} is changed in place after {name!r} used it, so activity "
                "perturbation's weight step cannot take that input again (autograd would refuse the same): make the "
                "change out of place, or train with a weight-perturbation estimator (naive, multi_direction, ...)")


def _sums(output: Tensor) -> Tensor:
    return torch.stack([output.detach().sum(dtype=torch.float64), output.detach().abs().sum(dtype=torch.float64)])


def _primal_of(t: Tensor) -> Tensor:
    return fwAD.unpack_dual(t).primal


def _untangled(t: Tensor) -> Tensor:
    """``t`` without its tangent: its primal where it has one, else ``t`` itself."""
    primal, tangent = fwAD.unpack_dual(t)
    return t if tangent is None else primal


class _Tangents:
    """What one :meth:`TorchNetwork.jvp` call gives the model, pass after pass (one direction per pass): as each
    module that owns trained parameters starts its forward, its parameters become dual tensors carrying this
    direction's tangent (asked from the source at the module's first call, with its input); after each call of
    such a module, the source's activity tangent for that call is added to its output. The first pass also watches every
    use of a parameter and of each perturbed output (:class:`_Watch`).

    A source's tangents are kept, all K directions of every parameter (``given``: the result's ``tangents``), through
    the K passes. A :class:`ReplayedSource` (one that gives the same tangents whenever asked again: MeZO's seed replay)
    is asked again at every call of a module instead, and only this direction's slice of what it gives is kept, for
    that call alone: one module's K tangents alive while it is asked, one direction's while it runs, none between
    (memory flat in K, for K - 1 more draws of every tangent), and the result carries no ``tangents``, as the
    engine's pass."""

    def __init__(self, network: TorchNetwork, source: TangentSource, device: torch.device) -> None:
        self.network, self.source, self.device = network, source, device
        self.model = type(network.module).__name__
        self.layers = network._layers()
        self.uses = _Watch(self.model, dict(network.named_parameters()), self.layers)
        self.replay = isinstance(source, ReplayedSource)  # asked again at each call, nothing kept between calls
        self.activity_source = source if isinstance(source, ActivitySource) else None
        self.given: dict[str, Any] = {}  # full parameter name -> as the source gave it (not kept when replayed)
        self.dense: dict[str, Tensor] = {}  # full parameter name -> (K, *shape) (not kept when replayed)
        self.outer: set[str] = set()  # full parameter names whose tangent the source gave as an OuterTangent
        self.activities: dict[tuple[str, int], Tensor] = {}  # (module name, call) -> (K, *output.shape)
        self.calls: dict[str, int] = {}  # module name -> calls so far in this pass
        self.recorded: dict[nn.Module, list[RecordedCall]] = {}  # each running owner's call, innermost last
        self.current: tuple[str, int] | None = None  # the call whose activity the source is asked for
        self.num_dirs: int | None = None
        self.direction = 0
        self.swapped: list[tuple[nn.Module, dict[str, Any]]] = []

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        hooks = [h for module in self.layers
                 for h in (module.register_forward_pre_hook(self.before, with_kwargs=True, prepend=True),
                           module.register_forward_hook(self.after, with_kwargs=True))]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for holder, params in reversed(self.swapped):
                holder._parameters.update(params)

    def next_direction(self) -> bool:
        """Move to the next direction; False when all K are done."""
        self.direction += 1
        self.calls = {}
        return self.direction < (self.num_dirs or 0)

    def check_dirs(self, what: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
        if shape[1:] != expected or (self.num_dirs is not None and shape[0] != self.num_dirs):
            k = "" if self.num_dirs is None else f"={self.num_dirs}"
            raise ValueError(f"{what} has shape {shape}, expected (K{k}, {', '.join(map(str, expected))})")
        self.num_dirs = shape[0]

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name, own = self.layers[module]
        self.calls[name] = call = self.calls.get(name, 0) + 1
        with self.uses.pause():
            if call == 2 and any(full_name(name, p) in self.outer for p in own):
                raise TorchBackendError(
                    f"{self.model}: {name!r} is called more than once in one forward, and its weight's direction was "
                    f"drawn from the input of its first call (input_qr, input_approx), which does not span the "
                    f"gradient of its other calls: use an estimator with Gaussian directions (naive, "
                    f"multi_direction, ...)")
            # this call's tangents, this direction's, by full name: asked again (replayed) and held by the dual
            # tensors below for this call only; or views of all K, kept from the first call of the first pass
            if self.replay:
                mine = self.ask(name, module, own, args, kwargs)
            else:
                if self.direction == 0 and call == 1:
                    self.ask(name, module, own, args, kwargs)
                mine = {full: self.dense[full][self.direction] for full in (full_name(name, p) for p in own)
                        if full in self.dense}
            if self.direction == 0 and self.activity_source is not None:
                self.recorded.setdefault(module, []).append(RecordedCall.of(module, args, kwargs, self.device, own))
            for param in own:  # a plain (dual) tensor in each parameter's place, for this forward only
                holder_name, _, leaf = param.rpartition(".")
                holder = module.get_submodule(holder_name) if holder_name else module
                self.swapped.append((holder, {leaf: holder._parameters[leaf]}))
                value = holder._parameters[leaf].detach()
                tangent = mine.get(full_name(name, param))
                if tangent is not None:
                    value = fwAD.make_dual(value, tangent.to(value.dtype))
                holder._parameters[leaf] = value
            del mine
        self.uses.running.append(name)

    def ask(self, name: str, module: nn.Module, own: list[str], args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> dict[str, Tensor]:
        """Asks the source for the module's tangents; returns this direction's, by full parameter name (a copy
        when replayed: the source's ``(K, *shape)`` tensor is released as this returns)."""
        params = {p: v for p, v in module.named_parameters() if p in own}
        given = self.source.weights(name, module, _primal(args, kwargs), params)
        mine: dict[str, Tensor] = {}
        for param, tangent in given.items():
            full = full_name(name, param)
            if param not in own:
                raise ValueError(f"the tangent source gave a tangent for {full!r}, which is not a trained parameter")
            self.check_dirs(f"tangent for {full!r}", tuple(tangent.shape), tuple(params[param].shape))
            if isinstance(tangent, OuterTangent):
                self.outer.add(full)
            if self.replay:  # (*shape): direction d's outer product, or a copy of its slice
                d = self.direction
                mine[full] = (tangent.out_factor[d].unsqueeze(1) * tangent.in_factor[d].unsqueeze(0)
                              if isinstance(tangent, OuterTangent) else tangent[d].clone())
            else:
                self.given[full] = tangent
                self.dense[full] = tangent.dense() if isinstance(tangent, OuterTangent) else tangent
        return mine

    def after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        own = len(self.layers[module][1])
        for holder, params in self.swapped[-own:]:
            holder._parameters.update(params)
        del self.swapped[-own:]
        self.uses.running.pop()
        if self.activity_source is None:
            return None
        name = self.layers[module][0]
        key = (name, self.calls[name])
        with self.uses.pause():
            if not isinstance(output, Tensor):
                raise TorchBackendError(
                    f"{self.model}: activity perturbation adds a tangent to the output of every module that owns "
                    f"trained parameters, but {name!r} ({type(module).__name__}) returns a {type(output).__name__}, "
                    "not one tensor: train this model with a weight-perturbation estimator (naive, multi_direction, "
                    "...)")
            primal = fwAD.unpack_dual(output).primal
            if self.direction == 0:
                recorded = self.recorded[module].pop()
                recorded.sums = _sums(primal)
                self.current = key
                activity = self.activity_source.activity(name, module, recorded, primal)
                self.current = None
                if activity is None:
                    return None
                self.check_dirs(f"activity tangent of {name!r}", tuple(activity.shape), tuple(primal.shape))
                self.activities[key] = activity
            activity = self.activities.get(key)
            if activity is None:
                return None
            if self.direction == len(activity) - 1:  # the last pass that needs it
                del self.activities[key]
            # The output's tangent plus this direction's, added into the source's tensor in place: the pass owns it,
            # and each direction's slice is read by its own pass only.
            tangent, mine = fwAD.unpack_dual(output).tangent, activity[self.direction]
            added = mine if tangent is None else mine.add_(tangent)
            del output, tangent, activity, mine
            perturbed = fwAD.make_dual(primal, added)
        if self.direction == 0:
            self.uses.follow(key, perturbed)
        return perturbed

    def mask(self, site: Tensor) -> Tensor:
        """The current call's activity mask (see :meth:`TorchNetwork.activity_mask`)."""
        if self.current is None:
            raise RuntimeError("activity_mask is asked during a forward-mode pass, for the call being perturbed")
        return self.uses.mask(self.current, site)

    def check_first_pass(self) -> None:
        self.uses.settle()
        missed = [name for name, _ in self.layers.values() if name not in self.calls]
        if missed:
            raise TorchBackendError(
                f"{self.model}: the forward pass never ran the forward of {', '.join(repr(m) for m in missed)}, whose "
                "parameters are trained; the torch backend gives a parameter its tangent as its own module's forward "
                "runs (freeze unused parameters with requires_grad=False)")
        if self.num_dirs is None:
            raise ValueError("the tangent source gave no tangent: nothing to differentiate along")


class _ActivityDraws(GivenTangents, ActivitySource):
    """The check's source with activities: weight tangents by parameter name, and activity tangents in call order
    (copies: the check reads its draws after the pass)."""

    def __init__(self, weights: dict[str, Tensor], activities: list[Tensor]) -> None:
        super().__init__(weights)
        self.activities = iter(activities)

    def activity(self, name: str, layer: Any, layer_input: Tensor, output: Tensor) -> Tensor:
        return next(self.activities).clone()


class _SomeExamples(ActivitySource):
    """:meth:`TorchNetwork.check_examples_apart`'s source: one direction, a tangent on the examples ``rows`` (a
    boolean mask of the batch) of every perturbed output (a private generator: the run's random state is not
    touched)."""

    def __init__(self, model: str, rows: Tensor) -> None:
        self.model, self.rows = model, rows
        self.generator: torch.Generator | None = None

    def activity(self, name: str, layer: Any, layer_input: Any, output: Tensor) -> Tensor:
        if output.dim() == 0 or output.shape[0] != len(self.rows):
            raise TorchBackendError(
                f"{self.model}: activity perturbation draws each example's noise along the first axis of a module's "
                f"output, but the output of {name!r} has shape {tuple(output.shape)}, not the batch of "
                f"{len(self.rows)} examples first: make the batch the first axis (batch_first=True), or train with "
                "a weight-perturbation estimator (naive, multi_direction, ...)")
        if self.generator is None:
            self.generator = torch.Generator(output.device).manual_seed(0)
        tangent = torch.zeros((1, *output.shape), dtype=output.dtype, device=output.device)
        tangent[0, self.rows] = torch.randn((int(self.rows.sum()), *output.shape[1:]), generator=self.generator,
                                            device=output.device, dtype=output.dtype)
        return tangent


def _apart(tree: Any, rows: Tensor) -> bool:
    """Whether every tangent among the tensors of ``tree`` is zero off the examples ``rows`` (along the first axis;
    a tensor without the batch there: zero everywhere)."""
    for value in tree_leaves(tree):
        tangent = fwAD.unpack_dual(value).tangent if isinstance(value, Tensor) else None
        if tangent is None:
            continue
        off = tangent[~rows] if tangent.dim() and len(tangent) == len(rows) else tangent
        if bool(off.any()):
            return False
    return True


@contextlib.contextmanager
def _outputs_of(layers: dict[nn.Module, tuple[str, list[str]]], model: str = "") -> Iterator[list[Tensor]]:
    """Collects the tensor output of every call of ``layers``, in call order. The model goes on with a copy, so that
    an in-place op after the module (``nn.ReLU(inplace=True)``) leaves the collected output as the module gave it,
    the tensor activity perturbation perturbs."""
    outputs: list[Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, Tensor):
            return None
        if not output.requires_grad:  # its module's own trained parameters would give it a gradient
            raise TorchBackendError(
                f"{model}: activity perturbation perturbs the output of {layers[module][0]!r} "
                f"({type(module).__name__}), which "
                "this model computes outside autograd's graph (under torch.no_grad, or inside "
                "checkpoint(use_reentrant=True)), so its derivative cannot be checked against autograd's: use "
                "checkpoint(use_reentrant=False), or train with a weight-perturbation estimator (naive, "
                "multi_direction, ...)")
        outputs.append(output)
        return output.clone()

    hooks = [module.register_forward_hook(keep) for module in layers]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()

"""Fine-tuning a pretrained ``torch.nn`` model without a backward pass: its starting weights and its adapters.

Both are functions that take a model and return it, so a config names them where it names the model (jsonargparse
builds a ``class_path`` that is a function returning a module)::

    model:
      network:
        class_path: fg_lightning.finetune.lora            # PEFT LoRA adapters on the pretrained model
        init_args:
          r: 8
          target_modules: [mlp.0, mlp.3, heads.head]
          model:
            class_path: fg_lightning.finetune.pretrained  # its weights from a checkpoint fg-cli wrote
            init_args:
              checkpoint: tb_logs/vit_pretrain/version_0/checkpoints/last.ckpt
              model: {class_path: fg_lightning.models.ViT}

Which parameters train is the module's ``trainable`` (names or patterns), or, with LoRA, the adapters alone (PEFT
freezes the rest): the frozen ones get no tangent, no perturbation and no optimizer state.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

import torch
from torch import nn

MISSING_EXTRA = "{what} needs {package}: pip install 'fg-lightning[finetune]'"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, or whose weights do not fit the model."""


def pretrained(model: nn.Module, checkpoint: str, key_prefix: str | None = None,
               skip: list[str] | None = None) -> nn.Module:
    """``model`` with its weights from ``checkpoint``: a checkpoint ``fg-cli`` (Lightning) wrote, whose
    ``state_dict`` holds the network under ``network.module.`` (``key_prefix`` to take another prefix), or a file of
    ``model.state_dict()`` as ``torch.save`` wrote it. ``skip``: names or patterns (``fnmatch``) of the model's
    weights left as the model initialised them, a new classifier head for a new task, say (torchvision's ViT starts
    its head at zero). Every other weight must fit: a missing, unexpected or mis-shaped one, or a ``skip`` pattern
    matching no weight, is refused in one line naming it, before anything is trained.

    Example::

        model = pretrained(ViT(), "tb_logs/vit_pretrain/version_0/checkpoints/last.ckpt", skip=["heads.*"])
    """
    skip = [] if skip is None else skip
    if isinstance(skip, str) or not all(isinstance(pattern, str) and pattern for pattern in skip):
        raise CheckpointError(f"skip must be a list of weight names or patterns, got skip={skip!r}")
    unmatched = [p for p in skip if not any(fnmatch.fnmatchcase(name, p) for name in model.state_dict())]
    if unmatched:
        raise CheckpointError(f"skip pattern(s) {unmatched} match no weight of {type(model).__name__}")
    if not isinstance(checkpoint, (str, os.PathLike)) or not os.path.isfile(checkpoint):
        raise CheckpointError(f"checkpoint {checkpoint!r} is not a file")
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as error:  # a file torch cannot read: say which, in one line
        raise CheckpointError(f"checkpoint {checkpoint!r} cannot be loaded: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}") from error
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {checkpoint!r} holds no state_dict")
    prefix = ("network.module." if "state_dict" in saved else "") if key_prefix is None else key_prefix

    def skipped(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)

    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not skipped(k[len(prefix):])}
    expected = {k: v for k, v in model.state_dict().items() if not skipped(k)}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{what} {names[:3]}{' …' if len(names) > 3 else ''}" for what, names in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if names]
        raise CheckpointError(f"checkpoint {checkpoint!r} does not fit {type(model).__name__} "
                              f"(prefix {prefix!r}): {'; '.join(parts)}")
    model.load_state_dict(weights, strict=not skip)
    return model


def lora(model: nn.Module, target_modules: list[str] | str, r: int = 8, alpha: int = 16, dropout: float = 0.0,
         modules_to_save: list[str] | None = None) -> nn.Module:
    """``model`` with PEFT's LoRA adapters (``peft.get_peft_model(model, LoraConfig(...))``) on ``target_modules``
    (names or a regular expression, as PEFT takes them; ``nn.Linear`` / ``nn.Conv2d`` layers): every other
    parameter is frozen, so the estimators perturb and update the adapters alone (and the ``modules_to_save``,
    trained whole: a new classifier head, say). ``lora_B`` starts at zero: the model starts as the pretrained one.

    Example::

        module = ForwardGradientModule(lora(ViT(), target_modules=["mlp.0", "mlp.3"]), ZerothOrder(k=1))
    """
    try:
        import peft
    except ImportError as error:
        raise ImportError(MISSING_EXTRA.format(what="lora", package="peft")) from error
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                             modules_to_save=modules_to_save)
    return _Adapted(peft.get_peft_model(model, config))


class _Adapted(nn.Module):
    """A PEFT model called as the model it wraps (``PeftModel.forward`` for a plain ``torch.nn`` model passes its
    arguments on as keywords), its parameters under ``model.``."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.get_base_model()(*args, **kwargs)

"""A run's checkpoints: find the newest, read one, and refuse one made for another model or with other settings.

The checks :class:`~fg_lightning.ForwardGradientModule` makes as it loads a checkpoint, and ``fg-cli``'s
``--ckpt_path last``; usable from any script: ``Trainer(...).fit(module, ckpt_path=newest_checkpoint("tb_logs/mlp_naive"))``.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: none found or unreadable, another model, or (resuming) other settings."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint holds another network or estimator than the module it is loaded into."""


def newest_checkpoint(root: str) -> str:
    """The newest checkpoint of the runs under ``root`` (``<save_dir>/<name>``: ``version_*/checkpoints/*.ckpt``): the
    newest version's, then the highest global step, then the newest file. Not ``last.ckpt`` by name: a run stopped by
    ``max_steps`` has its newest state in its epoch-end checkpoint, one stopped by an exception in
    ``interrupted.ckpt``. (Lightning's own ``ckpt_path="last"`` only looks in the new run's folder.)"""
    found = glob.glob(os.path.join(glob.escape(root), "version_*", "checkpoints", "*.ckpt"))
    if not found:
        raise CheckpointError(f"no checkpoint to resume: none under {os.path.join(root, 'version_*', 'checkpoints')}/")

    def newest_first(path: str) -> tuple[int, int, float]:
        version = os.path.basename(os.path.dirname(os.path.dirname(path)))[len("version_"):]
        try:  # mmap: only the few bytes of the step are read
            step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        except Exception:  # unreadable: ranked last of its version; if picked, read_checkpoint names the file
            step = -1
        return int(version) if version.isdigit() else -1, step, os.path.getmtime(path)

    return max(found, key=newest_first)


def read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at ``path`` (tensors memory-mapped), or a :class:`CheckpointError` naming the file: missing, a
    folder, truncated or corrupted, or no Lightning checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found" + " (a folder: give a .ckpt file)" * os.path.isdir(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # zip reader, unpickler, EOF...: all mean the file is not a whole checkpoint
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:200]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"<prefix>.a.b": 1}``; lists and scalars are leaves."""
    if not (isinstance(value, dict) and value):
        return {prefix: value}
    return {key: leaf for name, item in value.items() for key, leaf in _flat(item, f"{prefix}.{name}").items()}


def _describe(model: dict[str, Any], other: dict[str, Any]) -> str:
    """``network(args) trained by estimator(args)``, with only the arguments that differ from `other`'s."""
    calls = []
    for part, theirs in ((model.get(key) or {}, other.get(key) or {}) for key in ("network", "estimator")):
        same = part.get("class_path") == theirs.get("class_path")
        args = [f"{k}={v!r}" for k, v in (part.get("init_args") or {}).items()
                if not same or (theirs.get("init_args") or {}).get(k) != v]
        calls.append(f"{part.get('class_path')}({', '.join(args)})")
    return " trained by ".join(calls)


def check_settings(saved: dict[str, Any], mine: dict[str, Any], path: str | None, resuming: bool) -> None:
    """Refuse a checkpoint whose hyperparameters ``saved`` (a module built from a config, as by LightningCLI: the
    parsed config's model section) are another config's than ``mine``: another network (class or arguments) or
    estimator class always; when ``resuming`` training, any other setting too, since the run continues as it was
    configured. Settings new since the checkpoint was written are not compared."""
    theirs, asked = _flat(saved, "model"), _flat(mine, "model")
    differ = [key for key in theirs if key != "model._instantiator" and theirs[key] != asked.get(key)]
    path = path or "the checkpoint"
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml")
    hint = f"; its run's config is {os.path.relpath(config)}" if os.path.isfile(config) else ""
    if any(key.startswith("model.network.") or key == "model.estimator.class_path" for key in differ):
        raise CheckpointError(f"checkpoint {path} holds {_describe(saved, mine)}, but the config asks for "
                              f"{_describe(mine, saved)}: give the config it was trained with{hint}")
    if differ and resuming:
        raise CheckpointError(f"cannot resume {path} with other settings: " + "; ".join(
            f"{key} is {theirs[key]!r} in the checkpoint, {asked.get(key)!r} in the config" for key in differ) +
            ". Resuming continues that run as it was configured: give the settings it was trained with (drop the "
            f"new override, or repeat the old one{hint}), or start a new run without --ckpt_path")

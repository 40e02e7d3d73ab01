"""Resuming an fg-cli run continues it as if it had never stopped: the same losses at the same logged steps.

A tiny MLP (32 hidden units) on the small IDX files: 80 training images in batches of 8 are 10 steps per epoch, so
a stop at step 4 is mid-epoch and the resumed runs cross an epoch boundary (and validate epoch 0).
"""

from __future__ import annotations

import glob
import os

import lightning.pytorch as pl
import pytest
import torch
import yaml
from config_files import load_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fg_lightning.module as module_file
from fg_lightning.callbacks import StepTimer
from fg_lightning.cli import main as fg_cli

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "mlp_naive.yaml")
TAGS = ("train/loss", "val/loss")



def fit(save_dir, idx_root, max_steps, *extra, config=CONFIG):
    fg_cli(["fit", "--config", str(config), "--data.root", idx_root, "--data.download", "false",
            "--data.batch_size", "8", "--data.val_size", "16", "--model.network.init_args.hidden", "[32]",
            "--model.optimizer.init_args.lr", "0.01", "--trainer.max_steps", str(max_steps),
            "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir), *extra])


def logged(save_dir, *versions):
    """``{tag: [(step, value), ...]}`` of TAGS over the given versions' event files, in the versions' order."""
    found = {tag: [] for tag in TAGS}
    for version in versions:
        for path in sorted(glob.glob(os.path.join(str(save_dir), "mlp_naive", f"version_{version}", "events.*"))):
            events = EventAccumulator(path)
            events.Reload()
            for tag in TAGS:
                if tag in events.Tags()["scalars"]:
                    found[tag] += [(e.step, e.value) for e in events.Scalars(tag)]
    return found


def checkpoints(save_dir, version=0):
    return os.path.join(str(save_dir), "mlp_naive", f"version_{version}", "checkpoints")


@pytest.fixture(scope="module")
def straight(idx_root, tmp_path_factory):
    """What an uninterrupted 14-step run logs."""
    save_dir = tmp_path_factory.mktemp("straight")
    fit(save_dir, idx_root, 14)
    found = logged(save_dir, 0)
    assert len(found["train/loss"]) == 14 and len(found["val/loss"]) == 1  # epoch 0 validated once
    return found


@pytest.mark.parametrize("ckpt", ["last", "epoch=0-step=4.ckpt"])
def test_resume_after_max_steps_continues_the_epoch(ckpt, straight, idx_root, tmp_path):
    # Both checkpoints are written after max_steps ended epoch 0 at its 4th of 10 batches: the epoch-end one by the
    # config's "{epoch}-{step}" ModelCheckpoint, last.ckpt as training ends.
    fit(tmp_path, idx_root, 4)
    path = ckpt if ckpt == "last" else os.path.join(checkpoints(tmp_path), ckpt)
    fit(tmp_path, idx_root, 14, "--ckpt_path", path)
    assert logged(tmp_path, 0, 1) == straight


def test_max_steps_mid_epoch_does_not_step_an_epoch_schedule(idx_root, tmp_path):
    schedule = ["--model.lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler.step_size", "1",
                "--model.lr_scheduler.gamma", "0.1"]
    fit(tmp_path / "straight", idx_root, 14, *schedule)
    fit(tmp_path / "stopped", idx_root, 4, *schedule)
    fit(tmp_path / "stopped", idx_root, 14, *schedule, "--ckpt_path", "last")
    assert logged(tmp_path / "stopped", 0, 1) == logged(tmp_path / "straight", 0)


def test_ckpt_path_last_takes_the_newest_step_not_a_stale_last_ckpt(straight, idx_root, tmp_path):
    # last.ckpt every 3 steps: after max_steps 4 it holds step 3, the newest state is epoch=0-step=4.ckpt
    config = load_config("mlp_naive")
    for callback in config["trainer"]["callbacks"]:
        if (callback.get("init_args") or {}).get("every_n_train_steps"):
            callback["init_args"]["every_n_train_steps"] = 3
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    fit(tmp_path, idx_root, 4, config=path)
    assert torch.load(os.path.join(checkpoints(tmp_path), "last.ckpt"), weights_only=True)["global_step"] == 3
    fit(tmp_path, idx_root, 14, "--ckpt_path", "last", config=path)
    assert logged(tmp_path, 0, 1) == straight  # step 4 is not trained (nor logged) twice


def interrupt_before_update(monkeypatch, at_step):
    """At global step ``at_step`` the module's training step draws its estimate, then a KeyboardInterrupt stops it
    before the update, as a Ctrl-C would there; returns a function that undoes it."""
    original = module_file.training_step

    def interrupted(estimator, network, x, labels, step, optimizer, comm, **kwargs):
        if step == at_step:
            estimator.estimate(network, x, labels, step, comm)
            raise KeyboardInterrupt
        return original(estimator, network, x, labels, step, optimizer, comm, **kwargs)

    monkeypatch.setattr(module_file, "training_step", interrupted)
    return lambda: monkeypatch.setattr(module_file, "training_step", original)


def interrupt(monkeypatch, cls, name, at_step):
    """Make ``cls.name`` (a method taking the trainer or module first) raise KeyboardInterrupt at global step
    ``at_step``, as a Ctrl-C would there; returns a function that undoes it."""
    original = getattr(cls, name)

    def interrupted(self, *args):
        module = args[1] if isinstance(self, pl.Callback) else self
        result = original(self, *args)
        if module.global_step == at_step:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(cls, name, interrupted)
    return lambda: monkeypatch.setattr(cls, name, original)


@pytest.mark.parametrize("where", ["before-the-update", "after-the-update"])
def test_resume_after_an_interrupt_inside_a_step_logs_the_same_steps(where, straight, idx_root, tmp_path, monkeypatch):
    if where == "before-the-update":  # the 6th step's directions are drawn, its update is not applied
        undo = interrupt_before_update(monkeypatch, 5)
    else:  # the 6th update is applied, the step has not logged yet
        undo = interrupt(monkeypatch, StepTimer, "on_update_end", 6)
    with pytest.raises(SystemExit):
        fit(tmp_path, idx_root, 14)
    assert os.path.isfile(os.path.join(checkpoints(tmp_path), "interrupted.ckpt"))
    undo()
    fit(tmp_path, idx_root, 14, "--ckpt_path", "last")
    expected = dict(straight)
    if where == "after-the-update":  # not trained twice; its loss (logged at step 5) was never logged
        expected["train/loss"] = [(step, value) for step, value in straight["train/loss"] if step != 5]
    assert logged(tmp_path, 0, 1) == expected


def test_a_run_resumed_twice_logs_the_same_steps(straight, idx_root, tmp_path, monkeypatch):
    undo = interrupt_before_update(monkeypatch, 2)
    with pytest.raises(SystemExit):
        fit(tmp_path, idx_root, 14)
    undo()
    fit(tmp_path, idx_root, 6, "--ckpt_path", "last")
    fit(tmp_path, idx_root, 14, "--ckpt_path", "last")
    assert logged(tmp_path, 0, 1, 2) == straight

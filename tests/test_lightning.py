"""The Lightning layer: ForwardGradientModule, callbacks, checkpoint resume, divergence and fg-cli with every config."""

from __future__ import annotations

import glob
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from idx_files import needs_fashion
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fg_lightning.callbacks import EstimatorSummary, ExceptionCheckpoint, GradientCosine, PeakMemory, StepTimer
from fg_lightning.cli import main as fg_cli
from fg_lightning.data import MNISTDataModule
from fg_lightning.engine import CNN, MLP
from fg_lightning.estimators import REGISTRY, Backprop, MomentumForwardGradient, MultiDirection, NaiveForwardGradient
from fg_lightning.estimators.collective import ONE_PROCESS
from fg_lightning.module import CheckpointMismatchError, DivergenceError, ForwardGradientModule

CONFIGS = sorted(path for path in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml"))
                 if not path.endswith("trainer.yaml"))  # the trainer settings the configs share
# the fine-tuning configs start from a pretraining run's checkpoint: tests/test_finetune.py runs them from one
STANDALONE = [path for path in CONFIGS if not os.path.basename(path).startswith("vit_finetune_")]



def scalars(log_dir):
    files = glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no event file under {log_dir}"
    values = {}
    for path in files:
        events = EventAccumulator(path)
        events.Reload()
        for tag in events.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in events.Scalars(tag))
    return values


def cli_args(config, idx_root, tmp_path, *extra):
    return ["fit", "--config", config, "--data.root", idx_root, "--data.download", "false", "--data.batch_size", "8",
            "--data.val_size", "16", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
            "--trainer.val_check_interval", "3",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "tb_logs"), *extra]


def test_there_is_a_config_per_network_and_registered_estimator():
    import yaml

    names = {os.path.basename(c)[:-5] for c in CONFIGS}
    engine = {name for name in names if not name.startswith(("torch_", "vit_", "mixer_"))}  # torch.nn models (torch
    # backend), and the Mixer's baseline and Ren et al.'s recipe on it
    assert engine == {f"{net}_{name}" for net in ("mlp", "cnn") for name in REGISTRY}
    assert {name for name in names if name.startswith("mixer_")} == {"mixer_backprop", "mixer_local_activity"}
    assert "torch_resnet_multi_direction" in names
    for net in ("mlp", "cnn"):
        for name, spec in REGISTRY.items():
            with open(os.path.join(os.path.dirname(CONFIGS[0]), f"{net}_{name}.yaml")) as f:
                model = yaml.safe_load(f)["model"]
            assert model["estimator"]["class_path"] == f"fg_lightning.estimators.{spec.cls.__name__}"
            assert spec.kwargs.items() <= (model["estimator"].get("init_args") or {}).items(), (net, name)
            assert model["network"]["class_path"] == f"fg_lightning.engine.{net.upper()}"
            # the registry record is the one place of the configs' settings
            assert float(model["optimizer"]["init_args"]["lr"]) == spec.lr[net], (net, name)  # YAML reads 1e-06 as text
            assert (model["estimator"].get("init_args") or {}).get("k") == spec.k, (net, name)


@pytest.mark.parametrize("config", STANDALONE, ids=[os.path.basename(c)[:-5] for c in STANDALONE])
def test_every_config_runs_through_fg_cli(config, idx_root, tmp_path):
    fg_cli(cli_args(config, idx_root, tmp_path))
    name = os.path.basename(config)[:-5]
    run_dir = tmp_path / "tb_logs" / name / "version_0"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "hparams.yaml").is_file()
    values = scalars(str(run_dir))
    for tag in ("train/loss", "perf/step_ms", "grad/cosine", "val/acc"):
        assert values.get(tag), f"{name}: no {tag} in {sorted(values)}"
    assert all(np.isfinite(values["train/loss"]))
    if name.endswith("_backprop"):
        assert values["grad/cosine"][0] == pytest.approx(1.0, abs=1e-5)


def test_the_tags_the_docs_name_are_the_tags_logged(idx_root, tmp_path):
    import re

    page = open(os.path.join(os.path.dirname(__file__), "..", "docs", "getting-started.md")).read()
    paragraph = page[page.index("TensorBoard tags:"):].split("\n\n")[0]
    named = set(re.findall(r"`([a-z_]+/[a-z_/.<>]+)`", paragraph))
    config = [c for c in CONFIGS if c.endswith("mlp_momentum.yaml")][0]  # momentum: steps with and without backprop
    args = cli_args(config, idx_root, tmp_path, "--model.estimator.init_args.fix_gap", "3")
    args[args.index("--trainer.max_steps") + 1] = "10"  # one epoch: the per-epoch medians too
    fg_cli(args)
    logged = set(scalars(str(tmp_path / "tb_logs" / "mlp_momentum")))
    # test/* come from `fg-cli test`, perf/peak_mem_mb from CUDA only, grad/error/<param> are histograms
    expected = {tag for tag in named if not tag.startswith("test/") and tag != "perf/peak_mem_mb"
                and not tag.startswith("grad/error/")}
    expected = {tag.replace("<param>", "fc1.weight") for tag in expected}
    assert expected <= logged, expected - logged
    assert not {tag for tag in logged if tag.startswith("train/acc_")}, logged


def test_cli_override_and_print_config(idx_root, tmp_path, capsys):
    config = [c for c in CONFIGS if c.endswith("mlp_multi_direction.yaml")][0]
    with pytest.raises(SystemExit) as exit_info:
        fg_cli(cli_args(config, idx_root, tmp_path, "--model.estimator.init_args.k", "7", "--print_config"))
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "fg_lightning.estimators.MultiDirection" in printed and "k: 7" in printed


@pytest.mark.parametrize("extra, message", [
    (["--model.estimator.init_args.k", "-2"], "k=-2"),
    (["--data.dataset", "cifar10"], "'cifar10'"),
], ids=["negative-k", "unknown-dataset"])
def test_bad_config_fails_before_training_with_a_clear_error(extra, message, idx_root, tmp_path, capsys):
    config = [c for c in CONFIGS if c.endswith("mlp_multi_direction.yaml")][0]
    with pytest.raises(SystemExit) as exit_info:
        fg_cli(cli_args(config, idx_root, tmp_path, *extra))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "tb_logs").exists() or not glob.glob(str(tmp_path / "tb_logs" / "**" / "*.ckpt"), recursive=True)


def test_missing_data_files_give_one_clear_error(tmp_path, capsys):
    config = [c for c in CONFIGS if c.endswith("mlp_backprop.yaml")][0]
    with pytest.raises(SystemExit) as exit_info:
        fg_cli(cli_args(config, str(tmp_path / "empty"), tmp_path))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "DatasetNotFoundError" in err and str(tmp_path / "empty") in err and "download" in err
    assert "Traceback" not in err


def make_module(estimator, lr):
    return ForwardGradientModule(MLP(hidden=(32,), seed=0), estimator, lambda p: torch.optim.SGD(p, lr=lr))


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))  # manual optimization wraps the step output in a dict


def trainer(tmp_path, max_steps, callbacks=(), **kwargs):
    return pl.Trainer(max_steps=max_steps, callbacks=list(callbacks), logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      default_root_dir=str(tmp_path), **kwargs)


def data(idx_root):
    return MNISTDataModule(root=idx_root, download=False, batch_size=8, val_size=16, seed=3)


def test_global_step_counts_optimizer_steps_and_max_steps_stops(idx_root, tmp_path):
    module = make_module(Backprop(), 0.05)
    assert not {"network", "estimator", "optimizer"} & set(module.hparams)  # objects built by hand are not hparams
    before = [p.clone() for p in module.network.parameters()]
    run = trainer(tmp_path, 7, enable_checkpointing=False)
    run.fit(module, datamodule=data(idx_root))
    assert run.global_step == 7
    assert all(not torch.equal(a, b) for a, b in zip(before, module.network.parameters()))


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 0.0])  # a negative one: torch.optim names it
def test_a_learning_rate_that_is_not_finite_and_positive_is_refused_as_the_module_is_built(lr):
    """torch.optim takes nan, inf and 0; the module refuses them by name, for Python users of Trainer as for fg-cli."""
    with pytest.raises(ValueError, match=f"^lr {lr} is not a finite positive number"):
        ForwardGradientModule(MLP(hidden=(8,), seed=0), NaiveForwardGradient(),
                              optimizer=lambda params: torch.optim.SGD(params, lr=lr))


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_a_precision_the_passes_are_not_checked_under_is_refused_before_any_step(precision, idx_root, tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    module = make_module(Backprop(), 0.05)
    before = [p.clone() for p in module.network.parameters()]
    with pytest.raises(MisconfigurationException, match=f"^precision {precision} is not supported"):
        trainer(tmp_path, 2, enable_checkpointing=False, precision=precision).fit(module, datamodule=data(idx_root))
    assert all(torch.equal(a, b) for a, b in zip(before, module.network.parameters()))


class Crash(pl.Callback):
    """Kills a run as it is about to take step ``at`` (a crash or a pre-empted job)."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("make_estimator", [
    lambda: MomentumForwardGradient(fix_gap=4, decrease_gap=4, seed=5),
    lambda: NaiveForwardGradient(seed=5),
], ids=["momentum", "naive"])
@pytest.mark.parametrize("crash_at", [6, 10], ids=["mid-epoch", "epoch-end"])  # 80 training images / 8 = 10 per epoch
@pytest.mark.parametrize("saved_by", ["every-step", "on-exception"])
def test_resuming_from_a_checkpoint_gives_the_same_losses(make_estimator, crash_at, saved_by, idx_root, tmp_path):
    total = 17
    straight = LossRecorder()
    trainer(tmp_path / "a", total, [straight], enable_checkpointing=False).fit(
        make_module(make_estimator(), 1e-3), datamodule=data(idx_root))

    first = LossRecorder()
    if saved_by == "every-step":
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, save_last=True)
        path = tmp_path / "ckpt" / "last.ckpt"
    else:  # only the checkpoint written as the crash stops the run
        checkpoint = ExceptionCheckpoint(dirpath=str(tmp_path / "ckpt"))
        path = tmp_path / "ckpt" / "interrupted.ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "b", total, [first, checkpoint, Crash(crash_at)]).fit(
            make_module(make_estimator(), 1e-3), datamodule=data(idx_root))
    second = LossRecorder()
    trainer(tmp_path / "c", total, [second], enable_checkpointing=False).fit(
        make_module(make_estimator(), 1e-3), datamodule=data(idx_root), ckpt_path=str(path))
    assert len(straight.losses) == total and len(first.losses) == crash_at
    assert first.losses + second.losses == straight.losses


def test_divergence_stops_with_a_clear_message_and_saves_the_last_finite_parameters(idx_root, tmp_path):
    module = make_module(NaiveForwardGradient(), 1e4)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, save_last=True)
    recorder = LossRecorder()
    with pytest.raises(DivergenceError, match=r"diverged at step \d+.*NaiveForwardGradient.*learning rate 10000.*"
                                              r"parameters before this step are saved in .*interrupted\.ckpt"):
        trainer(tmp_path, 50, [recorder, checkpoint, ExceptionCheckpoint()]).fit(module, datamodule=data(idx_root))
    assert recorder.losses and all(np.isfinite(recorder.losses)), "steps before the divergence trained normally"
    for name in ("last.ckpt", "interrupted.ckpt"):
        saved = torch.load(tmp_path / "ckpt" / name, weights_only=False)
        assert saved["global_step"] == len(recorder.losses)
        assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())


def test_a_non_finite_input_batch_is_named_as_such(idx_root, tmp_path):
    class PoisonBatch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                batch[0][0, 0] = float("nan")

    with pytest.raises(DivergenceError, match="input batch of step 2 holds NaN or infinite values"):
        trainer(tmp_path, 5, [PoisonBatch()], enable_checkpointing=False).fit(
            make_module(Backprop(), 0.01), datamodule=data(idx_root))


def test_running_out_of_memory_names_k(idx_root, tmp_path):
    module = ForwardGradientModule(MLP(seed=0), MultiDirection(k=1_000_000))  # 1.9M parameters x 1e6 directions
    with pytest.raises(MemoryError, match="k=1000000 directions"):
        trainer(tmp_path, 1, enable_checkpointing=False).fit(module, datamodule=data(idx_root))


@pytest.mark.parametrize("interval, limit, expected", [("step", {"max_steps": 3}, 0.1 * 0.5**3),
                                                       ("epoch", {"max_epochs": 2}, 0.1 * 0.5**2)])
def test_lr_scheduler_is_stepped_per_interval(interval, limit, expected, idx_root, tmp_path):
    module = ForwardGradientModule(MLP(hidden=(32,), seed=0), Backprop(), lambda p: torch.optim.SGD(p, lr=0.1),
                                   lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                                   lr_scheduler_interval=interval)
    limit = {"max_steps": -1, **limit}
    pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
               limit_val_batches=0, enable_checkpointing=False, **limit).fit(module, datamodule=data(idx_root))
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(expected)


def test_reduce_on_plateau_steps_on_the_validation_loss(idx_root, tmp_path):
    # mode="max" on a falling val/loss: no improvement after the first epoch, so the rate halves at the next two
    module = ForwardGradientModule(
        MLP(hidden=(32,), seed=0), Backprop(), lambda p: torch.optim.SGD(p, lr=0.1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0, factor=0.5))
    pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0, enable_checkpointing=False).fit(module, datamodule=data(idx_root))
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_bounds_the_update(algorithm, idx_root, tmp_path):
    module = ForwardGradientModule(MLP(hidden=(32,), seed=0), NaiveForwardGradient(), lambda p: torch.optim.SGD(p, lr=1.0),
                                   gradient_clip_val=1e-3, gradient_clip_algorithm=algorithm)
    before = [p.clone() for p in module.network.parameters()]
    trainer(tmp_path, 1, enable_checkpointing=False).fit(module, datamodule=data(idx_root))
    update = torch.cat([(a - b).flatten() for a, b in zip(before, module.network.parameters())])  # lr 1: the estimate
    if algorithm == "norm":
        assert float(update.norm()) == pytest.approx(1e-3, rel=1e-3)
    else:
        assert float(update.abs().max()) == pytest.approx(1e-3, rel=1e-3) and float(update.norm()) > 2e-3
    with pytest.raises(ValueError, match="gradient_clip_algorithm must be 'norm' or 'value', got 'l1'"):
        ForwardGradientModule(MLP(hidden=(8,)), Backprop(), gradient_clip_val=1.0, gradient_clip_algorithm="l1")


def test_checkpoint_of_another_network_or_estimator_is_refused(idx_root, tmp_path):
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer(tmp_path, 2, [checkpoint]).fit(make_module(NaiveForwardGradient(), 1e-3), datamodule=data(idx_root))
    last = str(tmp_path / "ckpt" / "last.ckpt")
    for module, message in (
        (ForwardGradientModule(CNN(channels=(2, 2, 2), hidden=8), NaiveForwardGradient()), r"holds MLP \(32x10\).*is CNN"),
        (make_module(MomentumForwardGradient(), 1e-3), "trained by NaiveForwardGradient.*trained by MomentumForwardGradient"),
    ):
        with pytest.raises(CheckpointMismatchError, match=message):
            trainer(tmp_path, 4, enable_checkpointing=False).fit(module, datamodule=data(idx_root), ckpt_path=last)


@pytest.mark.parametrize("crash_at", [6, 10], ids=["mid-epoch", "epoch-end"])  # 10 steps per epoch
def test_step_timer_keeps_its_epochs_times_across_a_resume(crash_at, idx_root, tmp_path):
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, save_last=True)
    first = StepTimer(warmup=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path, 20, [first, checkpoint, Crash(crash_at)]).fit(
            make_module(Backprop(), 0.01), datamodule=data(idx_root))
    resumed = StepTimer(warmup=0)
    trainer(tmp_path, crash_at + 2, [resumed], enable_checkpointing=False).fit(
        make_module(Backprop(), 0.01), datamodule=data(idx_root), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    if crash_at == 6:  # the epoch's first 6 steps, then 2 more after resuming
        assert len(resumed._times) == 8 and resumed._times[:6] == first._times
    else:  # the resumed run starts a new epoch: its medians hold only its own steps
        assert len(resumed._times) == 2


class CrashInsideTheEstimate(NaiveForwardGradient):
    """Draws its directions, then stops (a Ctrl-C in the middle of the forward-mode pass) at step ``crash_at``."""

    def __init__(self, crash_at=None, seed=5):
        super().__init__(seed=seed)
        self.crash_at = crash_at

    def estimate(self, network, x, labels, step, comm=ONE_PROCESS):
        estimate = super().estimate(network, x, labels, step, comm)
        if step == self.crash_at:
            raise RuntimeError("simulated crash")
        return estimate


def test_a_step_interrupted_inside_the_estimate_resumes_with_the_same_directions(idx_root, tmp_path):
    straight = LossRecorder()
    trainer(tmp_path / "a", 12, [straight], enable_checkpointing=False).fit(
        make_module(CrashInsideTheEstimate(), 1e-3), datamodule=data(idx_root))
    first = LossRecorder()
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "b", 12, [first, ExceptionCheckpoint(dirpath=str(tmp_path / "ckpt"))]).fit(
            make_module(CrashInsideTheEstimate(crash_at=6), 1e-3), datamodule=data(idx_root))
    second = LossRecorder()
    trainer(tmp_path / "c", 12, [second], enable_checkpointing=False).fit(
        make_module(CrashInsideTheEstimate(), 1e-3), datamodule=data(idx_root),
        ckpt_path=str(tmp_path / "ckpt" / "interrupted.ckpt"))
    assert first.losses + second.losses == straight.losses


def test_predict_gives_class_probabilities(idx_root, tmp_path):
    module = make_module(Backprop(), 0.01)
    dm = data(idx_root)
    dm.setup("fit")
    batch = next(iter(dm.test_dataloader()))
    probabilities = module.predict_step(batch, 0)
    assert probabilities.shape == (len(batch[1]), 10)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(len(batch[1])))


def test_summary_counts_the_parameters_the_estimator_trains(idx_root, tmp_path, caplog):
    import logging

    logging.getLogger("lightning.pytorch").propagate = True
    with caplog.at_level(logging.INFO):
        pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                   enable_checkpointing=False, callbacks=[EstimatorSummary()]).fit(
            make_module(Backprop(), 0.01), datamodule=data(idx_root))
    summary = next(r.getMessage() for r in caplog.records if "Trainable params" in r.getMessage())
    total = sum(p.numel() for p in MLP(hidden=(32,)).parameters())
    assert f"{total / 1e3:.1f} K    Trainable params" in summary and "0         Non-trainable params" in summary


def test_divergence_through_fg_cli_keeps_the_logs(idx_root, tmp_path, capsys):
    config = [c for c in CONFIGS if c.endswith("mlp_naive.yaml")][0]
    args = cli_args(config, idx_root, tmp_path, "--model.optimizer.init_args.lr", "1e4")
    args[args.index("--trainer.max_steps") + 1] = "50"
    with pytest.raises(SystemExit) as exit_info:
        fg_cli(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "DivergenceError: training diverged at step" in err and "learning rate 10000" in err
    assert scalars(str(tmp_path / "tb_logs" / "mlp_naive")).get("train/loss")


def test_step_timer_reports_checkpoint_steps_apart(idx_root, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    module = make_module(MomentumForwardGradient(fix_gap=3, decrease_gap=3), 1e-4)
    run = pl.Trainer(max_epochs=1, callbacks=[StepTimer(warmup=1), PeakMemory(), GradientCosine(every_n_steps=4)],
                     logger=TensorBoardLogger(str(tmp_path), name="run"), enable_progress_bar=False,
                     num_sanity_val_steps=0, log_every_n_steps=1, enable_checkpointing=False)
    run.fit(module, datamodule=data(idx_root))
    values = scalars(str(tmp_path / "run"))
    assert len(values["perf/step_ms"]) == 10 and all(ms > 0 for ms in values["perf/step_ms"])
    for tag in ("perf/step_ms_median", "perf/step_ms_median_exact", "perf/step_ms_median_forward"):
        assert len(values[tag]) == 1
    assert len(values["grad/cosine"]) == 3  # steps 0, 4, 8
    assert "perf/peak_mem_mb" not in values  # CPU: no CUDA peak to report
    with pytest.raises(ValueError, match="every_n_steps=0"):
        GradientCosine(every_n_steps=0)


def test_gradient_cosine_of_backprop_is_one(idx_root, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    run = pl.Trainer(max_steps=3, callbacks=[GradientCosine(every_n_steps=1)], logger=CSVLogger(str(tmp_path)),
                     enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False)
    run.fit(make_module(Backprop(), 0.01), datamodule=data(idx_root))
    import csv

    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "**" / "metrics.csv"), recursive=True)[0])))
    cosines = [float(r["grad/cosine"]) for r in rows if r.get("grad/cosine")]
    assert len(cosines) == 3 and all(abs(c - 1) < 1e-5 for c in cosines)


@needs_fashion
@pytest.mark.parametrize("config, min_acc", [("mlp_backprop", 0.6), ("mlp_input_approx", 0.2)])
def test_one_epoch_on_real_fashion_mnist_beats_chance(config, min_acc, tmp_path):
    path = [c for c in CONFIGS if c.endswith(f"{config}.yaml")][0]
    fg_cli(["fit", "--config", path, "--data.dataset", "fashion_mnist", "--data.root", str(tmp_path / "none"),
            "--data.download", "false", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "tb_logs")])
    values = scalars(str(tmp_path / "tb_logs" / config))
    print(f"{config}: val/acc after one epoch = {values['val/acc'][-1]:.4f}")
    assert values["val/acc"][-1] > min_acc  # chance is 0.1


def test_validate_and_test_subcommands_from_a_checkpoint(idx_root, tmp_path):
    config = [c for c in CONFIGS if c.endswith("mlp_backprop.yaml")][0]
    fg_cli(cli_args(config, idx_root, tmp_path))
    checkpoint = tmp_path / "tb_logs" / "mlp_backprop" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    common = ["--config", config, "--data.root", idx_root, "--data.download", "false", "--data.batch_size", "8",
              "--data.val_size", "16", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "tb_logs"), "--ckpt_path", str(checkpoint)]
    fg_cli(["validate", *common])
    fg_cli(["test", *common])
    values = scalars(str(tmp_path / "tb_logs" / "mlp_backprop"))
    assert values.get("test/acc") and values.get("test/loss") and len(values["val/acc"]) >= 2
    # fg-cli records the config as the hyperparameters, so the checkpoint alone rebuilds the module
    module = ForwardGradientModule.load_from_checkpoint(str(checkpoint))
    assert isinstance(module.network, MLP) and isinstance(module.estimator, Backprop)
    assert module.configure_optimizers().param_groups[0]["lr"] == 0.01

"""fg-cli with a Lightning user's habits: every switch works or is refused before training, in one line.

Most cases call ``fg_lightning.cli.main`` in-process on tiny IDX files; a few run the installed ``fg-cli`` script to
check exit codes and that stderr is exactly one line.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import warnings

import pytest
import torch
from idx_files import learnable_idx
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fg_lightning.cli import ConfigError, ForwardGradientCLI, quiet
from fg_lightning.cli import main as fg_cli
from fg_lightning.data import MNISTDataModule
from fg_lightning.module import ForwardGradientModule

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")



def args(subcommand, config, idx_root, save_dir, *extra):
    common = [subcommand, "--config", os.path.join(CONFIGS, f"{config}.yaml"), "--data.root", idx_root,
              "--data.download", "false", "--data.batch_size", "8", "--data.val_size", "16",
              "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir)]
    if subcommand == "fit":
        common += ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1"]
    return common + list(extra)


@pytest.fixture(scope="module")
def trained(idx_root, tmp_path_factory):
    """tb_logs of one mlp_backprop run of 2 steps (version_0, with checkpoints/last.ckpt); copy it to change it."""
    save_dir = tmp_path_factory.mktemp("trained") / "tb"
    fg_cli(args("fit", "mlp_backprop", idx_root, save_dir))
    assert (save_dir / "mlp_backprop" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    return save_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run's tb_logs; returns (save_dir, its last.ckpt)."""
    save_dir = tmp_path / "tb"
    shutil.copytree(trained, save_dir)
    return save_dir, str(save_dir / "mlp_backprop" / "version_0" / "checkpoints" / "last.ckpt")


def error_line(capsys, argv, code=1):
    """Run fg-cli in-process, expecting exit `code` and one ``fg-cli:`` line (no traceback) on stderr; return it."""
    with pytest.raises(SystemExit) as exit_info:
        fg_cli(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fg-cli:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def versions(save_dir):
    return sorted(glob.glob(os.path.join(str(save_dir), "**", "version_*"), recursive=True))


def scalar_steps(folder, tag):
    steps = []
    for path in glob.glob(os.path.join(str(folder), "events.out.tfevents.*")):
        events = EventAccumulator(path)
        events.Reload()
        if tag in events.Tags()["scalars"]:
            steps += [e.step for e in events.Scalars(tag)]
    return sorted(steps)


# ------------------------------------------------------------------------------------------------- --ckpt_path last

def test_ckpt_path_last_resumes_the_newest_run(run_copy, idx_root):
    save_dir, _ = run_copy
    fg_cli(args("fit", "mlp_backprop", idx_root, save_dir, "--trainer.max_steps", "4", "--ckpt_path", "last"))
    resumed = save_dir / "mlp_backprop" / "version_1"
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert len(scalar_steps(resumed, "train/loss")) == 2  # steps 3 and 4 only: it continued from step 2


def test_ckpt_path_last_orders_versions_by_number(tmp_path, idx_root, capsys):
    for version, name in [(2, "last.ckpt"), (10, "last.ckpt"), (9, "interrupted.ckpt")]:
        folder = tmp_path / "tb" / "mlp_backprop" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"not a checkpoint")
    line = error_line(capsys, args("fit", "mlp_backprop", idx_root, tmp_path / "tb", "--ckpt_path", "last"))
    assert "CheckpointError" in line and os.path.join("version_10", "checkpoints", "last.ckpt") in line


def test_ckpt_path_last_without_a_checkpoint_fails_cleanly(tmp_path, idx_root, capsys):
    line = error_line(capsys, args("fit", "mlp_backprop", idx_root, tmp_path / "tb", "--ckpt_path", "last"))
    where = os.path.join(str(tmp_path / "tb"), "mlp_backprop", "version_*", "checkpoints")
    assert line.startswith(f"fg-cli: CheckpointError: no checkpoint to resume: none under {where}/")
    assert not versions(tmp_path / "tb")


# ----------------------------------------------------------------------------------------- --ckpt_path <file>

@pytest.mark.parametrize("subcommand, config, held, asked", [
    ("fit", "cnn_backprop", "fg_lightning.engine.MLP(", "fg_lightning.engine.CNN("),
    ("test", "cnn_backprop", "fg_lightning.engine.MLP(", "fg_lightning.engine.CNN("),
    ("fit", "mlp_naive", "fg_lightning.estimators.Backprop(", "fg_lightning.estimators.NaiveForwardGradient("),
], ids=["network-fit", "network-test", "estimator-fit"])
def test_checkpoint_of_another_model_is_refused_naming_both(subcommand, config, held, asked, run_copy, idx_root,
                                                             capsys):
    save_dir, ckpt = run_copy
    line = error_line(capsys, args(subcommand, config, idx_root, save_dir, "--ckpt_path", ckpt))
    assert "CheckpointError" in line and ckpt in line
    assert line.index(held) < line.index("but the config asks for") < line.index(asked)
    assert versions(save_dir) == [str(save_dir / "mlp_backprop" / "version_0")]


def test_override_on_resume_is_refused_and_evaluation_takes_the_checkpoint(run_copy, idx_root, capsys):
    save_dir, ckpt = run_copy
    line = error_line(capsys, args("fit", "mlp_backprop", idx_root, save_dir, "--ckpt_path", ckpt,
                                   "--model.optimizer.init_args.lr", "0.1"))
    assert "model.optimizer.init_args.lr is 0.01 in the checkpoint, 0.1 in the config" in line
    assert "new run" in line and "override" in line
    # the learning rate plays no part in test: the checkpoint's settings are used, as Lightning does
    fg_cli(args("test", "mlp_backprop", idx_root, save_dir, "--ckpt_path", ckpt,
                "--model.optimizer.init_args.lr", "0.1"))


def test_resume_with_the_same_settings_continues(run_copy, idx_root):
    save_dir, ckpt = run_copy
    fg_cli(args("fit", "mlp_backprop", idx_root, save_dir, "--trainer.max_steps", "3", "--ckpt_path", ckpt))
    assert torch.load(save_dir / "mlp_backprop" / "version_1" / "checkpoints" / "last.ckpt",
                      weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupted", "folder"])
def test_unreadable_checkpoint_is_one_line_naming_the_file(damage, run_copy, idx_root, capsys):
    save_dir, ckpt = run_copy
    bad = str(save_dir / "bad.ckpt")
    if damage == "truncated":
        data = open(ckpt, "rb").read()
        open(bad, "wb").write(data[: len(data) // 2])
    elif damage == "corrupted":
        open(bad, "wb").write(os.urandom(4096))
    elif damage == "folder":
        os.mkdir(bad)
    line = error_line(capsys, args("fit", "mlp_backprop", idx_root, save_dir, "--ckpt_path", bad))
    assert line.startswith("fg-cli: CheckpointError: ") and bad in line and "checkpoint" in line
    assert len(versions(save_dir)) == 1


def test_checkpoint_without_hyperparameters_is_left_to_the_module(run_copy, idx_root, capsys):
    """Made outside fg-cli (no hyperparameters): the module's own check refuses it, after the run's log folder
    exists; that folder holds nothing and is removed, the older run is kept."""
    save_dir, ckpt = run_copy
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["hyper_parameters"]
    bare = str(save_dir / "bare.ckpt")
    torch.save(checkpoint, bare)
    line = error_line(capsys, args("fit", "cnn_backprop", idx_root, save_dir, "--ckpt_path", bare))
    assert "CheckpointMismatchError" in line
    assert versions(save_dir) == [str(save_dir / "mlp_backprop" / "version_0")]


# ----------------------------------------------------------------------------------- refused before training

@pytest.mark.parametrize("extra, message", [
    (["--optimizer", "torch.optim.Adam"], "--model.optimizer"),
    (["--optimizer=torch.optim.Adam"], "--model.optimizer"),
    (["--lr_scheduler", "torch.optim.lr_scheduler.StepLR"], "--model.lr_scheduler"),
    (["--lr_scheduler.class_path", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler.init_args.step_size", "1"],
     "--model.lr_scheduler"),
    (["--trainer.accumulate_grad_batches", "4"], "Remove `Trainer(accumulate_grad_batches=4)`"),
    (["--trainer.precision", "bf16-mixed"], "precision bf16-mixed is not supported"),
    (["--trainer.precision", "16-mixed"], "precision 16-mixed is not supported"),
    (["--trainer.precision", "bf16-true"], "precision bf16-true is not supported"),
    (["--trainer.gradient_clip_val", "1.0", "--model.gradient_clip_val", "2.0"], "disagree"),
    (["--trainer.max_epochs", "-2"], "MisconfigurationException"),
    (["--model.optimizer.init_args.lr", "-1"], "ConfigError: lr -1 is not a finite positive number"),
], ids=["optimizer", "optimizer=", "lr_scheduler", "lr_scheduler-full", "accumulate", "bf16-mixed", "16-mixed",
        "bf16-true", "clip-conflict", "misconfiguration", "negative-lr"])
def test_refused_before_training_in_one_line(extra, message, tmp_path, idx_root, capsys):
    line = error_line(capsys, args("fit", "mlp_backprop", idx_root, tmp_path / "tb", *extra))
    assert message in line and line.endswith("(FG_CLI_TRACEBACK=1 for the traceback)")
    assert not versions(tmp_path / "tb")  # no stub log folder


def test_top_level_optimizer_in_a_config_file_is_refused(tmp_path, idx_root, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("optimizer:\n  class_path: torch.optim.Adam\n")
    line = error_line(capsys, args("fit", "mlp_backprop", idx_root, tmp_path / "tb", "--config", str(extra)))
    assert "--model.optimizer" in line


@pytest.mark.parametrize("extra, message", [
    (["--model.estimator.class_path", "NoSuchEstimator"], 'Parser key "model.estimator"'),
    (["--config", "typo.yaml"], "does not accept option 'model.estimatr'"),
    (["--config", "missing.yaml"], "missing.yaml"),
], ids=["unknown-class", "typo-key", "missing-config"])
def test_parser_errors_are_one_line_keeping_jsonargparse_message(extra, message, tmp_path, idx_root, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "typo.yaml").write_text("model:\n  estimatr: 1\n")
    line = error_line(capsys, args("fit", "mlp_backprop", idx_root, tmp_path / "tb", *extra))
    assert line.startswith("fg-cli: ConfigError: ") and message in line, line
    assert not versions(tmp_path / "tb")


@pytest.mark.parametrize("lr", ["nan", "inf", "-inf", "0"])
def test_a_learning_rate_that_is_not_finite_and_positive_is_refused_by_name(lr, tmp_path, idx_root, capsys):
    line = error_line(capsys, args("fit", "mlp_backprop", idx_root, tmp_path / "tb", "--model.optimizer.init_args.lr",
                                   lr))
    assert line.startswith(f"fg-cli: ConfigError: lr {lr} is not a finite positive number"), line


def test_a_nan_learning_rate_in_a_config_file_is_refused_by_name(tmp_path, idx_root, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  optimizer:\n    class_path: torch.optim.SGD\n    init_args:\n      lr: .nan\n")
    line = error_line(capsys, args("fit", "mlp_backprop", idx_root, tmp_path / "tb", "--config", str(extra)))
    assert line.startswith("fg-cli: ConfigError: lr nan is not a finite positive number"), line


def test_model_compile_true_trains_through_the_compiled_step(tmp_path, idx_root, monkeypatch):
    """``--model.compile true`` reaches ForwardGradientModule(compile=True), whose steps run compiled (aot_eager
    here: tests/test_compile.py runs inductor and checks the compiled steps against eager)."""
    from fg_lightning.estimators.compiled import CompiledStep

    steps = []

    class Counted(CompiledStep):
        def __init__(self, estimator, network):
            super().__init__(estimator, network, backend="aot_eager")

        def __call__(self, *args, **kwargs):
            steps.append(args[2])
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr("fg_lightning.module.CompiledStep", Counted)
    torch._dynamo.reset()
    fg_cli(args("fit", "mlp_backprop", idx_root, tmp_path / "tb", "--model.compile", "true"))
    torch._dynamo.reset()
    assert steps == [0, 1]


def test_model_compile_of_an_estimator_that_cannot_compile_is_one_line(tmp_path, idx_root, capsys):
    line = error_line(capsys, args("fit", "mlp_momentum", idx_root, tmp_path / "tb", "--model.compile", "true"))
    assert "MomentumForwardGradient" in line and "compile" in line, line
    assert not versions(tmp_path / "tb")


def test_help_lists_what_works(capsys):
    """The top-level --optimizer / --lr_scheduler that LightningCLI would add are off (the module's are the ones)."""
    with pytest.raises(SystemExit) as exit_info:
        fg_cli(["fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--model.network" in text and "--model.optimizer" in text and "--trainer.max_steps" in text
    for gone in ("\n  --optimizer", "\n  --lr_scheduler"):
        assert gone not in text, gone


def test_a_bad_label_is_one_line_naming_the_file(tmp_path, capsys):
    root = learnable_idx(tmp_path / "idx", bad_label=200)
    line = error_line(capsys, args("fit", "mlp_backprop", root, tmp_path / "tb"))
    assert "DataError" in line and "train-labels-idx1-ubyte" in line and "label 200" in line
    assert not versions(tmp_path / "tb")


def test_out_of_memory_is_one_line_naming_k(tmp_path, idx_root, capsys, monkeypatch):
    from fg_lightning.estimators import MultiDirection

    def allocate(*args, **kwargs):  # what the CPU allocator says; a real k=10**6 would thrash the test machine
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 7529000000000 bytes.")

    monkeypatch.setattr(MultiDirection, "estimate", allocate)
    line = error_line(capsys, args("fit", "mlp_multi_direction", idx_root, tmp_path / "tb",
                                   "--model.estimator.init_args.k", "1000000"))
    assert "MemoryError" in line and "k=1000000" in line
    assert not versions(tmp_path / "tb")  # failed at step 0: nothing trained, nothing left


def test_fg_cli_traceback_shows_the_traceback(tmp_path, idx_root, monkeypatch):
    monkeypatch.setenv("FG_CLI_TRACEBACK", "1")
    with pytest.raises(ConfigError, match="^lr nan is not a finite positive number"):
        fg_cli(args("fit", "mlp_backprop", idx_root, tmp_path / "tb", "--model.optimizer.init_args.lr", "nan"))


def test_programming_errors_keep_their_traceback(tmp_path, idx_root, monkeypatch):
    def broken(self, stage=None):
        raise AttributeError("a bug in the library")

    monkeypatch.setattr(MNISTDataModule, "setup", broken)
    with pytest.raises(AttributeError, match="a bug in the library"):
        fg_cli(args("fit", "mlp_backprop", idx_root, tmp_path / "tb"))


# ------------------------------------------------------------------------------------------ switches that work

def test_trainer_gradient_clipping_moves_to_the_module(tmp_path, idx_root):
    with quiet():
        cli = ForwardGradientCLI(args=args("fit", "mlp_backprop", idx_root, tmp_path / "tb",
                                           "--trainer.gradient_clip_val", "1.0",
                                           "--trainer.gradient_clip_algorithm", "value"))
    assert cli.model.gradient_clip_val == 1.0 and cli.model.gradient_clip_algorithm == "value"
    assert cli.trainer.gradient_clip_val is None and cli.trainer.global_step == 2


@pytest.mark.parametrize("config", ["mlp_backprop", "mlp_input_qr"])
def test_float64_trains(config, tmp_path, idx_root):
    fg_cli(args("fit", config, idx_root, tmp_path / "tb", "--trainer.precision", "64-true"))
    checkpoint = torch.load(tmp_path / "tb" / config / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    weights = [t for name, t in checkpoint["state_dict"].items() if name.startswith("network.")]
    assert weights and all(t.dtype == torch.float64 and torch.isfinite(t).all() for t in weights)


def test_predict_writes_probabilities_and_labels(run_copy, idx_root, capsys):
    save_dir, ckpt = run_copy
    fg_cli(args("predict", "mlp_backprop", idx_root, save_dir, "--ckpt_path", ckpt))
    path = save_dir / "mlp_backprop" / "version_1" / "predictions.pt"
    assert str(path) in capsys.readouterr().out
    saved = torch.load(path, weights_only=True)
    probabilities, labels = saved["probabilities"], saved["labels"]
    assert probabilities.shape == (32, 10) and labels.shape == (32,)
    assert torch.allclose(probabilities.sum(1), torch.ones(32, dtype=probabilities.dtype), atol=1e-5)
    data = MNISTDataModule(root=idx_root, download=False, val_size=16)
    data.setup()
    assert torch.equal(labels, data.test_set.tensors[1])  # the test set, in order


@pytest.mark.parametrize("stop, code, name", [
    (KeyboardInterrupt, 130, "KeyboardInterrupt"),
    (SIGTERMException, 143, "Terminated"),  # what Lightning's SIGTERM handler raises in the loop
], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("at", [0, 1])
def test_interrupt_says_where_the_checkpoint_is(at, stop, code, name, tmp_path, idx_root, capsys, monkeypatch):
    training_step = ForwardGradientModule.training_step

    def interrupted(self, batch, batch_idx):
        if self.global_step == at:
            raise stop()
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(ForwardGradientModule, "training_step", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    line = error_line(capsys, args("fit", "mlp_backprop", idx_root, tmp_path / "tb", "--trainer.max_steps", "3"),
                      code=code)
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning's SIG_IGN does not outlive the run
    assert line.startswith(f"fg-cli: {name}: stopped at step {at}; ")
    if at == 0:
        assert "no checkpoint was written" in line and not versions(tmp_path / "tb")
        return
    ckpt = line.split("resume with --ckpt_path ")[1]
    assert os.path.isfile(ckpt)
    monkeypatch.setattr(ForwardGradientModule, "training_step", training_step)
    fg_cli(args("fit", "mlp_backprop", idx_root, tmp_path / "tb", "--trainer.max_steps", "3", "--ckpt_path", "last"))
    resumed = torch.load(tmp_path / "tb" / "mlp_backprop" / "version_1" / "checkpoints" / "last.ckpt",
                         weights_only=True)
    assert resumed["global_step"] == 3


def test_quiet_drops_only_the_named_noise():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet():
            warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no ...")
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn("something that matters")
    assert [str(w.message) for w in caught] == ["something that matters"]


# ------------------------------------------------------------------------------------- the installed script

FG_CLI = shutil.which("fg-cli")


def script(argv, cwd):
    env = {k: v for k, v in os.environ.items() if k != "FG_CLI_TRACEBACK"}
    return subprocess.run([FG_CLI, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(FG_CLI is None, reason="fg-cli is not installed (pip install -e .)")
@pytest.mark.parametrize("extra, message", [
    (["--trainer.precision", "bf16-mixed"], "MisconfigurationException: precision bf16-mixed is not supported"),
    (["--model.optimizer.init_args.lr", "-1"], "ConfigError: lr -1 is not a finite"),
    (["--ckpt_path", "last"], "CheckpointError: no checkpoint to resume"),
    (["--model.estimator.class_path", "NoSuchEstimator"], "ConfigError: Parser key \"model.estimator\""),
    (["--model.optimizer.init_args.lr", "nan"], "ConfigError: lr nan is not a finite"),
], ids=["precision", "negative-lr", "no-last", "parser", "nan-lr"])
def test_script_errors_are_exactly_one_line_on_stderr(extra, message, tmp_path, idx_root):
    done = script(args("fit", "mlp_backprop", idx_root, tmp_path / "tb", *extra), tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"fg-cli: {message}"), done.stderr
    assert not versions(tmp_path / "tb")


@pytest.mark.skipif(FG_CLI is None, reason="fg-cli is not installed (pip install -e .)")
def test_script_run_is_quiet(tmp_path, idx_root):
    done = script(args("fit", "mlp_backprop", idx_root, tmp_path / "tb"), tmp_path)
    assert done.returncode == 0, done.stderr
    for noise in ("litlogger", "LeafSpec", "Seed set", "sys.argv", "Warning"):
        assert noise not in done.stderr, done.stderr

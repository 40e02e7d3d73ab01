"""``fg-cli``: LightningCLI over :class:`ForwardGradientModule` and :class:`MNISTDataModule`.

    fg-cli fit --config configs/cnn_momentum.yaml --model.estimator.init_args.k 10
    fg-cli fit --config configs/cnn_momentum.yaml --ckpt_path last       # resume the newest run of that config
    fg-cli predict --config configs/mlp_backprop.yaml --ckpt_path last   # writes <log dir>/predictions.pt

LightningCLI does the work: its parser (``--config`` files merged in order, ``trainer: trainer.yaml``), the optimizer as
the module's argument (``auto_configure_optimizers=False``), the config recorded as the module's hyperparameters (the
module compares a checkpoint's with its own). fg-cli refuses before training what cannot work: an error a user can
cause prints ``fg-cli: <ErrorType>: <message>`` and exits with 1 (``FG_CLI_TRACEBACK=1`` for the traceback); Ctrl-C
(SIGTERM) names the checkpoint to resume from and exits with 130 (143); a run that fails before its first step leaves
no log folder.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import math
import os
import re
import shutil
import signal
import sys
import warnings
from typing import Any, Iterator

import torch
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from fg_lightning.callbacks import PredictionWriter
from fg_lightning.data import DataError, DatasetNotFoundError, MNISTDataModule
from fg_lightning.distributed import ForwardGradientDDPStrategy, PeerLostError, auto_strategy, check_strategy
from fg_lightning.checkpoints import CheckpointError, newest_checkpoint, read_checkpoint
from fg_lightning.module import DivergenceError, ForwardGradientModule
from fg_lightning.torch_network import TorchBackendError


class ConfigError(ValueError):
    """A setting in the config or on the command line is invalid (raised before any training)."""


class Terminated(Exception):
    """SIGTERM stopped training (Lightning would exit with 0, as if training had ended)."""


# Errors a user causes with a setting, a file or the machine's memory: one line, not a traceback.
USER_ERRORS = (ConfigError, CheckpointError, DataError, DatasetNotFoundError, DivergenceError, PeerLostError,
               MisconfigurationException, MemoryError, torch.OutOfMemoryError, TorchBackendError)
# The engine's hand-written passes use the parameters' dtype; nobody has checked them under autocast or half precision.
PRECISIONS = {"32-true", "32", "64-true", "64"}
# Raised on every run inside torch's and Lightning's code, where fg-cli cannot avoid it: torch's deprecation of the
# LeafSpec that Lightning's CombinedLoader builds; ModelCheckpoint's note that under manual optimization it saves after
# the optimizer step (as the module means it to); a resumed run's ModelCheckpoint in its own version_N folder; the
# litlogger advertisement. ``quiet`` also keeps "Seed set to" off (config.yaml records the seed).
QUIET_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"The dirpath has changed from .* won't be",
                  r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
QUIET_LINES, RANK_ZERO_LOGGER = ("💡 Tip: For seamless cloud logging",), "lightning.pytorch.utilities.rank_zero"
MODULE_DEFAULTS = inspect.signature(ForwardGradientModule).parameters


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def check_learning_rate(value: Any) -> None:
    """Refuse a learning rate that is not a finite positive number, by name: torch.optim accepts nan, inf and 0."""
    try:
        lr = float(value)
    except (TypeError, ValueError):
        return  # None, or not a number: jsonargparse names it
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"model.optimizer.init_args.lr {value} is not a finite positive number: the learning "
                              "rate scales every update (e.g. --model.optimizer.init_args.lr 1e-3)")


def check_checkpoint(config: Namespace) -> None:
    """Resolve ``--ckpt_path last`` (the newest checkpoint in the logger's folder); refuse a file that is no readable
    Lightning checkpoint. The module compares its settings with the config's as it loads it."""
    if config.ckpt_path == "last":
        logger = config.trainer.get("logger")
        init = getattr(logger[0] if isinstance(logger, list) and logger else logger, "init_args", None)
        if init is None or not init.get("save_dir"):
            raise CheckpointError("--ckpt_path last looks in the logger's folder, but the config has no logger with a "
                                  "save_dir (TensorBoardLogger or CSVLogger): give the checkpoint file")
        config.ckpt_path = newest_checkpoint(os.path.join(str(init.save_dir), str(init.get("name") or "")))
    path = config.ckpt_path = str(config.ckpt_path)
    if path == "best":
        raise CheckpointError("--ckpt_path best means the best checkpoint of the run in progress, which a new fg-cli "
                              "run does not have: give a checkpoint file or `last`")
    if not (path in ("hpc", "registry") or path.startswith("registry:") or "://" in path):  # Lightning resolves those
        read_checkpoint(path)


def check_trainer(config: Namespace) -> None:
    """Trainer settings that cannot work under the module's manual optimisation: gradient clipping moves to the module
    (which clips the estimate), the rest is refused."""
    trainer, model = config.trainer, config.model
    for key in ("gradient_clip_val", "gradient_clip_algorithm"):
        value, mine, default = trainer.get(key), model.get(key), MODULE_DEFAULTS[key].default
        if value is not None and mine not in (None, default, value):
            raise ConfigError(f"--trainer.{key} {value} and --model.{key} {mine} disagree: set only --model.{key} "
                              "(the module clips the estimate itself)")
        if value is not None:
            model[key], trainer[key] = value, None
    if trainer.get("accumulate_grad_batches") not in (None, 1):
        raise ConfigError(f"--trainer.accumulate_grad_batches {trainer.accumulate_grad_batches} is not supported: "
                          "each step's estimate is applied at once; for a less noisy update use a larger "
                          "--data.batch_size or more directions (e.g. --model.estimator.init_args.k)")
    if trainer.get("precision") is not None and str(trainer.precision) not in PRECISIONS:
        raise ConfigError(f"--trainer.precision {trainer.precision} is not supported: the hand-written passes have not "
                          "been checked under autocast or half precision; use 32-true or 64-true")


def name_run_after_config(config: Namespace) -> None:
    """A logger whose ``name`` is left empty (as in ``configs/trainer.yaml``) logs the run under the name of the last
    ``--config`` file: ``--config configs/mlp_naive.yaml`` -> ``tb_logs/mlp_naive/version_N``."""
    files, logger = config.get("config") or [], config.trainer.get("logger")
    for init in (getattr(item, "init_args", None) for item in (logger if isinstance(logger, list) else [logger])):
        if files and init is not None and "name" in init and init.name is None:
            init.name = os.path.splitext(os.path.basename(str(files[-1])))[0]


class ForwardGradientCLI(LightningCLI):
    """LightningCLI with the project's module and data, TensorBoard logs in ``tb_logs/`` by default, ``config.yaml``
    beside them and ``predictions.pt`` from ``predict``; :meth:`parse_arguments` checks before anything is built,
    :meth:`instantiate_trainer` before anything is written."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", {"callbacks": [PredictionWriter()], "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "tb_logs", "name": "default"}}})
        # Any LightningDataModule by class_path (fg_lightning.data.DigitsDataModule for fine-tuning); a `data:` section
        # without one is MNISTDataModule's arguments
        super().__init__(ForwardGradientModule, LightningDataModule, subclass_mode_data=True,
                         save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": f"{MNISTDataModule.__module__}.{MNISTDataModule.__name__}"}})

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # A parse error raises ArgumentError (one line, see parse_arguments), not a usage block with exit code 2.
        return super().init_parser(**{"exit_on_error": False, **kwargs})

    def setup_parser(self, *args: Any, **kwargs: Any) -> None:
        """``--help`` lists what works: not ``accumulate_grad_batches`` (parsed, to be refused saying why), and for
        ``--model.network`` the project's networks rather than every ``torch.nn`` class (about 680 lines)."""
        super().setup_parser(*args, **kwargs)
        for action in (a for p in [self.parser, *self._subcommand_parsers.values()] for a in p._actions):
            if action.dest == "trainer.accumulate_grad_batches":
                action.help = argparse.SUPPRESS
            elif action.dest == "model.network" and hasattr(action, "extra_help"):
                action.extra_help = lambda: ", known subclasses: fg_lightning.MLP, fg_lightning.CNN, or any " \
                                            "torch.nn.Module classifier"

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse (not through LightningCLI's, which warns when main(args) runs under pytest), then refuse what cannot
        work."""
        raw = sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else []
        for key, value in zip(raw, [*raw[1:], None]):  # `--...lr nan`: jsonargparse refuses nan and inf unnamed
            if isinstance(key, str) and re.fullmatch(r"--model\.optimizer(\.init_args)?\.lr(=.*)?", key):
                check_learning_rate(key.partition("=")[2] if "=" in key else value)
        try:
            self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        except ArgumentError as err:
            off = re.search(r"(?:\s--|option ')(optimizer|lr_scheduler)\b", str(err))  # LightningCLI's, turned off
            raise ConfigError(str(err) + (f"; fg-cli has no --{off[1]}: set the module's --model.{off[1]} (e.g. "
                                          f"--model.{off[1]}.class_path ... --model.{off[1]}.init_args.<arg> ...)"
                                          if off else "")) from None
        config = self.config.get(self.config.get("subcommand") or "")
        if config is not None:
            check_learning_rate(config.get("model.optimizer.init_args.lr"))
            check_trainer(config)
            name_run_after_config(config)
            if config.get("ckpt_path"):
                check_checkpoint(config)

    def _parse_ckpt_path(self) -> None:
        """Not LightningCLI's, which replaces the config's model section by the checkpoint's hyperparameters and so
        would drop another network or an override without a word: the module compares them as it loads it."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, ImportError) as err:  # the module's, the data's or the trainer's arguments
            while err.__cause__ is not None and isinstance(err.__cause__, (ValueError, TypeError, ImportError)):
                err = err.__cause__  # jsonargparse wraps a subclass's own error: say that one
            if isinstance(err, USER_ERRORS):
                raise err from None
            raise ConfigError(str(err).splitlines()[0] if str(err) else type(err).__name__) from err

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Load the data first (a bad file fails before the Trainer prints its lines; the datamodule keeps what it
        loaded), then build the Trainer: to ``fit`` on several devices with ``strategy: auto``, with fg_ddp."""
        self.datamodule.prepare_data()
        self.datamodule.setup(self.subcommand)
        config = self.config_init[self.subcommand].trainer
        try:
            if self.subcommand == "fit" and config.strategy == "auto":
                kwargs["strategy"] = auto_strategy(config.accelerator, config.devices, config.num_nodes)
            trainer = super().instantiate_trainer(**kwargs)
        except ImportError as err:  # e.g. --trainer.accelerator tpu without torch_xla
            raise ConfigError(f"the trainer settings need a package that is not installed: {err}") from err
        if self.subcommand == "fit":
            check_strategy(trainer.strategy)  # Lightning's ddp, FSDP...: in one line, before any process starts
        if self.subcommand == "predict":
            PredictionWriter.check(trainer.world_size)  # before the processes start
        # The folders this run will make, taken away again if it fails before its first step (after_failure).
        loggers = [logger for logger in trainer.loggers if isinstance(logger, (TensorBoardLogger, CSVLogger))]
        self._new_folders = [logger.log_dir for logger in loggers if not os.path.exists(logger.log_dir)]
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        # LightningCLI runs the subcommand in its __init__: its failure is dealt with here, where the trainer is known.
        try:
            super()._run_subcommand(subcommand)
        except BaseException as err:
            stopped = self.after_failure(err)
            if stopped is err:
                raise
            raise stopped from None

    def after_failure(self, err: BaseException) -> BaseException:
        """Take away the run's new log folder if the run trained nothing (no step: no checkpoint, no training
        scalars; an evaluation logs at its end only), and say where to resume after a Ctrl-C, a SIGTERM or a lost
        peer (Lightning ends a Ctrl-C with ``sys.exit(1)``, a SIGTERM with exit code 0)."""
        trainer = self.trainer
        if self.subcommand != "fit" or trainer.global_step == 0:
            for folder in self._new_folders:
                shutil.rmtree(folder, ignore_errors=True)
                with contextlib.suppress(OSError):  # its run's folder too, if nothing else is in it
                    os.rmdir(os.path.dirname(folder))
        files = {getattr(callback, attr, None) for callback in trainer.callbacks
                 for attr in ("ckpt_path", "last_model_path", "best_model_path")}
        files = [path for path in files if isinstance(path, str) and path and os.path.isfile(path)]
        where = f"resume with --ckpt_path {max(files, key=os.path.getmtime)}" if files else "no checkpoint was written"
        stopped = f"stopped at step {trainer.global_step}; {where}"
        causes = (err, err.__context__)  # Lightning's sys.exit after its graceful shutdown has the signal as context
        if any(isinstance(cause, KeyboardInterrupt) for cause in causes):
            return KeyboardInterrupt(stopped)
        if any(isinstance(cause, SIGTERMException) for cause in causes):
            return Terminated(stopped)
        strategy = trainer.strategy
        lost = strategy.as_peer_lost(err) if isinstance(strategy, ForwardGradientDDPStrategy) else None
        return err if lost is None else PeerLostError(f"{lost}; {stopped}")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence :data:`QUIET_WARNINGS`, :data:`QUIET_LINES` and the seed's line for one run; every other warning and
    line stays."""
    seed, info = logging.getLogger("lightning.fabric.utilities.seed"), logging.getLogger(RANK_ZERO_LOGGER)
    level = seed.level

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(QUIET_LINES)

    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        seed.setLevel(logging.WARNING)
        info.addFilter(keep)
        try:
            yield
        finally:
            info.removeFilter(keep)
            seed.setLevel(level)


def main(args: Any = None) -> None:
    """Entry point of ``fg-cli``: the errors a user can cause end in one line on stderr and exit code 1
    (``FG_CLI_TRACEBACK=1`` shows the traceback instead), Ctrl-C with 130, SIGTERM with 143; other errors keep their
    traceback."""
    show_traceback = os.environ.get("FG_CLI_TRACEBACK", "") not in ("", "0")
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT from the first Ctrl-C on and never restores it
    try:
        with quiet():
            ForwardGradientCLI(args=args)
    except (KeyboardInterrupt, Terminated, *USER_ERRORS) as err:
        if show_traceback and not isinstance(err, Terminated):
            raise
        code = 130 if isinstance(err, KeyboardInterrupt) else 128 + signal.SIGTERM if isinstance(err, Terminated) else 1
        hint = " (FG_CLI_TRACEBACK=1 for the traceback)" if code == 1 else ""
        print(f"fg-cli: {type(err).__name__}: {_one_line(err) or 'interrupted'}{hint}", file=sys.stderr)
        raise SystemExit(code) from None
    finally:
        if sigint is not None:
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(signal.SIGINT, sigint)


if __name__ == "__main__":
    main()

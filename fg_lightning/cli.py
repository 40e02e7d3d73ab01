"""``fg-cli``: LightningCLI over :class:`ForwardGradientModule` and :class:`MNISTDataModule`.

    fg-cli fit --config configs/cnn_momentum.yaml --model.estimator.init_args.k 10
    fg-cli fit --config configs/cnn_momentum.yaml --ckpt_path last       # resume the newest run of that config
    fg-cli predict --config configs/mlp_backprop.yaml --ckpt_path last   # writes <log dir>/predictions.pt

LightningCLI does the work (``--config`` files, ``trainer: trainer.yaml``, the optimizer as the module's argument, the
config as the module's hyperparameters). fg-cli adds: a user's error is one line before training, Ctrl-C and SIGTERM
name the checkpoint to resume from, a run that fails before its first step leaves no log folder.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
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

from fg_lightning.allocator import keep_freed_memory
from fg_lightning.callbacks import PredictionWriter
from fg_lightning.data import DataError, DatasetNotFoundError, MNISTDataModule
from fg_lightning.distributed import ForwardGradientDDPStrategy, PeerLostError, auto_strategy, check_strategy
from fg_lightning.checkpoints import CheckpointError, newest_checkpoint, read_checkpoint
from fg_lightning.module import DivergenceError, ForwardGradientModule, check_learning_rate, check_precision
from fg_lightning.torch_network import TorchBackendError


class ConfigError(ValueError):
    """A setting in the config or on the command line is invalid (raised before any training)."""


class Terminated(Exception):
    """SIGTERM stopped training (Lightning would exit with 0, as if training had ended)."""


# Errors a user causes with a setting, a file or the machine's memory: one line, not a traceback.
USER_ERRORS = (ConfigError, CheckpointError, DataError, DatasetNotFoundError, DivergenceError, PeerLostError,
               MisconfigurationException, MemoryError, torch.OutOfMemoryError, TorchBackendError)
# Raised on every run inside torch's and Lightning's code, where fg-cli cannot avoid it: torch's deprecation of the
# LeafSpec that Lightning's CombinedLoader builds; ModelCheckpoint's note that under manual optimization it saves after
# the optimizer step (as the module means it to); a resumed run's ModelCheckpoint in its own version_N folder. And two
# lines: the litlogger advertisement, and the seed (config.yaml records it).
QUIET_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"The dirpath has changed from .* won't be",
                  r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
QUIET_LINES = {"lightning.pytorch.utilities.rank_zero": "💡 Tip: For seamless cloud logging",
               "lightning.fabric.utilities.seed": "Seed set to"}
MODULE_DEFAULTS = inspect.signature(ForwardGradientModule).parameters


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


def move_clipping(config: Namespace) -> None:
    """``--trainer.gradient_clip_val`` / ``_algorithm`` go to the module, which clips the estimate (Lightning refuses
    to clip under manual optimisation, and refuses ``accumulate_grad_batches`` there itself)."""
    trainer, model = config.trainer, config.model
    for key in ("gradient_clip_val", "gradient_clip_algorithm"):
        value, mine, default = trainer.get(key), model.get(key), MODULE_DEFAULTS[key].default
        if value is not None and mine not in (None, default, value):
            raise ConfigError(f"--trainer.{key} {value} and --model.{key} {mine} disagree: set only --model.{key} "
                              "(the module clips the estimate itself)")
        if value is not None:
            model[key], trainer[key] = value, None


def name_run_after_config(config: Namespace) -> None:
    """A logger whose ``name`` is left empty (as in ``configs/trainer.yaml``) logs the run under the name of the last
    ``--config`` file: ``--config configs/mlp_naive.yaml`` -> ``tb_logs/mlp_naive/version_N``."""
    files, logger = config.get("config") or [], config.trainer.get("logger")
    for init in (getattr(item, "init_args", None) for item in (logger if isinstance(logger, list) else [logger])):
        if files and init is not None and "name" in init and init.name is None:
            init.name = os.path.splitext(os.path.basename(str(files[-1])))[0]


class ForwardGradientCLI(LightningCLI):
    """LightningCLI with the project's module and data, TensorBoard logs in ``tb_logs/``, ``config.yaml`` beside them,
    ``predictions.pt`` from ``predict``; checks before anything is built or written."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", {"callbacks": [PredictionWriter()], "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "tb_logs", "name": "default"}}})
        # Parse errors raise (parse_arguments makes them one line), not a usage block with exit code 2; any
        # LightningDataModule by class_path (DigitsDataModule to fine-tune), MNISTDataModule's arguments without one.
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False, **{name: {"exit_on_error": False}
                                                                       for name in self.subcommands()}})
        super().__init__(ForwardGradientModule, LightningDataModule, subclass_mode_data=True,
                         save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": f"{MNISTDataModule.__module__}.{MNISTDataModule.__name__}"}})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """LightningCLI's parse, its ArgumentError made one line; a learning rate on the command line that is not a
        finite positive number is refused first (jsonargparse refuses ``nan`` in ~950 characters of union errors)."""
        raw = sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else []
        for key, value in zip(raw, [*raw[1:], None]):
            if isinstance(key, str) and re.fullmatch(r"--model\.optimizer(\.init_args)?\.lr(=.*)?", key):
                try:
                    check_learning_rate(key.partition("=")[2] if "=" in key else value)
                except ValueError as err:
                    raise ConfigError(err) from None
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            off = re.search(r"(?:\s--|option ')(optimizer|lr_scheduler)\b", str(err))  # LightningCLI's, turned off
            raise ConfigError(str(err) + (f"; fg-cli has no --{off[1]}: set the module's --model.{off[1]} (e.g. "
                                          f"--model.{off[1]}.class_path ... --model.{off[1]}.init_args.<arg> ...)"
                                          if off else "")) from None

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.config.get("subcommand") or "")
        if config is not None:
            check_precision(config.trainer.get("precision"))  # the module's check, before the Trainer prints a line
            move_clipping(config)
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
        if self.subcommand == "fit" and config.strategy == "auto":
            kwargs["strategy"] = auto_strategy(config.accelerator, config.devices, config.num_nodes)
        trainer = super().instantiate_trainer(**kwargs)  # an ImportError (tpu without torch_xla): instantiate_classes
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
        files = [path for path in {getattr(callback, attr, None) for callback in trainer.callbacks for attr in
                                   ("ckpt_path", "last_model_path", "best_model_path")}
                 if isinstance(path, str) and os.path.isfile(path)]
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
    """Silence :data:`QUIET_WARNINGS` and :data:`QUIET_LINES` for one run; every other warning and line stays."""
    filters = {name: (lambda record, start=start: not str(record.msg).startswith(start))
               for name, start in QUIET_LINES.items()}
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for name, keep in filters.items():
            logging.getLogger(name).addFilter(keep)
        try:
            yield
        finally:
            for name, keep in filters.items():
                logging.getLogger(name).removeFilter(keep)


def main(args: Any = None) -> None:
    """``fg-cli``: a user's error ends in one line on stderr and exit code 1 (``FG_CLI_TRACEBACK=1``: the traceback),
    Ctrl-C with 130, SIGTERM with 143; other errors keep their traceback."""
    show_traceback = os.environ.get("FG_CLI_TRACEBACK", "") not in ("", "0")
    keep_freed_memory()  # a step's large tensors again without page faults (fg_lightning.allocator)
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT from the first Ctrl-C on and never restores it
    try:
        with quiet():
            ForwardGradientCLI(args=args)
    except (KeyboardInterrupt, Terminated, *USER_ERRORS) as err:
        if show_traceback and not isinstance(err, Terminated):
            raise
        code = 130 if isinstance(err, KeyboardInterrupt) else 128 + signal.SIGTERM if isinstance(err, Terminated) else 1
        hint = " (FG_CLI_TRACEBACK=1 for the traceback)" if code == 1 else ""
        print(f"fg-cli: {type(err).__name__}: {' '.join(str(err).split()) or 'interrupted'}{hint}", file=sys.stderr)
        raise SystemExit(code) from None
    finally:
        if sigint is not None:
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(signal.SIGINT, sigint)


if __name__ == "__main__":
    main()

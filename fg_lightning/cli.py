"""``fg-cli``: LightningCLI over :class:`ForwardGradientModule` and :class:`MNISTDataModule`.

    fg-cli fit --config configs/cnn_momentum.yaml --model.estimator.init_args.k 10
    fg-cli fit --config configs/cnn_momentum.yaml --ckpt_path last       # resume the newest run of that config
    fg-cli predict --config configs/mlp_backprop.yaml --ckpt_path last   # writes <log dir>/predictions.pt

LightningCLI does the work: its parser (``--config`` files merged in order, ``trainer: trainer.yaml``), the optimizer as
the module's argument (``auto_configure_optimizers=False``: no ``--optimizer``), the config recorded as the module's
hyperparameters. fg-cli refuses before training what cannot work; an error a user can cause prints ``fg-cli:
<ErrorType>: <message>`` and exits with 1 (``FG_CLI_TRACEBACK=1`` for the traceback); Ctrl-C (SIGTERM) names the
checkpoint to resume from and exits with 130 (143); a run that fails before its first step leaves no log folder.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
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
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from fg_lightning.data import DataError, DatasetNotFoundError, MNISTDataModule
from fg_lightning.distributed import ForwardGradientDDPStrategy, PeerLostError, auto_strategy, check_strategy
from fg_lightning.module import CheckpointMismatchError, DivergenceError, ForwardGradientModule
from fg_lightning.torch_network import TorchBackendError


class ConfigError(ValueError):
    """A setting in the config or on the command line is invalid (raised before any training)."""


class CheckpointError(ValueError):
    """``--ckpt_path`` names no readable checkpoint, or one of another model than the config's."""


class Terminated(Exception):
    """SIGTERM stopped training (Lightning would exit with 0, as if training had ended)."""


# Errors a user causes with a setting, a file or the machine's memory: one line, not a traceback.
USER_ERRORS = (ConfigError, CheckpointError, DataError, DatasetNotFoundError, DivergenceError, CheckpointMismatchError,
               MisconfigurationException, MemoryError, torch.OutOfMemoryError, TorchBackendError, PeerLostError)

# The engine's hand-written passes use the parameters' dtype; nobody has checked them under autocast or half precision.
PRECISIONS = {"32-true", "32", "64-true", "64"}

# Noise raised on every run inside Lightning's and torch's own code, where fg-cli cannot avoid it: torch's deprecation
# of the LeafSpec that Lightning's CombinedLoader builds; ModelCheckpoint's note that under manual optimization it saves
# after the optimizer step (as the module means it to); a resumed run's ModelCheckpoint in its own version_N folder.
QUIET_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"The dirpath has changed from .* won't be",
                  r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
# INFO lines: the litlogger advertisement, the seed (config.yaml records it), the note that the configs'
# EstimatorSummary replaces the default summary. Without them a run refused before training prints one line.
QUIET_LINES = ("💡 Tip: For seamless cloud logging", "Seed set to ", "Trainer already configured with model summary")
QUIET_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


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


def check_learning_rate(value: Any) -> None:
    """Refuse a learning rate that is not a finite positive number, by name: torch.optim accepts nan, inf and 0, and
    the run would diverge at its first step or never move."""
    try:
        lr = float(value)
    except (TypeError, ValueError):
        return  # None, or not a number: jsonargparse names it
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"model.optimizer.init_args.lr {value} is not a finite positive number: the learning rate "
                          "scales every update (e.g. --model.optimizer.init_args.lr 1e-3)")


class ForwardGradientCLI(LightningCLI):
    """LightningCLI with the project's module and data, TensorBoard logs in ``tb_logs/`` by default, ``config.yaml``
    beside them; :meth:`parse_arguments` checks before anything is built, :meth:`instantiate_trainer` before anything
    is written."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_defaults", {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                          "init_args": {"save_dir": "tb_logs", "name": "default"}}})
        super().__init__(ForwardGradientModule, MNISTDataModule, save_config_kwargs={"overwrite": True},
                         auto_configure_optimizers=False, args=args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # A parse error raises ArgumentError (one line, see parse_arguments), not a usage block with exit code 2.
        return super().init_parser(**{"exit_on_error": False, **kwargs})

    def setup_parser(self, *args: Any, **kwargs: Any) -> None:
        """``--help`` lists what works: not ``accumulate_grad_batches`` (parsed, to be refused saying why), and for
        ``--model.network`` the project's networks rather than every ``torch.nn`` class (about 680 lines)."""
        super().setup_parser(*args, **kwargs)
        for parser in [self.parser, *getattr(self, "_subcommand_parsers", {}).values()]:
            for action in parser._actions:
                if action.dest == "trainer.accumulate_grad_batches":
                    action.help = argparse.SUPPRESS
                elif action.dest == "model.network" and hasattr(action, "extra_help"):
                    action.extra_help = lambda: (", known subclasses: fg_lightning.MLP, fg_lightning.CNN, or any "
                                                 "torch.nn.Module classifier")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse (not through LightningCLI's, which warns when main(args) runs under pytest), then refuse what cannot
        work, before LightningCLI applies ``--ckpt_path``: it then replaces the config's model section with the
        checkpoint's hyperparameters, which would drop another network or an override without a word."""
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
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            check_learning_rate(config.get("model.optimizer.init_args.lr"))
            self.check_trainer(config)
            self.name_run_after_config(config)
            if config.get("ckpt_path"):
                self.check_checkpoint(subcommand, config)

    @staticmethod
    def check_trainer(config: Namespace) -> None:
        """Trainer settings that cannot work under the module's manual optimisation: gradient clipping moves to the
        module (which clips the estimate), the rest is refused."""
        trainer, model = config.trainer, config.model
        for key in ("gradient_clip_val", "gradient_clip_algorithm"):
            value, mine = trainer.get(key), model.get(key)
            if value is None:
                continue
            if mine not in (None, inspect.signature(ForwardGradientModule).parameters[key].default, value):
                raise ConfigError(f"--trainer.{key} {value} and --model.{key} {mine} disagree: set only "
                                  f"--model.{key} (the module clips the estimate itself)")
            model[key], trainer[key] = value, None
        if trainer.get("accumulate_grad_batches") not in (None, 1):
            raise ConfigError(f"--trainer.accumulate_grad_batches {trainer.accumulate_grad_batches} is not supported: "
                              "each step's estimate is applied at once; for a less noisy update use a larger "
                              "--data.batch_size or more directions (e.g. --model.estimator.init_args.k)")
        if trainer.get("precision") is not None and str(trainer.precision) not in PRECISIONS:
            raise ConfigError(f"--trainer.precision {trainer.precision} is not supported: the hand-written passes have "
                              "not been checked under autocast or half precision; use 32-true or 64-true")

    @staticmethod
    def name_run_after_config(config: Namespace) -> None:
        """A logger whose ``name`` is left empty (as in ``configs/trainer.yaml``) logs the run under the name of the
        last ``--config`` file: ``--config configs/mlp_naive.yaml`` -> ``tb_logs/mlp_naive/version_N``."""
        files, logger = config.get("config") or [], config.trainer.get("logger")
        for item in logger if isinstance(logger, list) else [logger]:
            init = getattr(item, "init_args", None)
            if files and init is not None and "name" in init and init.name is None:
                init.name = os.path.splitext(os.path.basename(str(files[-1])))[0]

    def check_checkpoint(self, subcommand: str, config: Namespace) -> None:
        """Resolve ``--ckpt_path last``; refuse a file that is no readable checkpoint, or one of another network (class
        and arguments) or estimator class than the config's, and when resuming (``fit``) other settings anywhere in the
        model section. validate/test/predict evaluate the network: there the checkpoint's other settings are used."""
        path = config.ckpt_path = self.resolve_last(config) if config.ckpt_path == "last" else str(config.ckpt_path)
        if path in ("hpc", "registry") or path.startswith("registry:") or "://" in path:
            return  # Lightning resolves these itself
        if path == "best":
            raise CheckpointError("--ckpt_path best means the best checkpoint of the run in progress, which a new "
                                  "fg-cli run does not have: give a checkpoint file or `last`")
        if not os.path.isfile(path):
            folder = " (a folder: give a .ckpt file)" if os.path.isdir(path) else ""
            raise CheckpointError(f"checkpoint {path} not found{folder}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # zip reader, unpickler, EOF...: all mean the file is not a whole checkpoint
            raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({type(err).__name__}: "
                                  f"{_one_line(err)[:200]})") from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
        saved = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k != "_instantiator"}
        if not saved:  # made outside fg-cli: the module's on_load_checkpoint checks it
            return
        # Both are the parsed config dumped the same way (LightningCLI saves that dump as the hyperparameters).
        asked = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))[subcommand]
        theirs, mine = _flat(saved, "model"), _flat(asked["model"], "model")
        differ = [key for key in theirs if theirs[key] != mine.get(key)]
        run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml")
        hint = f"; its run's config is {os.path.relpath(run_config)}" if os.path.isfile(run_config) else ""
        if any(key.startswith("model.network.") or key == "model.estimator.class_path" for key in differ):
            raise CheckpointError(f"checkpoint {path} holds {_describe(saved, asked['model'])}, but the config asks "
                                  f"for {_describe(asked['model'], saved)}: give the config it was trained with{hint}")
        if differ and subcommand == "fit":
            raise CheckpointError(f"cannot resume {path} with other settings: " + "; ".join(
                f"{key} is {theirs[key]!r} in the checkpoint, {mine.get(key)!r} in the config" for key in differ) +
                ". Resuming continues that run as it was configured: give the settings it was trained with (drop the "
                f"new override, or repeat the old one{hint}), or start a new run without --ckpt_path")

    @staticmethod
    def resolve_last(config: Namespace) -> str:
        """The newest checkpoint of this config's runs (``<save_dir>/<name>/version_*/checkpoints/*.ckpt``): the newest
        version's, then the highest global step, then the newest file. Not ``last.ckpt`` by name: it is written every
        n steps, so a run stopped by ``max_steps`` has its newest state in its epoch-end checkpoint, one stopped by an
        exception in ``interrupted.ckpt``. Lightning's own "last" only looks in the new run's empty folder."""
        logger = config.trainer.get("logger")
        init = getattr(logger[0] if isinstance(logger, list) and logger else logger, "init_args", None)
        if init is None or not init.get("save_dir"):
            raise CheckpointError("--ckpt_path last looks in the logger's folder, but the config has no logger with a "
                                  "save_dir (TensorBoardLogger or CSVLogger): give the checkpoint file")
        root = os.path.join(str(init.save_dir), str(init.get("name") or ""))
        found = glob.glob(os.path.join(glob.escape(root), "version_*", "checkpoints", "*.ckpt"))
        if not found:
            where = os.path.join(root, "version_*", "checkpoints")
            raise CheckpointError(f"no checkpoint to resume: none under {where}/")

        def newest_first(path: str) -> tuple[int, int, float]:
            version = os.path.basename(os.path.dirname(os.path.dirname(path)))[len("version_"):]
            try:  # mmap: only the few bytes of the step are read
                step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
            except Exception:  # unreadable: ranked last of its version; if picked, check_checkpoint names the file
                step = -1
            return int(version) if version.isdigit() else -1, step, os.path.getmtime(path)

        return max(found, key=newest_first)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:  # the module's, the data's or the trainer's arguments
            if isinstance(err, USER_ERRORS):
                raise
            raise ConfigError(str(err)) from err

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

    def predict(self, model: ForwardGradientModule, datamodule: MNISTDataModule, **kwargs: Any) -> None:
        """``fg-cli predict``: class probabilities of the test set, in order, saved with its labels as
        ``<log dir>/predictions.pt`` (``{"probabilities": (N, 10), "labels": (N,), "ckpt_path": ...}``)."""
        if self.trainer.world_size > 1:
            raise ConfigError(f"predict writes the test set's probabilities in order to one file: run it on one "
                              f"device (--trainer.devices 1), not {self.trainer.world_size} processes")
        batches = self.trainer.predict(model, datamodule=datamodule, **{**kwargs, "return_predictions": True})
        labels, folder = datamodule.test_set.tensors[1], self.trainer.log_dir or "."
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "predictions.pt")
        torch.save({"probabilities": torch.cat([batch.detach().cpu() for batch in batches]), "labels": labels,
                    "ckpt_path": kwargs.get("ckpt_path")}, path)
        print(f"fg-cli: predictions of {len(labels)} test images written to {path}")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence :data:`QUIET_WARNINGS` and :data:`QUIET_LINES` for one run; every other warning and line stays."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(QUIET_LINES)

    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.addFilter(keep)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(keep)


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

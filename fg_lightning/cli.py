"""``fg-cli``: LightningCLI over :class:`ForwardGradientModule` and :class:`MNISTDataModule`.

    fg-cli fit --config configs/cnn_momentum.yaml
    fg-cli fit --config configs/mlp_multi_direction.yaml --model.estimator.init_args.k 10
    fg-cli fit --config configs/cnn_momentum.yaml --ckpt_path last       # resume the newest run of that config
    fg-cli test --config configs/mlp_backprop.yaml --ckpt_path tb_logs/mlp_backprop/version_0/checkpoints/last.ckpt
    fg-cli predict --config configs/mlp_backprop.yaml --ckpt_path last   # writes <log dir>/predictions.pt

Every switch a Lightning user may try either works or is refused before training, in one line: an error a user can
cause prints ``fg-cli: <ErrorType>: <message>`` and exits with 1 (``FG_CLI_TRACEBACK=1`` shows the traceback instead);
programming errors keep their traceback; Ctrl-C (SIGTERM) prints where the last checkpoint is and exits with 130
(143).
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
from contextvars import ContextVar
from typing import Any, Iterator

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from fg_lightning.data import DatasetNotFoundError, MNISTDataModule
from fg_lightning.distributed import ForwardGradientDDPStrategy, PeerLostError, check_strategy, wraps_in_ddp
from fg_lightning.module import (
    CheckpointMismatchError,
    DivergenceError,
    ForwardGradientModule,
    building_from_config,
)
from fg_lightning.torch_network import TorchBackendError


class ConfigError(ValueError):
    """A setting in the config or on the command line is invalid (raised before any training)."""


class CheckpointError(ValueError):
    """``--ckpt_path`` names no readable checkpoint, or one of another model than the config's."""


class DataError(ValueError):
    """The data files are truncated, corrupted or hold bad labels (MNISTDataModule's ValueError, found before
    training)."""


class Terminated(Exception):
    """SIGTERM stopped training (Lightning saves what callbacks save, then exits with 0 as if training had ended)."""


# Errors a user causes with a setting, a file or the machine's memory: one line, not a traceback.
USER_ERRORS = (ConfigError, CheckpointError, DataError, DatasetNotFoundError, DivergenceError, CheckpointMismatchError,
               MisconfigurationException, MemoryError, torch.OutOfMemoryError, TorchBackendError,
               PeerLostError)

# Precisions the engine has been checked under: its hand-written passes use the parameters' dtype, so float64 works;
# nobody has checked them under autocast or half precision.
PRECISIONS = {"32-true", "32", "64-true", "64"}

# Lightning's per-run noise that is no concern of an fg-cli user (message regex, category).
QUIET_WARNINGS = [
    # torch deprecated LeafSpec, which Lightning still builds when it moves a batch; nothing the user can change.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # The module checkpoints after its optimizer step on purpose: a checkpoint's global_step counts that step.
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps", UserWarning),
    # A resumed run writes its own version_N folder, so its ModelCheckpoint starts a new top-k, as it should.
    (r"The dirpath has changed from .* won't be reloaded", UserWarning),
    # torch's forward-mode AD loads its decompositions through torch.jit.script on first use (the torch backend).
    (r"`torch.jit.script` is deprecated", FutureWarning),
    # main(args) from Python (tests, notebooks) while sys.argv holds the caller's own arguments.
    (r"LightningCLI's args parameter is intended to run from within Python", UserWarning),
]
# Lightning's per-run INFO lines that are no concern either: the litlogger advertisement; the seed, which the config
# gives and the run's config.yaml records (also when `seed_everything: true` drew it); the note that the configs'
# EstimatorSummary replaces the default summary. Without them, a run refused before training prints one line.
QUIET_LOG_PREFIXES = ("💡 Tip: For seamless cloud logging", "Seed set to ",
                      "Trainer already configured with model summary callbacks")
QUIET_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed")

# Options the parser keeps so that they are refused in one line saying why (ForwardGradientCLI.check_trainer,
# refuse_top_level_optimizer), but that --help does not list: they cannot work under manual optimisation.
HIDDEN_OPTIONS = ("optimizer", "optimizer.help", "lr_scheduler", "lr_scheduler.help", "trainer.accumulate_grad_batches")

# --ckpt_path values Lightning resolves itself ("last" is resolved by fg-cli, see ForwardGradientCLI.resolve_last).
LIGHTNING_CKPT_KEYWORDS = ("hpc", "registry")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"<prefix>.a.b": 1}``; lists and scalars are leaves."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}"))
    return flat


def _describe(part: dict[str, Any], other: dict[str, Any]) -> str:
    """``class_path(arg=value, ...)`` with the arguments that differ from `other`'s (all of them for another class)."""
    args, other_args = part.get("init_args") or {}, other.get("init_args") or {}
    same_class = part.get("class_path") == other.get("class_path")
    shown = ", ".join(f"{k}={v!r}" for k, v in args.items() if not same_class or other_args.get(k) != v)
    return f"{part.get('class_path')}({shown})"


def _scalar_tags(events_file: str) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(events_file, size_guidance={"scalars": 1})
    events.Reload()
    return set(events.Tags()["scalars"])


def _untrained(folder: str) -> bool:
    """Whether a run folder holds only what a run writes before its first step: ``config.yaml``, ``hparams.yaml``
    and event files without training scalars (``hp_metric`` is Lightning's placeholder). Anything else (a
    checkpoint, predictions, a CSV log, a file we do not know) keeps the folder."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            if name in ("config.yaml", "hparams.yaml"):
                continue
            if name.startswith("events.out.tfevents.") and not _scalar_tags(path) - {"hp_metric"}:
                continue
            return False
    return True


# The CLI whose Trainer is running, for main() to clean up after a failure.
_RUNNING: ContextVar["ForwardGradientCLI | None"] = ContextVar("fg_cli_running", default=None)


class ForwardGradientCLI(LightningCLI):
    """LightningCLI with the project's module and data, TensorBoard logs in ``tb_logs/`` by default, and ``config.yaml``
    saved beside them. The module's and the data's settings are recorded as hyperparameters (TensorBoard's HPARAMS).

    On top of LightningCLI, every check that can run before training does (:meth:`parse_arguments`, then the data
    and the optimizer before the Trainer is built, :meth:`instantiate_trainer`), and a run that fails before its
    first step leaves no stub ``version_N`` folder behind.
    """

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault(
            "trainer_defaults",
            {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": "tb_logs", "name": "default"}}},
        )
        super().__init__(
            ForwardGradientModule,
            MNISTDataModule,
            save_config_kwargs={"overwrite": True},
            args=args,
            **kwargs,
        )

    # ---------------------------------------------------------------- checks on the parsed config (before anything)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # A parse error raises ArgumentError instead of printing a 70-line usage block and exiting with 2:
        # parse_arguments turns it into a ConfigError, which main() prints in one line.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def setup_parser(self, *args: Any, **kwargs: Any) -> None:
        """``--help`` lists what works: not the options that are refused (:data:`HIDDEN_OPTIONS`, still parsed so
        that they are refused saying why), and for ``--model.network`` the project's networks rather than every
        ``torch.nn`` class (about 680 lines)."""
        super().setup_parser(*args, **kwargs)
        for parser in [self.parser, *getattr(self, "_subcommand_parsers", {}).values()]:
            for action in parser._actions:
                if action.dest in HIDDEN_OPTIONS:
                    action.help = argparse.SUPPRESS
                elif action.dest == "model.network" and hasattr(action, "extra_help"):
                    action.extra_help = lambda: (", known subclasses: fg_lightning.MLP, fg_lightning.CNN, or any "
                                                 "torch.nn.Module classifier")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then refuse what would be ignored or silently changed, before Lightning applies ``--ckpt_path``:
        LightningCLI replaces the config's ``model`` section with the checkpoint's hyperparameters right after this
        method, so a different network or an override given on resume would otherwise be dropped without a word."""
        if isinstance(args, (list, tuple)) or args is None:
            raw = sys.argv[1:] if args is None else list(args)
            self.refuse_top_level_optimizer(raw)
            for key, value in zip(raw, raw[1:] + [None]):  # `--...lr nan`: jsonargparse's float refuses nan first
                if isinstance(key, str) and re.fullmatch(r"--model\.optimizer(\.init_args)?\.lr(=.*)?", key):
                    self.check_learning_rate(key.partition("=")[2] if "=" in key else value)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ConfigError(str(err)) from None
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        self.refuse_top_level_optimizer([f"--{key}" for key in ("optimizer", "lr_scheduler") if config.get(key)])
        self.check_learning_rate(config.get("model.optimizer.init_args.lr"))
        self.check_trainer(config)
        self.name_run_after_config(config)
        if config.get("ckpt_path"):
            self.check_checkpoint(subcommand, config)

    @staticmethod
    def name_run_after_config(config: Any) -> None:
        """A logger whose ``name`` is left empty (as in ``configs/trainer.yaml``, which every config shares) logs the
        run under the name of its config file, the last ``--config`` given: ``--config configs/mlp_naive.yaml`` ->
        ``tb_logs/mlp_naive/version_N``."""
        files = config.get("config") or []
        logger = config.trainer.get("logger")
        for item in logger if isinstance(logger, list) else [logger]:
            init = getattr(item, "init_args", None)
            if files and init is not None and "name" in init and init.name is None:
                init.name = os.path.splitext(os.path.basename(str(files[-1])))[0]

    @staticmethod
    def refuse_top_level_optimizer(args: list[str]) -> None:
        """LightningCLI's own ``--optimizer`` / ``--lr_scheduler`` would replace ``--model.optimizer`` (and a
        scheduler it adds is never stepped under manual optimisation): refuse them, pointing to the module's. Checked on
        the raw arguments too, so that e.g. ``--lr_scheduler StepLR`` without its step_size is not met by
        jsonargparse's usage message first."""
        for arg in args:
            for key in ("optimizer", "lr_scheduler"):
                if isinstance(arg, str) and re.fullmatch(rf"--{key}([.=].*)?", arg):
                    raise ConfigError(f"--{key} is LightningCLI's, which fg-cli does not use: set --model.{key} "
                                      f"(e.g. --model.{key}.class_path ... --model.{key}.init_args.<arg> ...)")

    @staticmethod
    def check_learning_rate(value: Any) -> None:
        """Refuse a learning rate that is not a finite positive number, by name: torch.optim accepts nan, inf and 0
        (only a negative rate is refused), and the run would then diverge at its first step or never move."""
        if value is None:
            return
        try:
            lr = float(value)
        except (TypeError, ValueError):
            return  # not a number at all: jsonargparse names it
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"model.optimizer.init_args.lr {value} is not a finite positive number: the learning "
                              "rate scales every update (e.g. --model.optimizer.init_args.lr 1e-3)")

    @staticmethod
    def check_trainer(config: Any) -> None:
        """Trainer settings that cannot work under the module's manual optimisation: gradient clipping moves to the
        module (which clips the estimate), the rest is refused."""
        trainer, model = config.trainer, config.model
        defaults = inspect.signature(ForwardGradientModule).parameters
        for key in ("gradient_clip_val", "gradient_clip_algorithm"):
            value = trainer.get(key)
            if value is None:
                continue
            mine = model.get(key)
            if mine not in (None, defaults[key].default, value):
                raise ConfigError(f"--trainer.{key} {value} and --model.{key} {mine} disagree: set only "
                                  f"--model.{key} (the module clips the estimate itself)")
            model[key], trainer[key] = value, None
        accumulate = trainer.get("accumulate_grad_batches")
        if accumulate not in (None, 1):
            raise ConfigError(f"--trainer.accumulate_grad_batches {accumulate} is not supported: each step's estimate "
                              "is applied at once; for a less noisy update use a larger --data.batch_size or more "
                              "directions (e.g. --model.estimator.init_args.k)")
        precision = trainer.get("precision")
        if precision is not None and str(precision) not in PRECISIONS:
            raise ConfigError(f"--trainer.precision {precision} is not supported: the hand-written forward and "
                              "backward passes have not been checked under autocast or half precision; use 32-true "
                              "or 64-true")

    def check_checkpoint(self, subcommand: str, config: Any) -> None:
        """Resolve ``--ckpt_path last``, make sure the file is a readable checkpoint, and that it holds the model the
        config asks for: the same network (class and arguments) and estimator class always; when resuming (``fit``),
        the same settings in the whole ``model`` section, since Lightning would replace the config's by the
        checkpoint's. validate/test/predict only evaluate the network, so there the checkpoint's optimizer and
        estimator arguments are used as Lightning does."""
        path = str(config.ckpt_path)
        if path == "last":
            path = config.ckpt_path = self.resolve_last(config)
        if path in LIGHTNING_CKPT_KEYWORDS or path.startswith("registry:") or "://" in path:
            return
        if path == "best":
            raise CheckpointError("--ckpt_path best means the best checkpoint of the run in progress, which a new "
                                  "fg-cli run does not have: give a checkpoint file or `last`")
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} not found" + (" (a folder: give a .ckpt file)"
                                                                    if os.path.isdir(path) else ""))
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # zip reader, unpickler, EOF...: all mean the file is not a whole checkpoint
            raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({type(err).__name__}: "
                                  f"{_one_line(err)[:200]})") from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
        saved = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k != "_instantiator"}
        if saved:  # without hyperparameters (made outside fg-cli), the module's on_load_checkpoint checks it
            self.compare_model(path, saved, subcommand, resuming=subcommand == "fit")

    def resolve_last(self, config: Any) -> str:
        """The newest checkpoint of this config's runs: of the ``*.ckpt`` files in
        ``<save_dir>/<name>/version_*/checkpoints/``, the newest version's, then the one of the highest global step,
        then by modification time. Not ``last.ckpt`` by name: it is written every n steps, so a run that stops
        between two (``max_steps``) has its newest state only in its epoch-end checkpoint, and one stopped by an
        exception in ``interrupted.ckpt``. Lightning's own "last" only looks in the new run's empty folder."""
        logger = config.trainer.get("logger")
        logger = logger[0] if isinstance(logger, list) and logger else logger
        init = getattr(logger, "init_args", None)
        if init is None or not init.get("save_dir"):
            raise CheckpointError("--ckpt_path last looks in the logger's folder, but the config has no logger with a "
                                  "save_dir (TensorBoardLogger or CSVLogger): give the checkpoint file")
        root = os.path.join(str(init.save_dir), str(init.get("name") or ""))

        def global_step(path: str) -> int:
            try:  # mmap: only the few bytes of the step are read
                return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
            except Exception:  # unreadable: ranked last of its version; if picked, the check after names the file
                return -1

        def newest_first(path: str) -> tuple[int, int, float]:
            version = os.path.basename(os.path.dirname(os.path.dirname(path)))[len("version_"):]
            return (int(version) if version.isdigit() else -1, global_step(path), os.path.getmtime(path))

        found = glob.glob(os.path.join(glob.escape(root), "version_*", "checkpoints", "*.ckpt"))
        if not found:
            where = os.path.join(root, "version_*", "checkpoints")
            raise CheckpointError(f"no checkpoint to resume: none under {where}/")
        return max(found, key=newest_first)

    def compare_model(self, path: str, saved: dict[str, Any], subcommand: str, resuming: bool) -> None:
        """Compare the checkpoint's model hyperparameters with the config's model section. Both are the parsed config
        dumped the same way (LightningCLI saves ``parser.dump`` of the config as the hyperparameters), so the config's
        own dump, with its defaults filled in, compares value for value."""
        dump = self.parser.dump(self.config, skip_link_targets=False, skip_none=False, format="yaml")
        asked = yaml.safe_load(dump)[subcommand]["model"]
        unknown = sorted(set(saved) - set(asked))
        if unknown:
            raise CheckpointError(f"checkpoint {path} holds model settings fg-cli does not know "
                                  f"({', '.join(unknown)}): it was not made by this version of fg-cli")
        for part in ("network", "estimator"):
            mine, theirs = asked.get(part), saved.get(part)
            if not (isinstance(mine, dict) and isinstance(theirs, dict)):
                continue
            keys = ("class_path", "init_args") if part == "network" else ("class_path",)
            if any(mine.get(key) != theirs.get(key) for key in keys):
                raise CheckpointError(f"checkpoint {path} holds {_describe(theirs, mine)} but the config asks for "
                                      f"{_describe(mine, theirs)}: give the config it was trained with"
                                      f"{self._run_config_hint(path)}")
        if not resuming:
            return
        flat_saved, flat_asked = _flatten(saved, "model"), _flatten(asked, "model")
        differ = [f"{key} is {flat_saved[key]!r} in the checkpoint, {flat_asked[key]!r} in the config"
                  for key in flat_saved if key in flat_asked and flat_saved[key] != flat_asked[key]]
        if differ:
            raise CheckpointError(f"cannot resume {path} with other settings: {'; '.join(differ)}. Resuming continues "
                                  "that run as it was configured: give the settings it was trained with (drop the "
                                  f"new override, or repeat the old one{self._run_config_hint(path)}), or start a new "
                                  "run without --ckpt_path")

    @staticmethod
    def _run_config_hint(path: str) -> str:
        """Where the checkpoint's own run saved its config (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``)."""
        config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml")
        return f"; its run's config is {os.path.relpath(config)}" if os.path.isfile(config) else ""

    # -------------------------------------------------------------------------------- building and running the run

    def instantiate_classes(self) -> None:
        try:
            with building_from_config():
                super().instantiate_classes()
        except (ConfigError, DataError):  # DataError: instantiate_trainer (called from here) loads the data
            raise
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err)) from err

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Load the data and build the optimizer once before the Trainer is built (and prints its lines, and makes its
        log folder later): a bad data file or a bad learning rate then fails at once, in one line. The datamodule
        keeps what it loaded, so the run does not load it again."""
        if self.subcommand == "fit":
            try:
                self.model.configure_optimizers()  # torch.optim checks lr, betas... only when an optimizer is built
            except (ValueError, TypeError) as err:
                raise ConfigError(f"model.optimizer / model.lr_scheduler: {err}") from err
        try:
            self.datamodule.prepare_data()
            self.datamodule.setup(self.subcommand)
        except DatasetNotFoundError:
            raise
        except ValueError as err:
            raise DataError(str(err)) from err
        trainer = self._build_trainer(**kwargs)
        if self.subcommand == "fit" and wraps_in_ddp(trainer.strategy) \
                and self.config_init[self.subcommand]["trainer"].get("strategy") == "auto":
            # Several devices and no strategy asked for: Lightning picks its ddp, which cannot train the engine; the
            # same processes with fg_ddp can.
            self.config_init[self.subcommand]["trainer"]["strategy"] = "fg_ddp"
            trainer = self._build_trainer(**kwargs)
        if self.subcommand == "fit":
            try:
                check_strategy(trainer.strategy)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if self.subcommand == "predict" and trainer.world_size > 1:
            raise ConfigError(f"predict writes the test set's probabilities in order to one file: run it on one "
                              f"device (--trainer.devices 1), not {trainer.world_size} processes")
        # The log folders this run will create, so that a failure can take them away again (cleanup_after).
        folders = [logger.log_dir for logger in trainer.loggers if isinstance(logger, (TensorBoardLogger, CSVLogger))]
        self._new_folders = {folder: self._first_missing(folder) for folder in folders
                             if re.fullmatch(r"version_\d+", os.path.basename(folder)) and not os.path.exists(folder)}
        _RUNNING.set(self)
        return trainer

    def _build_trainer(self, **kwargs: Any) -> Any:
        try:
            return super().instantiate_trainer(**kwargs)
        except ImportError as err:  # e.g. --trainer.accelerator tpu without torch_xla
            raise ConfigError(f"the trainer settings need a package that is not installed: {err}") from err

    def cleanup_after(self, err: BaseException) -> BaseException:
        """After the run failed with `err`: remove the run's new log folder if it holds nothing from training, and
        say what a Ctrl-C or a SIGTERM stopped. Lightning turns a Ctrl-C into ``sys.exit(1)`` after its graceful
        shutdown (here a KeyboardInterrupt saying where the last checkpoint is), and a SIGTERM into
        ``SystemExit(None)``, exit code 0 as if training had finished (here :class:`Terminated`)."""
        for folder, top in self._new_folders.items():
            if os.path.isdir(folder) and _untrained(folder):
                self._remove(folder, top)
        if isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt):
            return KeyboardInterrupt(self._interrupted())
        strategy = getattr(getattr(self, "trainer", None), "strategy", None)
        lost = strategy.as_peer_lost(err) if isinstance(strategy, ForwardGradientDDPStrategy) else None
        if lost is not None:  # a peer died or hangs: this rank's line, where it stopped and what to resume from
            return PeerLostError(f"{lost}; {self._interrupted()}")
        if isinstance(err, SIGTERMException) or (isinstance(err, SystemExit) and
                                                 isinstance(err.__context__, SIGTERMException)):
            return Terminated(self._interrupted())
        return err

    @staticmethod
    def _first_missing(folder: str) -> str:
        """The highest of `folder` and its parents that does not exist yet: what the run will have created."""
        folder = os.path.abspath(folder)
        while not os.path.exists(os.path.dirname(folder)):
            folder = os.path.dirname(folder)
        return folder

    @staticmethod
    def _remove(folder: str, top: str) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        parent = os.path.dirname(os.path.abspath(folder))
        while len(parent) >= len(top) and os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)
            parent = os.path.dirname(parent)

    def _interrupted(self) -> str:
        files = {getattr(callback, attr, None) for callback in self.trainer.callbacks
                 for attr in ("ckpt_path", "last_model_path", "best_model_path")}
        files = [path for path in files if isinstance(path, str) and path and os.path.isfile(path)]
        where = (f"resume with --ckpt_path {max(files, key=os.path.getmtime)}" if files
                 else "no checkpoint was written")
        return f"stopped at step {self.trainer.global_step}; {where}"

    def predict(self, model: ForwardGradientModule, datamodule: MNISTDataModule, **kwargs: Any) -> None:
        """``fg-cli predict``: class probabilities of the test set, in order, saved with its labels as
        ``<log dir>/predictions.pt`` (``{"probabilities": (N, 10), "labels": (N,), "ckpt_path": ...}``)."""
        kwargs["return_predictions"] = True
        batches = self.trainer.predict(model, datamodule=datamodule, **kwargs)
        probabilities = torch.cat([batch.detach().cpu() for batch in batches])
        labels = datamodule.test_set.tensors[1]
        folder = self.trainer.log_dir or "."
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "predictions.pt")
        torch.save({"probabilities": probabilities, "labels": labels, "ckpt_path": kwargs.get("ckpt_path")}, path)
        print(f"fg-cli: predictions of {len(labels)} test images written to {path}")


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(QUIET_LOG_PREFIXES)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's and torch's per-run noise (:data:`QUIET_WARNINGS`, :data:`QUIET_LOG_PREFIXES`) for one
    run; every other warning and line stays."""
    drop = _DropMessages()
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    with warnings.catch_warnings():
        for message, category in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)


def main(args: Any = None) -> None:
    """Entry point of ``fg-cli``: the errors a user can cause end in one line on stderr and exit code 1
    (``FG_CLI_TRACEBACK=1`` shows the traceback instead); Ctrl-C ends with 130, SIGTERM with 143; other errors keep
    their traceback."""
    show_traceback = os.environ.get("FG_CLI_TRACEBACK", "") not in ("", "0")
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT from the first Ctrl-C on and never restores it
    token = _RUNNING.set(None)
    try:
        with quiet():
            try:
                ForwardGradientCLI(args=args)
            except BaseException as err:
                running = _RUNNING.get()
                if running is None:
                    raise
                translated = running.cleanup_after(err)
                if translated is err:
                    raise
                raise translated from None
    except KeyboardInterrupt as err:
        if show_traceback:
            raise
        print(f"fg-cli: KeyboardInterrupt: {str(err) or 'interrupted'}", file=sys.stderr)
        raise SystemExit(130) from None
    except Terminated as err:
        print(f"fg-cli: Terminated: {err}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except USER_ERRORS as err:
        if show_traceback:
            raise
        print(f"fg-cli: {type(err).__name__}: {_one_line(err)} (FG_CLI_TRACEBACK=1 for the traceback)",
              file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        _RUNNING.reset(token)
        if sigint is not None:
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(signal.SIGINT, sigint)


if __name__ == "__main__":
    main()

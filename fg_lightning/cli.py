"""``fg-cli``: LightningCLI over :class:`ForwardGradientModule` and :class:`MNISTDataModule`.

    fg-cli fit --config configs/cnn_momentum.yaml
    fg-cli fit --config configs/mlp_multi_direction.yaml --model.estimator.init_args.k 10
    fg-cli test --config configs/mlp_backprop.yaml --ckpt_path tb_logs/mlp_backprop/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

from fg_lightning.data import DatasetNotFoundError, MNISTDataModule
from fg_lightning.module import DivergenceError, ForwardGradientModule, building_from_config


class ConfigError(ValueError):
    """A setting in the config or on the command line is invalid (raised before any training)."""


class ForwardGradientCLI(LightningCLI):
    """LightningCLI with the project's module and data, TensorBoard logs in ``tb_logs/`` by default, and ``config.yaml``
    saved beside them. The module's and the data's settings are recorded as hyperparameters (TensorBoard's HPARAMS)."""

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

    def instantiate_classes(self) -> None:
        try:
            with building_from_config():
                super().instantiate_classes()
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err)) from err


def main(args: Any = None) -> None:
    """Entry point of ``fg-cli``; training that diverges or cannot find its data ends with one clear message."""
    try:
        ForwardGradientCLI(args=args)
    except (ConfigError, DivergenceError, DatasetNotFoundError) as err:
        print(f"fg-cli: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()

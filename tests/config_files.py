"""The project's configs as dicts that run from anywhere: a test changes one and writes it to its own folder."""

from __future__ import annotations

import os

import yaml

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def load_config(name: str) -> dict:
    """``configs/<name>.yaml`` with its shared ``trainer: trainer.yaml`` read in (a path relative to the config, which
    a copy elsewhere would lose) and the run named ``name``, as fg-cli names it from the file."""
    with open(os.path.join(CONFIGS, f"{name}.yaml")) as f:
        config = yaml.safe_load(f)
    if isinstance(config.get("trainer"), str):
        with open(os.path.join(CONFIGS, config["trainer"])) as f:
            config["trainer"] = yaml.safe_load(f)
        config["trainer"]["logger"]["init_args"]["name"] = name
    return config

"""A model as a user writes it, for the torch-backend tests (``class_path: user_models.UserCNN`` in a config)."""

from __future__ import annotations

from torch import nn


class UserCNN(nn.Sequential):
    """A small CNN with batch norm and dropout (both active in train mode)."""

    def __init__(self, channels: int = 4, dropout: float = 0.1) -> None:
        super().__init__(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout(dropout), nn.Flatten(), nn.Linear(channels * 14 * 14, 10),
        )

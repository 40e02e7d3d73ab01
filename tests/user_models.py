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


class ReusedOutside(nn.Module):
    """fc1 runs as a module, then its weight is used again by a function call outside its forward."""

    def __init__(self, features: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(features, features), nn.Linear(features, classes)

    def forward(self, x):
        h = nn.functional.relu(self.fc1(x.flatten(1)))
        h = nn.functional.relu(nn.functional.linear(h, self.fc1.weight, self.fc1.bias))
        return self.fc2(h)


class CalledTwice(nn.Module):
    """One module called twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(nn.functional.relu(self.fc1(nn.functional.relu(self.fc1(x)))))


class Recurrent(nn.Module):
    """An LSTM (its output is a tuple) and a linear classifier on the last time step; inputs (B, T, features)."""

    def __init__(self, features: int = 3, hidden: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.lstm, self.fc = nn.LSTM(features, hidden, batch_first=True), nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


class TiedThroughAView(nn.Module):
    """fc2 reads fc1's weight through a view taken at construction: no parameter object is seen in the pass, so only
    the comparison with autograd can tell that forward mode misses this use."""

    def __init__(self, dtype=None) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4, dtype=dtype), nn.Linear(4, 3, dtype=dtype)
        self.transposed = self.fc1.weight.t()

    def forward(self, x):
        h = nn.functional.relu(self.fc1(x))
        return self.fc2(h @ self.transposed)


class OutputLayerTwice(nn.Module):
    """The output layer (the last module with parameters) is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.fc2(nn.functional.relu(self.fc2(nn.functional.relu(self.fc1(x)))))

"""Small ``torch.nn`` classifiers for the torch backend: what a user brings, as plain ``torch.nn`` code.

``ResNet`` is a torchvision-style residual network (``BasicBlock``: two 3×3 convolutions with batch norm and a
shortcut) sized for 28×28 single-channel images; ``ViT`` is torchvision's ``VisionTransformer`` sized for them; any ``torch.nn.Module`` classifier trains the same way
(``ForwardGradientModule(network=<module>, ...)``, or ``model.network.class_path`` in a config).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock``: conv-bn-relu-conv-bn, plus the input (projected by a 1×1 convolution
    with batch norm where the shape changes), then relu."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A stem (3×3 convolution, batch norm, relu), one ``BasicBlock`` per entry of ``channels`` (stride 2 from the
    second on), global average pooling and a linear classifier. The default (16, 32, 64) has 78 k parameters."""

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64), num_classes: int = 10,
                 seed: int | None = None) -> None:
        super().__init__()
        if not channels or any(c < 1 for c in channels) or num_classes < 1 or in_channels < 1:
            raise ValueError(f"ResNet needs positive sizes, got in_channels={in_channels}, channels={tuple(channels)}, "
                             f"num_classes={num_classes}")
        with torch.random.fork_rng(devices=[]):  # the weights from seed, the global generator left as it was
            if seed is not None:
                torch.manual_seed(seed)
            self._build(in_channels, channels, num_classes)

    def _build(self, in_channels: int, channels: Sequence[int], num_classes: int) -> None:
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU())
        blocks, width = [], channels[0]
        for index, out in enumerate(channels):
            blocks.append(BasicBlock(width, out, stride=1 if index == 0 else 2))
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def ViT(image_size: int = 28, in_channels: int = 1, patch_size: int = 7, num_layers: int = 4, num_heads: int = 4,
        hidden_dim: int = 64, mlp_dim: int = 128, num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    """torchvision's ``VisionTransformer`` for small single-channel images: 28×28 in 7×7 patches is 16 tokens and a
    class token; 4 layers of width 64 (about 0.2 M parameters) by default. Its patch embedding takes ``in_channels``
    (torchvision's takes 3). Trains on both sides of the suite: backprop, the weight estimators, zeroth order and
    LoRA (``fg_lightning.finetune.lora``); activity perturbation refuses it (``nn.MultiheadAttention`` returns a
    tuple)."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim, dropout=dropout,
                              num_classes=num_classes)
    model.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
    return model

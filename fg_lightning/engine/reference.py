"""The stock ``torch.nn`` twin of a :class:`Network`: same layers, same weights, trainable by torch.autograd.

Used as the oracle in tests and as the stock-PyTorch baseline in benchmarks; the engine itself never calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fg_lightning.engine.layers import (
    AdaptiveAvgPool2d, Conv2d, Flatten, GlobalAvgPool, GroupNorm, Layer, Linear, MaxPool2d, ReLU,
)
from fg_lightning.engine.network import Head, Network


class _BandedGroupNorm(nn.Module):
    """``GroupNorm(bands=...)``'s twin: ``F.group_norm`` on each cell of the bands' grid on its own."""

    def __init__(self, groups: int, bands: tuple[int, ...], eps: float) -> None:
        super().__init__()
        self.groups, self.bands, self.eps = groups, bands, eps

    def forward(self, x: Tensor) -> Tensor:
        rows = [torch.cat([F.group_norm(cell, self.groups, eps=self.eps) for cell in band.split(self.bands, 3)], 3)
                for band in x.split(self.bands, 2)]
        return torch.cat(rows, 2)


def _stock_layer(layer: Layer) -> nn.Module:
    if isinstance(layer, Linear):
        stock = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    elif isinstance(layer, Conv2d):
        stock = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          bias=layer.bias is not None)
    elif isinstance(layer, ReLU):
        return nn.ReLU(inplace=layer.inplace)
    elif isinstance(layer, MaxPool2d):
        return nn.MaxPool2d(layer.kernel_size, layer.stride)
    elif isinstance(layer, Flatten):
        return nn.Flatten()
    elif isinstance(layer, GroupNorm) and layer.bands is not None:
        return _BandedGroupNorm(layer.groups, layer.bands, layer.eps)
    elif isinstance(layer, GroupNorm):
        return nn.GroupNorm(layer.groups, layer.channels, eps=layer.eps, affine=False)
    elif isinstance(layer, AdaptiveAvgPool2d):
        return nn.AdaptiveAvgPool2d(layer.output_size)
    elif isinstance(layer, GlobalAvgPool):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    else:
        raise TypeError(f"no stock torch.nn equivalent for {type(layer).__name__}")
    for name, param in layer.named_parameters():
        getattr(stock, name).data.copy_(param.detach())
    return stock


def to_torch(network: Network | Head) -> nn.Sequential:
    """An ``nn.Sequential`` with the same layer names, parameter names and weights, on the same device and dtype.

    Its parameters require grad; ``nn.functional.cross_entropy`` on its output is the network's loss. A network's
    local-loss heads are not part of it; ``to_torch(network.get_submodule("head1"))`` gives a head's twin.
    """
    stock = nn.Sequential()
    for name, layer in network.named_layers():
        stock.add_module(name, _stock_layer(layer))
    param = next(network.parameters(), None)
    if param is not None:
        stock.to(device=param.device, dtype=param.dtype)
    return stock


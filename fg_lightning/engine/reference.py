"""The stock ``torch.nn`` twin of a :class:`Network`: same layers, same weights, trainable by torch.autograd.

Used as the oracle in tests and as the stock-PyTorch baseline in benchmarks; the engine itself never calls it.
"""

from __future__ import annotations

from torch import nn

from fg_lightning.engine.layers import Layer
from fg_lightning.engine.network import Head, Network


def _stock_layer(layer: Layer) -> nn.Module:
    stock = layer.stock()
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


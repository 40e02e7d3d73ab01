r"""What a data-parallel estimator exchanges between processes: the communicator an estimator's ``estimate(network, x,
labels, step, comm)`` is given, to combine what each process computed on its part of the batch.

Under data parallelism each of ``W`` processes (ranks) holds the same parameters and the same estimator state (so
the same random directions, drawn from the same generator) and a part of the *union batch* of ``B = Σ_r B_r``
examples, rank ``r``'s rows at offset ``Σ_{r' < r} B_{r'}``. Every estimator combines its per-rank quantities through
``comm`` so that every rank takes the update a single process would take on the union batch:

- quantities that are batch means (the loss, directional derivatives, a gradient) through :meth:`batch_mean`,
  :math:`\sum_r B_r t_r / \sum_r B_r`, all of a step's tensors in one all-reduce (:meth:`mean_derivatives`,
  :meth:`mean_gradient` for the two usual cases);
- the rows of a layer input through :meth:`gather_rows` (input-generated directions);
- per-example noise is drawn for the whole union batch on every rank and each rank takes its own rows
  (:meth:`batch_rows`).

The communicator is an argument, not estimator state, so that the caller that forms the update says which processes
take part: :func:`~fg_lightning.estimators.training_step` requires one, and an ``estimate`` called without one is
one process (:data:`ONE_PROCESS`), which is what it is when nobody else runs.

:class:`Collective` is the single process: nothing to combine, every method returns its input, but :attr:`bytes`
counts what the same calls would send, so that a single-process run (and ``fg-bench comm``) tells what a
data-parallel step communicates. :class:`TorchCollective` does it with ``torch.distributed`` (gloo on CPU, NCCL on
GPUs), in the default process group that Lightning's strategy sets up. :class:`ThreadCollective` runs ``W`` ranks as
threads of one process: a single-process test of an estimator on two ranks against one process on the union batch
fails when the estimator forgets a reduction.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fg_lightning.engine import JvpResult


def _nbytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Collective:
    """One process. ``bytes`` counts the bytes each call would send from this process (an all-reduce its payload, a
    gather this rank's rows), plus one element for the batch size that a batch-weighted mean carries."""

    world_size: int = 1
    rank: int = 0

    def __init__(self) -> None:
        self.bytes = 0

    def batch_mean(self, tensors: Sequence[Tensor], batch_size: int) -> list[Tensor]:
        """Each tensor, a mean over this rank's ``batch_size`` examples, as the mean over the union batch:
        :math:`\\sum_r B_r t_r / \\sum_r B_r`, all tensors in one all-reduce."""
        self.bytes += _nbytes(tensors) + (tensors[0].element_size() if tensors else 0)
        return list(tensors)

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """The union batch's rows of ``tensor (B_r, ...)``: every rank's rows in rank order, ``(B, ...)``."""
        self.bytes += _nbytes([tensor]) + 8  # and the batch size
        return tensor

    def batch_rows(self, batch_size: int) -> tuple[int, int]:
        """``(offset, total)``: where this rank's ``batch_size`` rows start in the union batch, and its size."""
        self.bytes += 8
        return 0, batch_size

    def mean_derivatives(self, batch_size: int, result: JvpResult) -> JvpResult:
        """``result`` with its loss and its K directional derivatives (each block's, with local losses) as means over
        the union batch, in one all-reduce of K + 1 numbers (per block); the tangents are the same on every rank."""
        blocks = result.block_derivs[:-1] if result.block_derivs is not None else []
        # the derivatives of a block's group losses (Network(groups=G)): sent only where G > 1; with one group they
        # are the block's own
        grouped = [i for i, d in enumerate(result.group_derivs or []) if d.shape[-1] > 1]
        # and of its group and patch losses (CNN(patches=P)): sent only where P > 1
        patched = [i for i, d in enumerate(result.patch_derivs or []) if d.shape[-1] > 1]
        loss, dir_derivs, *rest = self.batch_mean(
            [result.loss, result.dir_derivs, *blocks, *(result.group_derivs[i] for i in grouped),
             *(result.patch_derivs[i] for i in patched)], batch_size)
        block_derivs = None if result.block_derivs is None else [*rest[:len(blocks)], dir_derivs]
        group_derivs = None if result.group_derivs is None else [d.unsqueeze(-1) for d in block_derivs]
        for i, d in zip(grouped, rest[len(blocks):]):
            group_derivs[i] = d
        patch_derivs = None if result.patch_derivs is None else [d.unsqueeze(-1) for d in group_derivs]
        for i, d in zip(patched, rest[len(blocks) + len(grouped):]):
            patch_derivs[i] = d
        return dataclasses.replace(result, loss=loss, dir_derivs=dir_derivs, block_derivs=block_derivs,
                                   group_derivs=group_derivs, patch_derivs=patch_derivs)

    def mean_gradient(self, batch_size: int, loss: Tensor,
                      grads: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and a gradient (a dict of per-parameter batch means) over the union batch, in one all-reduce."""
        loss, *values = self.batch_mean([loss, *grads.values()], batch_size)
        return loss, dict(zip(grads, values))


ONE_PROCESS = Collective()
"""What ``estimate`` combines with when given no communicator: one process. Its byte count is shared by every such
call; pass your own :class:`Collective` to count a run's bytes."""


class TorchCollective(Collective):
    """``torch.distributed`` in the default process group (or ``group``), which must be initialised: Lightning's
    :class:`~fg_lightning.distributed.ForwardGradientDDPStrategy` does it. Results are identical on every rank (an
    all-reduce hands every rank the same sum)."""

    def __init__(self, group: object | None = None) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchCollective needs an initialised torch.distributed process group")
        self._group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def batch_mean(self, tensors: Sequence[Tensor], batch_size: int) -> list[Tensor]:
        super().batch_mean(tensors, batch_size)
        if not tensors:
            return []
        # One flat buffer: Σ_r B_r t_r for every tensor, then Σ_r B_r in the last element.
        flat = torch.cat([t.reshape(-1) for t in tensors] + [tensors[0].new_ones(1)]).mul_(batch_size)
        dist.all_reduce(flat, group=self._group)
        flat = flat[:-1] / flat[-1]
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def _batch_sizes(self, batch_size: int, device: torch.device) -> list[int]:
        sizes = torch.zeros(self.world_size, dtype=torch.int64, device=device)
        sizes[self.rank] = batch_size
        dist.all_reduce(sizes, group=self._group)
        return sizes.tolist()

    def gather_rows(self, tensor: Tensor) -> Tensor:
        super().gather_rows(tensor)
        sizes = self._batch_sizes(len(tensor), tensor.device)
        padded = tensor.new_zeros(max(sizes), *tensor.shape[1:])  # all_gather wants equal shapes
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous(), group=self._group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def batch_rows(self, batch_size: int) -> tuple[int, int]:
        super().batch_rows(batch_size)
        nccl = dist.get_backend(self._group) == "nccl"  # NCCL reduces CUDA tensors only
        sizes = self._batch_sizes(batch_size, torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
        return sum(sizes[: self.rank]), sum(sizes)


class ThreadCollective(Collective):
    r"""Rank ``rank`` of ``world_size`` ranks that run as threads of one process (:meth:`group` makes one per rank;
    each rank's thread uses its own). Each call waits for every rank's value and gives every rank the same result,
    computed from all values in rank order, :math:`\sum_r B_r t_r / \sum_r B_r` as :class:`TorchCollective` does.

    For tests: an estimator run on two ranks in two threads must take the update of one process on the union batch,
    which fails, in one process, when it forgets a reduction. (The torch backend cannot run in two threads at once:
    ``torch.autograd.forward_ad`` allows one dual level per process.)
    """

    def __init__(self, rank: int, world_size: int, barrier: threading.Barrier, slots: list) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self._barrier, self._slots = barrier, slots

    @classmethod
    def group(cls, world_size: int) -> list["ThreadCollective"]:
        barrier, slots = threading.Barrier(world_size, timeout=60), [None] * world_size
        return [cls(rank, world_size, barrier, slots) for rank in range(world_size)]

    def abort(self) -> None:
        """Release the other ranks' waits (with ``threading.BrokenBarrierError``): this rank failed."""
        self._barrier.abort()

    def _exchange(self, value: object) -> list:
        """Every rank's ``value``, in rank order."""
        self._slots[self.rank] = value
        self._barrier.wait()  # every rank has written
        values = list(self._slots)
        self._barrier.wait()  # every rank has read before any writes its next value
        return values

    def batch_mean(self, tensors: Sequence[Tensor], batch_size: int) -> list[Tensor]:
        super().batch_mean(tensors, batch_size)
        ranks = self._exchange((list(tensors), batch_size))
        total = sum(size for _, size in ranks)
        return [sum(size * values[i] for values, size in ranks) / total for i in range(len(tensors))]

    def gather_rows(self, tensor: Tensor) -> Tensor:
        super().gather_rows(tensor)
        return torch.cat(self._exchange(tensor))

    def batch_rows(self, batch_size: int) -> tuple[int, int]:
        super().batch_rows(batch_size)
        sizes = self._exchange(batch_size)
        return sum(sizes[: self.rank]), sum(sizes)

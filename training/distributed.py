"""Data-parallel training under ``torchrun``: one small context object, a no-op in a single process.

``torchrun --nproc_per_node N -m cli train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``) in their
environment. :meth:`DistContext.from_env` reads them; :meth:`DistContext.init` joins the process
group: gloo for CPU tensors, plus nccl for CUDA tensors when every local rank has a GPU
(``"cpu:gloo,cuda:nccl"``; a model trained on the CPU then never touches nccl). A trainer then

* trains on ``dist.shard(windows)`` (a deterministic strided shard, padded so that every rank takes
  the same number of steps: DDP's gradient all-reduce needs every rank in every step),
* steps a ``dist.wrap(module)`` (``DistributedDataParallel`` when ``world_size > 1``),
* decides early stopping on rank 0 and shares it with ``dist.broadcast(decision)``,
* writes files only where ``dist.is_main``.

With ``WORLD_SIZE`` unset or 1 every method is the identity (``shard`` returns its argument,
``wrap`` the module), so single-process training is exactly what it was.

Trainers read the context of the running command with :func:`current`; ``genret train`` sets it
with :func:`activate`. Everything else (``genret compare``, tests) sees the single-process default.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, overload

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

T = TypeVar("T")
INIT_TIMEOUT = timedelta(minutes=30)  # rank 0 evaluates alone while the others wait in a broadcast


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a ``torchrun`` job; the default is a single process."""

    rank: int = 0
    """Global rank of this process, ``0 <= rank < world_size``."""
    world_size: int = 1
    """Number of processes training together."""
    local_rank: int = 0
    """Rank on this node (picks the GPU under nccl)."""
    local_world_size: int = 1
    """Processes on this node (nccl is used only when the node has a GPU for each)."""

    def __post_init__(self) -> None:
        if (
            self.world_size < 1
            or not 0 <= self.rank < self.world_size
            or not 0 <= self.local_rank < self.local_world_size
        ):
            raise ValueError(
                "need world_size >= 1, 0 <= rank < world_size and 0 <= local_rank < local_world_size, got "
                f"rank={self.rank} world_size={self.world_size} local_rank={self.local_rank} "
                f"local_world_size={self.local_world_size}"
            )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DistContext:
        """From ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` as ``torchrun`` sets them.

        Unset variables mean a single process.
        """
        env = dict(os.environ) if env is None else env
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        try:
            world_size = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", str(rank)))
            local_world_size = int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
        except ValueError as exc:
            found = ", ".join(f"{n}={env.get(n)!r}" for n in names)
            raise ValueError(f"{', '.join(names)} must be integers, got {found}") from exc
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size)

    # ------------------------------------------------------------------------------------ state
    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that evaluates, decides and writes files."""
        return self.rank == 0

    @property
    def uses_cuda(self) -> bool:
        """Whether this node has a GPU for each of its ranks (then CUDA tensors go through nccl)."""
        return (
            torch.cuda.is_available()
            and torch_dist.is_nccl_available()
            and torch.cuda.device_count() >= self.local_world_size
        )

    @property
    def backend(self) -> str:
        """``"cpu:gloo,cuda:nccl"`` with a GPU per local rank, else ``"gloo"``."""
        return "cpu:gloo,cuda:nccl" if self.uses_cuda else "gloo"

    @property
    def device(self) -> torch.device:
        """``cuda:<local_rank>`` with a GPU per local rank, else the CPU."""
        return torch.device(f"cuda:{self.local_rank}") if self.uses_cuda else torch.device("cpu")

    def init(self) -> DistContext:
        """Join the process group (once per process); a no-op for a single process. Returns ``self``."""
        if not self.is_distributed or torch_dist.is_initialized():
            return self
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(
                    f"WORLD_SIZE={self.world_size} but {name} is not set: start the job with torchrun"
                )
        backend = self.backend
        if self.uses_cuda:
            torch.cuda.set_device(self.local_rank)
        torch_dist.init_process_group(
            backend, rank=self.rank, world_size=self.world_size, timeout=INIT_TIMEOUT
        )
        log.info("distributed: rank %d of %d joined (%s)", self.rank, self.world_size, backend)
        return self

    def close(self, *, wait_for_peers: bool = True) -> None:
        """Leave the process group (a no-op when none was joined).

        Wrappers that are no longer referenced (DDP reducers left in reference cycles) are collected
        first, while the group still exists: collected after it, a gloo reducer can abort the process
        at exit. With ``wait_for_peers`` every rank then meets at a barrier, so that no rank tears its
        connections down while another (rank 0 evaluating) still holds them.
        """
        if not (self.is_distributed and torch_dist.is_initialized()):
            return
        gc.collect()
        if wait_for_peers:
            torch_dist.barrier()
        torch_dist.destroy_process_group()

    # ------------------------------------------------------------------------------------ data
    def shard_indices(self, n: int) -> np.ndarray:
        """Indices ``[ceil(n / world_size)]`` of this rank's strided shard of ``n`` rows.

        Rank ``r`` takes rows ``r, r + W, r + 2W, ...`` of ``0..n-1`` padded by wrapping around to
        a multiple of ``W`` (as ``torch.utils.data.DistributedSampler`` does), so that every rank
        holds the same number of rows and therefore takes the same number of optimiser steps.
        """
        if n < self.world_size:
            raise ValueError(f"cannot shard {n} rows over {self.world_size} processes")
        per_rank = -(-n // self.world_size)
        return np.arange(self.rank, per_rank * self.world_size, self.world_size) % n

    @overload
    def shard(self, items: np.ndarray) -> np.ndarray: ...
    @overload
    def shard(self, items: Sequence[T]) -> list[T]: ...
    def shard(self, items: np.ndarray | Sequence[T]) -> np.ndarray | list[T]:
        """This rank's rows of ``items`` (see :meth:`shard_indices`); ``items`` itself in one process."""
        if not self.is_distributed:
            return items if isinstance(items, np.ndarray) else list(items)
        idx = self.shard_indices(len(items))
        if isinstance(items, np.ndarray):
            return items[idx]
        return [items[i] for i in idx]

    # ------------------------------------------------------------------------------------ model
    def wrap(self, module: nn.Module, *, find_unused_parameters: bool = False) -> nn.Module:
        """``DistributedDataParallel(module)`` when distributed (gradients averaged over ranks), else ``module``.

        The training forward pass must go through the wrapper; keep the unwrapped module for the
        rest (evaluation, ``state_dict``). ``find_unused_parameters`` for a module whose forward
        leaves some parameters out of the loss (DDP otherwise waits for their gradients).
        """
        if not self.is_distributed:
            return module
        self._require_group("wrap")
        on_cuda = next(module.parameters()).is_cuda
        return DistributedDataParallel(
            module,
            device_ids=[self.local_rank] if on_cuda else None,
            find_unused_parameters=find_unused_parameters,
        )

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over all ranks (a new tensor; ``tensor`` itself in one process)."""
        if not self.is_distributed:
            return tensor
        self._require_group("all_reduce_mean")
        out = tensor.detach().clone().float()
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
        return out / self.world_size

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``value`` on every rank (any picklable object); ``value`` in one process."""
        if not self.is_distributed:
            return value
        self._require_group("broadcast")
        box = [value]
        torch_dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here (a no-op in one process)."""
        if self.is_distributed:
            self._require_group("barrier")
            torch_dist.barrier()

    def _require_group(self, what: str) -> None:
        if not torch_dist.is_initialized():
            raise RuntimeError(
                f"DistContext.{what}: call init() first (rank {self.rank} of {self.world_size})"
            )


SINGLE = DistContext()
_active: DistContext = SINGLE


def current() -> DistContext:
    """The context of the running command (:data:`SINGLE` unless inside :func:`activate`)."""
    return _active


@contextmanager
def activate(ctx: DistContext) -> Iterator[DistContext]:
    """Make ``ctx`` the :func:`current` context inside the block; joins its process group on entry
    and leaves it on exit (if this call joined it)."""
    global _active
    joined = ctx.is_distributed and not torch_dist.is_initialized()
    previous = _active
    _active = ctx.init()
    try:
        yield ctx
    except BaseException:
        _active = previous
        if joined:
            ctx.close(wait_for_peers=False)  # the other ranks may never reach a barrier
        raise
    _active = previous
    if joined:
        ctx.close()

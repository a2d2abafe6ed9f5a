"""torch.distributed helpers that degrade to no-ops in a single process.

Gathering convention of the SSL losses: ``gather_with_grad`` concatenates every
worker's rows (rank order) and its backward sums, into each worker's own rows, the
gradients that all workers' losses send to them (``torch.distributed.nn``'s
all_gather). With DDP averaging parameter gradients over the W workers, a loss
computed from gathered rows then trains exactly like the same loss on the global
batch in one process: each worker's input gradient is W times the single-process
gradient of its rows, and DDP divides by W.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one worker."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all_reduce (sum or max) across workers; identity in one process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) rows of this worker -> (W*B, ...) rows of all workers, rank-major, differentiable.

    Every worker must pass the same shape (the loader yields equal full batches).
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (W*B, ...) rows of all workers, rank-major, without gradient (queue keys)."""
    if not is_distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def require_batch_statistics(n_global: int, loss: str) -> None:
    """Raise ``ValueError`` when a batch-statistics loss sees a global batch of one sample."""
    if n_global < 2:
        raise ValueError(
            f"{loss} needs at least 2 samples in the global batch (batch statistics / negatives), got "
            f"{n_global}; raise loader.batch_size (or the number of workers)")

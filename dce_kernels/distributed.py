"""What channel selection needs from torch.distributed: the saliency of the global
batch, and a check that every rank's selector is in the same state.

Every rank runs its own selector. Selectors are deterministic (seeded tie-breaking),
so identical seeds and identical inputs keep them identical without sending the
selection around; :func:`global_saliency` makes the inputs identical, and
:func:`check_same_on_all_ranks` verifies the rest (a rank started with another seed,
another option or another model) and fails on every rank at once.

Nothing here runs a collective unless a process group of more than one rank is
initialized: a single process pays nothing.
"""
from __future__ import annotations

import hashlib
import pickle
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["world_size", "rank", "global_saliency", "digest", "check_same_on_all_ranks"]


def world_size(group=None) -> int:
    """The number of ranks of ``group`` (default: the world); 1 without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group=None) -> int:
    """This process's rank in ``group``; 0 without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def global_saliency(saliencies: Sequence[torch.Tensor], batch_size: Optional[int] = None,
                    group=None) -> list[torch.Tensor]:
    """The saliency of the whole global batch from each rank's batch-mean saliency.

    Under DistributedDataParallel each rank's loss is the mean over its own batch and
    DDP averages the gradients, so the objective is ``G = mean_r L_r``. A rank's
    backward sees ``dL_r/dy = W dG/dy`` on its samples, and the saliency of ``G`` over
    the global batch of ``B = sum_r b_r`` samples is
    ``S = (1 / W) sum_r (b_r / B) S_r``: the batch-share weighted mean of the rank
    saliencies, divided by the world size. With equal batches this is exactly what one
    process computes on the global batch (whose loss DDP's gradient then equals).

    ``batch_size``: this rank's batch (None: every rank has the same). One all-reduce
    carries the saliencies and the batch sizes together."""
    world = world_size(group)
    if world == 1:
        return list(saliencies)
    sizes = [s.numel() for s in saliencies]
    flat = torch.cat([s.detach().reshape(-1) for s in saliencies])
    share = float(1 if batch_size is None else batch_size)
    if share <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    packed = torch.cat([flat * share, flat.new_tensor([share])])
    dist.all_reduce(packed, group=group)
    total = packed[:-1] / (packed[-1] * world)
    return list(total.split(sizes))


def _plain(obj: Any) -> Any:
    """``obj`` with tensors replaced by (dtype, shape, values), for a byte-exact pickle."""
    if torch.is_tensor(obj):
        t = obj.detach().cpu()
        return ("tensor", str(t.dtype), tuple(t.shape), t.reshape(-1).tolist())
    if isinstance(obj, dict):
        return ("dict", [(k, _plain(v)) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))])
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [_plain(v) for v in obj])
    return obj


def digest(obj: Any) -> int:
    """A 63-bit hash of ``obj`` (nested dicts, lists, tensors, numbers, strings): equal
    exactly when the contents are equal, bit for bit (floats included)."""
    raw = hashlib.blake2b(pickle.dumps(_plain(obj), protocol=4), digest_size=8).digest()
    return int.from_bytes(raw, "little") >> 1  # fits a signed int64 tensor


def check_same_on_all_ranks(value: int, what: str, device=None, group=None) -> None:
    """Raises RuntimeError on every rank unless all ranks passed the same ``value``
    (a :func:`digest`); the message names the ranks that differ from rank 0."""
    world = world_size(group)
    if world == 1:
        return
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    values = [int(t.item()) for t in gathered]
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise RuntimeError(
            f"{what} differs across ranks: rank(s) {differ} disagree with rank 0 (of "
            f"{world}). Every rank must build its selector with the same seed and options "
            "and feed it the same saliency; check the seed and the options of each rank")

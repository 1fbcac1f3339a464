"""Starting `dce train` as one rank of a torchrun job, and the `--nproc` shortcut.

torchrun (``python -m torch.distributed.run``) starts the processes and sets the
rendezvous variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ...);
this module only reads them: the process group, DDP and the sampler are torch's own.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

__all__ = ["under_torchrun", "init_from_environment", "torchrun_command"]


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_environment(device: str) -> str:
    """Joins the torchrun job (if this process is one of its ranks and the group is not
    initialized yet) and returns this rank's device: ``cuda`` becomes
    ``cuda:LOCAL_RANK``. The backend is NCCL on CUDA, gloo on the CPU."""
    import torch
    import torch.distributed as dist

    if not under_torchrun() or dist.is_initialized():
        return device
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return device


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command line that runs ``dce <argv>`` in ``nproc`` processes on this
    machine (``--standalone``: a local rendezvous on a free port)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be a positive number of processes, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "dce_kernels.experiments.cli", *argv]

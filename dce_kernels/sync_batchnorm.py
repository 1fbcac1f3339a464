"""A channel-sparse SyncBatchNorm: batch statistics of the active channels over the
global batch of all ranks.

Why not ``torch.nn.SyncBatchNorm``: it normalizes every channel (an inactive one
would get statistics and running-stat updates), and its kernels run on GPUs only,
so it cannot be tested (or used) with the gloo backend on a CPU.

The statistics are reduced with torch's differentiable functional all-reduce, whose backward sums the gradients of the statistics over the ranks.
That is the gradient of the sum of the rank losses, which DDP's averaging turns
into the gradient of their mean: the same as one process on the global batch.
Two passes (mean, then the variance about it) keep float32 free of the
cancellation of ``E[x^2] - E[x]^2``. Two all-reduces per layer and step, and two
in backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as collectives

from .distributed import world_size
from .nn import ChannelSparseBatchNorm2d

__all__ = ["ChannelSparseSyncBatchNorm2d", "convert_sync_batchnorm"]


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    # The functional collective has a registered autograd formula (the backward
    # all-reduces the gradient); torch.distributed.nn's is deprecated in its favour.
    out = collectives.all_reduce(t, "sum", dist.group.WORLD if group is None else group)
    return collectives.wait_tensor(out)


class ChannelSparseSyncBatchNorm2d(ChannelSparseBatchNorm2d):
    """:class:`~dce_kernels.ChannelSparseBatchNorm2d` whose training-mode statistics
    are those of the global batch of ``process_group`` (default: the world).

    Without a process group of more than one rank, or in eval mode, it is exactly
    ``ChannelSparseBatchNorm2d``. Every rank must run the same layers in the same
    order with the same active channels (as :class:`~dce_kernels.DynamicChannels`
    guarantees)."""

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _syncs(self) -> bool:
        return self.training and world_size(self.process_group) > 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The parent runs all-active layers as plain nn.BatchNorm2d; a syncing one
        # takes the active-channel path for every selection, the full one included.
        return self._forward_active(input) if self._syncs() else super().forward(input)

    def _normalize(self, x, mean, var, weight, bias, training, momentum):
        if not self._syncs():
            return super()._normalize(x, mean, var, weight, bias, training, momentum)
        dims = (0, 2, 3)
        shape = (1, -1, 1, 1)
        local_count = x.new_tensor([x.numel() // max(x.shape[1], 1)])
        sums = _all_reduce(torch.cat([x.sum(dims), local_count]), self.process_group)
        count = sums[-1]
        batch_mean = sums[:-1] / count
        centered = x - batch_mean.view(shape)
        batch_var = _all_reduce(centered.square().sum(dims), self.process_group) / count
        if mean is not None:
            with torch.no_grad():
                unbiased = batch_var * (count / (count - 1).clamp(min=1))
                mean.mul_(1 - momentum).add_(batch_mean, alpha=momentum)
                var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        out = centered * torch.rsqrt(batch_var + self.eps).view(shape)
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        return out


def _sync_copy(bn: nn.BatchNorm2d, process_group) -> ChannelSparseSyncBatchNorm2d:
    """The sync layer sharing ``bn``'s parameters, buffers and active channels."""
    sync = ChannelSparseSyncBatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum,
                                        affine=bn.affine,
                                        track_running_stats=bn.track_running_stats,
                                        process_group=process_group, device="meta")
    for name in ("weight", "bias"):
        setattr(sync, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        sync._buffers[name] = bn._buffers.get(name)
    device = bn.weight.device if bn.weight is not None else (
        bn.running_mean.device if bn.running_mean is not None else None)
    active = getattr(bn, "active_idx", None)
    sync._buffers["active_idx"] = (torch.arange(bn.num_features, device=device)
                                   if active is None else active)
    sync.packed = getattr(bn, "packed", False)
    sync.train(bn.training)
    return sync


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replaces every ``nn.BatchNorm2d`` and :class:`~dce_kernels.ChannelSparseBatchNorm2d`
    of ``model`` by a :class:`ChannelSparseSyncBatchNorm2d` that shares its parameters
    and statistics (in place; returns ``model``, or the new layer if ``model`` is one).

    Convert before building a :class:`~dce_kernels.ChannelPlan` (or
    :class:`~dce_kernels.DynamicChannels`, whose ``sync_bn=True`` does this), and
    before wrapping the model in DistributedDataParallel: both hold the layers."""
    def convertible(m):
        return isinstance(m, nn.BatchNorm2d) and not isinstance(m, ChannelSparseSyncBatchNorm2d)

    if convertible(model):
        return _sync_copy(model, process_group)
    for name, module in list(model.named_modules()):
        if convertible(module):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, _sync_copy(module, process_group))
    return model

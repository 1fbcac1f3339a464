"""dce-kernels: Dynamic Channel Execution for training compact CNNs.

The library: the channel-sparse op and layers, channel groups and plans,
``convert()`` for existing models, the selectors, the masked optimizer, the
export of the compact model, and ``DynamicChannels``, which joins them for a
training loop of your own (under torch.distributed too). It needs torch and the compiled extension only.

The paper's experiment pipeline (datasets, model zoo, trainer, sweeps, plots, the
``dce`` command) lives in :mod:`dce_kernels.experiments` and needs the
``experiments`` extra (``pip install .[experiments]``).

Importing the package loads the compiled ops (``ops``) and registers their FLOP
formulas with torch.utils.flop_counter (``flops``).
"""
from . import flops
from .channels import ChannelGroup, ChannelPlan, convert, plan_for, sequential_groups
from .compact import compact_model, export_compact
from .cost import FlopsCost
from .dynamic import DynamicChannels
from .flops import count_flops, count_params
from .nn import (ChannelSparseBatchNorm2d, ChannelSparseConv2d, ChannelSparseGroupNorm,
                 ChannelSparseLayerNorm, ChannelSparseLinear, ChannelSparseNormAct)
from .ops import channel_sparse_conv2d, get_cuda_conv_impl, set_cuda_conv_impl
from .optim import MaskedOptimizer
from .selectors import CUCBSelector, RandomSelector, ShrinkSelector, TaylorPruneSelector
from .sync_batchnorm import ChannelSparseSyncBatchNorm2d, convert_sync_batchnorm

__all__ = [
    "DynamicChannels",
    "channel_sparse_conv2d",
    "set_cuda_conv_impl",
    "get_cuda_conv_impl",
    "ChannelSparseConv2d",
    "ChannelSparseLinear",
    "ChannelSparseBatchNorm2d",
    "ChannelSparseSyncBatchNorm2d",
    "convert_sync_batchnorm",
    "ChannelSparseNormAct",
    "ChannelSparseLayerNorm",
    "ChannelSparseGroupNorm",
    "ChannelGroup",
    "ChannelPlan",
    "plan_for",
    "sequential_groups",
    "convert",
    "ShrinkSelector",
    "CUCBSelector",
    "RandomSelector",
    "TaylorPruneSelector",
    "MaskedOptimizer",
    "compact_model",
    "export_compact",
    "count_flops",
    "count_params",
    "FlopsCost",
]
__version__ = "0.1.0"

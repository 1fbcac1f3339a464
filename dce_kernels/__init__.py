"""dce-kernels: Dynamic Channel Execution for training compact CNNs.

Importing the package loads the compiled ops (``ops``) and registers their FLOP
formulas with torch.utils.flop_counter (``flops``).
"""
from .ops import channel_sparse_conv2d
from .nn import ChannelSparseConv2d
from . import data, flops
from .flops import count_flops, count_params
from .data import dataset_info, load_dataset, make_loaders

__all__ = [
    "channel_sparse_conv2d",
    "ChannelSparseConv2d",
    "count_flops",
    "count_params",
    "dataset_info",
    "load_dataset",
    "make_loaders",
]
__version__ = "0.1.0"

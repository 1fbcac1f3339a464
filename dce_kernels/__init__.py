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

from .selectors import CUCBSelector, RandomSelector  # noqa: E402

__all__ += ["CUCBSelector", "RandomSelector"]

from .nn import ChannelSparseBatchNorm2d  # noqa: E402
from .channels import ChannelGroup, ChannelPlan, plan_for, sequential_groups  # noqa: E402
from .optim import MaskedOptimizer  # noqa: E402

__all__ += ["ChannelSparseBatchNorm2d", "ChannelGroup", "ChannelPlan", "plan_for",
            "sequential_groups", "MaskedOptimizer"]

from .models import build_model  # noqa: E402
from .compact import compact_model, export_compact  # noqa: E402

__all__ += ["build_model", "compact_model", "export_compact"]

# dce_kernels.convert is the function; it and conversion_notes live in
# dce_kernels.channels (`from dce_kernels.channels import conversion_notes`).
from .channels import convert  # noqa: E402

__all__ += ["convert"]

# The training entry point stays dce_kernels.train.train: a top-level `train`
# would shadow the submodule of the same name.
from .train import TrainConfig  # noqa: E402

__all__ += ["TrainConfig"]

"""The one table of ops the channel linkers know: which modules, functions and
tensor methods keep channels apart, and the ops with rules of their own.

:func:`~dce_kernels.channels.sequential_groups` links through the channel-wise
modules; the torch.fx analysis (:mod:`dce_kernels.channels.trace`) reads all of
it. Functions and methods are named as fx records them (torch's own functions;
several have a Python and a C++ entry point with one name).
"""
from __future__ import annotations

import operator

import torch
from torch import nn

# Act value by value and map zero to zero: an inactive (zero) channel stays inactive.
ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                       nn.SiLU, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Tanh, nn.Softsign,
                       nn.Tanhshrink, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
ELEMENTWISE_NAMES = {"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_",
                     "selu", "selu_", "celu", "celu_", "gelu", "silu", "silu_", "mish",
                     "mish_", "hardtanh", "hardtanh_", "hardswish", "hardswish_", "tanh",
                     "tanh_", "softsign", "dropout", "dropout_", "dropout1d", "dropout2d",
                     "feature_dropout", "contiguous", "clone", "neg", "neg_"}

# Act value by value but map zero elsewhere (sigmoid(0) = 1/2): the result is aligned
# with its input's channels, and may scale a tensor of those channels (a gate,
# x * sigmoid(conv(pool(x)))), which keeps that tensor's zeros zero. Adding a number
# makes a gate too (timm's hard_sigmoid: relu6(x + 3) / 6).
GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
GATE_NAMES = {"sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "exp", "exp_"}

# Normalize each channel by its own statistics, as functions: F.batch_norm on the
# parameters of a BatchNorm2d (subclasses such as timm's BatchNormAct2d call it
# in their own forward).
NORM_FUNCTIONS = {"batch_norm"}
# Normalize over the last dim, which mixes its entries: F.layer_norm on the weight and
# bias of an nn.LayerNorm over the channels, in channels-last tensors (timm's
# LayerNorm2d permutes there and back in its own forward). It gets a channel-sparse
# version that normalizes over the active channels only.
LAYER_NORM_FUNCTIONS = {"layer_norm"}
# Move the channels of a (N, C, H, W) tensor last, (0, 2, 3, 1), and back, (0, 3, 1, 2).
PERMUTE_NAMES = {"permute"}
# Shape a parameter or buffer of one entry per channel (ConvNeXt's layer scale
# gamma) so that it broadcasts along the channels only; the product keeps zeros zero.
SCALE_SHAPE_NAMES = {"reshape", "view", "unsqueeze", "getitem", "to", "float", "double",
                     "half"}
# F.linear on an nn.Linear's own weight (timm's Linear calls it in its forward): that Linear.
LINEAR_FUNCTIONS = {"linear"}
# Tensor methods that change only the dtype or device.
CAST_METHODS = {"float", "double", "half", "to"}

# Act on each channel's (H, W) map alone and map a zero map to zero; not on
# flattened tensors.
SPATIAL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                   nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
                   nn.Dropout3d)
SPATIAL_NAMES = {"max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
                 "adaptive_max_pool2d", "interpolate", "upsample", "upsample_nearest",
                 "upsample_bilinear"}

# Read a tensor's metadata only.
METADATA_NAMES = {"size", "dim", "numel", "type", "getattr"}

# Ops with rules of their own (see the analysis): sums tie their inputs'
# channels, products keep zeros zero, concatenation lays channels side by side,
# flattening, reshapes to (N, -1) and reductions over H and W feed a Linear.
ADD_FUNCTIONS = {operator.add, operator.sub, torch.add, torch.sub}
ADD_METHODS = {"add", "sub", "add_", "sub_"}
MUL_FUNCTIONS = {operator.mul, torch.mul}
MUL_METHODS = {"mul", "mul_"}
DIV_FUNCTIONS = {operator.truediv, torch.div}
DIV_METHODS = {"div", "div_"}
CAT_NAMES = {"cat", "concat", "concatenate"}
RESHAPE_METHODS = {"view", "reshape"}
SPATIAL_REDUCTIONS = {"mean", "sum", "amax"}

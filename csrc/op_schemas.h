// Operator schemas of dce, as strings, so that every library that registers
// them (dce for the production backends, dce_emu for the emulated CUDA
// kernels) declares exactly the same signature. The argument order is defined
// here only: Python reads it from the registered schema (dce_kernels/ops.py),
// C++ callers through the function types below.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace dce::schema {

// Convolution over lists of active channels. Output channels outside out_idx
// are zero; input channels outside in_idx are never read. saliency_probe is a
// [out_channels] tensor whose gradient, when it requires grad, is the batch-mean
// Taylor saliency of the output channels (computed inside the backward).
//
// Activation layouts: by default input and output keep their full channel
// width. packed_input says the input holds only the channels of in_idx, in
// that order (input.size(1) == in_idx.numel()); packed_output asks for only the
// channels of out_idx. Packed layouts let a chain of channel-sparse layers pass
// narrow activations, as a physically narrower network would; they need
// ascending index lists and groups == 1, a depthwise conv (groups ==
// in_channels == out_channels), which with packed_input needs in_idx equal to
// out_idx, or a grouped conv whose two lists both hold equally many channels of
// every conv group. Weight, bias and their gradients keep the layer's full
// shape (the backward's compact_grad_weight excepted).
//
// compact_weight, when given, is the caller's copy of the weight's active
// block, weight[out_idx][:, in_idx] (groups == 1) or weight[out_idx]
// (depthwise), and stands in for the gather of it. The Python layer gathers it
// once and passes it to forward and backward, which would otherwise gather it
// twice. Its shape, dtype and device are checked; its values are trusted to be
// that block.
inline constexpr const char* kChannelSparseConv2d =
    "channel_sparse_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor in_idx, "
    "Tensor out_idx, int[2] stride, int[2] padding, int[2] dilation, int groups, "
    "Tensor? saliency_probe, bool packed_input=False, bool packed_output=False, "
    "Tensor? compact_weight=None) -> Tensor";

// Gradients of the op above. output is the forward's result; when given, the
// fourth result is the saliency [out_channels] (zero for inactive channels),
// reduced in the same pass that reads grad_output. output_mask selects
// grad_input, grad_weight, grad_bias; unselected results are undefined (None).
// grad_output, output and grad_input are in the forward's layouts.
// compact_grad_weight asks for the weight gradient of the active block only,
// [len(out_idx), len(in_idx) (groups == 1) or 1 (depthwise), kH, kW], the
// gradient of weight[out_idx][:, in_idx] (depthwise: weight[out_idx]), instead
// of the layer's full shape with zeros outside; it needs groups == 1 or a
// depthwise conv. The caller writes the block where it wants it, so a step
// never writes the inactive part of the weight's gradient (dce_kernels/blocks.py).
inline constexpr const char* kChannelSparseConv2dBackward =
    "channel_sparse_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, "
    "Tensor? output, Tensor in_idx, Tensor out_idx, int[2] stride, int[2] padding, "
    "int[2] dilation, int groups, bool[3] output_mask, bool packed_input=False, "
    "bool packed_output=False, bool compact_grad_weight=False, Tensor? compact_weight=None) "
    "-> (Tensor, Tensor, Tensor, Tensor)";

// The C++ types of the two ops, for typed dispatcher calls (api.cpp) and
// kernels. The dispatcher compares a type with the schema string when a
// kernel is registered (m.impl) or a typed handle is made, so an edit to one
// and not the other fails when the library loads, not silently.
using ChannelSparseConv2dFn = at::Tensor(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& in_idx, const at::Tensor& out_idx, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& saliency_probe, bool packed_input, bool packed_output,
    const std::optional<at::Tensor>& compact_weight);
using ChannelSparseConv2dBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& output, const at::Tensor& in_idx, const at::Tensor& out_idx,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, bool packed_input, bool packed_output,
    bool compact_grad_weight, const std::optional<at::Tensor>& compact_weight);

// Blocks of parameter-shaped tensors, for optimizer steps over the active
// channels only: a tensor is viewed as [rows, cols, rest...]; a block is the
// listed rows (dim 0) and columns (dim 1; None: all) with every trailing
// element. gather_block copies one out; scatter_block_ writes one back in place.
inline constexpr const char* kGatherBlock =
    "gather_block(Tensor src, Tensor? rows, Tensor? cols) -> Tensor";
inline constexpr const char* kScatterBlock =
    "scatter_block_(Tensor(a!) dst, Tensor? rows, Tensor? cols, Tensor block) -> ()";

// Which implementation the CUDA backend runs (csrc/common/cuda_conv_impl.h):
// "cudnn" (the compact-conv composition with cuDNN) or "igemm" (our own
// implicit-GEMM kernels). Process-wide; read at every call of the conv ops.
inline constexpr const char* kSetCudaConvImpl = "set_cuda_conv_impl(str impl) -> ()";
inline constexpr const char* kGetCudaConvImpl = "get_cuda_conv_impl() -> str";

// Optimizer steps of a block in place: every element of the block (as above:
// rows, cols, all trailing elements) of param and its state is updated exactly
// as torch.optim's single-tensor (for-loop) step updates a compact copy of
// it; nothing outside the block is read or written. All tensors share
// param's shape, dtype and contiguous layout. The per-tensor scalars are the
// caller's (dce_kernels/block_steps.py computes them as torch.optim does).
// sgd: momentum_buffer is required when momentum != 0; fresh_buffer says it
// was just created, so this step sets it to the gradient (torch.optim's first
// step) instead of decaying it.
inline constexpr const char* kSgdBlockStep =
    "sgd_block_step_(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, Tensor? rows, "
    "Tensor? cols, float lr, float momentum, float dampening, float weight_decay, "
    "bool nesterov, bool maximize, bool fresh_buffer) -> ()";
// adam (and AdamW with decoupled_weight_decay): step_size = lr / (1 - beta1^t)
// and bias_correction2_sqrt = sqrt(1 - beta2^t) for the tensor's step t;
// max_exp_avg_sq given means amsgrad.
inline constexpr const char* kAdamBlockStep =
    "adam_block_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
    "Tensor(d!)? max_exp_avg_sq, Tensor? rows, Tensor? cols, float lr, float beta1, "
    "float beta2, float weight_decay, bool decoupled_weight_decay, float eps, float step_size, "
    "float bias_correction2_sqrt, bool maximize) -> ()";

}  // namespace dce::schema

// C++ API of dce-kernels for programs that link LibTorch directly.
//
// These functions call the registered operators through the dispatcher, so a
// program gets whichever backend matches its tensors' device, exactly as the
// Python package does. Autograd is registered in Python only: C++ callers get
// the forward op and the explicit backward op (like at::convolution_backward).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace dce {

// F.conv2d(input * mask_in, weight, bias) * mask_out, computed only over the
// channels in in_idx / out_idx (1-D integer tensors of unique indices).
// packed_input / packed_output: the input holds, the output is to hold, only the
// listed channels (see op_schemas.h).
at::Tensor channel_sparse_conv2d(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& in_idx,
                                 const at::Tensor& out_idx, at::IntArrayRef stride = {1, 1},
                                 at::IntArrayRef padding = {0, 0},
                                 at::IntArrayRef dilation = {1, 1}, int64_t groups = 1,
                                 bool packed_input = false, bool packed_output = false);

// (grad_input, grad_weight, grad_bias, saliency) of the op above. Pass the
// forward's output to get the saliency [out_channels]; results not selected by
// output_mask (and the saliency without output) are undefined tensors.
// compact_grad_weight: the weight gradient of the active block only (op_schemas.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_sparse_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& output, const at::Tensor& in_idx, const at::Tensor& out_idx,
    at::IntArrayRef stride = {1, 1}, at::IntArrayRef padding = {0, 0},
    at::IntArrayRef dilation = {1, 1}, int64_t groups = 1,
    std::array<bool, 3> output_mask = {true, true, true}, bool packed_input = false,
    bool packed_output = false, bool compact_grad_weight = false);

}  // namespace dce

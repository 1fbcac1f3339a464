// CPU backend of dce::channel_sparse_conv2d: the compact-convolution
// composition (common/compact_conv.h) with the CPU's memory passes
// (channel_planes.h), so the heavy math is at::convolution over the compact
// tensors (oneDNN/MKL, at the narrow network's speed).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>

#include "../common/compact_conv.h"
#include "../op_schemas.h"
#include "channel_planes.h"

namespace dce::cpu {
namespace {

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& in_idx,
                       const at::Tensor& out_idx, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       const c10::optional<at::Tensor>& saliency_probe, bool packed_input,
                       bool packed_output, const c10::optional<at::Tensor>& compact_weight) {
  return compact_conv_forward<CpuPlanes>(input, weight, bias, in_idx, out_idx, stride, padding,
                                         dilation, groups, saliency_probe, packed_input,
                                         packed_output, compact_weight);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& output, const at::Tensor& in_idx, const at::Tensor& out_idx,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, bool packed_input, bool packed_output,
    bool compact_grad_weight, const c10::optional<at::Tensor>& compact_weight) {
  return compact_conv_backward<CpuPlanes>(grad_output, input, weight, output, in_idx, out_idx,
                                          stride, padding, dilation, groups, output_mask,
                                          packed_input, packed_output, compact_grad_weight,
                                          compact_weight);
}

}  // namespace

// The kernels have the schemas' types (a mismatch fails here, at compile time,
// rather than when the library registers them).
static_assert(std::is_same_v<decltype(forward_cpu), schema::ChannelSparseConv2dFn>);
static_assert(std::is_same_v<decltype(backward_cpu), schema::ChannelSparseConv2dBackwardFn>);

TORCH_LIBRARY_IMPL(dce, CPU, m) {
  m.impl("channel_sparse_conv2d", &forward_cpu);
  m.impl("channel_sparse_conv2d_backward", &backward_cpu);
}

}  // namespace dce::cpu

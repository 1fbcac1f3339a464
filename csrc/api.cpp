#include "api.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include "op_schemas.h"

namespace dce {

at::Tensor channel_sparse_conv2d(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& in_idx,
                                 const at::Tensor& out_idx, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, bool packed_input, bool packed_output) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dce::channel_sparse_conv2d", "")
                       .typed<schema::ChannelSparseConv2dFn>();
  return op.call(input, weight, bias, in_idx, out_idx, stride, padding, dilation, groups,
                 std::nullopt, packed_input, packed_output, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_sparse_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& output, const at::Tensor& in_idx, const at::Tensor& out_idx,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, bool packed_input, bool packed_output,
    bool compact_grad_weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dce::channel_sparse_conv2d_backward", "")
                       .typed<schema::ChannelSparseConv2dBackwardFn>();
  return op.call(grad_output, input, weight, output, in_idx, out_idx, stride, padding, dilation,
                 groups, output_mask, packed_input, packed_output, compact_grad_weight,
                 std::nullopt);
}

}  // namespace dce

#include "api.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace dce {

at::Tensor channel_sparse_conv2d(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& in_idx,
                                 const at::Tensor& out_idx, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dce::channel_sparse_conv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const at::Tensor&,
                                         const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                         at::IntArrayRef, int64_t,
                                         const std::optional<at::Tensor>&)>();
  return op.call(input, weight, bias, in_idx, out_idx, stride, padding, dilation, groups,
                 std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_sparse_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& output, const at::Tensor& in_idx, const at::Tensor& out_idx,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dce::channel_sparse_conv2d_backward", "")
          .typed<Result(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                        at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                        std::array<bool, 3>)>();
  return op.call(grad_output, input, weight, output, in_idx, out_idx, stride, padding, dilation,
                 groups, output_mask);
}

}  // namespace dce

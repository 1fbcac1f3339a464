// Autocast for dce::channel_sparse_conv2d, so that under torch.autocast a
// channel-sparse conv runs in the autocast dtype exactly as nn.Conv2d does
// (conv is on autocast's lower-precision list): floating inputs of the
// autocast device are cast to torch.get_autocast_dtype(device) (fp16/bf16),
// and the op runs, and returns, in that dtype; the casts are differentiable,
// so the gradients reach the fp32 parameters. The backward op needs no
// autocast kernel: it receives the forward's (already cast) tensors.
//
// Without this kernel the dispatcher would fall through to the backend, and
// the at::convolution inside the compact-conv composition would be autocast
// on its own (CUDA's autocast lists `convolution`): a result in another dtype
// than the op's declared one. With it, autocast is excluded below, so the
// backends always see one dtype.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../op_schemas.h"

namespace dce {
namespace {

template <c10::DeviceType kDevice>
at::Tensor forward_autocast(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& in_idx,
                            const at::Tensor& out_idx, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            const std::optional<at::Tensor>& saliency_probe, bool packed_input,
                            bool packed_output,
                            const std::optional<at::Tensor>& compact_weight) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  auto cast = [&](const auto& t) { return at::autocast::cached_cast(dtype, t, kDevice); };
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dce::channel_sparse_conv2d", "")
                             .typed<schema::ChannelSparseConv2dFn>();
  return op.call(cast(input), cast(weight), cast(bias), in_idx, out_idx, stride, padding,
                 dilation, groups, cast(saliency_probe), packed_input, packed_output,
                 cast(compact_weight));
}

}  // namespace

TORCH_LIBRARY_IMPL(dce, AutocastCUDA, m) {
  m.impl("channel_sparse_conv2d", &forward_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(dce, AutocastCPU, m) {
  m.impl("channel_sparse_conv2d", &forward_autocast<c10::DeviceType::CPU>);
}

}  // namespace dce

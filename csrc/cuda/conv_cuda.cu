// CUDA backend of dce::channel_sparse_conv2d. Two implementations, chosen per
// call by dce::cuda_conv_impl() (common/cuda_conv_impl.h: DCE_CUDA_CONV,
// dce_kernels.set_cuda_conv_impl):
//   cudnn  (default) the compact-conv composition (common/compact_conv.h) with
//          the kernels of kernels/planes_host.h around cuDNN;
//   igemm  the implicit-GEMM launchers of kernels/conv_host.h.
// Both are shared with the emulated backend (dce_emu_cudnn and dce_emu), so the
// emulated tests run this code but for cuDNN itself. Launches go to
// at::cuda::getCurrentCUDAStream() and every launch is followed by
// C10_CUDA_KERNEL_LAUNCH_CHECK (see DCE_LAUNCH).
#include <torch/library.h>

#include <type_traits>

#include "../common/cuda_conv_impl.h"
#include "../kernels/conv_host.h"
#include "../kernels/planes_host.h"
#include "../op_schemas.h"

namespace dce::kernels {
namespace {

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& in_idx,
                        const at::Tensor& out_idx, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        const c10::optional<at::Tensor>& saliency_probe, bool packed_input,
                        bool packed_output, const c10::optional<at::Tensor>& compact_weight) {
  auto* impl = cuda_conv_impl() == CudaConvImpl::kIgemm ? &igemm_channel_sparse_conv2d
                                                        : &compact_channel_sparse_conv2d;
  return impl(input, weight, bias, in_idx, out_idx, stride, padding, dilation, groups,
              saliency_probe, packed_input, packed_output, compact_weight);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& output, const at::Tensor& in_idx, const at::Tensor& out_idx,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, bool packed_input, bool packed_output,
    bool compact_grad_weight, const c10::optional<at::Tensor>& compact_weight) {
  auto* impl = cuda_conv_impl() == CudaConvImpl::kIgemm ? &igemm_channel_sparse_conv2d_backward
                                                        : &compact_channel_sparse_conv2d_backward;
  return impl(grad_output, input, weight, output, in_idx, out_idx, stride, padding, dilation,
              groups, output_mask, packed_input, packed_output, compact_grad_weight,
              compact_weight);
}

static_assert(std::is_same_v<decltype(forward_cuda), schema::ChannelSparseConv2dFn>);
static_assert(std::is_same_v<decltype(backward_cuda), schema::ChannelSparseConv2dBackwardFn>);

}  // namespace
}  // namespace dce::kernels

TORCH_LIBRARY_IMPL(dce, CUDA, m) {
  m.impl("channel_sparse_conv2d", &dce::kernels::forward_cuda);
  m.impl("channel_sparse_conv2d_backward", &dce::kernels::backward_cuda);
}

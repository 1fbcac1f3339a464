// CUDA backend of dce::channel_sparse_conv2d: registers the csrc/kernels
// launchers (conv_host.h, shared with the emulated backend) for the CUDA
// dispatch key. Launches go to at::cuda::getCurrentCUDAStream() and every
// launch is followed by C10_CUDA_KERNEL_LAUNCH_CHECK (see DCE_LAUNCH).
#include <torch/library.h>

#include "../kernels/conv_host.h"

TORCH_LIBRARY_IMPL(dce, CUDA, m) {
  m.impl("channel_sparse_conv2d", &dce::kernels::channel_sparse_conv2d);
  m.impl("channel_sparse_conv2d_backward", &dce::kernels::channel_sparse_conv2d_backward);
}

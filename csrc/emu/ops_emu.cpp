// The emulated backend: the same schemas as the dce library, registered under
// the dce_emu namespace for CPU tensors, implemented by the csrc/kernels CUDA
// kernels running on the CPU emulator (csrc/emu). It exists to test those
// kernels and their launch code on machines without a GPU; it is not fast.
#include <torch/library.h>

#include "../kernels/conv_host.h"
#include "../op_schemas.h"

TORCH_LIBRARY(dce_emu, m) {
  m.def(dce::schema::kChannelSparseConv2d);
  m.def(dce::schema::kChannelSparseConv2dBackward);
}

TORCH_LIBRARY_IMPL(dce_emu, CPU, m) {
  m.impl("channel_sparse_conv2d", &dce::kernels::channel_sparse_conv2d);
  m.impl("channel_sparse_conv2d_backward", &dce::kernels::channel_sparse_conv2d_backward);
}

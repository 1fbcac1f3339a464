// The emulated backends: the same schemas as the dce library, registered for
// CPU tensors and implemented by the csrc/kernels CUDA kernels running on the
// CPU emulator (csrc/emu). They exist to test those kernels and their launch
// code on machines without a GPU; they are not fast.
//   dce_emu        the igemm path (kernels/conv_host.h), all of it emulated;
//   dce_emu_cudnn  the cudnn path (kernels/planes_host.h): the compact-conv
//                  composition with the emulated gather/scatter/grad_output
//                  kernels, and at::convolution on CPU tensors in cuDNN's place.
#include <torch/library.h>

#include "../kernels/conv_host.h"
#include "../kernels/planes_host.h"
#include "../op_schemas.h"

TORCH_LIBRARY(dce_emu, m) {
  m.def(dce::schema::kChannelSparseConv2d);
  m.def(dce::schema::kChannelSparseConv2dBackward);
}

TORCH_LIBRARY_IMPL(dce_emu, CPU, m) {
  m.impl("channel_sparse_conv2d", &dce::kernels::igemm_channel_sparse_conv2d);
  m.impl("channel_sparse_conv2d_backward", &dce::kernels::igemm_channel_sparse_conv2d_backward);
}

TORCH_LIBRARY(dce_emu_cudnn, m) {
  m.def(dce::schema::kChannelSparseConv2d);
  m.def(dce::schema::kChannelSparseConv2dBackward);
}

TORCH_LIBRARY_IMPL(dce_emu_cudnn, CPU, m) {
  m.impl("channel_sparse_conv2d", &dce::kernels::compact_channel_sparse_conv2d);
  m.impl("channel_sparse_conv2d_backward", &dce::kernels::compact_channel_sparse_conv2d_backward);
}

// Which implementation the CUDA backend of dce::channel_sparse_conv2d runs.
//
//   cudnn  (default) the compact-conv composition (compact_conv.h): our kernels
//          gather/scatter the active planes and make the fused grad_output
//          pass, cuDNN does the convolution (tensor cores: TF32 when
//          torch.backends.cudnn.allow_tf32, fp16/bf16 under autocast);
//   igemm  our own implicit-GEMM kernels (csrc/kernels/conv_host.h): no
//          gather copies, no tensor cores; the emulator-verified reference.
//
// The choice starts as the environment variable DCE_CUDA_CONV (read once, at
// the first query; unset means cudnn) and can be changed at run time with
// set_cuda_conv_impl (Python: dce_kernels.set_cuda_conv_impl). It is
// process-wide and read at every call of the conv ops, so graphs that
// torch.compile captured follow it without recompiling. The CPU backend has
// one implementation and ignores it. Compiled into every build (with or
// without CUDA), so the setting exists wherever the package does.
#pragma once

#include <string>
#include <string_view>

namespace dce {

enum class CudaConvImpl { kCudnn, kIgemm };

// "cudnn" -> kCudnn, "igemm" -> kIgemm; anything else is an error naming `source`.
CudaConvImpl parse_cuda_conv_impl(std::string_view name, const char* source);
const char* cuda_conv_impl_name(CudaConvImpl impl);

CudaConvImpl cuda_conv_impl();
void set_cuda_conv_impl(CudaConvImpl impl);

}  // namespace dce

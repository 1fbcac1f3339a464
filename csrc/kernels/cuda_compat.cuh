// The one place where csrc/kernels learns whether it is compiled by nvcc (for
// a GPU) or by g++ against the CPU emulator in csrc/emu. Kernels include this
// header and nothing CUDA-specific besides it; everything they use must exist
// in both worlds (rules: csrc/kernels/README.md).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// Different inline namespaces per build give the kernels different symbol
// names in the CUDA library (_C) and the emulated one (_emu), so the dynamic
// linker can never bind one library's call to the other's function.
#define DCE_KERNEL_NS cuda_build
#else
#include "../emu/cuda_emu.h"
#define DCE_KERNEL_NS emu_build
#endif

namespace dce::kernels {
inline namespace DCE_KERNEL_NS {

// Dynamic shared memory of the running block, as an array of T. Kernels
// declare no __shared__ arrays of their own: the emulator fills dynamic
// shared memory with NaN bytes before every block, so a read of a value no
// thread wrote shows up in the result.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#if defined(__CUDACC__)
  extern __shared__ __align__(16) unsigned char dce_dynamic_smem[];
  return reinterpret_cast<T*>(dce_dynamic_smem);
#else
  return reinterpret_cast<T*>(::dce::emu::tl_block.dynamic_smem);
#endif
}

// Accumulator type: fp32 for fp32/fp16/bf16 storage, fp64 for fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  __device__ __forceinline__ static float cast(float v) { return v; }
};
template <>
struct FromAcc<double> {
  __device__ __forceinline__ static double cast(double v) { return v; }
};
template <>
struct FromAcc<__half> {
  __device__ __forceinline__ static __half cast(float v) { return __float2half_rn(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 cast(float v) { return __float2bfloat16_rn(v); }
};
template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return FromAcc<T>::cast(v);
}

// Fused multiply-add spelled out, so g++ (-mfma) and nvcc round identically.
__device__ __forceinline__ float madd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double madd(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float absval(float v) { return fabsf(v); }
__device__ __forceinline__ double absval(double v) { return fabs(v); }

}  // namespace DCE_KERNEL_NS
}  // namespace dce::kernels

// DCE_LAUNCH(kernel, grid, block, dynamic_smem_bytes, stream, args...):
// a <<<>>> launch followed by PyTorch's launch error check under nvcc, a call
// into the emulator (which throws on any launch or kernel error) under g++.
#if defined(__CUDACC__)
#define DCE_LAUNCH(kernel, grid, block, smem, stream, ...)        \
  do {                                                           \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__);  \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                              \
  } while (0)
#else
#define DCE_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::dce::emu::launch(#kernel, (kernel), (grid), (block), (smem), __VA_ARGS__)
#endif

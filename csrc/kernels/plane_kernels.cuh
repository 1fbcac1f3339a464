// Memory-pass kernels of the compact-convolution composition
// (common/compact_conv.h) on the GPU: the gathers and scatters of whole planes
// around cuDNN, and the fused pass over grad_output (gather + bias gradient +
// Taylor saliency). Memory-bound; the heavy math is cuDNN's. Host side:
// planes_host.h.
#pragma once

#include "cuda_compat.cuh"

namespace dce::kernels {
inline namespace DCE_KERNEL_NS {

// dst[r, c, p] = src[rm(r), col_map[c], p] for a dst of [rows, dst_cols, plane]
// and a src of [*, src_cols, plane], where rm(r) = row_map ? row_map[r] : r;
// a negative map entry writes zero instead. Every dst element is written
// exactly once. One kernel serves all five gathers and scatters:
//   gather planes   row_map null, col_map = idx (length K)
//   scatter planes  row_map null, col_map = slot (length C: slot[idx[k]] = k, else -1)
//   mask planes     row_map null, col_map = c if c is listed, else -1
//   gather weight   row_map = out_idx, col_map = in_idx, plane = kH*kW
//   scatter weight  row_map = out slot, col_map = in slot
// Index is int32 when the whole dst fits (the common case: cheaper division).
template <typename T, typename Index>
__global__ void __launch_bounds__(256)
    remap_planes_kernel(const T* __restrict__ src, T* __restrict__ dst,
                        const int64_t* __restrict__ row_map, const int64_t* __restrict__ col_map,
                        Index dst_cols, Index src_cols, Index plane, Index total) {
  const T zero = from_acc<T>(acc_t<T>(0));
  const Index step = static_cast<Index>(gridDim.x) * static_cast<Index>(blockDim.x);
  for (Index i = static_cast<Index>(blockIdx.x) * static_cast<Index>(blockDim.x) +
                 static_cast<Index>(threadIdx.x);
       i < total; i += step) {
    const Index p = i % plane;
    const Index rc = i / plane;
    const Index c = rc % dst_cols;
    const Index r = rc / dst_cols;
    const int64_t sr = row_map != nullptr ? row_map[r] : static_cast<int64_t>(r);
    const int64_t sc = col_map[c];
    dst[i] = (sr >= 0 && sc >= 0) ? src[(sr * src_cols + sc) * plane + p] : zero;
  }
}

// slot[c] = (identity ? c : k) where idx[k] == c, else -1, for c < channels.
// One block: all of slot is filled before any listed entry is written.
__global__ void __launch_bounds__(256)
    inverse_index_kernel(const int64_t* __restrict__ idx, int count, int64_t* __restrict__ slot,
                         int channels, int identity) {
  for (int c = static_cast<int>(threadIdx.x); c < channels; c += static_cast<int>(blockDim.x))
    slot[c] = -1;
  __syncthreads();
  for (int k = static_cast<int>(threadIdx.x); k < count; k += static_cast<int>(blockDim.x))
    slot[idx[k]] = identity ? idx[k] : k;
}

constexpr int kWarpSize = 32;

// One warp per active plane i = n*K + k of grad_output (channel idx[k] at full
// width, plane i when packed): sum_g[i] = sum of g, sum_gh[i] = sum of g*h
// (when h is given), copying the plane to compact[i] (when given). Lanes
// stride over the plane, then a fixed shuffle tree: deterministic.
template <typename T>
__global__ void __launch_bounds__(256)
    grad_output_planes_kernel(const T* __restrict__ g, const T* __restrict__ h,
                              T* __restrict__ compact, const int64_t* __restrict__ idx,
                              int packed, int64_t planes, int64_t K, int64_t C, int64_t plane,
                              acc_t<T>* __restrict__ sum_g, acc_t<T>* __restrict__ sum_gh) {
  using Acc = acc_t<T>;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) +
                    static_cast<int64_t>(threadIdx.x) / kWarpSize;
  if (i >= planes) return;  // uniform over the warp: i is the warp's
  const int64_t n = i / K, k = i % K;
  const int64_t src = (packed ? i : n * C + idx[k]) * plane;
  const T* gp = g + src;
  Acc a = Acc(0), b = Acc(0);
  for (int64_t e = lane; e < plane; e += kWarpSize) {
    const T v = gp[e];
    if (compact != nullptr) compact[i * plane + e] = v;
    a += to_acc(v);
    if (h != nullptr) b = madd(to_acc(v), to_acc(h[src + e]), b);
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
  }
  if (lane == 0) {
    sum_g[i] = a;
    if (h != nullptr) sum_gh[i] = b;
  }
}

// grad_bias[idx[k]] = sum_n sum_g[n, k]; saliency[idx[k]] = mean_n |inv_plane *
// sum_gh[n, k]|, summed over n in order (deterministic). The outputs are
// zero-initialized [C]; either may be null.
template <typename T>
__global__ void __launch_bounds__(256)
    finalize_plane_sums_kernel(const acc_t<T>* __restrict__ sum_g,
                               const acc_t<T>* __restrict__ sum_gh,
                               const int64_t* __restrict__ idx, int n_samples, int K,
                               acc_t<T> inv_plane, T* __restrict__ grad_bias,
                               T* __restrict__ saliency) {
  using Acc = acc_t<T>;
  const int k = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (k >= K) return;
  Acc gb = Acc(0), sal = Acc(0);
  for (int n = 0; n < n_samples; ++n) {
    const int64_t i = static_cast<int64_t>(n) * K + k;
    if (grad_bias != nullptr) gb += sum_g[i];
    if (saliency != nullptr) sal += absval(sum_gh[i] * inv_plane);
  }
  if (grad_bias != nullptr) grad_bias[idx[k]] = from_acc<T>(gb);
  if (saliency != nullptr) saliency[idx[k]] = from_acc<T>(sal / static_cast<Acc>(n_samples));
}

}  // namespace DCE_KERNEL_NS
}  // namespace dce::kernels

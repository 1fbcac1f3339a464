// Shared-memory tiled GEMM main loop, parameterized by a "problem" policy
// that says how to read the A (M x K) and B (K x N) operands straight from the
// convolution's tensors and index lists (implicit GEMM: nothing is gathered
// or unfolded into memory) and where each result goes.
//
// Block tile BM x BN, K step BK; each thread owns a TM x TN register tile whose
// rows are ty + i*(BM/TM) and columns tx + j*(BN/TN): strided, so that the 16
// threads sharing a row of the block read 16 consecutive Bs words (no bank
// conflicts) and write 16 consecutive output pixels (coalesced).
// Operands are converted to the accumulator type when staged in shared memory;
// accumulation is fp32 (fp64 for double).
#pragma once

#include "cuda_compat.cuh"

namespace dce::kernels {
inline namespace DCE_KERNEL_NS {

template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
  static constexpr int kThreadsM = BM / TM, kThreadsN = BN / TN;
  static constexpr int kThreads = kThreadsM * kThreadsN;
  // One word of padding per shared row: the k-fast staging stores (16 lanes
  // on consecutive k, same m) then hit 16 different banks.
  static constexpr int kAStride = BM + 1, kBStride = BN + 1;
  static constexpr int kAPerThread = BM * BK / kThreads, kBPerThread = BK * BN / kThreads;
  static_assert(BM % TM == 0 && BN % TN == 0, "tile not divisible by the thread tile");
  static_assert(kThreads % BK == 0 && kThreads % BN == 0, "thread count vs. tile shape");
  static_assert(BM % (kThreads / BK) == 0 && BN % (kThreads / BK) == 0, "k-fast staging map");
  static_assert(BK % (kThreads / BN) == 0, "n-fast staging map");
  static_assert(BM * BK % kThreads == 0 && BK * BN % kThreads == 0, "staging elements per thread");

  template <typename Acc>
  static constexpr size_t smem_bytes() {
    return static_cast<size_t>(BK) * (kAStride + kBStride) * sizeof(Acc);
  }

  // Which (m, k) of the A tile staging element e of thread tid is.
  // A is always staged k-fast (consecutive threads on consecutive k).
  __device__ __forceinline__ static int a_m(int tid, int e) { return tid / BK + e * (kThreads / BK); }
  __device__ __forceinline__ static int a_k(int tid) { return tid % BK; }
  // B staged n-fast (kBKFast == false) or k-fast.
  template <bool kBKFast>
  __device__ __forceinline__ static int b_n(int tid, int e) {
    return kBKFast ? tid / BK + e * (kThreads / BK) : tid % BN;
  }
  template <bool kBKFast>
  __device__ __forceinline__ static int b_k(int tid, int e) {
    return kBKFast ? tid % BK : tid / BN + e * (kThreads / BN);
  }
};

// Policy P provides (all per thread; see conv_kernels.cuh):
//   types T, Acc, Tile, Params; constexpr bool kBKFast;
//   P(params)                   decode blockIdx, precompute per-thread state
//   active()                    false: the whole block has nothing to do
//   k_begin, k_end              the block's K range; m0, n0 its tile origin
//   mma                         false: stage A only (a reduction-only block)
//   load_a(m, k, e)             A[m0+m][k], zero outside the problem
//   load_b(k, n, e)             B[k][n0+n], zero outside the problem
//   finish()                    after the K loop (flush per-thread reductions)
//   store(m, n, v)              result of C[m0+m][n0+n], bounds-checked
template <typename P>
__global__ void __launch_bounds__(P::Tile::kThreads) igemm_kernel(const typename P::Params params) {
  using Tile = typename P::Tile;
  using Acc = typename P::Acc;
  constexpr int BK = Tile::BK, TM = Tile::TM, TN = Tile::TN;

  P prob(params);
  if (!prob.active()) return;  // uniform over the block: no barrier is skipped by only some threads

  Acc* As = dynamic_smem<Acc>();
  Acc* Bs = As + BK * Tile::kAStride;
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % Tile::kThreadsN, ty = tid / Tile::kThreadsN;

  Acc acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);

  for (int k0 = prob.k_begin; k0 < prob.k_end; k0 += BK) {
#pragma unroll
    for (int e = 0; e < Tile::kAPerThread; ++e) {
      const int m = Tile::a_m(tid, e), k = Tile::a_k(tid);
      As[k * Tile::kAStride + m] = prob.load_a(m, k0 + k, e);
    }
    if (prob.mma) {
#pragma unroll
      for (int e = 0; e < Tile::kBPerThread; ++e) {
        const int n = Tile::template b_n<P::kBKFast>(tid, e);
        const int k = Tile::template b_k<P::kBKFast>(tid, e);
        Bs[k * Tile::kBStride + n] = prob.load_b(k0 + k, n, e);
      }
    }
    __syncthreads();
    if (prob.mma) {
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        Acc a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = As[k * Tile::kAStride + ty + i * Tile::kThreadsM];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = Bs[k * Tile::kBStride + tx + j * Tile::kThreadsN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = madd(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();  // the next iteration overwrites As/Bs
  }
  prob.finish();
  if (prob.mma) {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j)
        prob.store(ty + i * Tile::kThreadsM, tx + j * Tile::kThreadsN, acc[i][j]);
  }
}

}  // namespace DCE_KERNEL_NS
}  // namespace dce::kernels

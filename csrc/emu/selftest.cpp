// Self-test kernels of the CUDA emulator, registered as dce_emu_test::* ops so
// python_tests/test_emulator_runtime.py can show that the emulator catches
// what a GPU would get wrong (a missing barrier, reads of unwritten shared
// memory, deadlocks) and implements warp collectives, atomics, half/bfloat16
// and the built-in index variables as CUDA does. Some kernels here are wrong
// on purpose; that is why they live here and not in csrc/kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../kernels/cuda_compat.cuh"

namespace dce::emu::selftest {
namespace {

using dce::kernels::dynamic_smem;

constexpr int kT = 16;  // SGEMM tile: 16x16 threads, one output each

// C[M,N] = A[M,K] @ B[K,N], shared-memory tiled; kSync=false drops the barrier
// between staging and use, the classic race.
template <bool kSync>
__global__ void sgemm_kernel(const float* A, const float* B, float* C, int M, int N, int K) {
  float* As = dynamic_smem<float>();
  float* Bs = As + kT * kT;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int row = blockIdx.y * kT + ty, col = blockIdx.x * kT + tx;
  float acc = 0.f;
  for (int k0 = 0; k0 < K; k0 += kT) {
    As[ty * kT + tx] = (row < M && k0 + tx < K) ? A[row * K + k0 + tx] : 0.f;
    Bs[ty * kT + tx] = (k0 + ty < K && col < N) ? B[(k0 + ty) * N + col] : 0.f;
    if (kSync) __syncthreads();
    for (int k = 0; k < kT; ++k) acc = fmaf(As[ty * kT + k], Bs[k * kT + tx], acc);
    __syncthreads();
  }
  if (row < M && col < N) C[row * N + col] = acc;
}

at::Tensor sgemm(const at::Tensor& a, const at::Tensor& b, bool sync) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "sgemm: bad shapes");
  const at::Tensor A = a.to(at::kFloat).contiguous(), B = b.to(at::kFloat).contiguous();
  const int M = A.size(0), K = A.size(1), N = B.size(1);
  at::Tensor C = at::empty({M, N}, A.options());
  const dim3 grid((N + kT - 1) / kT, (M + kT - 1) / kT);
  const size_t smem = 2 * kT * kT * sizeof(float);
  if (sync)
    DCE_LAUNCH(sgemm_kernel<true>, grid, dim3(kT, kT), smem, 0, A.const_data_ptr<float>(),
               B.const_data_ptr<float>(), C.data_ptr<float>(), M, N, K);
  else
    DCE_LAUNCH(sgemm_kernel<false>, grid, dim3(kT, kT), smem, 0, A.const_data_ptr<float>(),
               B.const_data_ptr<float>(), C.data_ptr<float>(), M, N, K);
  return C;
}

// out[t] = dynamic shared memory word t as the block found it: never written.
__global__ void read_unwritten_smem_kernel(float* out) {
  out[threadIdx.x] = dynamic_smem<float>()[threadIdx.x];
}

at::Tensor read_unwritten_smem(int64_t threads) {
  at::Tensor out = at::zeros({threads}, at::kFloat);
  DCE_LAUNCH(read_unwritten_smem_kernel, dim3(1), dim3(static_cast<unsigned>(threads)),
             threads * sizeof(float), 0, out.data_ptr<float>());
  return out;
}

// mode 0: half the block returns before a __syncthreads the rest waits at.
// mode 1: the two halves wait at different __syncthreads.
// mode 2: a lane exits before the full-warp shuffle its warp waits in.
// mode 3: a correct kernel with several barriers (control).
__global__ void hang_kernel(int mode, int* out) {
  const int t = threadIdx.x;
  if (mode == 0) {
    if (t >= 32) return;
    __syncthreads();
  } else if (mode == 1) {
    if (t < 32) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (mode == 2) {
    if (t == 5) return;
    out[t] = __shfl_sync(0xffffffffu, t, 0);
    return;
  } else {
    for (int i = 0; i < 3; ++i) __syncthreads();
  }
  out[t] = 1;
}

int64_t hang(int64_t mode) {
  at::Tensor out = at::zeros({64}, at::kInt);
  DCE_LAUNCH(hang_kernel, dim3(1), dim3(64), 0, 0, static_cast<int>(mode), out.data_ptr<int>());
  return out.sum().item<int64_t>();
}

// Per thread: 10 results of warp collectives over the thread's input value v.
constexpr int kWarpCols = 10;
__global__ void warp_ops_kernel(const int* in, int* out, int threshold) {
  const int t = threadIdx.x;
  const int v = in[t];
  const unsigned full = 0xffffffffu;
  int* o = out + t * kWarpCols;
  o[0] = __shfl_sync(full, v, 3);
  o[1] = __shfl_xor_sync(full, v, 1);
  o[2] = __shfl_up_sync(full, v, 2);
  o[3] = __shfl_down_sync(full, v, 3);
  o[4] = static_cast<int>(__ballot_sync(full, v & 1));
  o[5] = __any_sync(full, v > threshold);
  o[6] = __all_sync(full, v > threshold);
  o[7] = __shfl_sync(full, v, 1, 8);        // lane 1 of each group of 8
  o[8] = __shfl_down_sync(full, v, 1, 16);  // within groups of 16
  // a warp-wide sum by butterfly reduction
  int s = v;
  for (int d = 16; d >= 1; d /= 2) s += __shfl_xor_sync(full, s, d);
  o[9] = s;
}

at::Tensor warp_ops(const at::Tensor& values, int64_t threshold) {
  TORCH_CHECK(values.dim() == 1 && values.numel() % 32 == 0, "warp_ops: whole warps only");
  const at::Tensor v = values.to(at::kInt).contiguous();
  at::Tensor out = at::empty({v.numel(), kWarpCols}, v.options());
  DCE_LAUNCH(warp_ops_kernel, dim3(1), dim3(static_cast<unsigned>(v.numel())), 0, 0,
             v.const_data_ptr<int>(), out.data_ptr<int>(), static_cast<int>(threshold));
  return out;
}

// Every thread of every block adds to the same counters; with several OS
// worker threads the blocks really race.
__global__ void atomics_kernel(int* counter, float* fsum, double* dsum, int* maxv, unsigned* cas) {
  const int gid = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(counter, 1);
  atomicAdd(fsum, 0.5f);
  atomicAdd(dsum, static_cast<double>(gid));
  atomicMax(maxv, gid);
  unsigned old = *cas, assumed;
  do {  // increment through a CAS loop, the way CUDA code builds custom atomics
    assumed = old;
    old = atomicCAS(cas, assumed, assumed + 2u);
  } while (old != assumed);
}

at::Tensor atomics(int64_t blocks, int64_t threads) {
  at::Tensor i = at::zeros({3}, at::kInt);
  at::Tensor f = at::zeros({1}, at::kFloat);
  at::Tensor d = at::zeros({1}, at::kDouble);
  int* ip = i.data_ptr<int>();
  DCE_LAUNCH(atomics_kernel, dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads)),
             0, 0, ip, f.data_ptr<float>(), d.data_ptr<double>(), ip + 1,
             reinterpret_cast<unsigned*>(ip + 2));
  return at::cat({i.to(at::kDouble), f.to(at::kDouble), d});
}

// One row per thread: blockIdx, threadIdx, blockDim, gridDim (x, y, z each).
__global__ void builtins_kernel(int* out) {
  const int bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int* o = out + (static_cast<int64_t>(bid) * blockDim.x * blockDim.y * blockDim.z + tid) * 12;
  const unsigned vals[12] = {blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z,
                             blockDim.x, blockDim.y, blockDim.z, gridDim.x,   gridDim.y,   gridDim.z};
  for (int i = 0; i < 12; ++i) o[i] = static_cast<int>(vals[i]);
}

at::Tensor builtins(at::IntArrayRef grid, at::IntArrayRef block) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "builtins: 3-D grid and block");
  const int64_t total = grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2];
  at::Tensor out = at::full({total, 12}, -1, at::kInt);
  DCE_LAUNCH(builtins_kernel, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), 0, 0,
             out.data_ptr<int>());
  return out;
}

// Float -> half / bfloat16 bits and back, through the emulator's conversions.
__global__ void convert_kernel(const float* in, int16_t* h, int16_t* b, float* h_back, float* b_back,
                               int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __half hv = __float2half_rn(in[i]);
  const __nv_bfloat16 bv = __float2bfloat16_rn(in[i]);
  std::memcpy(h + i, &hv, 2);
  std::memcpy(b + i, &bv, 2);
  h_back[i] = __half2float(hv);
  b_back[i] = __bfloat162float(bv);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> convert(const at::Tensor& x) {
  const at::Tensor v = x.to(at::kFloat).contiguous();
  const int n = static_cast<int>(v.numel());
  auto h = at::empty({n}, at::kShort), b = at::empty({n}, at::kShort);
  auto hb = at::empty({n}, at::kFloat), bb = at::empty({n}, at::kFloat);
  if (n > 0)
    DCE_LAUNCH(convert_kernel, dim3((n + 127) / 128), dim3(128), 0, 0, v.const_data_ptr<float>(),
               h.data_ptr<int16_t>(), b.data_ptr<int16_t>(), hb.data_ptr<float>(), bb.data_ptr<float>(), n);
  return {h, b, hb, bb};
}

// Per-block sum through a static __shared__ array (tree reduction), one block
// per row: static shared memory must be private to each block in flight,
// also when blocks run concurrently on several OS worker threads.
__global__ void static_smem_sum_kernel(const float* in, float* out, int cols) {
  __shared__ float buf[64];
  const int t = threadIdx.x;
  float v = 0.f;
  for (int c = t; c < cols; c += 64) v += in[blockIdx.x * cols + c];
  buf[t] = v;
  __syncthreads();
  for (int stride = 32; stride > 0; stride /= 2) {
    if (t < stride) buf[t] += buf[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

at::Tensor static_smem_sum(const at::Tensor& x) {
  const at::Tensor v = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({v.size(0)}, v.options());
  DCE_LAUNCH(static_smem_sum_kernel, dim3(static_cast<unsigned>(v.size(0))), dim3(64), 0, 0,
             v.const_data_ptr<float>(), out.data_ptr<float>(), static_cast<int>(v.size(1)));
  return out;
}

}  // namespace
}  // namespace dce::emu::selftest

TORCH_LIBRARY(dce_emu_test, m) {
  m.def("sgemm(Tensor a, Tensor b, bool sync) -> Tensor", &dce::emu::selftest::sgemm);
  m.def("read_unwritten_smem(int threads) -> Tensor", &dce::emu::selftest::read_unwritten_smem);
  m.def("hang(int mode) -> int", &dce::emu::selftest::hang);
  m.def("warp_ops(Tensor values, int threshold) -> Tensor", &dce::emu::selftest::warp_ops);
  m.def("atomics(int blocks, int threads) -> Tensor", &dce::emu::selftest::atomics);
  m.def("builtins(int[3] grid, int[3] block) -> Tensor", &dce::emu::selftest::builtins);
  m.def("static_smem_sum(Tensor x) -> Tensor", &dce::emu::selftest::static_smem_sum);
  m.def("convert(Tensor x) -> (Tensor, Tensor, Tensor, Tensor)", &dce::emu::selftest::convert);
}

// CUDA emulation runtime: lets the kernels in csrc/kernels, written as plain
// CUDA C++, compile with g++ and run on the CPU.
//
// Model: one fiber per CUDA thread, all threads of a block on one OS thread,
// run in deterministic round-robin order; a fiber runs until it blocks on a
// barrier (__syncthreads, a warp collective) or exits. Blocks of a grid run
// one after another on each of a few OS worker threads. Everything a kernel
// may use from CUDA is declared here; whatever is missing here is not allowed
// in csrc/kernels (see csrc/kernels/README.md).
//
// Errors (deadlock, barrier divergence, bad warp masks, exceptions thrown by a
// kernel) unwind the block and surface as a dce::emu::Error thrown from
// launch(), which PyTorch turns into a Python RuntimeError.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is the CPU emulation of CUDA; nvcc builds must not include it"
#endif

#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA keywords ----------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared memory: every fiber of a block runs on the same OS thread, so
// a function-local thread_local is exactly "one copy per block in flight".
// It is zero-initialized once and keeps stale values between blocks; it is
// not poisoned, which is why csrc/kernels uses dynamic shared memory only.
#define __shared__ static thread_local

// ---- built-in vector types ----------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

namespace dce::emu {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

constexpr int kWarpSize = 32;

// Per-CUDA-thread state the kernel can see.
struct ThreadInfo {
  uint3 thread_idx;
  int linear;  // x + y*bx + z*bx*by
};

// Per-block state the kernel can see (one block in flight per OS thread).
struct BlockInfo {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned char* dynamic_smem;
  size_t dynamic_smem_bytes;
};

inline thread_local ThreadInfo* tl_thread = nullptr;
inline thread_local BlockInfo tl_block{};

// Implemented in runtime.cpp; called from fibers.
void syncthreads(const char* file, int line);
// Deposits value for the calling lane, waits for every lane of mask, and
// returns the 32 deposited values of this collective.
const uint64_t* warp_exchange(unsigned mask, uint64_t value, const char* what);
void device_trap(const char* what, const char* file, int line);

inline ThreadInfo& current_thread() {
  if (tl_thread == nullptr) throw Error("CUDA built-in used outside an emulated kernel");
  return *tl_thread;
}

// Runs kernel body once per thread of every block of grid.
void launch_erased(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body,
                   const char* kernel_name);

template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
            size_t dynamic_smem, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel argument count mismatch");
  // Arguments are copied once, as a real launch copies them into constant memory.
  std::tuple<std::decay_t<Params>...> copied(std::forward<Args>(args)...);
  launch_erased(grid, block, dynamic_smem, [&] { std::apply(kernel, copied); }, name);
}

// Number of OS worker threads that run blocks (DCE_EMU_THREADS, default: all cores).
int worker_threads();

}  // namespace dce::emu

// ---- built-in variables -----------------------------------------------------------
#define threadIdx (::dce::emu::current_thread().thread_idx)
#define blockIdx (::dce::emu::tl_block.block_idx)
#define blockDim (::dce::emu::tl_block.block_dim)
#define gridDim (::dce::emu::tl_block.grid_dim)
#define warpSize 32

// ---- synchronization ------------------------------------------------------------
#define __syncthreads() ::dce::emu::syncthreads(__FILE__, __LINE__)
#define __trap() ::dce::emu::device_trap("__trap()", __FILE__, __LINE__)
// Memory fences are no-ops: a block's fibers share one OS thread, and blocks on
// other OS threads may only communicate through atomics (std::atomic_ref below).
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() {}

inline unsigned __lane_id_emu() {
  return static_cast<unsigned>(::dce::emu::current_thread().linear) % 32u;
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::dce::emu::warp_exchange(mask, 0, "__syncwarp");
}

namespace dce::emu::detail {
template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type > 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
// CUDA semantics of width: lanes are split into segments of `width`; a source
// lane outside the caller's segment wraps (shfl) or leaves the value unchanged
// (up/down/xor), as the PTX shfl instruction does.
inline void check_width(int width) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    throw Error("warp shuffle width must be a power of two in [1, 32], got " +
                std::to_string(width));
}
}  // namespace dce::emu::detail

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  using namespace dce::emu::detail;
  check_width(width);
  const unsigned lane = __lane_id_emu();
  const uint64_t* v = dce::emu::warp_exchange(mask, to_bits(var), "__shfl_sync");
  const unsigned base = lane & ~static_cast<unsigned>(width - 1);
  const unsigned src = base + (static_cast<unsigned>(src_lane) & (width - 1));
  return from_bits<T>(v[src]);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  using namespace dce::emu::detail;
  check_width(width);
  const unsigned lane = __lane_id_emu();
  const uint64_t* v = dce::emu::warp_exchange(mask, to_bits(var), "__shfl_up_sync");
  const unsigned in_seg = lane & (width - 1);
  return in_seg >= delta ? from_bits<T>(v[lane - delta]) : var;
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  using namespace dce::emu::detail;
  check_width(width);
  const unsigned lane = __lane_id_emu();
  const uint64_t* v = dce::emu::warp_exchange(mask, to_bits(var), "__shfl_down_sync");
  const unsigned in_seg = lane & (width - 1);
  return in_seg + delta < static_cast<unsigned>(width) ? from_bits<T>(v[lane + delta]) : var;
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  using namespace dce::emu::detail;
  check_width(width);
  const unsigned lane = __lane_id_emu();
  const uint64_t* v = dce::emu::warp_exchange(mask, to_bits(var), "__shfl_xor_sync");
  const unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  const unsigned base = lane & ~static_cast<unsigned>(width - 1);
  return src >= base && src < base + width ? from_bits<T>(v[src]) : var;
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const uint64_t* v = dce::emu::warp_exchange(mask, predicate != 0, "__ballot_sync");
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) out |= static_cast<unsigned>(v[l] != 0) << l;
  return out;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  return __ballot_sync(mask, predicate) == mask;
}

// ---- atomics (device-wide: blocks on other OS threads may race) ---------------------
template <typename T>
T __emu_atomic_add(T* address, T val) {
  return std::atomic_ref<T>(*address).fetch_add(val, std::memory_order_relaxed);
}
inline float atomicAdd(float* a, float v) { return __emu_atomic_add(a, v); }
inline double atomicAdd(double* a, double v) { return __emu_atomic_add(a, v); }
inline int atomicAdd(int* a, int v) { return __emu_atomic_add(a, v); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __emu_atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return __emu_atomic_add(a, v);
}
inline int atomicSub(int* a, int v) { return std::atomic_ref<int>(*a).fetch_sub(v); }
inline unsigned atomicSub(unsigned* a, unsigned v) {
  return std::atomic_ref<unsigned>(*a).fetch_sub(v);
}
template <typename T>
T atomicExch(T* a, T v) {
  return std::atomic_ref<T>(*a).exchange(v);
}
template <typename T>
T atomicCAS(T* a, T compare, T val) {
  std::atomic_ref<T>(*a).compare_exchange_strong(compare, val);
  return compare;  // the old value, whether or not the swap happened
}
template <typename T>
T atomicMax(T* a, T v) {
  std::atomic_ref<T> r(*a);
  T old = r.load();
  while (old < v && !r.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* a, T v) {
  std::atomic_ref<T> r(*a);
  T old = r.load();
  while (old > v && !r.compare_exchange_weak(old, v)) {
  }
  return old;
}

// ---- read-only cache load -------------------------------------------------------------
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ---- fp32 intrinsics with CUDA rounding -----------------------------------------------
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline int __float_as_int(float v) { return std::bit_cast<int>(v); }

// ---- half and bfloat16 ------------------------------------------------------------------
// Storage-compatible with CUDA's __half / __nv_bfloat16 and with c10::Half /
// c10::BFloat16 (two bytes, IEEE binary16 / upper half of binary32), with the
// conversion intrinsics csrc/kernels uses, rounding to nearest even as the
// hardware does.
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t exp = (h.x >> 10) & 0x1fu;
  const uint32_t man = h.x & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: value = man * 2^-24, exact in fp32
      const float f = static_cast<float>(man) * 0x1p-24f;
      bits = sign | std::bit_cast<uint32_t>(f);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  return std::bit_cast<float>(bits);
}

inline __half __float2half_rn(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  __half h;
  if (a >= 0x7f800000u) {  // inf or nan (nan keeps a quiet payload bit)
    h.x = sign | 0x7c00u | (a > 0x7f800000u ? 0x200u | ((a >> 13) & 0x3ffu) : 0u);
    return h;
  }
  if (a >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    h.x = sign | 0x7c00u;
    return h;
  }
  if (a < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    // value / 2^-24 rounded to nearest even, computed exactly in fp32.
    const float scaled = std::bit_cast<float>(a) * 0x1p24f;
    const float r = std::nearbyint(scaled);  // default rounding mode: to nearest even
    h.x = sign | static_cast<uint16_t>(r);
    return h;
  }
  const uint32_t exp = (a >> 23) - 112u;
  uint32_t man = a & 0x7fffffu;
  uint32_t out = (exp << 10) | (man >> 13);
  const uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (out & 1u))) ++out;  // may carry into the exponent
  h.x = sign | static_cast<uint16_t>(out);
  return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }

inline float __bfloat162float(__nv_bfloat16 b) {
  return std::bit_cast<float>(static_cast<uint32_t>(b.x) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.x = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet nan
    return b;
  }
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  b.x = static_cast<uint16_t>(rounded >> 16);
  return b;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

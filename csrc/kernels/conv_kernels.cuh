// Channel-sparse convolution kernels: forward, grad-input (dgrad) and
// grad-weight (wgrad, with fused grad-bias and Taylor saliency) as implicit
// GEMMs over sorted index lists of active channels, plus two small helpers
// (zero-fill of inactive planes, finalization of the per-channel reductions).
//
// Index lists are partitioned by convolution group on the host: list[off[g] ..
// off[g+1]) are the active channels of group g, ascending. Every GEMM is per
// group (blockIdx.z), over active channels only:
//
//   forward  C[co, p]   = sum_{(ci,kh,kw)} W[co, ci, kh, kw] * X[n, ci, oh*s-pad+kh*d, ...]
//            M = active outputs, N = N*Ho*Wo output pixels, K = active inputs * kH*kW
//   dgrad    dX[ci, p]  = sum_{(co,kh,kw)} W[co, ci, kh, kw] * G[n, co, (ih+pad-kh*d)/s, ...]
//            M = active inputs,  N = N*H*W input pixels,   K = active outputs * kH*kW
//            (terms whose (ih+pad-kh*d) is not a multiple of s are zero)
//   wgrad    dW[co, r]  = sum_{p} G[n, co, oh, ow] * X[n, ci, oh*s-pad+kh*d, ...]
//            M = active outputs, N = active inputs * kH*kW, K = N*Ho*Wo (split-K)
//
// where p = (n, oh, ow) / (n, ih, iw) flattened and r = (ci, kh, kw).
#pragma once

#include "igemm.cuh"

namespace dce::kernels {
inline namespace DCE_KERNEL_NS {

// Shapes and index lists shared by all kernels. int is enough for every
// count; element offsets are computed in int64_t. Cin and Cout are the channel
// counts of the activation tensors: the layer's, or the active counts when a
// side is packed (only the listed channels, in list order; see op_schemas.h).
struct ConvGeom {
  int N, Cin, H, W, Cout, Ho, Wo, kH, kW;
  int sh, sw, ph, pw, dh, dw;
  int cin_g, cout_g;  // channels per group of the weight (weight.size(1), out_channels / groups)
  const int* in_list;
  const int* in_off;
  const int* out_list;
  const int* out_off;
  int in_packed, out_packed;
};

// Plane of the activation tensor that holds the active channel in list slot
// `slot`: the listed channel at full width, the slot itself when packed. The
// weight is always indexed by the listed channel.
__device__ __forceinline__ int input_plane(const ConvGeom& g, int slot) {
  return g.in_packed ? slot : g.in_list[slot];
}
__device__ __forceinline__ int output_plane(const ConvGeom& g, int slot) {
  return g.out_packed ? slot : g.out_list[slot];
}

template <typename T>
struct FwdParams {
  ConvGeom g;
  const T* x;
  const T* w;
  const T* bias;  // may be null
  T* y;
};

template <typename T>
struct DgradParams {
  ConvGeom g;
  const T* gy;
  const T* w;
  T* gx;
};

template <typename T>
struct WgradParams {
  ConvGeom g;
  const T* gy;
  const T* x;
  const T* h;             // forward output, for the saliency; may be null
  acc_t<T>* gw;           // [Cout, cin_g, kH, kW], zero-initialized; null: no weight grad
  acc_t<T>* ws_gb;        // [Ko] sum of g per active output (slot order); may be null
  acc_t<T>* ws_gh;        // [N, Ko] sum of g*h per sample and active output; may be null
  int ko_total;           // total active outputs (row length of ws_gh)
  int splits;             // split-K factor: blockIdx.z = group * splits + split
  int k_per_split;        // multiple of BK
};

// ---------------------------------------------------------------- forward
template <typename T_, typename Tile_>
struct FwdPolicy {
  using T = T_;
  using Acc = acc_t<T>;
  using Tile = Tile_;
  using Params = FwdParams<T>;
  static constexpr bool kBKFast = false;

  Params p;
  int group, m0, n0, k_begin = 0, k_end, mg, obase, ibase, kk;
  bool mma = true;
  // This thread's B column (one output pixel), fixed for the whole K loop.
  bool col_ok;
  int64_t x_nbase;
  int ih0, iw0;
  // Decode of this thread's A column k (one per K tile), cached.
  int a_k = -1;
  int64_t a_woff = 0;

  __device__ __forceinline__ explicit FwdPolicy(const Params& prm) : p(prm) {
    const ConvGeom& g = p.g;
    group = static_cast<int>(blockIdx.z);
    m0 = static_cast<int>(blockIdx.y) * Tile::BM;
    n0 = static_cast<int>(blockIdx.x) * Tile::BN;
    obase = g.out_off[group];
    mg = g.out_off[group + 1] - obase;
    ibase = g.in_off[group];
    kk = g.kH * g.kW;
    k_end = (g.in_off[group + 1] - ibase) * kk;
    const int hw = g.Ho * g.Wo;
    const int n = n0 + Tile::template b_n<kBKFast>(static_cast<int>(threadIdx.x), 0);
    col_ok = n < g.N * hw;
    const int nb = col_ok ? n / hw : 0, pix = n - nb * hw;
    const int oh = pix / g.Wo, ow = pix - oh * g.Wo;
    x_nbase = static_cast<int64_t>(nb) * g.Cin * g.H * g.W;
    ih0 = oh * g.sh - g.ph;
    iw0 = ow * g.sw - g.pw;
  }
  __device__ __forceinline__ bool active() const { return m0 < mg; }

  __device__ __forceinline__ Acc load_a(int m, int k, int) {
    if (m0 + m >= mg || k >= k_end) return Acc(0);
    if (k != a_k) {
      a_k = k;
      const int a = k / kk, r = k - a * kk;
      const int ci = p.g.in_list[ibase + a];
      a_woff = static_cast<int64_t>(ci - group * p.g.cin_g) * kk + r;
    }
    const int co = p.g.out_list[obase + m0 + m];
    return to_acc(p.w[static_cast<int64_t>(co) * p.g.cin_g * kk + a_woff]);
  }

  __device__ __forceinline__ Acc load_b(int k, int, int) {
    if (!col_ok || k >= k_end) return Acc(0);
    const ConvGeom& g = p.g;
    const int a = k / kk, r = k - a * kk;
    const int kh = r / g.kW, kw = r - kh * g.kW;
    const int ih = ih0 + kh * g.dh, iw = iw0 + kw * g.dw;
    if (static_cast<unsigned>(ih) >= static_cast<unsigned>(g.H) ||
        static_cast<unsigned>(iw) >= static_cast<unsigned>(g.W))
      return Acc(0);
    const int ci = input_plane(g, ibase + a);
    return to_acc(p.x[x_nbase + (static_cast<int64_t>(ci) * g.H + ih) * g.W + iw]);
  }

  __device__ __forceinline__ void finish() {}

  __device__ __forceinline__ void store(int m, int n, Acc v) {
    const ConvGeom& g = p.g;
    const int hw = g.Ho * g.Wo;
    if (m0 + m >= mg || n0 + n >= g.N * hw) return;
    const int slot = obase + m0 + m;
    if (p.bias != nullptr) v += to_acc(p.bias[g.out_list[slot]]);
    const int nb = (n0 + n) / hw, pix = n0 + n - nb * hw;
    p.y[(static_cast<int64_t>(nb) * g.Cout + output_plane(g, slot)) * hw + pix] =
        from_acc<T>(v);
  }
};

// ---------------------------------------------------------------- grad input
template <typename T_, typename Tile_>
struct DgradPolicy {
  using T = T_;
  using Acc = acc_t<T>;
  using Tile = Tile_;
  using Params = DgradParams<T>;
  static constexpr bool kBKFast = false;

  Params p;
  int group, m0, n0, k_begin = 0, k_end, mg, obase, ibase, kk;
  bool mma = true;
  bool col_ok;
  int64_t gy_nbase;
  int th0, tw0;  // ih + pad, iw + pad of this thread's input pixel
  int a_k = -1;
  int64_t a_woff = 0;

  __device__ __forceinline__ explicit DgradPolicy(const Params& prm) : p(prm) {
    const ConvGeom& g = p.g;
    group = static_cast<int>(blockIdx.z);
    m0 = static_cast<int>(blockIdx.y) * Tile::BM;
    n0 = static_cast<int>(blockIdx.x) * Tile::BN;
    ibase = g.in_off[group];
    mg = g.in_off[group + 1] - ibase;
    obase = g.out_off[group];
    kk = g.kH * g.kW;
    k_end = (g.out_off[group + 1] - obase) * kk;
    const int hw = g.H * g.W;
    const int n = n0 + Tile::template b_n<kBKFast>(static_cast<int>(threadIdx.x), 0);
    col_ok = n < g.N * hw;
    const int nb = col_ok ? n / hw : 0, pix = n - nb * hw;
    const int ih = pix / g.W, iw = pix - ih * g.W;
    gy_nbase = static_cast<int64_t>(nb) * g.Cout * g.Ho * g.Wo;
    th0 = ih + g.ph;
    tw0 = iw + g.pw;
  }
  __device__ __forceinline__ bool active() const { return m0 < mg; }

  __device__ __forceinline__ Acc load_a(int m, int k, int) {
    if (m0 + m >= mg || k >= k_end) return Acc(0);
    if (k != a_k) {
      a_k = k;
      const int a = k / kk, r = k - a * kk;
      const int co = p.g.out_list[obase + a];
      a_woff = static_cast<int64_t>(co) * p.g.cin_g * kk + r;
    }
    const int ci = p.g.in_list[ibase + m0 + m];
    return to_acc(p.w[a_woff + static_cast<int64_t>(ci - group * p.g.cin_g) * kk]);
  }

  __device__ __forceinline__ Acc load_b(int k, int, int) {
    if (!col_ok || k >= k_end) return Acc(0);
    const ConvGeom& g = p.g;
    const int a = k / kk, r = k - a * kk;
    const int kh = r / g.kW, kw = r - kh * g.kW;
    const int th = th0 - kh * g.dh, tw = tw0 - kw * g.dw;
    if (th < 0 || tw < 0) return Acc(0);
    const int oh = th / g.sh, ow = tw / g.sw;
    if (oh * g.sh != th || ow * g.sw != tw || oh >= g.Ho || ow >= g.Wo) return Acc(0);
    const int co = output_plane(g, obase + a);
    return to_acc(p.gy[gy_nbase + (static_cast<int64_t>(co) * g.Ho + oh) * g.Wo + ow]);
  }

  __device__ __forceinline__ void finish() {}

  __device__ __forceinline__ void store(int m, int n, Acc v) {
    const ConvGeom& g = p.g;
    const int hw = g.H * g.W;
    if (m0 + m >= mg || n0 + n >= g.N * hw) return;
    const int ci = input_plane(g, ibase + m0 + m);
    const int nb = (n0 + n) / hw, pix = n0 + n - nb * hw;
    p.gx[(static_cast<int64_t>(nb) * g.Cin + ci) * hw + pix] = from_acc<T>(v);
  }
};

// ---------------------------------------------------------------- grad weight
// A = grad_output rows of active outputs over pixels. The blocks in the first
// column of the grid (blockIdx.x == 0) stage each element of A exactly once
// over all K splits, so they also reduce sum(g) (grad-bias) and sum(g*h)
// (saliency) per (sample, active output) while staging: the Taylor saliency
// costs one extra load of h per element of g, in the pass that reads g anyway.
template <typename T_, typename Tile_>
struct WgradPolicy {
  using T = T_;
  using Acc = acc_t<T>;
  using Tile = Tile_;
  using Params = WgradParams<T>;
  static constexpr bool kBKFast = true;
  static constexpr int kA = Tile::kAPerThread, kB = Tile::kBPerThread;

  Params p;
  int group, m0, n0, k_begin, k_end, mg, ng, obase, ibase, kk;
  bool mma, reduce;
  // B columns of this thread (one (ci, kh, kw) each), fixed for the K loop.
  bool col_ok[kB];
  int64_t col_cioff[kB];
  int col_dh[kB], col_dw[kB];
  // Decode of this thread's K lane (one pixel per K tile), shared by A and B.
  int cur_k = -1, k_nb = 0, k_pix = 0, k_ih0 = 0, k_iw0 = 0;
  // Running reductions per staged A row, flushed when the sample changes.
  int red_n[kA];
  Acc red_g[kA], red_gh[kA];

  __device__ __forceinline__ explicit WgradPolicy(const Params& prm) : p(prm) {
    const ConvGeom& g = p.g;
    const int z = static_cast<int>(blockIdx.z);
    group = z / p.splits;
    const int split = z - group * p.splits;
    const int npix = g.N * g.Ho * g.Wo;
    k_begin = split * p.k_per_split;
    k_end = k_begin + p.k_per_split < npix ? k_begin + p.k_per_split : npix;
    m0 = static_cast<int>(blockIdx.y) * Tile::BM;
    n0 = static_cast<int>(blockIdx.x) * Tile::BN;
    obase = g.out_off[group];
    mg = g.out_off[group + 1] - obase;
    ibase = g.in_off[group];
    kk = g.kH * g.kW;
    ng = (g.in_off[group + 1] - ibase) * kk;
    mma = p.gw != nullptr && n0 < ng;
    reduce = blockIdx.x == 0 && (p.ws_gb != nullptr || p.ws_gh != nullptr);
    const int tid = static_cast<int>(threadIdx.x);
#pragma unroll
    for (int e = 0; e < kB; ++e) {
      const int n = n0 + Tile::template b_n<kBKFast>(tid, e);
      col_ok[e] = n < ng;
      const int a = col_ok[e] ? n / kk : 0, r = n - a * kk;
      const int kh = r / g.kW, kw = r - kh * g.kW;
      col_cioff[e] = col_ok[e] ? static_cast<int64_t>(input_plane(g, ibase + a)) * g.H * g.W : 0;
      col_dh[e] = kh * g.dh;
      col_dw[e] = kw * g.dw;
    }
#pragma unroll
    for (int e = 0; e < kA; ++e) {
      red_n[e] = -1;
      red_g[e] = Acc(0);
      red_gh[e] = Acc(0);
    }
  }
  __device__ __forceinline__ bool active() const {
    return m0 < mg && k_begin < k_end && (mma || reduce);
  }

  __device__ __forceinline__ void decode_k(int k) {
    if (k == cur_k) return;
    cur_k = k;
    const int hw = p.g.Ho * p.g.Wo;
    k_nb = k / hw;
    k_pix = k - k_nb * hw;
    const int oh = k_pix / p.g.Wo, ow = k_pix - oh * p.g.Wo;
    k_ih0 = oh * p.g.sh - p.g.ph;
    k_iw0 = ow * p.g.sw - p.g.pw;
  }

  __device__ __forceinline__ void flush(int e) {
    if (red_n[e] < 0) return;
    const int slot = obase + m0 + Tile::a_m(static_cast<int>(threadIdx.x), e);
    if (p.ws_gb != nullptr) atomicAdd(p.ws_gb + slot, red_g[e]);
    if (p.ws_gh != nullptr)
      atomicAdd(p.ws_gh + static_cast<int64_t>(red_n[e]) * p.ko_total + slot, red_gh[e]);
    red_g[e] = Acc(0);
    red_gh[e] = Acc(0);
  }

  __device__ __forceinline__ Acc load_a(int m, int k, int e) {
    if (m0 + m >= mg || k >= k_end) return Acc(0);
    decode_k(k);
    const ConvGeom& g = p.g;
    const int co = output_plane(g, obase + m0 + m);
    const int64_t off = (static_cast<int64_t>(k_nb) * g.Cout + co) * g.Ho * g.Wo + k_pix;
    const Acc v = to_acc(p.gy[off]);
    if (reduce) {
      if (red_n[e] != k_nb) {
        flush(e);
        red_n[e] = k_nb;
      }
      red_g[e] += v;
      if (p.h != nullptr) red_gh[e] = madd(v, to_acc(p.h[off]), red_gh[e]);
    }
    return v;
  }

  __device__ __forceinline__ Acc load_b(int k, int, int e) {
    if (!col_ok[e] || k >= k_end) return Acc(0);
    decode_k(k);
    const ConvGeom& g = p.g;
    const int ih = k_ih0 + col_dh[e], iw = k_iw0 + col_dw[e];
    if (static_cast<unsigned>(ih) >= static_cast<unsigned>(g.H) ||
        static_cast<unsigned>(iw) >= static_cast<unsigned>(g.W))
      return Acc(0);
    return to_acc(p.x[static_cast<int64_t>(k_nb) * g.Cin * g.H * g.W + col_cioff[e] +
                      static_cast<int64_t>(ih) * g.W + iw]);
  }

  __device__ __forceinline__ void finish() {
    if (!reduce) return;
#pragma unroll
    for (int e = 0; e < kA; ++e) flush(e);
  }

  __device__ __forceinline__ void store(int m, int n, Acc v) {
    if (m0 + m >= mg || n0 + n >= ng) return;
    const ConvGeom& g = p.g;
    const int co = g.out_list[obase + m0 + m];
    const int a = (n0 + n) / kk, r = n0 + n - a * kk;
    const int ci = g.in_list[ibase + a];
    // Split-K partial sums meet here; with one split this is a plain add to zero.
    atomicAdd(p.gw + (static_cast<int64_t>(co) * g.cin_g + (ci - group * g.cin_g)) * kk + r, v);
  }
};

// ---------------------------------------------------------------- helpers

// Zeroes the planes [n, c] of an [N, C, plane] tensor whose channel is not
// active. One block per plane; blocks of active planes exit at once.
template <typename T>
__global__ void zero_inactive_planes_kernel(T* out, const uint8_t* active, int C, int64_t plane) {
  const int64_t pl = blockIdx.x;
  if (active[pl % C]) return;
  const T zero = from_acc<T>(acc_t<T>(0));
  T* dst = out + pl * plane;
  for (int64_t i = threadIdx.x; i < plane; i += blockDim.x) dst[i] = zero;
}

// grad_bias[c] = sum_n sum_m g; saliency[c] = mean_n |(1/M) sum_m g*h| for the
// active outputs c = out_list[slot]; the outputs are zero-initialized.
template <typename T>
__global__ void finalize_reductions_kernel(const acc_t<T>* ws_gb, const acc_t<T>* ws_gh,
                                           const int* out_list, int ko, int n_samples,
                                           acc_t<T> inv_m, T* grad_bias, T* saliency) {
  using Acc = acc_t<T>;
  const int s = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (s >= ko) return;
  const int c = out_list[s];
  if (grad_bias != nullptr) grad_bias[c] = from_acc<T>(ws_gb[s]);
  if (saliency != nullptr) {
    Acc total = Acc(0);
    for (int n = 0; n < n_samples; ++n)
      total += absval(ws_gh[static_cast<int64_t>(n) * ko + s] * inv_m);
    saliency[c] = from_acc<T>(total / static_cast<Acc>(n_samples));
  }
}

}  // namespace DCE_KERNEL_NS
}  // namespace dce::kernels

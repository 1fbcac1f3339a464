#include "channel_planes.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/irange.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace dce::cpu {
namespace {

// Planes per parallel task: enough bytes per task that scheduling is noise.
int64_t plane_grain(int64_t plane_elems) {
  constexpr int64_t kBytesPerTask = 1 << 16;
  return std::max<int64_t>(1, kBytesPerTask / std::max<int64_t>(1, plane_elems * 4));
}

int64_t plane_size(const at::Tensor& t) {
  int64_t p = 1;
  for (int64_t d = 2; d < t.dim(); ++d) p *= t.size(d);
  return p;
}

// slot[c] = k if idx[k] == c, else -1.
std::vector<int64_t> inverse_index(const at::Tensor& idx, int64_t num_channels) {
  std::vector<int64_t> slot(num_channels, -1);
  const int64_t* p = idx.const_data_ptr<int64_t>();
  for (const auto k : c10::irange(idx.numel())) slot[p[k]] = k;
  return slot;
}

}  // namespace

at::Tensor gather_channels(const at::Tensor& src, const at::Tensor& idx) {
  RECORD_FUNCTION("dce::cpu::gather_channels", c10::ArrayRef<const c10::IValue>{});
  const int64_t N = src.size(0), C = src.size(1), K = idx.numel(), P = plane_size(src);
  auto sizes = src.sizes().vec();
  sizes[1] = K;
  at::Tensor dst = at::empty(sizes, src.options());
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const size_t bytes = P * src.element_size();
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, N * K, plane_grain(P), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / K, k = i % K;
      std::memcpy(d + i * bytes, s + (n * C + ip[k]) * bytes, bytes);
    }
  });
  return dst;
}

at::Tensor scatter_channels(const at::Tensor& src, const at::Tensor& idx, int64_t num_channels) {
  RECORD_FUNCTION("dce::cpu::scatter_channels", c10::ArrayRef<const c10::IValue>{});
  const int64_t N = src.size(0), K = src.size(1), C = num_channels, P = plane_size(src);
  auto sizes = src.sizes().vec();
  sizes[1] = C;
  at::Tensor dst = at::empty(sizes, src.options());
  const auto slot = inverse_index(idx, C);
  const size_t bytes = P * src.element_size();
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, N * C, plane_grain(P), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / C, k = slot[i % C];
      if (k >= 0) {
        std::memcpy(d + i * bytes, s + (n * K + k) * bytes, bytes);
      } else {
        std::memset(d + i * bytes, 0, bytes);
      }
    }
  });
  return dst;
}

at::Tensor mask_channels(const at::Tensor& src, const at::Tensor& idx) {
  RECORD_FUNCTION("dce::cpu::mask_channels", c10::ArrayRef<const c10::IValue>{});
  const int64_t N = src.size(0), C = src.size(1), P = plane_size(src);
  at::Tensor dst = at::empty_like(src, at::MemoryFormat::Contiguous);
  const auto slot = inverse_index(idx, C);
  const size_t bytes = P * src.element_size();
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, N * C, plane_grain(P), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (slot[i % C] >= 0) {
        std::memcpy(d + i * bytes, s + i * bytes, bytes);
      } else {
        std::memset(d + i * bytes, 0, bytes);
      }
    }
  });
  return dst;
}

at::Tensor gather_weight(const at::Tensor& weight, const at::Tensor& out_idx,
                         const at::Tensor& in_idx) {
  RECORD_FUNCTION("dce::cpu::gather_weight", c10::ArrayRef<const c10::IValue>{});
  const int64_t Cin = weight.size(1), K = out_idx.numel(), J = in_idx.numel();
  const int64_t P = weight.size(2) * weight.size(3);
  at::Tensor dst = at::empty({K, J, weight.size(2), weight.size(3)}, weight.options());
  const int64_t* oi = out_idx.const_data_ptr<int64_t>();
  const int64_t* ii = in_idx.const_data_ptr<int64_t>();
  const size_t bytes = P * weight.element_size();
  const char* s = static_cast<const char*>(weight.const_data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, K, plane_grain(P * J), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      for (int64_t j = 0; j < J; ++j)
        std::memcpy(d + (k * J + j) * bytes, s + (oi[k] * Cin + ii[j]) * bytes, bytes);
  });
  return dst;
}

at::Tensor scatter_weight(const at::Tensor& compact, const at::Tensor& out_idx,
                          const at::Tensor& in_idx, int64_t out_channels, int64_t in_channels) {
  RECORD_FUNCTION("dce::cpu::scatter_weight", c10::ArrayRef<const c10::IValue>{});
  // Each row is zeroed with one memset (fast, streaming) and then only the
  // active runs are copied in; per-run memsets cost more than they save.
  const int64_t J = in_idx.numel(), P = compact.size(2) * compact.size(3);
  at::Tensor dst = at::empty({out_channels, in_channels, compact.size(2), compact.size(3)},
                             compact.options());
  const auto out_slot = inverse_index(out_idx, out_channels);
  const int64_t* ii = in_idx.const_data_ptr<int64_t>();
  const size_t bytes = P * compact.element_size();
  const char* s = static_cast<const char*>(compact.const_data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, out_channels, plane_grain(P * in_channels), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      char* row = d + o * in_channels * bytes;
      std::memset(row, 0, in_channels * bytes);
      const int64_t k = out_slot[o];
      if (k < 0) continue;
      const char* src_row = s + k * J * bytes;
      for (int64_t j = 0; j < J; ++j) std::memcpy(row + ii[j] * bytes, src_row + j * bytes, bytes);
    }
  });
  return dst;
}

namespace {

// Sum of v and of v*h over one plane, copying v to dst when dst is non-null.
// Eight independent partial sums let the compiler vectorize without -ffast-math.
template <typename scalar_t, bool kCopy, bool kWithH>
void reduce_plane(const scalar_t* __restrict__ g, const scalar_t* __restrict__ h,
                  scalar_t* __restrict__ dst, int64_t n, double& sum_g, double& sum_gh) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kLanes = 8;
  acc_t sg[kLanes] = {}, sgh[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(g[i + l]);
      if constexpr (kCopy) dst[i + l] = g[i + l];
      sg[l] += v;
      if constexpr (kWithH) sgh[l] += v * static_cast<acc_t>(h[i + l]);
    }
  }
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(g[i]);
    if constexpr (kCopy) dst[i] = g[i];
    sg[0] += v;
    if constexpr (kWithH) sgh[0] += v * static_cast<acc_t>(h[i]);
  }
  double a = 0, b = 0;
  for (int l = 0; l < kLanes; ++l) {
    a += sg[l];
    b += sgh[l];
  }
  sum_g = a;
  sum_gh = b;
}

template <typename scalar_t, bool kCopy, bool kWithH>
void grad_output_planes(const scalar_t* g, const scalar_t* h, scalar_t* compact,
                        const int64_t* idx, bool packed, int64_t N, int64_t C, int64_t K,
                        int64_t P, double* sum_g, double* sum_gh) {
  at::parallel_for(0, N * K, plane_grain(P), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t src = packed ? i * P : (i / K * C + idx[i % K]) * P;
      reduce_plane<scalar_t, kCopy, kWithH>(g + src, kWithH ? h + src : nullptr,
                                            kCopy ? compact + i * P : nullptr, P, sum_g[i],
                                            sum_gh[i]);
    }
  });
}

}  // namespace

GradOutputPass grad_output_pass(const at::Tensor& grad_output, const at::Tensor& output,
                                const at::Tensor& out_idx, int64_t num_channels, bool packed,
                                bool want_compact, bool want_grad_bias) {
  RECORD_FUNCTION("dce::cpu::grad_output_pass", c10::ArrayRef<const c10::IValue>{});
  TORCH_INTERNAL_ASSERT(!(packed && want_compact), "a packed grad_output is already compact");
  const int64_t N = grad_output.size(0), C = grad_output.size(1), K = out_idx.numel();
  const int64_t P = plane_size(grad_output);
  const bool with_h = output.defined();
  GradOutputPass result;
  if (!want_compact && !want_grad_bias && !with_h) return result;

  if (want_compact) {
    auto sizes = grad_output.sizes().vec();
    sizes[1] = K;
    result.compact = at::empty(sizes, grad_output.options());
  }
  std::vector<double> sum_g(N * K), sum_gh(N * K);
  const int64_t* idx = out_idx.const_data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_output.scalar_type(), "dce_grad_output_pass", [&] {
        const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
        const scalar_t* h = with_h ? output.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* dst = want_compact ? result.compact.data_ptr<scalar_t>() : nullptr;
        auto run = [&](auto copy, auto with_h_tag) {
          grad_output_planes<scalar_t, decltype(copy)::value, decltype(with_h_tag)::value>(
              g, h, dst, idx, packed, N, C, K, P, sum_g.data(), sum_gh.data());
        };
        using T = std::true_type;
        using F = std::false_type;
        if (want_compact && with_h) run(T{}, T{});
        else if (want_compact) run(T{}, F{});
        else if (with_h) run(F{}, T{});
        else run(F{}, F{});
      });

  // Reduce over the batch in a fixed order so results are deterministic.
  auto opts = grad_output.options();
  if (want_grad_bias) {
    std::vector<double> gb(num_channels, 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) gb[idx[k]] += sum_g[n * K + k];
    result.grad_bias = at::tensor(gb, opts.dtype(at::kDouble)).to(opts.dtype());
  }
  if (with_h) {
    std::vector<double> sal(num_channels, 0.0);
    const double inv_p = 1.0 / static_cast<double>(P), inv_n = 1.0 / static_cast<double>(N);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) sal[idx[k]] += std::abs(sum_gh[n * K + k] * inv_p) * inv_n;
    result.saliency = at::tensor(sal, opts.dtype(at::kDouble)).to(opts.dtype());
  }
  return result;
}

}  // namespace dce::cpu

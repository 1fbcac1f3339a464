// Host side of the channel-sparse convolution kernels, shared verbatim by the
// CUDA backend (csrc/cuda, compiled by nvcc) and the emulated backend
// (csrc/emu, compiled by g++): argument checks, index-list plans, output
// allocation, dtype dispatch, grid and split-K arithmetic. Only DCE_LAUNCH and
// the stream differ, so the emulated tests exercise the real launch math.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>
#include <climits>
#include <tuple>
#include <type_traits>

#if defined(__CUDACC__)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../common/conv_args.h"
#include "../op_schemas.h"
#include "conv_kernels.cuh"

namespace dce::kernels {
inline namespace DCE_KERNEL_NS {

// Production tile: 64x64 outputs per block, K step 16, 4x4 per thread, 256 threads.
using ConvTile = Tile<64, 64, 16, 4, 4>;
constexpr int kHelperThreads = 128;

template <typename scalar_t>
struct DeviceType {
  using type = scalar_t;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

#if defined(__CUDACC__)
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline int multiprocessor_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}
constexpr c10::DeviceType kBackendDevice = c10::DeviceType::CUDA;
#else
inline int current_stream() { return 0; }
// The emulator plans launches as for an H100 SXM (132 SMs), so split-K and
// grid shapes in the emulated tests are those a real H100 would get.
inline int multiprocessor_count() { return 132; }
constexpr c10::DeviceType kBackendDevice = c10::DeviceType::CPU;
#endif

// Active channels of one side, sorted and partitioned by group.
struct ListPlan {
  at::Tensor list;     // int32 [count], ascending
  at::Tensor offsets;  // int32 [groups + 1]: group g owns list[offsets[g] .. offsets[g+1])
  at::Tensor active;   // uint8 [C]: 1 for active channels
  int64_t count = 0;
  int64_t max_per_group = 0;  // upper bound on any group's count (no device sync)
  bool is_all = false;
};

inline ListPlan make_plan(const ChannelIndex& ci, int64_t channels, int64_t groups) {
  ListPlan plan;
  const at::Tensor sorted = std::get<0>(ci.idx.sort());
  const at::Tensor bounds = at::arange(groups + 1, ci.idx.options()) * (channels / groups);
  plan.offsets = at::searchsorted(sorted, bounds).to(at::kInt).contiguous();
  plan.list = sorted.to(at::kInt).contiguous();
  plan.active = at::zeros({channels}, ci.idx.options().dtype(at::kByte)).index_fill_(0, ci.idx, 1);
  plan.count = ci.count;
  plan.max_per_group = std::min<int64_t>(ci.count, channels / groups);
  plan.is_all = ci.is_all;
  return plan;
}

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

inline void check_int_range(int64_t v, const char* what, const char* op) {
  TORCH_CHECK(v < INT_MAX, op, ": ", what, " = ", v,
              " exceeds the 32-bit index range of the kernels");
}

inline void check_device(const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.device().type() == kBackendDevice, op, ": ", what, " must be a ",
              c10::DeviceTypeName(kBackendDevice, /*lower_case=*/true), " tensor, got ",
              t.device());
}

// Cout is the channel count of the output activation: the layer's, or the
// active count when the output is packed (x.size(1) already is the input's).
inline ConvGeom make_geom(const at::Tensor& x, const at::Tensor& w, int64_t Cout, int64_t Ho,
                          int64_t Wo, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups, const ListPlan& in,
                          const ListPlan& out, bool packed_input, bool packed_output,
                          const char* op) {
  check_int_range(x.size(0) * std::max(x.size(2) * x.size(3), Ho * Wo), "N*H*W", op);
  check_int_range(x.size(1) * w.size(2) * w.size(3), "C_in*kH*kW", op);
  ConvGeom g{};
  g.N = static_cast<int>(x.size(0));
  g.Cin = static_cast<int>(x.size(1));
  g.H = static_cast<int>(x.size(2));
  g.W = static_cast<int>(x.size(3));
  g.Cout = static_cast<int>(Cout);
  g.Ho = static_cast<int>(Ho);
  g.Wo = static_cast<int>(Wo);
  g.kH = static_cast<int>(w.size(2));
  g.kW = static_cast<int>(w.size(3));
  g.sh = static_cast<int>(stride[0]);
  g.sw = static_cast<int>(stride[1]);
  g.ph = static_cast<int>(padding[0]);
  g.pw = static_cast<int>(padding[1]);
  g.dh = static_cast<int>(dilation[0]);
  g.dw = static_cast<int>(dilation[1]);
  g.cin_g = static_cast<int>(w.size(1));
  g.cout_g = static_cast<int>(w.size(0) / groups);
  g.in_list = in.list.const_data_ptr<int>();
  g.in_off = in.offsets.const_data_ptr<int>();
  g.out_list = out.list.const_data_ptr<int>();
  g.out_off = out.offsets.const_data_ptr<int>();
  g.in_packed = packed_input ? 1 : 0;
  g.out_packed = packed_output ? 1 : 0;
  return g;
}

inline dim3 gemm_grid(int64_t n, int64_t m_bound, int64_t z, const char* op) {
  const unsigned gy = ceil_div(m_bound, ConvTile::BM);
  TORCH_CHECK(gy <= 65535 && z <= 65535, op, ": too many channels or groups for one launch");
  return dim3(std::max(1u, ceil_div(n, ConvTile::BN)), gy, static_cast<unsigned>(z));
}

template <typename T>
void zero_inactive(T* data, const ListPlan& plan, int64_t n, int64_t plane) {
  if (plan.is_all || n * plan.active.size(0) == 0 || plane == 0) return;
  check_int_range(n * plan.active.size(0), "N*C", "zero_inactive_planes");
  DCE_LAUNCH(zero_inactive_planes_kernel<T>, dim3(static_cast<unsigned>(n * plan.active.size(0))),
             dim3(kHelperThreads), 0, current_stream(), data,
             plan.active.const_data_ptr<uint8_t>(), static_cast<int>(plan.active.size(0)), plane);
}

inline at::Tensor channel_sparse_conv2d(const at::Tensor& input, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const at::Tensor& in_idx, const at::Tensor& out_idx,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, int64_t groups,
                                        const c10::optional<at::Tensor>& saliency_probe,
                                        bool packed_input, bool packed_output,
                                        const c10::optional<at::Tensor>& compact_weight) {
  constexpr const char* op = "channel_sparse_conv2d";
  check_conv_args(input, weight, bias, stride, padding, dilation, groups, op);
  check_device(input, "input", op);
  check_saliency_probe(saliency_probe, weight.size(0), op);
#if defined(__CUDACC__)
  const c10::cuda::CUDAGuard guard(input.device());
#endif
  const auto indices = check_channel_indices(input, weight, groups, in_idx, out_idx,
                                             packed_input, packed_output, op);
  // These kernels read the weight through the index lists; a caller's compact
  // copy is checked, as every backend does, and not needed.
  check_compact_weight(compact_weight, weight, groups, indices, op);
  const auto in = make_plan(indices.in, weight.size(1) * groups, groups);
  const auto out = make_plan(indices.out, weight.size(0), groups);
  const int64_t Cy = output_channels(weight, indices.out, packed_output);
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const auto [Ho, Wo] = conv_output_size(x, w, stride, padding, dilation);
  at::Tensor y = at::empty({x.size(0), Cy, Ho, Wo}, x.options());
  if (y.numel() == 0) return y;
  const ConvGeom geom = make_geom(x, w, Cy, Ho, Wo, stride, padding, dilation, groups, in, out,
                                  packed_input, packed_output, op);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dce_fwd", [&] {
    using T = typename DeviceType<scalar_t>::type;
    using Policy = FwdPolicy<T, ConvTile>;
    FwdParams<T> prm{geom, reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>()),
                     reinterpret_cast<const T*>(w.const_data_ptr<scalar_t>()),
                     has_bias ? reinterpret_cast<const T*>(b.const_data_ptr<scalar_t>()) : nullptr,
                     reinterpret_cast<T*>(y.data_ptr<scalar_t>())};
    const dim3 grid = gemm_grid(x.size(0) * Ho * Wo, out.max_per_group, groups, op);
    DCE_LAUNCH(igemm_kernel<Policy>, grid, dim3(ConvTile::kThreads),
               ConvTile::smem_bytes<acc_t<T>>(), current_stream(), prm);
    if (!packed_output) {
      zero_inactive(reinterpret_cast<T*>(y.data_ptr<scalar_t>()), out, x.size(0), Ho * Wo);
    }
  });
  return y;
}

// Split-K factor of the weight gradient: enough blocks for two waves on the
// device when the output tile grid is small, but at least 8 K steps per split.
inline int wgrad_splits(int64_t blocks, int64_t npix, int64_t groups) {
  const int64_t ksteps = (npix + ConvTile::BK - 1) / ConvTile::BK;
  const int64_t target = 2 * static_cast<int64_t>(multiprocessor_count());
  int64_t splits = std::max<int64_t>(1, (target + blocks - 1) / blocks);
  splits = std::min(splits, std::max<int64_t>(1, ksteps / 8));
  splits = std::min(splits, std::max<int64_t>(1, 65535 / groups));
  return static_cast<int>(splits);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_sparse_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& output, const at::Tensor& in_idx, const at::Tensor& out_idx,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, bool packed_input, bool packed_output,
    bool compact_grad_weight, const c10::optional<at::Tensor>& compact_weight) {
  constexpr const char* op = "channel_sparse_conv2d_backward";
  check_device(input, "input", op);
  const BackwardArgs args =
      check_backward_args(grad_output, input, weight, output, in_idx, out_idx, stride, padding,
                          dilation, groups, packed_input, packed_output,
                          compact_grad_weight, op);
  const auto& indices = args.indices;
  check_compact_weight(compact_weight, weight, groups, indices, op);
  const int64_t Cy = args.out_channels;
  const auto [Ho, Wo] = args.out_size;
  const bool with_saliency = args.with_saliency;
#if defined(__CUDACC__)
  const c10::cuda::CUDAGuard guard(input.device());
#endif
  const auto in = make_plan(indices.in, weight.size(1) * groups, groups);
  const auto out = make_plan(indices.out, weight.size(0), groups);
  const auto [want_gi, want_gw, want_gb] = output_mask;
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor h = with_saliency ? output->contiguous() : at::Tensor();
  const ConvGeom geom = make_geom(x, w, Cy, Ho, Wo, stride, padding, dilation, groups, in, out,
                                  packed_input, packed_output, op);
  const int64_t N = x.size(0), Cout = w.size(0);
  const at::ScalarType acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = x.options().dtype(acc_dtype);

  at::Tensor grad_input, grad_weight, grad_bias, saliency;
  if (want_gi) grad_input = at::empty_like(x);
  at::Tensor gw_acc = want_gw ? at::zeros(w.sizes(), acc_opts) : at::Tensor();
  at::Tensor ws_gb = want_gb ? at::zeros({out.count}, acc_opts) : at::Tensor();
  at::Tensor ws_gh = with_saliency ? at::zeros({N, out.count}, acc_opts) : at::Tensor();
  if (want_gb) grad_bias = at::zeros({Cout}, x.options());
  if (with_saliency) saliency = at::zeros({Cout}, x.options());
  const int64_t npix = N * Ho * Wo;
  const bool empty = npix == 0 || x.numel() == 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dce_bwd", [&] {
    using T = typename DeviceType<scalar_t>::type;
    using Acc = acc_t<T>;
    const T* gp = reinterpret_cast<const T*>(g.const_data_ptr<scalar_t>());
    if (want_gi && !empty) {
      T* gx = reinterpret_cast<T*>(grad_input.data_ptr<scalar_t>());
      DgradParams<T> prm{geom, gp, reinterpret_cast<const T*>(w.const_data_ptr<scalar_t>()), gx};
      const dim3 grid = gemm_grid(N * x.size(2) * x.size(3), in.max_per_group, groups, op);
      using Policy = DgradPolicy<T, ConvTile>;
      DCE_LAUNCH(igemm_kernel<Policy>, grid, dim3(ConvTile::kThreads),
                 ConvTile::smem_bytes<Acc>(), current_stream(), prm);
      if (!packed_input) zero_inactive(gx, in, N, x.size(2) * x.size(3));
    } else if (want_gi) {
      grad_input.zero_();
    }
    if ((want_gw || want_gb || with_saliency) && !empty) {
      WgradParams<T> prm{};
      prm.g = geom;
      prm.gy = gp;
      prm.x = reinterpret_cast<const T*>(x.const_data_ptr<scalar_t>());
      prm.h = with_saliency ? reinterpret_cast<const T*>(h.const_data_ptr<scalar_t>()) : nullptr;
      prm.gw = want_gw ? gw_acc.data_ptr<Acc>() : nullptr;
      prm.ws_gb = want_gb ? ws_gb.data_ptr<Acc>() : nullptr;
      prm.ws_gh = with_saliency ? ws_gh.data_ptr<Acc>() : nullptr;
      prm.ko_total = static_cast<int>(out.count);
      // Without a weight gradient only the first grid column (the reducing one) runs.
      const int64_t ncols = want_gw ? in.max_per_group * w.size(2) * w.size(3) : 1;
      dim3 grid = gemm_grid(ncols, out.max_per_group, groups, op);
      prm.splits = wgrad_splits(int64_t{grid.x} * grid.y * groups, npix, groups);
      const int64_t ksteps = (npix + ConvTile::BK - 1) / ConvTile::BK;
      prm.k_per_split = static_cast<int>((ksteps + prm.splits - 1) / prm.splits) * ConvTile::BK;
      prm.splits = static_cast<int>((npix + prm.k_per_split - 1) / prm.k_per_split);
      grid.z = static_cast<unsigned>(groups * prm.splits);
      using Policy = WgradPolicy<T, ConvTile>;
      DCE_LAUNCH(igemm_kernel<Policy>, grid, dim3(ConvTile::kThreads),
                 ConvTile::smem_bytes<Acc>(), current_stream(), prm);
      if (want_gb || with_saliency) {
        DCE_LAUNCH(finalize_reductions_kernel<T>, dim3(ceil_div(out.count, kHelperThreads)),
                   dim3(kHelperThreads), 0, current_stream(),
                   want_gb ? ws_gb.const_data_ptr<Acc>() : nullptr,
                   with_saliency ? ws_gh.const_data_ptr<Acc>() : nullptr,
                   out.list.const_data_ptr<int>(), static_cast<int>(out.count),
                   static_cast<int>(N), static_cast<Acc>(1.0 / static_cast<double>(Ho * Wo)),
                   want_gb ? reinterpret_cast<T*>(grad_bias.data_ptr<scalar_t>()) : nullptr,
                   with_saliency ? reinterpret_cast<T*>(saliency.data_ptr<scalar_t>()) : nullptr);
      }
    }
  });
  if (want_gw) grad_weight = gw_acc.scalar_type() == x.scalar_type() ? gw_acc : gw_acc.to(x.scalar_type());
  // These kernels accumulate the full shape; the compact block is cut from it.
  if (want_gw && compact_grad_weight) {
    if (!indices.out.is_all) grad_weight = grad_weight.index_select(0, indices.out.idx);
    if (groups == 1 && !indices.in.is_all) grad_weight = grad_weight.index_select(1, indices.in.idx);
    grad_weight = grad_weight.contiguous();
  }
  return {grad_input, grad_weight, grad_bias, saliency};
}

// The launchers have the schemas' types (a mismatch fails here, at compile
// time, rather than when a library registers them).
static_assert(std::is_same_v<decltype(channel_sparse_conv2d), schema::ChannelSparseConv2dFn>);
static_assert(
    std::is_same_v<decltype(channel_sparse_conv2d_backward), schema::ChannelSparseConv2dBackwardFn>);

}  // namespace DCE_KERNEL_NS
}  // namespace dce::kernels

// The Planes backend of the compact-convolution composition
// (common/compact_conv.h) made of the plane_kernels.cuh kernels: under nvcc
// the CUDA backend's default path (the composition with cuDNN), under g++ its
// emulated twin (the composition with the kernels on the emulator and
// at::convolution on CPU tensors). Index lists stay on the device: the slot
// maps of the scatters are built by a kernel, never read back.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <climits>

#include "../common/compact_conv.h"
#include "conv_host.h"
#include "plane_kernels.cuh"

namespace dce::kernels {
inline namespace DCE_KERNEL_NS {

struct KernelPlanes {
  static constexpr int kThreads = 256;

  static void check_device(const at::Tensor& t, const char* what, const char* op) {
    kernels::check_device(t, what, op);
  }

  // slot[c] = k (or c itself, with identity) for c = idx[k], -1 elsewhere: int64 [channels].
  static at::Tensor slot_map(const at::Tensor& idx, int64_t channels, bool identity) {
    check_int_range(channels, "channels", "slot_map");
    at::Tensor slot = at::empty({channels}, idx.options().dtype(at::kLong));
    DCE_LAUNCH(inverse_index_kernel, dim3(1), dim3(kThreads), 0, current_stream(),
               idx.const_data_ptr<int64_t>(), static_cast<int>(idx.numel()),
               slot.data_ptr<int64_t>(), static_cast<int>(channels), identity ? 1 : 0);
    return slot;
  }

  template <typename T, typename Index>
  static void launch_remap(dim3 grid, dim3 block, const T* src, T* dst, const int64_t* row_map,
                           const int64_t* col_map, int64_t dst_cols, int64_t src_cols,
                           int64_t plane, int64_t total) {
    // A name without template commas for DCE_LAUNCH (csrc/kernels/README.md, rule 3).
    constexpr auto remap_planes = &remap_planes_kernel<T, Index>;
    DCE_LAUNCH(remap_planes, grid, block, 0, current_stream(), src, dst, row_map, col_map,
               static_cast<Index>(dst_cols), static_cast<Index>(src_cols),
               static_cast<Index>(plane), static_cast<Index>(total));
  }

  // dst[r, c, p] = src[row_map(r), col_map[c], p] (remap_planes_kernel) for a
  // dst of [rows, dst_cols, <plane dims of src>].
  static at::Tensor remap(const at::Tensor& src, const at::Tensor& row_map,
                          const at::Tensor& col_map, int64_t rows, int64_t dst_cols) {
    auto sizes = src.sizes().vec();
    sizes[0] = rows;
    sizes[1] = dst_cols;
    at::Tensor dst = at::empty(sizes, src.options());
    const int64_t total = dst.numel();
    if (total == 0) return dst;
    const int64_t plane = total / (rows * dst_cols);
    const int64_t blocks =
        std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{8} * multiprocessor_count());
    const int64_t* rm = row_map.defined() ? row_map.const_data_ptr<int64_t>() : nullptr;
    const int64_t* cm = col_map.const_data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "dce_remap", [&] {
      using T = typename DeviceType<scalar_t>::type;
      const T* s = reinterpret_cast<const T*>(src.const_data_ptr<scalar_t>());
      T* d = reinterpret_cast<T*>(dst.data_ptr<scalar_t>());
      const dim3 grid(static_cast<unsigned>(blocks)), block(kThreads);
      // The int32 variant needs every index of dst and of src (and one grid stride past
      // the end) below INT_MAX.
      if (std::max(total, src.numel()) + blocks * kThreads < INT_MAX) {
        launch_remap<T, int>(grid, block, s, d, rm, cm, dst_cols, src.size(1), plane, total);
      } else {
        launch_remap<T, int64_t>(grid, block, s, d, rm, cm, dst_cols, src.size(1), plane, total);
      }
    });
    return dst;
  }

  static at::Tensor gather_channels(const at::Tensor& src, const at::Tensor& idx) {
    return remap(src, at::Tensor(), idx, src.size(0), idx.numel());
  }
  static at::Tensor scatter_channels(const at::Tensor& src, const at::Tensor& idx,
                                     int64_t num_channels) {
    return remap(src, at::Tensor(), slot_map(idx, num_channels, false), src.size(0),
                 num_channels);
  }
  static at::Tensor mask_channels(const at::Tensor& src, const at::Tensor& idx) {
    return remap(src, at::Tensor(), slot_map(idx, src.size(1), true), src.size(0), src.size(1));
  }
  static at::Tensor gather_weight(const at::Tensor& weight, const at::Tensor& out_idx,
                                  const at::Tensor& in_idx) {
    return remap(weight, out_idx, in_idx, out_idx.numel(), in_idx.numel());
  }
  static at::Tensor scatter_weight(const at::Tensor& compact, const at::Tensor& out_idx,
                                   const at::Tensor& in_idx, int64_t out_channels,
                                   int64_t in_channels) {
    return remap(compact, slot_map(out_idx, out_channels, false),
                 slot_map(in_idx, in_channels, false), out_channels, in_channels);
  }

  static GradOutputPass grad_output_pass(const at::Tensor& grad_output, const at::Tensor& output,
                                         const at::Tensor& out_idx, int64_t num_channels,
                                         bool packed, bool want_compact, bool want_grad_bias) {
    TORCH_INTERNAL_ASSERT(!(packed && want_compact), "a packed grad_output is already compact");
    const bool with_h = output.defined();
    GradOutputPass result;
    if (!want_compact && !want_grad_bias && !with_h) return result;
    const int64_t N = grad_output.size(0), C = grad_output.size(1), K = out_idx.numel();
    const int64_t plane = grad_output.size(2) * grad_output.size(3);
    const auto opts = grad_output.options();
    if (want_compact) result.compact = at::empty({N, K, grad_output.size(2), grad_output.size(3)}, opts);
    if (want_grad_bias) result.grad_bias = at::zeros({num_channels}, opts);
    if (with_h) result.saliency = at::zeros({num_channels}, opts);
    if (N * K == 0 || (plane == 0 && !want_grad_bias && !with_h)) return result;
    check_int_range(N, "N", "grad_output_pass");
    check_int_range(K, "active output channels", "grad_output_pass");
    const at::ScalarType acc_dtype =
        grad_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor sum_g = at::empty({N * K}, opts.dtype(acc_dtype));
    at::Tensor sum_gh = with_h ? at::empty({N * K}, opts.dtype(acc_dtype)) : at::Tensor();
    constexpr int kPlanesPerBlock = kThreads / kWarpSize;
    const int64_t blocks = (N * K + kPlanesPerBlock - 1) / kPlanesPerBlock;
    TORCH_CHECK(blocks < INT_MAX, "grad_output_pass: too many planes for one launch");

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                    "dce_grad_output_pass", [&] {
      using T = typename DeviceType<scalar_t>::type;
      using Acc = acc_t<T>;
      const T* g = reinterpret_cast<const T*>(grad_output.const_data_ptr<scalar_t>());
      const T* h = with_h ? reinterpret_cast<const T*>(output.const_data_ptr<scalar_t>()) : nullptr;
      T* compact = want_compact ? reinterpret_cast<T*>(result.compact.data_ptr<scalar_t>()) : nullptr;
      Acc* sg = sum_g.data_ptr<Acc>();
      Acc* sgh = with_h ? sum_gh.data_ptr<Acc>() : nullptr;
      const int64_t* idx = out_idx.const_data_ptr<int64_t>();
      DCE_LAUNCH(grad_output_planes_kernel<T>, dim3(static_cast<unsigned>(blocks)),
                 dim3(kThreads), 0, current_stream(), g, h, compact, idx, packed ? 1 : 0, N * K,
                 K, C, plane, sg, sgh);
      if (want_grad_bias || with_h) {
        DCE_LAUNCH(finalize_plane_sums_kernel<T>, dim3(ceil_div(K, kThreads)), dim3(kThreads), 0,
                   current_stream(), sg, sgh, idx, static_cast<int>(N), static_cast<int>(K),
                   static_cast<Acc>(1.0 / static_cast<double>(plane)),
                   want_grad_bias ? reinterpret_cast<T*>(result.grad_bias.data_ptr<scalar_t>()) : nullptr,
                   with_h ? reinterpret_cast<T*>(result.saliency.data_ptr<scalar_t>()) : nullptr);
      }
    });
    return result;
  }
};

// The composition with these kernels, as the ops' kernels (the schemas' types).
inline at::Tensor compact_channel_sparse_conv2d(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& in_idx, const at::Tensor& out_idx, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const c10::optional<at::Tensor>& saliency_probe, bool packed_input, bool packed_output,
    const c10::optional<at::Tensor>& compact_weight) {
  return compact_conv_forward<KernelPlanes>(input, weight, bias, in_idx, out_idx, stride,
                                            padding, dilation, groups, saliency_probe,
                                            packed_input, packed_output, compact_weight);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
compact_channel_sparse_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& output, const at::Tensor& in_idx, const at::Tensor& out_idx,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, bool packed_input, bool packed_output,
    bool compact_grad_weight, const c10::optional<at::Tensor>& compact_weight) {
  return compact_conv_backward<KernelPlanes>(grad_output, input, weight, output, in_idx, out_idx,
                                             stride, padding, dilation, groups, output_mask,
                                             packed_input, packed_output, compact_grad_weight,
                                             compact_weight);
}

// The igemm implementation as the ops' kernels: its launchers (conv_host.h)
// pack only groups == 1, so a packed depthwise or grouped conv takes the composition.
inline at::Tensor igemm_channel_sparse_conv2d(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& in_idx, const at::Tensor& out_idx, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const c10::optional<at::Tensor>& saliency_probe, bool packed_input, bool packed_output,
    const c10::optional<at::Tensor>& compact_weight) {
  auto* impl = groups > 1 && (packed_input || packed_output) ? &compact_channel_sparse_conv2d
                                                             : &channel_sparse_conv2d;
  return impl(input, weight, bias, in_idx, out_idx, stride, padding, dilation, groups,
              saliency_probe, packed_input, packed_output, compact_weight);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
igemm_channel_sparse_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& output, const at::Tensor& in_idx, const at::Tensor& out_idx,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, bool packed_input, bool packed_output,
    bool compact_grad_weight, const c10::optional<at::Tensor>& compact_weight) {
  auto* impl = groups > 1 && (packed_input || packed_output)
                   ? &compact_channel_sparse_conv2d_backward
                   : &channel_sparse_conv2d_backward;
  return impl(grad_output, input, weight, output, in_idx, out_idx, stride, padding, dilation,
              groups, output_mask, packed_input, packed_output, compact_grad_weight,
              compact_weight);
}

static_assert(std::is_same_v<decltype(compact_channel_sparse_conv2d),
                             schema::ChannelSparseConv2dFn>);
static_assert(std::is_same_v<decltype(igemm_channel_sparse_conv2d),
                             schema::ChannelSparseConv2dFn>);
static_assert(std::is_same_v<decltype(igemm_channel_sparse_conv2d_backward),
                             schema::ChannelSparseConv2dBackwardFn>);
static_assert(std::is_same_v<decltype(compact_channel_sparse_conv2d_backward),
                             schema::ChannelSparseConv2dBackwardFn>);

}  // namespace DCE_KERNEL_NS
}  // namespace dce::kernels

// Memory passes over whole (sample, channel) planes of NCHW tensors: the
// gathers and scatters that surround the dense convolution on the CPU, and the
// single pass over grad_output that also reduces bias gradient and saliency.
#pragma once

#include <ATen/ATen.h>

#include "../common/compact_conv.h"

namespace dce::cpu {

// dst[n, k] = src[n, idx[k]] for a contiguous [N, C, H, W] src; dst is [N, K, H, W].
at::Tensor gather_channels(const at::Tensor& src, const at::Tensor& idx);

// dst[n, idx[k]] = src[n, k], every other plane of dst zero; dst is [N, C, H, W].
// Each plane of dst is written exactly once (copy or zero-fill).
at::Tensor scatter_channels(const at::Tensor& src, const at::Tensor& idx, int64_t num_channels);

// Copy of src with the planes of channels outside idx zeroed, in one pass.
at::Tensor mask_channels(const at::Tensor& src, const at::Tensor& idx);

// weight[out_idx][:, in_idx] for a [Cout, Cin, kH, kW] weight, and its inverse
// (zeros outside the selected rows and columns).
at::Tensor gather_weight(const at::Tensor& weight, const at::Tensor& out_idx,
                         const at::Tensor& in_idx);
at::Tensor scatter_weight(const at::Tensor& compact, const at::Tensor& out_idx,
                          const at::Tensor& in_idx, int64_t out_channels, int64_t in_channels);

// One pass over the active planes of grad_output (GradOutputPass: compact_conv.h).
GradOutputPass grad_output_pass(const at::Tensor& grad_output, const at::Tensor& output,
                                const at::Tensor& out_idx, int64_t num_channels, bool packed,
                                bool want_compact, bool want_grad_bias);

// The functions above as the Planes backend of compact_conv.h.
struct CpuPlanes {
  static void check_device(const at::Tensor& t, const char* what, const char* op) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor, got ", t.device());
  }
  static at::Tensor gather_channels(const at::Tensor& src, const at::Tensor& idx) {
    return cpu::gather_channels(src, idx);
  }
  static at::Tensor scatter_channels(const at::Tensor& src, const at::Tensor& idx, int64_t c) {
    return cpu::scatter_channels(src, idx, c);
  }
  static at::Tensor mask_channels(const at::Tensor& src, const at::Tensor& idx) {
    return cpu::mask_channels(src, idx);
  }
  static at::Tensor gather_weight(const at::Tensor& w, const at::Tensor& out_idx,
                                  const at::Tensor& in_idx) {
    return cpu::gather_weight(w, out_idx, in_idx);
  }
  static at::Tensor scatter_weight(const at::Tensor& compact, const at::Tensor& out_idx,
                                   const at::Tensor& in_idx, int64_t out_channels,
                                   int64_t in_channels) {
    return cpu::scatter_weight(compact, out_idx, in_idx, out_channels, in_channels);
  }
  static GradOutputPass grad_output_pass(const at::Tensor& g, const at::Tensor& h,
                                         const at::Tensor& out_idx, int64_t num_channels,
                                         bool packed, bool want_compact, bool want_grad_bias) {
    return cpu::grad_output_pass(g, h, out_idx, num_channels, packed, want_compact,
                                 want_grad_bias);
  }
};

}  // namespace dce::cpu

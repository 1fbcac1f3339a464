// Memory passes over whole (sample, channel) planes of NCHW tensors: the
// gathers and scatters that surround the dense convolution on the CPU, and the
// single pass over grad_output that also reduces bias gradient and saliency.
#pragma once

#include <ATen/ATen.h>

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

// One pass over the active planes of grad_output: g[n, out_idx[k]] of a
// full-width [N, C, H, W] grad_output, or g[n, k] of a packed [N, K, H, W] one.
//  - compact (if requested; full width only): the [N, K, H, W] gather of those planes;
//  - grad_bias (if requested): [num_channels] with sum over n and space of g, zero elsewhere;
//  - saliency (if output is defined): [num_channels] with mean_n |mean_space(g * h)|,
//    zero elsewhere, where h is output's plane at the same position as g's.
struct GradOutputPass {
  at::Tensor compact;
  at::Tensor grad_bias;
  at::Tensor saliency;
};
GradOutputPass grad_output_pass(const at::Tensor& grad_output, const at::Tensor& output,
                                const at::Tensor& out_idx, int64_t num_channels, bool packed,
                                bool want_compact, bool want_grad_bias);

}  // namespace dce::cpu

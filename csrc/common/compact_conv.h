// The compact-convolution composition of dce::channel_sparse_conv2d, shared by
// the CPU backend, the CUDA backend's default ("cudnn") path and its emulated
// twin: gather the active planes, run a dense convolution over the compact
// tensors with at::convolution / at::convolution_backward (oneDNN on CPU
// tensors, cuDNN on CUDA tensors), scatter the results, and in backward make
// one pass over grad_output that gathers it and reduces bias gradient and
// Taylor saliency at the same time. With packed layouts (op_schemas.h) the
// input is already compact and/or the output stays compact: those gathers and
// scatters are skipped, which leaves the narrow network's own work plus the
// fused grad_output pass. A depthwise conv with some outputs inactive runs as
// a narrower depthwise conv over its active planes (see depthwise_input_keep);
// a grouped conv whose lists hold equally many channels of every conv group
// (runs_narrow_grouped) as a narrower grouped conv (see grouped_columns); other
// groups > 1 take a masked dense path (correct, not faster than dense).
//
// The memory passes come from a `Planes` backend, a struct of static
// functions (the CPU loops in cpu/channel_planes.h; the kernels of
// kernels/planes_host.h, compiled by nvcc for the GPU and by g++ for the
// emulator), so that everything but the dense convolution itself is the same
// code on every backend and runs in the CPU and emulated tests:
//
//   check_device(t, what, op)                   the backend's own device check
//   gather_channels(src, idx)                   dst[n, k] = src[n, idx[k]]
//   scatter_channels(src, idx, C)               dst[n, idx[k]] = src[n, k], zeros elsewhere
//   mask_channels(src, idx)                     src with planes outside idx zeroed
//   gather_weight(w, out_idx, in_idx)           w[out_idx][:, in_idx]
//   scatter_weight(c, out_idx, in_idx, Co, Ci)  its inverse, zeros elsewhere
//   grad_output_pass(g, h, out_idx, C, packed, want_compact, want_grad_bias) -> GradOutputPass
//
// Index lists arrive checked (conv_args.h) and on the tensors' device; no
// function here reads them on the host, so the composition itself never
// synchronizes with a GPU.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <array>
#include <tuple>

#include "conv_args.h"

namespace dce {

// What Planes::grad_output_pass returns. One pass over the active planes of
// grad_output: g[n, out_idx[k]] of a full-width [N, C, H, W] grad_output, or
// g[n, k] of a packed [N, K, H, W] one.
//  - compact (if requested; full width only): the [N, K, H, W] gather of those planes;
//  - grad_bias (if requested): [C] with sum over n and space of g, zero elsewhere;
//  - saliency (if output is defined): [C] with mean_n |mean_space(g * h)|, zero
//    elsewhere, where h is output's plane at the same position as g's.
struct GradOutputPass {
  at::Tensor compact;
  at::Tensor grad_bias;
  at::Tensor saliency;
};

// For a depthwise conv over the active output planes: which of those planes'
// inputs are active, as a [1, K, 1, 1] 0/1 factor for the gathered input (an
// active output whose input is inactive sees a zero plane, as the masked dense
// conv would give it). None where every one is known active without reading a
// device list: all inputs active, or the input list is the output list (the
// same tensor, which a ChannelPlan hands a depthwise conv of one group; on the
// CPU also equal contents, which there cost no device sync). A packed input
// has the output list as its input list (check_channel_indices).
inline c10::optional<at::Tensor> depthwise_input_keep(const ChannelIndex& in,
                                                      const ChannelIndex& out, int64_t channels,
                                                      at::ScalarType dtype, bool packed_input) {
  if (in.is_all || packed_input) return c10::nullopt;
  if (in.count == out.count &&
      (in.idx.data_ptr() == out.idx.data_ptr() || (in.idx.is_cpu() && at::equal(in.idx, out.idx)))) {
    return c10::nullopt;
  }
  at::Tensor member = at::zeros({channels}, in.idx.options().dtype(dtype));
  member.index_fill_(0, in.idx, 1);
  return member.index_select(0, out.idx).view({1, out.count, 1, 1});
}

// For a grouped conv that runs narrow: [K_out, m_in], row k the positions within
// its conv group's weight columns (0 .. in_channels / groups) of the active
// inputs of that group, for the k-th active output. Both lists are ascending
// with equally many entries per conv group, so output k lies in conv group
// k / out.per_group, whose active inputs are row k / out.per_group of in_idx
// viewed as [groups, m_in].
inline at::Tensor grouped_columns(const ChannelIndex& in, const ChannelIndex& out,
                                  int64_t in_channels, int64_t groups) {
  const at::Tensor starts =
      at::arange(groups, in.idx.options()).mul_(in_channels / groups).unsqueeze(1);
  const at::Tensor local = in.idx.view({groups, in.per_group}) - starts;
  return local.repeat_interleave(out.per_group, 0);
}

// The narrow grouped conv's weight [K_out, m_in, kH, kW]: w[out_idx[k], columns[k]].
inline at::Tensor gather_grouped_weight(const at::Tensor& w, const ChannelIndex& in,
                                        const ChannelIndex& out, int64_t groups) {
  const at::Tensor rows = out.is_all ? w : w.index_select(0, out.idx);
  if (in.is_all) return rows;
  const at::Tensor cols = grouped_columns(in, out, w.size(1) * groups, groups);
  return rows.gather(1, cols.view({out.count, in.per_group, 1, 1})
                            .expand({out.count, in.per_group, w.size(2), w.size(3)}));
}

// Its inverse for the weight gradient: the compact gradient at those places,
// zeros elsewhere.
inline at::Tensor scatter_grouped_weight(const at::Tensor& grad_c, const at::Tensor& w,
                                         const ChannelIndex& in, const ChannelIndex& out,
                                         int64_t groups) {
  at::Tensor rows = grad_c;
  if (!in.is_all) {
    const at::Tensor cols = grouped_columns(in, out, w.size(1) * groups, groups);
    rows = at::zeros({out.count, w.size(1), w.size(2), w.size(3)}, w.options())
               .scatter_(1,
                         cols.view({out.count, in.per_group, 1, 1})
                             .expand({out.count, in.per_group, w.size(2), w.size(3)}),
                         grad_c);
  }
  return out.is_all ? rows : at::zeros_like(w).index_copy_(0, out.idx, rows);
}

// The weight of the compact conv (groups == 1 or a narrow grouped conv): w with
// every channel active, else the caller's copy (given, groups == 1 only), else
// w[out_idx][:, in_idx] or gather_grouped_weight.
template <typename Planes>
at::Tensor active_weight(const at::Tensor& w, const ChannelIndex& in, const ChannelIndex& out,
                         int64_t groups, const c10::optional<at::Tensor>& given) {
  if (in.is_all && out.is_all) return w;
  if (given) return *given;
  return groups == 1 ? Planes::gather_weight(w, out.idx, in.idx)
                     : gather_grouped_weight(w, in, out, groups);
}

// A depthwise conv's weight over its active planes: the caller's copy, else w[out_idx].
inline at::Tensor depthwise_weight(const at::Tensor& w, const ChannelIndex& out,
                                   const c10::optional<at::Tensor>& given) {
  return given ? *given : w.index_select(0, out.idx);
}

// The caller's compact weight (op_schemas.h), checked, contiguous; none if not given.
inline c10::optional<at::Tensor> given_weight(const c10::optional<at::Tensor>& compact_weight,
                                              const at::Tensor& weight, int64_t groups,
                                              const ChannelIndices& indices, const char* op) {
  check_compact_weight(compact_weight, weight, groups, indices, op);
  if (!compact_weight.has_value() || !compact_weight->defined()) return c10::nullopt;
  return compact_weight->contiguous();
}

// Its inverse for the weight gradient: the layer's full shape, zeros outside.
template <typename Planes>
at::Tensor full_weight_grad(const at::Tensor& grad_c, const at::Tensor& w, const ChannelIndex& in,
                            const ChannelIndex& out, int64_t groups) {
  if (in.is_all && out.is_all) return grad_c;
  return groups == 1 ? Planes::scatter_weight(grad_c, out.idx, in.idx, w.size(0), w.size(1))
                     : scatter_grouped_weight(grad_c, w, in, out, groups);
}

template <typename Planes>
at::Tensor compact_conv_forward(const at::Tensor& input, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, const at::Tensor& in_idx,
                                const at::Tensor& out_idx, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, const c10::optional<at::Tensor>& saliency_probe,
                                bool packed_input, bool packed_output,
                                const c10::optional<at::Tensor>& compact_weight) {
  constexpr const char* op = "channel_sparse_conv2d";
  check_conv_args(input, weight, bias, stride, padding, dilation, groups, op);
  Planes::check_device(input, "input", op);
  check_saliency_probe(saliency_probe, weight.size(0), op);
  const c10::DeviceGuard guard(input.device());
  const ChannelIndices indices = check_channel_indices(input, weight, groups, in_idx, out_idx,
                                                       packed_input, packed_output, op);
  const auto& [in, out] = indices;
  const auto given = given_weight(compact_weight, weight, groups, indices, op);
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  const c10::optional<at::Tensor> b =
      bias.has_value() && bias->defined() ? c10::optional<at::Tensor>(bias->contiguous())
                                          : c10::nullopt;

  if (is_depthwise(w, groups) && !out.is_all) {
    at::Tensor x_c = packed_input ? x : Planes::gather_channels(x, out.idx);
    const auto keep =
        depthwise_input_keep(in, out, weight.size(0), x.scalar_type(), packed_input);
    if (keep) x_c = x_c * *keep;
    c10::optional<at::Tensor> b_c = b;
    if (b.has_value()) b_c = b->index_select(0, out.idx);
    at::Tensor y_c = at::convolution(x_c, depthwise_weight(w, out, given), b_c, stride, padding,
                                     dilation, false, {0, 0}, out.count)
                         .contiguous();
    return packed_output ? y_c : Planes::scatter_channels(y_c, out.idx, weight.size(0));
  }
  if (groups > 1 && !runs_narrow_grouped(w, groups, in, out)) {
    at::Tensor xm = in.is_all ? x : Planes::mask_channels(x, in.idx);
    at::Tensor y = at::convolution(xm, w, b, stride, padding, dilation, false, {0, 0}, groups)
                       .contiguous();
    return out.is_all ? y : Planes::mask_channels(y, out.idx);
  }

  // groups == 1, or a narrow grouped conv: the compact conv, of as many groups.
  at::Tensor x_c = (in.is_all || packed_input) ? x : Planes::gather_channels(x, in.idx);
  c10::optional<at::Tensor> b_c = b;
  if (b.has_value() && !out.is_all) b_c = b->index_select(0, out.idx);
  at::Tensor y_c = at::convolution(x_c, active_weight<Planes>(w, in, out, groups, given), b_c, stride,
                                   padding, dilation, false, {0, 0}, groups)
                       .contiguous();
  return (out.is_all || packed_output) ? y_c
                                       : Planes::scatter_channels(y_c, out.idx, weight.size(0));
}

template <typename Planes>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compact_conv_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& output, const at::Tensor& in_idx, const at::Tensor& out_idx,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, bool packed_input, bool packed_output,
    bool compact_grad_weight, const c10::optional<at::Tensor>& compact_weight) {
  constexpr const char* op = "channel_sparse_conv2d_backward";
  Planes::check_device(input, "input", op);
  const BackwardArgs args =
      check_backward_args(grad_output, input, weight, output, in_idx, out_idx, stride, padding,
                          dilation, groups, packed_input, packed_output,
                          compact_grad_weight, op);
  const c10::DeviceGuard guard(input.device());
  const auto& [in, out] = args.indices;
  const auto given = given_weight(compact_weight, weight, groups, args.indices, op);
  const bool with_saliency = args.with_saliency;
  const auto [want_gi, want_gw, want_gb] = output_mask;

  const at::Tensor g = grad_output.contiguous();
  const at::Tensor h = with_saliency ? output->contiguous() : at::Tensor();
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();

  // groups == 1, depthwise and narrow grouped convs with a partial output list
  // convolve the compact grad_output (gathered here unless it arrives packed);
  // otherwise the pass only reduces (grouped: masked dense, so g is masked below).
  const bool depthwise = is_depthwise(w, groups) && !out.is_all;
  const bool narrow_grouped = runs_narrow_grouped(w, groups, in, out);
  const bool compact_path = (groups == 1 || depthwise || narrow_grouped) && !out.is_all;
  const bool gather_g = compact_path && !packed_output;
  GradOutputPass pass = Planes::grad_output_pass(g, h, out.idx, weight.size(0), packed_output,
                                                 gather_g, want_gb);

  at::Tensor grad_input, grad_weight;
  if ((want_gi || want_gw) && depthwise) {
    // The narrow depthwise conv's gradients, on the active output planes only;
    // inputs outside those planes feed no active output and get zero.
    const auto keep =
        depthwise_input_keep(in, out, weight.size(0), x.scalar_type(), packed_input);
    at::Tensor x_c;
    if (packed_input) {
      x_c = x;
    } else if (want_gw) {
      x_c = Planes::gather_channels(x, out.idx);
      if (keep) x_c = x_c * *keep;
    } else {
      x_c = at::empty({x.size(0), out.count, x.size(2), x.size(3)}, x.options());
    }
    const at::Tensor g_c = packed_output ? g : pass.compact;
    auto grads = at::convolution_backward(g_c, x_c, depthwise_weight(w, out, given),
                                          c10::nullopt, stride, padding, dilation, false,
                                          {0, 0}, out.count, {want_gi, want_gw, false});
    if (want_gi) {
      at::Tensor gi_c = std::get<0>(grads).contiguous();
      if (keep) gi_c = gi_c * *keep;
      grad_input = packed_input ? gi_c : Planes::scatter_channels(gi_c, out.idx, input.size(1));
    }
    if (want_gw) {
      grad_weight = compact_grad_weight ? std::get<1>(grads)
                                        : at::zeros_like(w).index_copy_(0, out.idx, std::get<1>(grads));
    }
  } else if (want_gi || want_gw) {
    if (groups > 1 && !narrow_grouped) {
      at::Tensor gm = out.is_all ? g : Planes::mask_channels(g, out.idx);
      at::Tensor xm = in.is_all ? x : Planes::mask_channels(x, in.idx);
      auto grads = at::convolution_backward(gm, xm, w, c10::nullopt, stride, padding, dilation,
                                            false, {0, 0}, groups, {want_gi, want_gw, false});
      if (want_gi) {
        grad_input = std::get<0>(grads).contiguous();
        if (!in.is_all) grad_input = Planes::mask_channels(grad_input, in.idx);
      }
      if (want_gw) grad_weight = std::get<1>(grads);
    } else {
      // groups == 1, or a narrow grouped conv: the compact conv, of as many groups.
      const at::Tensor g_c = gather_g ? pass.compact : g;
      // The weight gradient needs the compact input; grad_input needs only its shape.
      at::Tensor x_c;
      if (in.is_all || packed_input) {
        x_c = x;
      } else if (want_gw) {
        x_c = Planes::gather_channels(x, in.idx);
      } else {
        x_c = at::empty({x.size(0), in.count, x.size(2), x.size(3)}, x.options());
      }
      auto grads = at::convolution_backward(g_c, x_c,
                                            active_weight<Planes>(w, in, out, groups, given),
                                            c10::nullopt, stride, padding, dilation, false,
                                            {0, 0}, groups, {want_gi, want_gw, false});
      if (want_gi) {
        grad_input = std::get<0>(grads).contiguous();
        if (!in.is_all && !packed_input) {
          grad_input = Planes::scatter_channels(grad_input, in.idx, input.size(1));
        }
      }
      if (want_gw) {
        const at::Tensor grad_c = std::get<1>(grads).contiguous();
        grad_weight = compact_grad_weight ? grad_c
                                          : full_weight_grad<Planes>(grad_c, w, in, out, groups);
      }
    }
  }
  return {grad_input, grad_weight, pass.grad_bias, pass.saliency};
}

}  // namespace dce

// CPU backend of dce::channel_sparse_conv2d.
//
// The heavy math is a dense convolution over the compact (active-only) tensors,
// handed to at::convolution so oneDNN/MKL do it at the narrow network's speed.
// Around it we move only active planes: gather inputs, scatter outputs (each
// output plane written once), and in backward one pass over grad_output that
// gathers it and reduces bias gradient and Taylor saliency at the same time.
// With packed layouts (op_schemas.h) the input is already compact and/or the
// output stays compact: those gathers and scatters are skipped, which leaves
// the narrow network's own work plus the fused grad_output pass.
// A depthwise conv (groups == in == out channels) whose active inputs are its
// active outputs (or all inputs) runs a narrower depthwise conv over the active
// planes only (groups = active count); other groups > 1 take a masked dense
// path (correct, not faster than dense).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>

#include "../common/conv_args.h"
#include "../op_schemas.h"
#include "channel_planes.h"

namespace dce::cpu {
namespace {

constexpr const char* kForward = "channel_sparse_conv2d";
constexpr const char* kBackward = "channel_sparse_conv2d_backward";

void check_cpu(const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor, got ", t.device());
}

// Whether a grouped conv can compute only its active output planes: depthwise
// (each output channel reads its own input channel, multiplier 1), some outputs
// inactive, and every active output's input active. Then the compact conv is
// depthwise over the active channels, which out_idx lists for inputs and outputs.
bool compact_depthwise(const at::Tensor& weight, int64_t groups, const ChannelIndex& in,
                       const ChannelIndex& out) {
  if (groups <= 1 || weight.size(0) != groups || weight.size(1) != 1 || out.is_all) return false;
  return in.is_all || (in.count == out.count && at::equal(in.idx, out.idx));
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const at::Tensor& in_idx,
                       const at::Tensor& out_idx, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       const c10::optional<at::Tensor>& saliency_probe, bool packed_input,
                       bool packed_output) {
  check_conv_args(input, weight, bias, stride, padding, dilation, groups, kForward);
  check_cpu(input, "input", kForward);
  check_saliency_probe(saliency_probe, weight.size(0), kForward);
  const auto [in, out] = check_channel_indices(input, weight, groups, in_idx, out_idx,
                                               packed_input, packed_output, kForward);
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  const c10::optional<at::Tensor> b =
      bias.has_value() && bias->defined() ? c10::optional<at::Tensor>(bias->contiguous())
                                          : c10::nullopt;

  if (compact_depthwise(w, groups, in, out)) {
    at::Tensor x_c = gather_channels(x, out.idx);
    at::Tensor w_c = w.index_select(0, out.idx);
    c10::optional<at::Tensor> b_c = b;
    if (b.has_value()) b_c = b->index_select(0, out.idx);
    at::Tensor y_c = at::convolution(x_c, w_c, b_c, stride, padding, dilation, false, {0, 0},
                                     out.count)
                         .contiguous();
    return scatter_channels(y_c, out.idx, weight.size(0));
  }
  if (groups > 1) {
    at::Tensor xm = in.is_all ? x : mask_channels(x, in.idx);
    at::Tensor y = at::convolution(xm, w, b, stride, padding, dilation, false, {0, 0}, groups)
                       .contiguous();
    return out.is_all ? y : mask_channels(y, out.idx);
  }

  at::Tensor x_c = (in.is_all || packed_input) ? x : gather_channels(x, in.idx);
  at::Tensor w_c = (in.is_all && out.is_all) ? w : gather_weight(w, out.idx, in.idx);
  c10::optional<at::Tensor> b_c = b;
  if (b.has_value() && !out.is_all) b_c = b->index_select(0, out.idx);
  at::Tensor y_c =
      at::convolution(x_c, w_c, b_c, stride, padding, dilation, false, {0, 0}, 1).contiguous();
  return (out.is_all || packed_output) ? y_c : scatter_channels(y_c, out.idx, weight.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& output, const at::Tensor& in_idx, const at::Tensor& out_idx,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, bool packed_input, bool packed_output) {
  check_cpu(input, "input", kBackward);
  const BackwardArgs args =
      check_backward_args(grad_output, input, weight, output, in_idx, out_idx, stride, padding,
                          dilation, groups, packed_input, packed_output, kBackward);
  const auto& [in, out] = args.indices;
  const bool with_saliency = args.with_saliency;
  const auto [want_gi, want_gw, want_gb] = output_mask;

  const at::Tensor g = grad_output.contiguous();
  const at::Tensor h = with_saliency ? output->contiguous() : at::Tensor();
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();

  // groups == 1 with a partial output list convolves the compact grad_output
  // (gathered here unless it arrives packed); otherwise the pass only reduces
  // (grouped: masked dense, so g is masked below).
  const bool depthwise = compact_depthwise(weight, groups, in, out);
  const bool compact_path = (groups == 1 || depthwise) && !out.is_all;
  const bool gather_g = compact_path && !packed_output;
  GradOutputPass pass = grad_output_pass(g, h, out.idx, weight.size(0), packed_output, gather_g,
                                         want_gb);

  at::Tensor grad_input, grad_weight;
  if ((want_gi || want_gw) && depthwise) {
    // The compact depthwise conv's gradients, on the active planes only.
    const at::Tensor x_c =
        want_gw ? gather_channels(x, out.idx)
                : at::empty({x.size(0), out.count, x.size(2), x.size(3)}, x.options());
    const at::Tensor w_c = w.index_select(0, out.idx);
    auto grads = at::convolution_backward(pass.compact, x_c, w_c, c10::nullopt, stride, padding,
                                          dilation, false, {0, 0}, out.count,
                                          {want_gi, want_gw, false});
    if (want_gi) {
      grad_input = scatter_channels(std::get<0>(grads).contiguous(), out.idx, input.size(1));
    }
    if (want_gw) {
      grad_weight = at::zeros_like(w).index_copy_(0, out.idx, std::get<1>(grads));
    }
  } else if (want_gi || want_gw) {
    if (groups > 1) {
      at::Tensor gm = out.is_all ? g : mask_channels(g, out.idx);
      at::Tensor xm = in.is_all ? x : mask_channels(x, in.idx);
      auto grads = at::convolution_backward(gm, xm, w, c10::nullopt, stride, padding, dilation,
                                            false, {0, 0}, groups, {want_gi, want_gw, false});
      if (want_gi) {
        grad_input = std::get<0>(grads).contiguous();
        if (!in.is_all) grad_input = mask_channels(grad_input, in.idx);
      }
      if (want_gw) grad_weight = std::get<1>(grads);
    } else {
      const at::Tensor g_c = gather_g ? pass.compact : g;
      // The weight gradient needs the compact input; grad_input needs only its shape.
      at::Tensor x_c;
      if (in.is_all || packed_input) {
        x_c = x;
      } else if (want_gw) {
        x_c = gather_channels(x, in.idx);
      } else {
        x_c = at::empty({x.size(0), in.count, x.size(2), x.size(3)}, x.options());
      }
      at::Tensor w_c = (in.is_all && out.is_all) ? w : gather_weight(w, out.idx, in.idx);
      auto grads = at::convolution_backward(g_c, x_c, w_c, c10::nullopt, stride, padding,
                                            dilation, false, {0, 0}, 1,
                                            {want_gi, want_gw, false});
      if (want_gi) {
        grad_input = std::get<0>(grads).contiguous();
        if (!in.is_all && !packed_input) {
          grad_input = scatter_channels(grad_input, in.idx, input.size(1));
        }
      }
      if (want_gw) {
        grad_weight = std::get<1>(grads).contiguous();
        if (!(in.is_all && out.is_all)) {
          grad_weight =
              scatter_weight(grad_weight, out.idx, in.idx, weight.size(0), weight.size(1));
        }
      }
    }
  }
  return {grad_input, grad_weight, pass.grad_bias, pass.saliency};
}

}  // namespace

// The kernels have the schemas' types (a mismatch fails here, at compile time,
// rather than when the library registers them).
static_assert(std::is_same_v<decltype(forward_cpu), schema::ChannelSparseConv2dFn>);
static_assert(std::is_same_v<decltype(backward_cpu), schema::ChannelSparseConv2dBackwardFn>);

TORCH_LIBRARY_IMPL(dce, CPU, m) {
  m.impl("channel_sparse_conv2d", &forward_cpu);
  m.impl("channel_sparse_conv2d_backward", &backward_cpu);
}

}  // namespace dce::cpu

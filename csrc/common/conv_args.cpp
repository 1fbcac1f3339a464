#include "conv_args.h"

#include <c10/util/irange.h>

#include <vector>

namespace dce {

ChannelIndex check_channel_index(const at::Tensor& idx, int64_t num_channels,
                                 const at::Device& device, const char* name) {
  TORCH_CHECK(idx.defined(), name, " must be a tensor");
  TORCH_CHECK(idx.dim() == 1, name, " must be a 1-D tensor of channel indices, got ",
              idx.dim(), "-D with shape ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, name,
              " must hold int64 or int32 channel indices, got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == device, name, " must be on the input's device (", device,
              "), got ", idx.device());
  TORCH_CHECK(idx.numel() > 0, name,
              " is empty: at least one channel must be active (use all channels for a dense layer)");
  TORCH_CHECK(idx.numel() <= num_channels, name, " has ", idx.numel(),
              " entries but the layer has only ", num_channels, " channels");

  ChannelIndex out;
  out.idx = idx.to(at::kLong).contiguous();
  out.count = idx.numel();

  if (device.is_cpu()) {
    const int64_t* p = out.idx.const_data_ptr<int64_t>();
    std::vector<uint8_t> seen(num_channels, 0);
    bool in_order = true, ascending = true;
    for (const auto i : c10::irange(out.count)) {
      const int64_t c = p[i];
      TORCH_CHECK(c >= 0 && c < num_channels, name, "[", i, "] = ", c,
                  " is out of range for ", num_channels, " channels");
      TORCH_CHECK(!seen[c], name, " contains channel ", c, " more than once");
      seen[c] = 1;
      in_order = in_order && (c == i);
      ascending = ascending && (i == 0 || c > p[i - 1]);
    }
    out.is_all = in_order && out.count == num_channels;
    out.ascending = ascending;
  } else {
    // Device indices: one small reduction each; the sync this costs is the
    // price of the contract's clear exception instead of silent garbage.
    auto range_ok = at::logical_and(out.idx >= 0, out.idx < num_channels).all().item<bool>();
    TORCH_CHECK(range_ok, name, " has an index outside [0, ", num_channels, ")");
    auto sorted = std::get<0>(out.idx.sort());
    bool unique = out.count < 2 ||
                  !sorted.slice(0, 1).eq(sorted.slice(0, 0, out.count - 1)).any().item<bool>();
    TORCH_CHECK(unique, name, " contains a channel more than once");
    out.ascending = sorted.equal(out.idx);
    out.is_all = out.count == num_channels &&
                 out.idx.eq(at::arange(num_channels, out.idx.options())).all().item<bool>();
  }
  return out;
}

namespace {

// ChannelIndex::per_group of a checked list over `channels` split into `groups`
// equal runs: an ascending list is balanced iff its k-th entry lies in run
// k / (count / groups). A device list costs one reduction (as its other checks).
int64_t balanced_per_group(const ChannelIndex& ci, int64_t channels, int64_t groups) {
  if (!ci.ascending || ci.count % groups != 0) return 0;
  const int64_t per = ci.count / groups;
  const int64_t run = channels / groups;
  if (ci.is_all) return per;
  if (ci.idx.is_cpu()) {
    const int64_t* p = ci.idx.const_data_ptr<int64_t>();
    for (const auto k : c10::irange(ci.count)) {
      if (p[k] / run != k / per) return 0;
    }
    return per;
  }
  const at::Tensor expected = at::arange(ci.count, ci.idx.options()).div_(per, "floor");
  return at::equal(ci.idx.div(run, "floor"), expected) ? per : 0;
}

}  // namespace

ChannelIndices check_channel_indices(const at::Tensor& input, const at::Tensor& weight,
                                     int64_t groups, const at::Tensor& in_idx,
                                     const at::Tensor& out_idx, bool packed_input,
                                     bool packed_output, const char* op_name) {
  const int64_t in_channels = weight.size(1) * groups;
  if (!packed_input) {
    TORCH_CHECK(input.size(1) == in_channels, op_name, ": input has ", input.size(1),
                " channels but weight expects ", in_channels, " (weight.size(1)=",
                weight.size(1), " x groups=", groups, ")");
  }
  ChannelIndices result{check_channel_index(in_idx, in_channels, input.device(), "in_idx"),
                        check_channel_index(out_idx, weight.size(0), input.device(), "out_idx")};
  if (is_grouped(weight, groups)) {
    result.in.per_group = balanced_per_group(result.in, in_channels, groups);
    result.out.per_group = balanced_per_group(result.out, weight.size(0), groups);
  }
  if (packed_input || packed_output) {
    const bool narrow_grouped = result.in.per_group > 0 && result.out.per_group > 0;
    TORCH_CHECK(groups == 1 || is_depthwise(weight, groups) || narrow_grouped, op_name,
                ": packed channel layouts need groups == 1, a depthwise conv (groups == "
                "in_channels == out_channels) or a grouped conv whose in_idx and out_idx "
                "both hold equally many channels of every conv group, in ascending order; "
                "got groups=", groups, " and weight of shape ", weight.sizes());
  }
  if (packed_input && is_depthwise(weight, groups)) {
    // The packed planes are the inputs of the active outputs only if both lists agree.
    TORCH_CHECK(same_list(result.in, result.out), op_name,
                ": a depthwise conv with packed_input needs in_idx equal to out_idx (each "
                "active output reads its own input plane)");
  }
  if (packed_input) {
    TORCH_CHECK(input.size(1) == result.in.count, op_name, ": packed input has ",
                input.size(1), " channels but in_idx lists ", result.in.count);
    TORCH_CHECK(result.in.ascending, op_name, ": packed_input needs in_idx in ascending order");
  }
  if (packed_output) {
    TORCH_CHECK(result.out.ascending, op_name,
                ": packed_output needs out_idx in ascending order");
  }
  return result;
}

void check_conv_args(const at::Tensor& input, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     const char* op_name) {
  TORCH_CHECK(input.dim() == 4, op_name, ": input must be 4-D (N, C, H, W), got shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 4, op_name,
              ": weight must be 4-D (out_channels, in_channels/groups, kH, kW), got shape ",
              weight.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op_name,
              ": input must be a floating point tensor, got ", input.scalar_type());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op_name,
              ": weight dtype ", weight.scalar_type(), " differs from input dtype ",
              input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), op_name, ": weight is on ", weight.device(),
              " but input is on ", input.device());
  TORCH_CHECK(groups >= 1, op_name, ": groups must be positive, got ", groups);
  TORCH_CHECK(weight.size(0) % groups == 0, op_name, ": out_channels ", weight.size(0),
              " is not divisible by groups ", groups);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op_name,
                ": bias must have shape [", weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op_name, ": bias dtype ",
                bias->scalar_type(), " differs from input dtype ", input.scalar_type());
    TORCH_CHECK(bias->device() == input.device(), op_name, ": bias is on ", bias->device(),
                " but input is on ", input.device());
  }
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op_name,
              ": stride, padding and dilation must each have 2 entries");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] >= 1, op_name, ": stride must be >= 1, got ", stride);
    TORCH_CHECK(dilation[i] >= 1, op_name, ": dilation must be >= 1, got ", dilation);
    TORCH_CHECK(padding[i] >= 0, op_name, ": padding must be >= 0, got ", padding);
    const int64_t span = dilation[i] * (weight.size(2 + i) - 1) + 1;
    TORCH_CHECK(input.size(2 + i) + 2 * padding[i] >= span, op_name,
                ": input spatial size ", input.sizes().slice(2), " with padding ", padding,
                " is smaller than the dilated kernel (", span, ")");
  }
}

void check_saliency_probe(const c10::optional<at::Tensor>& probe, int64_t out_channels,
                          const char* op_name) {
  if (probe.has_value() && probe->defined()) {
    TORCH_CHECK(probe->dim() == 1 && probe->size(0) == out_channels, op_name,
                ": saliency_probe must have shape [", out_channels, "], got ", probe->sizes());
  }
}

void check_compact_weight(const c10::optional<at::Tensor>& compact_weight,
                          const at::Tensor& weight, int64_t groups,
                          const ChannelIndices& indices, const char* op_name) {
  if (!compact_weight.has_value() || !compact_weight->defined()) return;
  const at::Tensor& c = *compact_weight;
  TORCH_CHECK(has_weight_block(weight, groups), op_name,
              ": compact_weight needs groups == 1 or a depthwise conv, got groups=", groups);
  const std::vector<int64_t> want = {indices.out.count, groups == 1 ? indices.in.count : 1,
                                     weight.size(2), weight.size(3)};
  TORCH_CHECK(c.sizes() == at::IntArrayRef(want), op_name, ": compact_weight shape ",
              c.sizes(), " is not that of the active block ", at::IntArrayRef(want));
  TORCH_CHECK(c.scalar_type() == weight.scalar_type(), op_name, ": compact_weight dtype ",
              c.scalar_type(), " differs from weight dtype ", weight.scalar_type());
  TORCH_CHECK(c.device() == weight.device(), op_name, ": compact_weight is on ", c.device(),
              " but weight is on ", weight.device());
}

BackwardArgs check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                 const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& output,
                                 const at::Tensor& in_idx, const at::Tensor& out_idx,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups, bool packed_input,
                                 bool packed_output, bool compact_grad_weight,
                                 const char* op_name) {
  check_conv_args(input, weight, c10::nullopt, stride, padding, dilation, groups, op_name);
  TORCH_CHECK(!compact_grad_weight || has_weight_block(weight, groups), op_name,
              ": compact_grad_weight needs groups == 1 or a depthwise conv, got groups=", groups,
              " with weight ", weight.sizes());
  BackwardArgs args;
  args.indices = check_channel_indices(input, weight, groups, in_idx, out_idx, packed_input,
                                       packed_output, op_name);
  args.out_channels = output_channels(weight, args.indices.out, packed_output);
  args.out_size = conv_output_size(input, weight, stride, padding, dilation);
  const auto [Ho, Wo] = args.out_size;
  TORCH_CHECK(grad_output.defined(), op_name, ": grad_output must be a tensor");
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == input.size(0) &&
                  grad_output.size(1) == args.out_channels && grad_output.size(2) == Ho &&
                  grad_output.size(3) == Wo,
              op_name, ": grad_output shape ", grad_output.sizes(),
              " does not match input/weight (expected [", input.size(0), ", ",
              args.out_channels, ", ", Ho, ", ", Wo, "])");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op_name, ": grad_output dtype ",
              grad_output.scalar_type(), " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), op_name, ": grad_output is on ",
              grad_output.device(), " but input is on ", input.device());
  args.with_saliency = output.has_value() && output->defined();
  if (args.with_saliency) {
    TORCH_CHECK(output->sizes() == grad_output.sizes(), op_name, ": output shape ",
                output->sizes(), " differs from grad_output shape ", grad_output.sizes());
    TORCH_CHECK(output->scalar_type() == input.scalar_type(), op_name, ": output dtype ",
                output->scalar_type(), " differs from input dtype ", input.scalar_type());
    TORCH_CHECK(output->device() == input.device(), op_name, ": output is on ",
                output->device(), " but input is on ", input.device());
  }
  return args;
}

}  // namespace dce

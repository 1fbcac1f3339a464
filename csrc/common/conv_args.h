// Argument checks shared by every backend of dce::channel_sparse_conv2d.
//
// The op contract (ARCHITECTURE.md, "The op contract") promises a clear exception for bad input on every
// backend, so the checks live here once and each backend calls them before it
// touches memory. Only the device check is the backend's own (each accepts its
// device's tensors).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <vector>

namespace dce {

// What a backend needs to know about one index list after it has been checked.
struct ChannelIndex {
  at::Tensor idx;      // int64, contiguous, on the tensor's device
  int64_t count = 0;   // number of active channels
  bool is_all = false; // the list is exactly 0..C-1 in order: no gather needed
  bool ascending = false;
  // For a grouped conv (not depthwise): how many channels of each conv group the
  // list holds when it holds equally many of every one, in ascending order; else 0
  // (check_channel_indices sets it; other convs leave it 0).
  int64_t per_group = 0;
};

// Checks dtype, rank, device and emptiness of an index list; for CPU index
// tensors also range and uniqueness (one O(C) pass with a bitmap).
ChannelIndex check_channel_index(const at::Tensor& idx, int64_t num_channels,
                                 const at::Device& device, const char* name);

// Both index lists of a conv and the input's channel count for its layout:
// in_idx against the layer's input channels (weight.size(1) * groups), out_idx
// against its output channels, each on the input's device. A full-width input
// has every input channel; a packed one exactly the listed channels (see
// op_schemas.h for the layouts).
struct ChannelIndices {
  ChannelIndex in;
  ChannelIndex out;
};
ChannelIndices check_channel_indices(const at::Tensor& input, const at::Tensor& weight,
                                     int64_t groups, const at::Tensor& in_idx,
                                     const at::Tensor& out_idx, bool packed_input,
                                     bool packed_output, const char* op_name);

// Depthwise: every output channel reads only its own input channel (channel
// multiplier 1, groups == in == out channels).
inline bool is_depthwise(const at::Tensor& weight, int64_t groups) {
  return groups > 1 && weight.size(0) == groups && weight.size(1) == 1;
}

// Whether the weight's active channels form a rectangular block,
// weight[out_idx][:, in_idx] (groups == 1) or weight[out_idx] (depthwise): what
// compact_weight and compact_grad_weight hold (op_schemas.h). A grouped conv's
// active columns differ per conv group.
inline bool has_weight_block(const at::Tensor& weight, int64_t groups) {
  return groups == 1 || is_depthwise(weight, groups);
}

// A grouped conv that is not depthwise (1 < groups; each output reads the
// in_channels / groups inputs of its own conv group).
inline bool is_grouped(const at::Tensor& weight, int64_t groups) {
  return groups > 1 && !is_depthwise(weight, groups);
}

// Whether a grouped conv runs as a narrower grouped conv over its active
// channels: both lists hold equally many channels of every conv group, in
// ascending order (ChannelIndex::per_group), so the compact weight is again one
// of `groups` equal groups; with some channel inactive (else nothing to narrow).
inline bool runs_narrow_grouped(const at::Tensor& weight, int64_t groups, const ChannelIndex& in,
                                const ChannelIndex& out) {
  return is_grouped(weight, groups) && in.per_group > 0 && out.per_group > 0 &&
         !(in.is_all && out.is_all);
}

// Whether two checked lists are the same list: the same tensor (what a
// ChannelPlan hands a depthwise conv of one group, checked without a device
// read), else equal contents (a device read on a GPU).
inline bool same_list(const ChannelIndex& a, const ChannelIndex& b) {
  return a.count == b.count &&
         (a.idx.const_data_ptr() == b.idx.const_data_ptr() || at::equal(a.idx, b.idx));
}

// Channels of the output (and grad_output) tensor in the requested layout.
inline int64_t output_channels(const at::Tensor& weight, const ChannelIndex& out,
                               bool packed_output) {
  return packed_output ? out.count : weight.size(0);
}

// Checks the tensors and conv parameters shared by forward and backward (the
// channel counts depend on the layout: check_channel_indices checks them).
void check_conv_args(const at::Tensor& input, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     const char* op_name);

// The caller's compact weight, when given (op_schemas.h): groups == 1 or a
// depthwise conv, shape [out.count, in.count or 1, kH, kW], the weight's dtype
// and device.
void check_compact_weight(const c10::optional<at::Tensor>& compact_weight,
                          const at::Tensor& weight, int64_t groups,
                          const ChannelIndices& indices, const char* op_name);

// The saliency probe, when given, is a [out_channels] tensor (its gradient
// carries the saliency out of backward).
void check_saliency_probe(const c10::optional<at::Tensor>& probe, int64_t out_channels,
                          const char* op_name);

// Output height and width of the conv: PyTorch's formula (at::convolution's),
// for arguments that check_conv_args has accepted (so both are >= 1).
inline std::array<int64_t, 2> conv_output_size(const at::Tensor& input, const at::Tensor& weight,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef dilation) {
  std::array<int64_t, 2> size{};
  for (int i = 0; i < 2; ++i) {
    size[i] = (input.size(2 + i) + 2 * padding[i] - dilation[i] * (weight.size(2 + i) - 1) - 1) /
                  stride[i] +
              1;
  }
  return size;
}

// The arguments of channel_sparse_conv2d_backward, checked once for every
// backend (the CPU backward, the CUDA launcher and the emulated one): those it
// shares with the forward (as check_conv_args and check_channel_indices), then
// grad_output, which must be what the forward returned for these arguments
// ([N, channels of the output layout, Ho, Wo], input's dtype and device), and
// output, when given, likewise. A mismatch would otherwise be read out of
// bounds or silently reinterpreted by the kernels.
struct BackwardArgs {
  ChannelIndices indices;
  int64_t out_channels = 0;          // grad_output.size(1): full or packed width
  std::array<int64_t, 2> out_size{}; // grad_output's (Ho, Wo)
  bool with_saliency = false;        // output was given: the saliency is wanted
};
BackwardArgs check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                 const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& output,
                                 const at::Tensor& in_idx, const at::Tensor& out_idx,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups, bool packed_input,
                                 bool packed_output, bool compact_grad_weight,
                                 const char* op_name);

}  // namespace dce

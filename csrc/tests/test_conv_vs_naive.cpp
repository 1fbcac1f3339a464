// C++ test of one op library against the naive float64 reference: forward,
// gradients and saliency on random odd shapes, and a clear error for a bad
// index list. The library is named on the command line: `dce` (the production
// backends, through the public C++ API's dispatcher path) or `dce_emu` (the CUDA
// kernels run by the CPU emulator). Exit code 0 means every case passed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>

#include "naive_conv.h"
#include "op_schemas.h"

namespace {

int failures = 0;
std::string library = "dce";

// The ops' C++ types; typed() checks them against the library's registered schemas.
using Forward = dce::schema::ChannelSparseConv2dFn;
using Backward = dce::schema::ChannelSparseConv2dBackwardFn;

at::Tensor forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                   const at::Tensor& in_idx, const at::Tensor& out_idx, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow((library + "::channel_sparse_conv2d").c_str(), "")
                       .typed<Forward>();
  return op.call(x, w, b, in_idx, out_idx, stride, padding, dilation, 1, std::nullopt, false,
                 false, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& y,
    const at::Tensor& in_idx, const at::Tensor& out_idx, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow((library + "::channel_sparse_conv2d_backward").c_str(), "")
                       .typed<Backward>();
  return op.call(g, x, w, y, in_idx, out_idx, stride, padding, dilation, 1, mask, false, false,
                 false, std::nullopt);
}

void expect_close(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  const double err = (got.to(at::kDouble) - want).abs().max().item<double>();
  const double scale = 1.0 + want.abs().max().item<double>();
  if (!(err <= 1e-9 * scale)) {
    std::printf("FAIL %s: max abs error %g\n", what.c_str(), err);
    ++failures;
  }
}

struct Case {
  int64_t n, c, k, h, w, kh, kw;
  dce::testing::ConvGeometry geo;
  int64_t active_in, active_out;
  bool bias;
};

void run_case(const Case& cs, int id) {
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = at::randn({cs.n, cs.c, cs.h, cs.w}, opts);
  auto w = at::randn({cs.k, cs.c, cs.kh, cs.kw}, opts);
  auto b = cs.bias ? at::randn({cs.k}, opts) : at::Tensor();
  auto in_idx = at::randperm(cs.c, at::kLong).slice(0, 0, cs.active_in);
  auto out_idx = at::randperm(cs.k, at::kLong).slice(0, 0, cs.active_out);
  at::IntArrayRef stride(cs.geo.stride, 2), padding(cs.geo.padding, 2),
      dilation(cs.geo.dilation, 2);

  auto y = forward(x, w, cs.bias ? std::optional<at::Tensor>(b) : std::nullopt, in_idx, out_idx,
                   stride, padding, dilation);
  auto g = at::randn_like(y);
  auto ref = dce::testing::naive_conv(x, w, b, in_idx, out_idx, g, cs.geo);
  auto [gi, gw, gb, sal] =
      backward(g, x, w, y, in_idx, out_idx, stride, padding, dilation, {true, true, cs.bias});
  const std::string tag = library + " case " + std::to_string(id);
  expect_close(y, ref.output, tag + " output");
  expect_close(gi, ref.grad_input, tag + " grad_input");
  expect_close(gw, ref.grad_weight, tag + " grad_weight");
  if (cs.bias) expect_close(gb, ref.grad_bias, tag + " grad_bias");
  expect_close(sal, ref.saliency, tag + " saliency");
}

void bad_index_is_rejected() {
  auto x = at::randn({1, 4, 5, 5});
  auto w = at::randn({3, 4, 3, 3});
  try {
    forward(x, w, std::nullopt, at::tensor({0, 0}, at::kLong), at::tensor({1}, at::kLong),
            {1, 1}, {0, 0}, {1, 1});
    std::printf("FAIL duplicate index was accepted\n");
    ++failures;
  } catch (const c10::Error& e) {
    if (std::string(e.what()).find("more than once") == std::string::npos) {
      std::printf("FAIL unexpected message: %s\n", e.what());
      ++failures;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) library = argv[1];
  at::manual_seed(7);
  const Case cases[] = {
      {1, 1, 1, 1, 1, 1, 1, {}, 1, 1, true},
      {2, 5, 4, 7, 6, 3, 3, {{1, 1}, {1, 1}, {1, 1}}, 3, 2, true},
      {3, 7, 6, 9, 8, 3, 2, {{2, 1}, {1, 0}, {1, 2}}, 4, 5, false},
      {1, 6, 7, 11, 5, 5, 5, {{1, 2}, {2, 2}, {1, 1}}, 6, 3, true},
      {2, 4, 4, 6, 6, 1, 1, {{3, 3}, {0, 0}, {1, 1}}, 1, 4, true},
  };
  int id = 0;
  for (const auto& cs : cases) run_case(cs, id++);
  bad_index_is_rejected();
  std::printf("%s %s: %d case(s), %d failure(s)\n", library.c_str(), failures ? "FAILED" : "OK",
              id + 1, failures);
  return failures ? 1 : 0;
}

// Naive float64 reference for the C++ tests: direct loops over the op contract
// (masked input, masked output, bias only on active outputs) and its gradients.
// Deliberately shares nothing with the kernels under test.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace dce::testing {

struct ConvGeometry {
  int64_t stride[2] = {1, 1}, padding[2] = {0, 0}, dilation[2] = {1, 1};
};

struct NaiveResult {
  at::Tensor output, grad_input, grad_weight, grad_bias, saliency;
};

inline std::vector<bool> active_mask(const at::Tensor& idx, int64_t n) {
  std::vector<bool> m(n, false);
  auto a = idx.to(at::kLong).contiguous();
  for (int64_t i = 0; i < a.numel(); ++i) m[a.data_ptr<int64_t>()[i]] = true;
  return m;
}

inline NaiveResult naive_conv(const at::Tensor& x_in, const at::Tensor& w_in,
                              const at::Tensor& b_in, const at::Tensor& in_idx,
                              const at::Tensor& out_idx, const at::Tensor& g_in,
                              const ConvGeometry& geo) {
  auto x = x_in.to(at::kDouble).contiguous();
  auto w = w_in.to(at::kDouble).contiguous();
  auto g = g_in.to(at::kDouble).contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = w.size(0), KH = w.size(2), KW = w.size(3);
  const int64_t HO = g.size(2), WO = g.size(3);
  const auto in_on = active_mask(in_idx, C), out_on = active_mask(out_idx, K);

  NaiveResult r;
  r.output = at::zeros({N, K, HO, WO}, x.options());
  r.grad_input = at::zeros_like(x);
  r.grad_weight = at::zeros_like(w);
  r.grad_bias = at::zeros({K}, x.options());
  r.saliency = at::zeros({K}, x.options());
  auto X = x.accessor<double, 4>(), Wt = w.accessor<double, 4>(), G = g.accessor<double, 4>();
  auto Y = r.output.accessor<double, 4>(), GX = r.grad_input.accessor<double, 4>();
  auto GW = r.grad_weight.accessor<double, 4>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      if (!out_on[k]) continue;
      double gh = 0;
      for (int64_t oh = 0; oh < HO; ++oh) {
        for (int64_t ow = 0; ow < WO; ++ow) {
          double acc = b_in.defined() ? b_in.to(at::kDouble)[k].item<double>() : 0.0;
          for (int64_t c = 0; c < C; ++c) {
            if (!in_on[c]) continue;
            for (int64_t i = 0; i < KH; ++i) {
              for (int64_t j = 0; j < KW; ++j) {
                const int64_t ih = oh * geo.stride[0] - geo.padding[0] + i * geo.dilation[0];
                const int64_t iw = ow * geo.stride[1] - geo.padding[1] + j * geo.dilation[1];
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                acc += X[n][c][ih][iw] * Wt[k][c][i][j];
                GX[n][c][ih][iw] += G[n][k][oh][ow] * Wt[k][c][i][j];
                GW[k][c][i][j] += G[n][k][oh][ow] * X[n][c][ih][iw];
              }
            }
          }
          Y[n][k][oh][ow] = acc;
          gh += G[n][k][oh][ow] * acc;
          r.grad_bias[k] += G[n][k][oh][ow];
        }
      }
      r.saliency[k] += std::abs(gh / static_cast<double>(HO * WO)) / static_cast<double>(N);
    }
  }
  return r;
}

}  // namespace dce::testing

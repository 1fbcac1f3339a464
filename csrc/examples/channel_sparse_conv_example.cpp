// Smallest useful C++ program: a 3x3 convolution over half of the channels.
#include <ATen/ATen.h>

#include <iostream>

#include "api.h"

int main() {
  auto x = at::randn({8, 16, 32, 32});
  auto w = at::randn({32, 16, 3, 3});
  auto in_idx = at::arange(0, 16, 2);   // every other input channel
  auto out_idx = at::arange(0, 32, 2);  // every other output channel
  auto y = dce::channel_sparse_conv2d(x, w, std::nullopt, in_idx, out_idx, {1, 1}, {1, 1});
  std::cout << "output " << y.sizes() << ", nonzero channels: "
            << (y.abs().sum({0, 2, 3}) > 0).sum().item<int64_t>() << " of " << y.size(1) << "\n";
  return 0;
}

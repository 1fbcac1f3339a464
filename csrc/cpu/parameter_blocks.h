// Blocks of parameter-shaped tensors (op_schemas.h, "Blocks of
// parameter-shaped tensors"): a tensor viewed as [rows, cols, run] and the
// checked index lists of one block. Shared by the block copies
// (parameter_blocks.cpp) and the in-place optimizer steps (block_steps.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace dce::cpu {

// One side of a block: the listed indices, or all of [0, size).
struct BlockSide {
  std::vector<int64_t> index;
  int64_t count = 0;
};

// The listed indices of one side, checked (1-D, integer, CPU, in range,
// unique); no list means all of [0, size).
BlockSide block_side(const c10::optional<at::Tensor>& idx, int64_t size, const char* name,
                     const char* op);

struct BlockGeometry {
  int64_t rows, cols, run;  // the full tensor as [rows, cols, run]
};

BlockGeometry geometry(const at::Tensor& t, bool has_cols, const char* op);

// t's shape with dim 0 set to rows and dim 1 (if any) to cols.
std::vector<int64_t> block_shape(const at::Tensor& t, int64_t rows, int64_t cols);

}  // namespace dce::cpu

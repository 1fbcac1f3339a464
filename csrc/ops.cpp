// Declares the dce operator library. Backends register implementations in
// their own files (csrc/cpu, csrc/cuda); Python adds fake kernels and autograd
// in dce_kernels/ops.py.
#include <torch/library.h>

#include "op_schemas.h"

TORCH_LIBRARY(dce, m) {
  m.def(dce::schema::kChannelSparseConv2d);
  m.def(dce::schema::kChannelSparseConv2dBackward);
  m.def(dce::schema::kGatherBlock);
  m.def(dce::schema::kScatterBlock);
  m.def(dce::schema::kSgdBlockStep);
  m.def(dce::schema::kAdamBlockStep);
}

// CPU kernels of dce::gather_block / dce::scatter_block_ (schemas in
// op_schemas.h): the active block of a weight, its gradient and optimizer
// state, moved in runs of contiguous trailing elements (a conv weight's kH*kW)
// with memcpy. ATen's index_select / index_put do the same with per-element
// index arithmetic, which measured about ten times slower than a copy here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace dce::cpu {
namespace {

// One side of a block: the listed indices, or all of [0, size).
struct BlockSide {
  std::vector<int64_t> index;
  int64_t count = 0;
};

BlockSide block_side(const c10::optional<at::Tensor>& idx, int64_t size, const char* name,
                     const char* op) {
  BlockSide side;
  if (!idx.has_value() || !idx->defined()) {
    side.index.resize(size);
    for (int64_t i = 0; i < size; ++i) side.index[i] = i;
    side.count = size;
    return side;
  }
  TORCH_CHECK(idx->dim() == 1, op, ": ", name, " must be 1-D, got shape ", idx->sizes());
  TORCH_CHECK(idx->scalar_type() == at::kLong || idx->scalar_type() == at::kInt, op, ": ", name,
              " must hold integer indices, got ", idx->scalar_type());
  TORCH_CHECK(idx->device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  const at::Tensor i64 = idx->to(at::kLong).contiguous();
  const int64_t* p = i64.const_data_ptr<int64_t>();
  side.count = i64.numel();
  side.index.assign(p, p + side.count);
  std::vector<uint8_t> seen(size, 0);
  for (int64_t k = 0; k < side.count; ++k) {
    const int64_t i = side.index[k];
    TORCH_CHECK(i >= 0 && i < size, op, ": ", name, "[", k, "] = ", i,
                " is out of range for size ", size);
    // Unique indices: scatter_block_ writes rows in parallel.
    TORCH_CHECK(!seen[i], op, ": ", name, " contains ", i, " more than once");
    seen[i] = 1;
  }
  return side;
}

struct BlockGeometry {
  int64_t rows, cols, run;  // the full tensor as [rows, cols, run]
};

BlockGeometry geometry(const at::Tensor& t, bool has_cols, const char* op) {
  TORCH_CHECK(t.dim() >= (has_cols ? 2 : 1), op, ": a block with columns needs a tensor of at "
              "least 2 dims, got shape ", t.sizes());
  BlockGeometry g{t.size(0), t.dim() >= 2 ? t.size(1) : 1, 1};
  for (int64_t d = 2; d < t.dim(); ++d) g.run *= t.size(d);
  return g;
}

std::vector<int64_t> block_shape(const at::Tensor& t, int64_t rows, int64_t cols) {
  auto sizes = t.sizes().vec();
  sizes[0] = rows;
  if (sizes.size() >= 2) sizes[1] = cols;
  return sizes;
}

int64_t grain(int64_t bytes_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, bytes_per_row));
}

at::Tensor gather_block_cpu(const at::Tensor& src, const c10::optional<at::Tensor>& rows,
                            const c10::optional<at::Tensor>& cols) {
  constexpr const char* op = "gather_block";
  const bool has_cols = cols.has_value() && cols->defined();
  const BlockGeometry g = geometry(src, has_cols, op);
  const BlockSide r = block_side(rows, g.rows, "rows", op);
  const BlockSide c = block_side(cols, g.cols, "cols", op);
  const at::Tensor s = src.contiguous();
  at::Tensor dst = at::empty(block_shape(s, r.count, c.count), s.options());
  const size_t bytes = g.run * s.element_size();
  const char* sp = static_cast<const char*>(s.const_data_ptr());
  char* dp = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, r.count, grain(c.count * bytes), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const char* row = sp + r.index[k] * g.cols * bytes;
      char* out = dp + k * c.count * bytes;
      for (int64_t j = 0; j < c.count; ++j) {
        std::memcpy(out + j * bytes, row + c.index[j] * bytes, bytes);
      }
    }
  });
  return dst;
}

void scatter_block_cpu(const at::Tensor& dst, const c10::optional<at::Tensor>& rows,
                       const c10::optional<at::Tensor>& cols, const at::Tensor& block) {
  constexpr const char* op = "scatter_block_";
  const bool has_cols = cols.has_value() && cols->defined();
  const BlockGeometry g = geometry(dst, has_cols, op);
  const BlockSide r = block_side(rows, g.rows, "rows", op);
  const BlockSide c = block_side(cols, g.cols, "cols", op);
  TORCH_CHECK(dst.is_contiguous(), op, ": dst must be contiguous");
  TORCH_CHECK(block.scalar_type() == dst.scalar_type(), op, ": block dtype ",
              block.scalar_type(), " differs from dst dtype ", dst.scalar_type());
  TORCH_CHECK(block.sizes().vec() == block_shape(dst, r.count, c.count), op, ": block shape ",
              block.sizes(), " does not match ", r.count, " rows and ", c.count, " columns of ",
              dst.sizes());
  const at::Tensor b = block.contiguous();
  const size_t bytes = g.run * dst.element_size();
  const char* bp = static_cast<const char*>(b.const_data_ptr());
  char* dp = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, r.count, grain(c.count * bytes), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      char* row = dp + r.index[k] * g.cols * bytes;
      const char* in = bp + k * c.count * bytes;
      for (int64_t j = 0; j < c.count; ++j) {
        std::memcpy(row + c.index[j] * bytes, in + j * bytes, bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dce, CPU, m) {
  m.impl("gather_block", &gather_block_cpu);
  m.impl("scatter_block_", &scatter_block_cpu);
}

}  // namespace dce::cpu

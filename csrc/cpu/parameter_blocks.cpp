// CPU kernels of dce::gather_block / dce::scatter_block_ (schemas in
// op_schemas.h): the active block of a weight, its gradient and optimizer
// state, moved in runs of contiguous trailing elements (a conv weight's kH*kW,
// a single element of a Linear weight) by typed loops. ATen's index_select /
// index_put on the same blocks measured 2-4x slower here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "parameter_blocks.h"

namespace dce::cpu {

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

namespace {


int64_t grain(int64_t bytes_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, bytes_per_row));
}

// Copies rows x columns runs of `run` elements. For runs of a few words or
// more (a conv weight's kH*kW) memcpy is fastest; a Linear weight's runs can be
// single elements, where a memcpy call per element costs more than the copy,
// so short runs take a loop typed by the element's size.
struct Word16 {
  uint64_t lo, hi;
};

template <typename Word>
void copy_short_runs(const BlockGeometry& g, const BlockSide& r, const BlockSide& c,
                     const char* src, char* dst, bool to_block) {
  const int64_t run = g.run;
  at::parallel_for(0, r.count, grain(c.count * run * sizeof(Word)), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      Word* full = reinterpret_cast<Word*>(to_block ? const_cast<char*>(src) : dst) +
                   r.index[k] * g.cols * run;
      Word* block = reinterpret_cast<Word*>(to_block ? dst : const_cast<char*>(src)) +
                    k * c.count * run;
      for (int64_t j = 0; j < c.count; ++j) {
        Word* f = full + c.index[j] * run;
        Word* bl = block + j * run;
        for (int64_t i = 0; i < run; ++i) {
          if (to_block) bl[i] = f[i]; else f[i] = bl[i];
        }
      }
    }
  });
}

// to_block: full -> block (gather); else block -> full (scatter).
void copy_block(const BlockGeometry& g, const BlockSide& r, const BlockSide& c,
                int64_t element_size, const char* src, char* dst, bool to_block) {
  const size_t bytes = g.run * element_size;
  if (bytes >= 32) {
    at::parallel_for(0, r.count, grain(c.count * bytes), [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t full_row = r.index[k] * g.cols, block_row = k * c.count;
        for (int64_t j = 0; j < c.count; ++j) {
          const int64_t f = (full_row + c.index[j]) * bytes, bl = (block_row + j) * bytes;
          if (to_block) std::memcpy(dst + bl, src + f, bytes);
          else std::memcpy(dst + f, src + bl, bytes);
        }
      }
    });
    return;
  }
  switch (element_size) {
    case 1: copy_short_runs<uint8_t>(g, r, c, src, dst, to_block); break;
    case 2: copy_short_runs<uint16_t>(g, r, c, src, dst, to_block); break;
    case 4: copy_short_runs<uint32_t>(g, r, c, src, dst, to_block); break;
    case 8: copy_short_runs<uint64_t>(g, r, c, src, dst, to_block); break;
    case 16: copy_short_runs<Word16>(g, r, c, src, dst, to_block); break;
    default: TORCH_CHECK(false, "block copy: unsupported element size ", element_size);
  }
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
  copy_block(g, r, c, s.element_size(), static_cast<const char*>(s.const_data_ptr()),
             static_cast<char*>(dst.data_ptr()), /*to_block=*/true);
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
  copy_block(g, r, c, dst.element_size(), static_cast<const char*>(b.const_data_ptr()),
             static_cast<char*>(dst.data_ptr()), /*to_block=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(dce, CPU, m) {
  m.impl("gather_block", &gather_block_cpu);
  m.impl("scatter_block_", &scatter_block_cpu);
}

}  // namespace dce::cpu

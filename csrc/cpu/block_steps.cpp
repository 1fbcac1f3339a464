// CPU kernels of dce::sgd_block_step_ / dce::adam_block_step_ (schemas in
// op_schemas.h): one pass over the contiguous runs of a parameter's active
// block that reads gradient, parameter and state once and writes parameter and
// state once, in place. This replaces gathering the block into fresh tensors,
// stepping them with torch.optim and scattering them back.
//
// The arithmetic is that of ATen's CPU kernels behind torch.optim's
// single-tensor steps, operation by operation and rounding by rounding, so
// that the results are bit-identical: add(a, b, alpha) and lerp are one fused
// multiply-add in ATen's vectorized kernels (vec::fmadd), addcmul is
// fma(value * t1, t2, self), addcdiv is self + (value * t1) / t2, scalars are
// cast to the tensor's dtype first, and sqrt is ATen's own (AdamTask). The
// loops are built twice: for CPUs with AVX2+FMA, where GCC
// vectorizes the fused multiply-adds, and a generic one, where they are
// libm's fma (exact, slower). ATen's own DEFAULT
// (pre-AVX2) kernels do not fuse, so on such CPUs the two may differ by an ulp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "parameter_blocks.h"

namespace dce::cpu {
namespace {

// A block as contiguous element ranges: row runs, and within a row the runs
// of consecutive active columns (one run of the whole row when all columns are
// active, in which case consecutive rows merge as well).
struct Run {
  int64_t start, length;
};

std::vector<Run> consecutive_runs(const BlockSide& side) {
  std::vector<Run> runs;
  for (int64_t k = 0; k < side.count; ++k) {
    const int64_t i = side.index[k];
    if (!runs.empty() && runs.back().start + runs.back().length == i) {
      ++runs.back().length;
    } else {
      runs.push_back({i, 1});
    }
  }
  return runs;
}

struct BlockRuns {
  std::vector<Run> rows;  // in rows
  std::vector<Run> cols;  // in elements, relative to a row's start
  int64_t row_elements;   // elements per row of the full tensor
  bool whole_rows;
};

BlockRuns block_runs(const at::Tensor& param, const c10::optional<at::Tensor>& rows,
                     const c10::optional<at::Tensor>& cols, const char* op) {
  const bool has_cols = cols.has_value() && cols->defined();
  const BlockGeometry g = geometry(param, has_cols, op);
  const BlockSide r = block_side(rows, g.rows, "rows", op);
  const BlockSide c = block_side(cols, g.cols, "cols", op);
  BlockRuns runs;
  runs.row_elements = g.cols * g.run;
  runs.whole_rows = c.count == g.cols;
  if (runs.whole_rows) {
    runs.rows = consecutive_runs(r);
  } else {
    for (int64_t k = 0; k < r.count; ++k) runs.rows.push_back({r.index[k], 1});
    for (const Run& col : consecutive_runs(c)) {
      runs.cols.push_back({col.start * g.run, col.length * g.run});
    }
  }
  return runs;
}

// Calls task(start, length) for every element range of the block, then
// task.finish(), with one task made by make_task() per share of the parallel
// loop over row runs.
template <typename MakeTask>
void for_each_range(const BlockRuns& runs, const MakeTask& make_task) {
  int64_t per_row = 0;
  for (const Run& c : runs.cols) per_row += c.length;
  if (runs.whole_rows) per_row = runs.row_elements;
  int64_t total_rows = 0;
  for (const Run& r : runs.rows) total_rows += r.length;
  const int64_t rows_per_run = runs.rows.empty() ? 1 : std::max<int64_t>(
      1, total_rows / static_cast<int64_t>(runs.rows.size()));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(
      1, per_row * rows_per_run));
  at::parallel_for(0, static_cast<int64_t>(runs.rows.size()), grain, [&](int64_t b, int64_t e) {
    auto task = make_task();
    for (int64_t k = b; k < e; ++k) {
      const Run& r = runs.rows[k];
      const int64_t row_start = r.start * runs.row_elements;
      if (runs.whole_rows) {
        task(row_start, r.length * runs.row_elements);
      } else {
        for (const Run& c : runs.cols) task(row_start + c.start, c.length);
      }
    }
    task.finish();
  });
}

// a * b + c rounded once. The builtins, not std::fma: the std:: overloads are
// out-of-line functions of the default target, which the AVX2 clones below call
// (into libm) instead of emitting vfmadd.
__attribute__((always_inline)) inline float fused(float a, float b, float c) {
  return __builtin_fmaf(a, b, c);
}
__attribute__((always_inline)) inline double fused(double a, double b, double c) {
  return __builtin_fma(a, b, c);
}

template <typename T>
struct SgdScalars {
  T lr_neg, momentum, one_minus_dampening, weight_decay;
  bool use_momentum, use_weight_decay, nesterov, maximize, fresh_buffer;
};

// torch.optim.SGD's _single_tensor_sgd on elements [0, n) of the pointers.
// The scalars come by value: a reference could alias the arrays, and the loop
// would reload them after every store instead of vectorizing. Every store is
// unconditional (the optional buffer is a template flag) and the other options
// are selects, so that GCC vectorizes the loop.
template <typename T, bool kMomentum>
__attribute__((always_inline)) inline void sgd_loop(T* __restrict__ p,
                                                    const T* __restrict__ grad,
                                                    T* __restrict__ buf, int64_t n,
                                                    const SgdScalars<T> s) {
  for (int64_t i = 0; i < n; ++i) {
    T g = s.maximize ? -grad[i] : grad[i];
    const T pi = p[i];
    g = s.use_weight_decay ? fused(s.weight_decay, pi, g) : g;  // grad.add(param, alpha=wd)
    if constexpr (kMomentum) {
      // buf = grad.clone() on the first step, else buf.mul_(momentum).add_(grad, alpha=1 - dampening)
      const T b = s.fresh_buffer ? g : fused(s.one_minus_dampening, g, buf[i] * s.momentum);
      buf[i] = b;
      g = s.nesterov ? fused(s.momentum, b, g) : b;  // grad.add(buf, alpha=momentum)
    }
    p[i] = fused(s.lr_neg, g, pi);  // param.add_(grad, alpha=-lr)
  }
}

template <typename T>
__attribute__((always_inline)) inline void sgd_elements(T* p, const T* grad, T* buf, int64_t n,
                                                        const SgdScalars<T>& s) {
  if (s.use_momentum) {
    sgd_loop<T, true>(p, grad, buf, n, s);
  } else {
    sgd_loop<T, false>(p, grad, buf, n, s);
  }
}

template <typename T>
struct AdamScalars {
  T decay, weight_decay, lerp_weight, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
      step_size_neg;
  bool use_weight_decay, decoupled, maximize;
};

// torch.optim.Adam's _single_tensor_adam (capturable=False, differentiable=False),
// in two loops around the square root, which must be ATen's own (see adam_task):
// the first updates the moments (and decays the parameter, for AdamW) and leaves
// the second moment that normalizes the step in `second`.
template <typename T, bool kAmsgrad>
__attribute__((always_inline)) inline void adam_moments_loop(
    T* __restrict__ p, const T* __restrict__ grad, T* __restrict__ m, T* __restrict__ v,
    T* __restrict__ vmax, T* __restrict__ second, int64_t n, const AdamScalars<T> s) {
  const bool small_weight = std::abs(s.lerp_weight) < T(0.5);
  const T lerp_coeff = small_weight ? s.lerp_weight : s.lerp_weight - T(1);
  const bool decay_param = s.use_weight_decay && s.decoupled;
  const bool decay_grad = s.use_weight_decay && !s.decoupled;
  for (int64_t i = 0; i < n; ++i) {
    T g = s.maximize ? -grad[i] : grad[i];
    const T pi = p[i];
    p[i] = decay_param ? pi * s.decay : pi;  // param.mul_(1 - lr * weight_decay)
    g = decay_grad ? fused(s.weight_decay, pi, g) : g;  // grad.add(param, alpha=wd)
    // exp_avg.lerp_(grad, 1 - beta1): ATen's fmadd(coeff, end - start, base).
    const T mi = m[i];
    m[i] = fused(lerp_coeff, g - mi, small_weight ? mi : g);
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    const T v_new = fused(s.one_minus_beta2 * g, g, v[i] * s.beta2);
    v[i] = v_new;
    T sq = v_new;
    if constexpr (kAmsgrad) {  // torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
      const T old = vmax[i];
      sq = (__builtin_isnan(old) || old > v_new) ? old : v_new;
      vmax[i] = sq;
    }
    second[i] = sq;
  }
}

template <typename T>
__attribute__((always_inline)) inline void adam_moments(T* p, const T* grad, T* m, T* v,
                                                        T* vmax, T* second, int64_t n,
                                                        const AdamScalars<T>& s) {
  if (vmax != nullptr) {
    adam_moments_loop<T, true>(p, grad, m, v, vmax, second, n, s);
  } else {
    adam_moments_loop<T, false>(p, grad, m, v, vmax, second, n, s);
  }
}

// The second loop: `root` holds sqrt(second) as ATen computes it.
template <typename T>
__attribute__((always_inline)) inline void adam_params(T* __restrict__ p, const T* __restrict__ m,
                                                       const T* __restrict__ root, int64_t n,
                                                       const AdamScalars<T> s) {
  for (int64_t i = 0; i < n; ++i) {
    // denom = (sqrt / bias_correction2_sqrt).add_(eps); param.addcdiv_(exp_avg, denom, -step_size)
    const T denom = root[i] / s.bias_correction2_sqrt + s.eps;
    p[i] = p[i] + (s.step_size_neg * m[i]) / denom;
  }
}

// The vectorizable loops, built for AVX2+FMA and generically (see the top);
// each NAME below picks one per call. (Not target_clones: its "arch=haswell" clone
// is not chosen on every CPU that has AVX2 and FMA.)
#define DCE_AVX2_FMA __attribute__((target("avx2,fma")))

bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

#define DCE_BLOCK_LOOP(name, body_fn, params, args)  \
  DCE_AVX2_FMA void name##_avx2 params { body_fn args; } \
  void name##_generic params { body_fn args; }          \
  void name params {                                    \
    if (has_avx2_fma()) {                               \
      name##_avx2 args;                                 \
    } else {                                            \
      name##_generic args;                              \
    }                                                   \
  }

DCE_BLOCK_LOOP(sgd_run, sgd_elements,
               (float* p, const float* g, float* b, int64_t n, const SgdScalars<float>& s),
               (p, g, b, n, s))
DCE_BLOCK_LOOP(sgd_run, sgd_elements,
               (double* p, const double* g, double* b, int64_t n, const SgdScalars<double>& s),
               (p, g, b, n, s))
DCE_BLOCK_LOOP(adam_moments_run, adam_moments,
               (float* p, const float* g, float* m, float* v, float* vm, float* sq, int64_t n,
                const AdamScalars<float>& s),
               (p, g, m, v, vm, sq, n, s))
DCE_BLOCK_LOOP(adam_moments_run, adam_moments,
               (double* p, const double* g, double* m, double* v, double* vm, double* sq,
                int64_t n, const AdamScalars<double>& s),
               (p, g, m, v, vm, sq, n, s))
DCE_BLOCK_LOOP(adam_params_run, adam_params,
               (float* p, const float* m, const float* root, int64_t n,
                const AdamScalars<float>& s),
               (p, m, root, n, s))
DCE_BLOCK_LOOP(adam_params_run, adam_params,
               (double* p, const double* m, const double* root, int64_t n,
                const AdamScalars<double>& s),
               (p, m, root, n, s))

#undef DCE_BLOCK_LOOP

// One task's share of an Adam step. ATen's CPU sqrt is not IEEE's correctly
// rounded one (MKL VML, about an ulp off), so for the same bits the square
// roots are ATen's too: the second moments of up to kChunk elements, from as
// many ranges as fill it, are collected in a cache-sized buffer, square-rooted
// by one at::sqrt_ call, and then the parameters of those ranges are updated.
template <typename T>
class AdamTask {
 public:
  static constexpr int64_t kChunk = 4096;

  AdamTask(T* p, const T* g, T* m, T* v, T* vm, const AdamScalars<T>& s)
      : p_(p), g_(g), m_(m), v_(v), vm_(vm), s_(s), second_(kChunk) {}

  void operator()(int64_t start, int64_t length) {
    while (length > 0) {
      const int64_t take = std::min(length, kChunk - filled_);
      adam_moments_run(p_ + start, g_ + start, m_ + start, v_ + start,
                       vm_ == nullptr ? nullptr : vm_ + start, second_.data() + filled_, take,
                       s_);
      pending_.push_back({start, take});
      filled_ += take;
      start += take;
      length -= take;
      if (filled_ == kChunk) finish();
    }
  }

  void finish() {
    if (filled_ == 0) return;
    at::from_blob(second_.data(), {filled_}, at::CPU(c10::CppTypeToScalarType<T>::value))
        .sqrt_();
    int64_t offset = 0;
    for (const Run& r : pending_) {
      adam_params_run(p_ + r.start, m_ + r.start, second_.data() + offset, r.length, s_);
      offset += r.length;
    }
    pending_.clear();
    filled_ = 0;
  }

 private:
  T* p_;
  const T* g_;
  T* m_;
  T* v_;
  T* vm_;
  AdamScalars<T> s_;
  std::vector<T> second_;
  std::vector<Run> pending_;
  int64_t filled_ = 0;
};

void check_like(const at::Tensor& param, const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", what, " is required");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), op, ": ", what, " has dtype ",
              t.scalar_type(), ", param has ", param.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", what, " has shape ", t.sizes(),
              ", param has ", param.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
}

void check_param(const at::Tensor& param, const char* op) {
  TORCH_CHECK(param.device().is_cpu(), op, ": param must be a CPU tensor, got ", param.device());
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble, op,
              ": param must be float32 or float64, got ", param.scalar_type());
  TORCH_CHECK(param.is_contiguous(), op, ": param must be contiguous");
}

template <typename T>
T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void sgd_block_step_cpu(const at::Tensor& param, const at::Tensor& grad,
                        const c10::optional<at::Tensor>& momentum_buffer,
                        const c10::optional<at::Tensor>& rows,
                        const c10::optional<at::Tensor>& cols, double lr, double momentum,
                        double dampening, double weight_decay, bool nesterov, bool maximize,
                        bool fresh_buffer) {
  constexpr const char* op = "sgd_block_step_";
  check_param(param, op);
  check_like(param, grad, "grad", op);
  const bool use_momentum = momentum != 0;
  if (use_momentum) {
    TORCH_CHECK(momentum_buffer.has_value() && momentum_buffer->defined(), op,
                ": momentum != 0 needs a momentum_buffer");
    check_like(param, *momentum_buffer, "momentum_buffer", op);
  }
  const BlockRuns runs = block_runs(param, rows, cols, op);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), op, [&] {
    const SgdScalars<scalar_t> s{static_cast<scalar_t>(-lr), static_cast<scalar_t>(momentum),
                                 static_cast<scalar_t>(1 - dampening),
                                 static_cast<scalar_t>(weight_decay), use_momentum,
                                 weight_decay != 0, nesterov, maximize, fresh_buffer};
    scalar_t* p = param.data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* b = use_momentum ? data_or_null<scalar_t>(momentum_buffer) : nullptr;
    struct SgdTask {
      scalar_t* p;
      const scalar_t* g;
      scalar_t* b;
      const SgdScalars<scalar_t>& s;
      void operator()(int64_t start, int64_t length) const {
        sgd_run(p + start, g + start, b == nullptr ? nullptr : b + start, length, s);
      }
      void finish() const {}
    };
    for_each_range(runs, [&] { return SgdTask{p, g, b, s}; });
  });
}

void adam_block_step_cpu(const at::Tensor& param, const at::Tensor& grad,
                         const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         const c10::optional<at::Tensor>& max_exp_avg_sq,
                         const c10::optional<at::Tensor>& rows,
                         const c10::optional<at::Tensor>& cols, double lr, double beta1,
                         double beta2, double weight_decay, bool decoupled_weight_decay,
                         double eps, double step_size, double bias_correction2_sqrt,
                         bool maximize) {
  constexpr const char* op = "adam_block_step_";
  check_param(param, op);
  check_like(param, grad, "grad", op);
  check_like(param, exp_avg, "exp_avg", op);
  check_like(param, exp_avg_sq, "exp_avg_sq", op);
  const bool amsgrad = max_exp_avg_sq.has_value() && max_exp_avg_sq->defined();
  if (amsgrad) check_like(param, *max_exp_avg_sq, "max_exp_avg_sq", op);
  const BlockRuns runs = block_runs(param, rows, cols, op);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), op, [&] {
    // Each scalar is what torch.optim hands ATen (a Python float), cast as ATen casts it.
    const AdamScalars<scalar_t> s{static_cast<scalar_t>(1 - lr * weight_decay),
                                  static_cast<scalar_t>(weight_decay),
                                  static_cast<scalar_t>(1 - beta1),
                                  static_cast<scalar_t>(beta2),
                                  static_cast<scalar_t>(1 - beta2),
                                  static_cast<scalar_t>(bias_correction2_sqrt),
                                  static_cast<scalar_t>(eps),
                                  static_cast<scalar_t>(-step_size),
                                  weight_decay != 0, decoupled_weight_decay, maximize};
    scalar_t* p = param.data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* m = exp_avg.data_ptr<scalar_t>();
    scalar_t* v = exp_avg_sq.data_ptr<scalar_t>();
    scalar_t* vm = amsgrad ? data_or_null<scalar_t>(max_exp_avg_sq) : nullptr;
    for_each_range(runs, [&] { return AdamTask<scalar_t>(p, g, m, v, vm, s); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dce, CPU, m) {
  m.impl("sgd_block_step_", &sgd_block_step_cpu);
  m.impl("adam_block_step_", &adam_block_step_cpu);
}

}  // namespace dce::cpu

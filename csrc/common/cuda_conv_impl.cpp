#include "cuda_conv_impl.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>

#include "../op_schemas.h"

namespace dce {
namespace {

constexpr const char* kEnvVar = "DCE_CUDA_CONV";

std::atomic<int>& current() {
  // Initialized once from the environment; a bad value throws here, and again
  // at every query (a failed static initialization is retried), so nothing runs
  // with a setting the user did not ask for.
  static std::atomic<int> impl([] {
    const char* env = std::getenv(kEnvVar);
    return static_cast<int>(env == nullptr || *env == '\0'
                                ? CudaConvImpl::kCudnn
                                : parse_cuda_conv_impl(env, "the environment variable DCE_CUDA_CONV"));
  }());
  return impl;
}

}  // namespace

CudaConvImpl parse_cuda_conv_impl(std::string_view name, const char* source) {
  if (name == "cudnn") return CudaConvImpl::kCudnn;
  if (name == "igemm") return CudaConvImpl::kIgemm;
  TORCH_CHECK(false, source, " must be \"cudnn\" or \"igemm\" (the CUDA conv implementation), got \"",
              std::string(name), "\"");
}

const char* cuda_conv_impl_name(CudaConvImpl impl) {
  return impl == CudaConvImpl::kIgemm ? "igemm" : "cudnn";
}

CudaConvImpl cuda_conv_impl() { return static_cast<CudaConvImpl>(current().load()); }

void set_cuda_conv_impl(CudaConvImpl impl) { current().store(static_cast<int>(impl)); }

namespace {

void set_op(std::string impl) {
  set_cuda_conv_impl(parse_cuda_conv_impl(impl, "set_cuda_conv_impl: impl"));
}
std::string get_op() { return cuda_conv_impl_name(cuda_conv_impl()); }

}  // namespace

// No tensor arguments: one kernel for every dispatch key.
TORCH_LIBRARY_FRAGMENT(dce, m) {
  m.def(schema::kSetCudaConvImpl, &set_op);
  m.def(schema::kGetCudaConvImpl, &get_op);
}

}  // namespace dce

// Torch binding of csrc/fp8_cast/fp8_cast.cu: herd::fp8_amax, herd::fp8_cast and herd::fp8_delayed_update on CUDA
// tensors (schemas in engine/ops/fp8_cast.py; references in engine/ops/reference.py).
//
// This file includes no CUDA header (neither ATen/cuda/CUDAContext.h nor c10/cuda/*): those need cuSPARSE/cuBLAS
// headers and torch's generated c10/cuda/impl/cuda_cmake_macros.h, which a CPU build machine (CPU torch wheel plus
// nvcc only) lacks, and tests/unit/test_csrc_compile.py compiles this file there. The device-generic equivalents:
// c10::DeviceGuard for the CUDAGuard, the current stream's native handle (a cudaStream_t) from the CUDA guard
// implementation, and the launchers return the cudaGetLastError() text that C10_CUDA_KERNEL_LAUNCH_CHECK checks.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/extension.h>

#include <tuple>
#include <vector>

const char* herd_fp8_amax(const void* x, int64_t n, int dtype_code, void* amax, int device, void* stream);
const char* herd_fp8_cast(const void* x, const float* scale, int64_t M, int64_t K, int dtype_code, int fp8_code,
                          bool transpose, void* out, void* out_t, void* amax, void* stream);
const char* herd_fp8_delayed_update(void* history, void* scale, void* overflows, const void* amax, double limit,
                                    int64_t H, void* inv_used, void* stream);

namespace {

int input_dtype_code(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, op,
              ": x must be bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(x.numel() > 0, op, ": x must be non-empty (the max of no elements is undefined)");
  return x.scalar_type() == at::kBFloat16 ? 0 : 1;
}

// The current CUDA stream of `device` (what at::cuda::getCurrentCUDAStream gives), as a cudaStream_t.
void* current_stream(const c10::Device& device) {
  return c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(device).native_handle();
}

// max |x| over all of x (any shape): fp32 0-dim tensor. NaN anywhere gives NaN.
at::Tensor fp8_amax(const at::Tensor& x_in) {
  const int dtype_code = input_dtype_code(x_in, "fp8_amax");
  c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor amax = at::empty({}, x.options().dtype(at::kFloat));  // zeroed, then atomicMax-ed, by the launcher
  const char* err = herd_fp8_amax(x.data_ptr(), x.numel(), dtype_code, amax.data_ptr(), x.device().index(),
                                  current_stream(x.device()));
  TORCH_CHECK(err == nullptr, "fp8_amax: kernel launch failed: ", err);
  return amax;
}

// x [M, K], scale fp32 (one element, read on the device: no host sync) -> out [M, K] fp8, out_t [K, M] fp8 (or
// [0] when not transpose), amax fp32 0-dim.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_cast(const at::Tensor& x_in, const at::Tensor& scale,
                                                        at::ScalarType dtype, bool transpose) {
  const int dtype_code = input_dtype_code(x_in, "fp8_cast");
  TORCH_CHECK(x_in.dim() == 2, "fp8_cast: x must be 2-D [M, K], got ", x_in.dim(), " dims");
  TORCH_CHECK(dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2,
              "fp8_cast: dtype must be float8_e4m3fn or float8_e5m2, got ", dtype);
  TORCH_CHECK(scale.device() == x_in.device(), "fp8_cast: scale must be on x's device");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 1,
              "fp8_cast: scale must be a one-element float32 tensor");
  const int64_t M = x_in.size(0), K = x_in.size(1);
  TORCH_CHECK(!transpose || K <= int64_t{65535} * 64, "fp8_cast: K = ", K, " too large for the transpose grid");
  c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({M, K}, x.options().dtype(dtype));
  at::Tensor out_t = at::empty(transpose ? std::vector<int64_t>{K, M} : std::vector<int64_t>{0},
                               x.options().dtype(dtype));
  at::Tensor amax = at::empty({}, x.options().dtype(at::kFloat));  // zeroed, then atomicMax-ed, by the launcher
  const char* err = herd_fp8_cast(x.data_ptr(), scale.data_ptr<float>(), M, K, dtype_code,
                                  dtype == at::kFloat8_e4m3fn ? 0 : 1, transpose, out.data_ptr(),
                                  transpose ? out_t.data_ptr() : nullptr, amax.data_ptr(),
                                  current_stream(x.device()));
  TORCH_CHECK(err == nullptr, "fp8_cast: kernel launch failed: ", err);
  return {out, out_t, amax};
}

void check_scalar(const at::Tensor& t, at::ScalarType dtype, const at::Tensor& history, const char* name) {
  TORCH_CHECK(t.device() == history.device(), "fp8_delayed_update: ", name, " must be on history's device");
  TORCH_CHECK(t.scalar_type() == dtype && t.numel() == 1, "fp8_delayed_update: ", name, " must be one ", dtype);
}

// In place: history [H] fp32 contiguous, scale fp32 and overflows int64 (one element each); amax fp32 (one
// element). Returns 1/scale of the scale before the update (fp32 0-dim).
at::Tensor fp8_delayed_update(at::Tensor history, at::Tensor scale, at::Tensor overflows, const at::Tensor& amax,
                              double limit) {
  TORCH_CHECK(history.is_cuda(), "fp8_delayed_update: history must be a CUDA tensor");
  TORCH_CHECK(history.scalar_type() == at::kFloat && history.dim() == 1 && history.is_contiguous(),
              "fp8_delayed_update: history must be a contiguous 1-D float32 tensor");
  const int64_t H = history.numel();
  TORCH_CHECK(H >= 1 && H <= 8192, "fp8_delayed_update: window length ", H, " not in [1, 8192]");
  check_scalar(scale, at::kFloat, history, "scale");
  check_scalar(overflows, at::kLong, history, "overflows");
  check_scalar(amax, at::kFloat, history, "amax");
  TORCH_CHECK(scale.is_contiguous() && overflows.is_contiguous() && amax.is_contiguous(),
              "fp8_delayed_update: scale, overflows and amax must be contiguous");
  c10::DeviceGuard guard(history.device());
  at::Tensor inv_used = at::empty({}, scale.options());
  const char* err = herd_fp8_delayed_update(history.data_ptr(), scale.data_ptr(), overflows.data_ptr(),
                                            amax.data_ptr(), limit, H, inv_used.data_ptr(),
                                            current_stream(history.device()));
  TORCH_CHECK(err == nullptr, "fp8_delayed_update: kernel launch failed: ", err);
  return inv_used;
}

}  // namespace

TORCH_LIBRARY_IMPL(herd, CUDA, m) {
  m.impl("fp8_amax", &fp8_amax);
  m.impl("fp8_cast", &fp8_cast);
  m.impl("fp8_delayed_update", &fp8_delayed_update);
}

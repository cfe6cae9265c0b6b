// Torch binding of the fused RMSNorm kernels (rms_norm.cu): argument checks, output allocation, launch on the
// current stream. The ops are defined (schemas, CPU references, fake and autograd kernels) in engine/ops/norm.py.
//
// No CUDA header is included: ATen/cuda/CUDAContext.h and c10/cuda/* need the cuSPARSE/cuBLAS headers and torch's
// generated cuda_cmake_macros.h, absent on the CPU build machine where tests/unit/test_csrc_compile.py compiles this
// file. Device-generic equivalents stand in: c10::DeviceGuard for CUDAGuard, the CUDA guard implementation's current
// stream for at::cuda::getCurrentCUDAStream(), and the launchers return the cudaGetLastError() text that
// C10_CUDA_KERNEL_LAUNCH_CHECK would check (nullptr when the launch succeeded).
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

// rms_norm.cu
int64_t herd_rms_norm_max_dim();
const char* herd_rms_norm_fwd(const void* x, const void* residual, const void* weight, void* y, void* h_out,
                              float* rstd, int64_t rows, int64_t dim, double eps, int x_dtype, int residual_dtype,
                              int weight_dtype, int out_dtype, bool vec, void* stream);
const char* herd_rms_norm_fp8_fwd(const void* x, const void* residual, const void* weight, void* q, void* h_out,
                                  float* rstd, const float* scale, void* amax, int64_t rows, int64_t dim, double eps,
                                  int x_dtype, int residual_dtype, int weight_dtype, int out_dtype, bool vec,
                                  void* stream);
// fp8_cast.cu: in [M, K] bytes -> out [K, M] bytes
const char* herd_fp8_transpose(const void* in, int64_t M, int64_t K, void* out, void* stream);
int64_t herd_rms_norm_bwd_blocks(int64_t rows, int64_t dim, int dy_dtype, int h_dtype, int weight_dtype, bool vec);
const char* herd_rms_norm_bwd(const void* dy, const void* h, const void* weight, const float* rstd,
                              const void* dh_extra, void* dx, void* dweight, float* dw_partial, int64_t blocks,
                              int64_t rows, int64_t dim, int dy_dtype, int h_dtype, int weight_dtype, bool vec,
                              void* stream);

namespace {

constexpr int kFloat32 = 0, kBFloat16 = 1;  // dtype codes of rms_norm.cu

int dtype_code(at::ScalarType type, const char* op, const char* arg) {
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16, op, ": ", arg, " must be float32 or bfloat16, got ", type);
  return type == at::kBFloat16 ? kBFloat16 : kFloat32;
}

void check_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* arg) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), op, ": ", arg, " must be on ", x.device(), ", got ",
              t.device());
}

// The row length D (the last dim of x, named `arg`), checked against weight [D] and the kernel's limit.
int64_t check_dim(const at::Tensor& x, const at::Tensor& weight, const char* op, const char* arg) {
  TORCH_CHECK(x.is_cuda(), op, ": ", arg, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() >= 1, op, ": ", arg, " must have at least one dimension");
  check_device(weight, x, op, "weight");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(dim >= 1 && dim <= herd_rms_norm_max_dim(), op, ": last dim must be in [1, ", herd_rms_norm_max_dim(),
              "], got ", dim);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == dim, op, ": weight must be [", dim, "], got ", weight.sizes());
  TORCH_CHECK(x.numel() / dim < (int64_t{1} << 31), op, ": too many rows (", x.numel() / dim, ")");
  return dim;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// The current CUDA stream of `device` (what at::cuda::getCurrentCUDAStream gives), as a cudaStream_t.
void* current_stream(const c10::Device& device) {
  return c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(device).native_handle();
}

// An add+norm op's residual: checked against x (device, shape), made contiguous into `residual`, and `h` (the sum,
// residual's dtype) allocated; returns the residual's dtype code.
int take_residual(const at::Tensor& residual_in, const at::Tensor& x_in, const char* op, at::Tensor& residual,
                  at::Tensor& h) {
  check_device(residual_in, x_in, op, "residual");
  TORCH_CHECK(residual_in.sizes() == x_in.sizes(), op, ": residual must match x ", x_in.sizes(), ", got ",
              residual_in.sizes());
  residual = residual_in.contiguous();
  h = at::empty_like(residual, at::MemoryFormat::Contiguous);
  return dtype_code(residual_in.scalar_type(), op, "residual");
}

// y = rmsnorm(residual + x or x) * weight; h (the sum, residual's dtype) is undefined without a residual.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const char* op, const at::Tensor& x_in,
                                                       const at::Tensor* residual_in, const at::Tensor& weight_in,
                                                       double eps, at::ScalarType out_dtype) {
  const int64_t dim = check_dim(x_in, weight_in, op, "x");
  const int x_code = dtype_code(x_in.scalar_type(), op, "x");
  const int w_code = dtype_code(weight_in.scalar_type(), op, "weight");
  const int out_code = dtype_code(out_dtype, op, "out_dtype");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor residual, h;
  int r_code = x_code;
  if (residual_in != nullptr) {
    r_code = take_residual(*residual_in, x_in, op, residual, h);
  }
  const int64_t rows = x.numel() / dim;
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, h, rstd};
  bool vec = dim % 8 == 0 && aligned16(x) && aligned16(weight) && aligned16(y);
  if (residual.defined()) vec = vec && aligned16(residual) && aligned16(h);
  const c10::DeviceGuard guard(x.device());
  const char* err = herd_rms_norm_fwd(x.data_ptr(), residual.defined() ? residual.data_ptr() : nullptr,
                                      weight.data_ptr(), y.data_ptr(), h.defined() ? h.data_ptr() : nullptr,
                                      rstd.data_ptr<float>(), rows, dim, eps, x_code, r_code, w_code, out_code, vec,
                                      current_stream(x.device()));
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                at::ScalarType out_dtype) {
  auto [y, h, rstd] = forward("rms_norm_fwd", x, nullptr, weight, eps, out_dtype);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(const at::Tensor& x, const at::Tensor& residual,
                                                                const at::Tensor& weight, double eps,
                                                                at::ScalarType out_dtype) {
  return forward("add_rms_norm_fwd", x, &residual, weight, eps, out_dtype);
}

// The forward writing y only as e4m3 (engine/ops/fp8_fused.py): (q [rows, dim], q^T [dim, rows] or [0], amax of y,
// h (residual + x; [0] without residual), rstd). norm_dtype: the dtype the plain forward would store y in.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rms_norm_fp8_fwd(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in, const at::Tensor& weight_in, double eps,
    at::ScalarType norm_dtype, const at::Tensor& scale, at::ScalarType dtype, bool transpose) {
  const char* op = "rms_norm_fp8_fwd";
  const int64_t dim = check_dim(x_in, weight_in, op, "x");
  TORCH_CHECK(dim % 16 == 0, op, ": last dim must be a multiple of 16, got ", dim);
  TORCH_CHECK(dtype == at::kFloat8_e4m3fn, op, ": dtype must be float8_e4m3fn, got ", dtype);
  check_device(scale, x_in, op, "scale");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 1, op, ": scale must be one float32");
  const int x_code = dtype_code(x_in.scalar_type(), op, "x");
  const int w_code = dtype_code(weight_in.scalar_type(), op, "weight");
  const int out_code = dtype_code(norm_dtype, op, "norm_dtype");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), scale_c = scale.contiguous();
  const bool add = residual_in.has_value() && residual_in->defined();
  at::Tensor residual, h;
  int r_code = x_code;
  if (add) {
    r_code = take_residual(*residual_in, x_in, op, residual, h);
  } else {
    h = at::empty({0}, x.options());
  }
  const int64_t rows = x.numel() / dim;
  TORCH_CHECK(!transpose || dim <= int64_t{65535} * 64, op, ": dim ", dim, " too large for the transpose grid");
  at::Tensor q = at::empty({rows, dim}, x.options().dtype(dtype));
  at::Tensor q_t = at::empty(transpose ? std::vector<int64_t>{dim, rows} : std::vector<int64_t>{0},
                             x.options().dtype(dtype));
  at::Tensor amax = at::zeros({}, x.options().dtype(at::kFloat));  // the launcher zeroes it again, async
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {q, q_t, amax, h, rstd};  // amax of nothing: 0, as the reference's cast of no rows
  bool vec = aligned16(x) && aligned16(weight) && aligned16(q);
  if (add) vec = vec && aligned16(residual) && aligned16(h);
  const c10::DeviceGuard guard(x.device());
  void* stream = current_stream(x.device());
  const char* err = herd_rms_norm_fp8_fwd(x.data_ptr(), add ? residual.data_ptr() : nullptr, weight.data_ptr(),
                                          q.data_ptr(), add ? h.data_ptr() : nullptr, rstd.data_ptr<float>(),
                                          scale_c.data_ptr<float>(), amax.data_ptr(), rows, dim, eps, x_code, r_code,
                                          w_code, out_code, vec, stream);
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  if (transpose) {
    err = herd_fp8_transpose(q.data_ptr(), rows, dim, q_t.data_ptr(), stream);
    TORCH_CHECK(err == nullptr, op, ": transpose launch failed: ", err);
  }
  return {q, q_t, amax, h, rstd};
}

// dx = d rmsnorm / dh (+ dh_extra), in h's dtype; dweight summed over rows in fp32, in weight's dtype.
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy_in, const at::Tensor& h_in,
                                                const at::Tensor& weight_in, const at::Tensor& rstd_in,
                                                const std::optional<at::Tensor>& dh_extra_in) {
  const char* op = "rms_norm_bwd";
  const int64_t dim = check_dim(h_in, weight_in, op, "h");
  const int dy_code = dtype_code(dy_in.scalar_type(), op, "dy"), h_code = dtype_code(h_in.scalar_type(), op, "h");
  const int w_code = dtype_code(weight_in.scalar_type(), op, "weight");
  check_device(dy_in, h_in, op, "dy");
  check_device(rstd_in, h_in, op, "rstd");
  TORCH_CHECK(dy_in.sizes() == h_in.sizes(), op, ": dy must match h ", h_in.sizes(), ", got ", dy_in.sizes());
  const int64_t rows = h_in.numel() / dim;
  TORCH_CHECK(rstd_in.scalar_type() == at::kFloat && rstd_in.numel() == rows, op, ": rstd must be float32 [", rows,
              "], got ", rstd_in.scalar_type(), " ", rstd_in.sizes());
  const at::Tensor dy = dy_in.contiguous(), h = h_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  at::Tensor dh_extra;
  if (dh_extra_in.has_value() && dh_extra_in->defined()) {
    check_device(*dh_extra_in, h_in, op, "dh_extra");
    TORCH_CHECK(dh_extra_in->sizes() == h_in.sizes(), op, ": dh_extra must match h ", h_in.sizes(), ", got ",
                dh_extra_in->sizes());
    dh_extra = dh_extra_in->to(h.scalar_type()).contiguous();  // the kernel reads it in h's dtype
  }
  at::Tensor dx = at::empty(h.sizes(), h.options());
  at::Tensor dweight = at::empty({dim}, weight.options());
  if (rows == 0) return {dx, dweight.zero_()};
  bool vec = dim % 8 == 0 && aligned16(dy) && aligned16(h) && aligned16(weight) && aligned16(dx);
  if (dh_extra.defined()) vec = vec && aligned16(dh_extra);
  const c10::DeviceGuard guard(h.device());
  const int64_t blocks = herd_rms_norm_bwd_blocks(rows, dim, dy_code, h_code, w_code, vec);
  at::Tensor partial = at::empty({blocks, dim}, h.options().dtype(at::kFloat));  // stage-1 dweight sums
  const char* err = herd_rms_norm_bwd(dy.data_ptr(), h.data_ptr(), weight.data_ptr(), rstd.data_ptr<float>(),
                                      dh_extra.defined() ? dh_extra.data_ptr() : nullptr, dx.data_ptr(),
                                      dweight.data_ptr(), partial.data_ptr<float>(), blocks, rows, dim, dy_code,
                                      h_code, w_code, vec, current_stream(h.device()));
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  return {dx, dweight};
}

}  // namespace

TORCH_LIBRARY_IMPL(herd, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("rms_norm_fp8_fwd", &rms_norm_fp8_fwd);
}

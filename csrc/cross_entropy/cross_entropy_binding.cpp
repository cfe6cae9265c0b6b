// Torch binding of the fused cross-entropy kernels (cross_entropy.cu) as the CUDA kernels of
// herd::cross_entropy_fwd and herd::cross_entropy_bwd (schemas and CPU references: engine/ops/cross_entropy.py).
//
// No CUDA header here (neither ATen/cuda/CUDAContext.h nor c10/cuda/*, which need cuBLAS/cuSPARSE headers and
// torch's generated cuda_cmake_macros.h that a CPU build machine lacks; tests/unit/test_csrc_compile.py compiles
// this file there), as in csrc/fp8_cast: c10::DeviceGuard for the CUDAGuard, the current stream's native handle
// from the CUDA guard implementation, and launchers that return the cudaGetLastError() text.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/extension.h>

#include <limits>
#include <tuple>

const char* herd_cross_entropy_fwd(const void* logits, const int64_t* targets, float* row_max, float* row_sumexp,
                                   float* target_logit, int64_t rows, int64_t cols, int64_t vocab_start,
                                   int64_t vocab_size, int dtype_code, void* stream);
const char* herd_cross_entropy_bwd(const float* grad, const void* logits, const int64_t* targets, const float* lse,
                                   void* dlogits, int64_t rows, int64_t cols, int64_t vocab_start,
                                   int64_t vocab_size, int dtype_code, void* stream);

namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

// The current CUDA stream of `device` (what at::cuda::getCurrentCUDAStream gives), as a cudaStream_t.
void* current_stream(const c10::Device& device) {
  return c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(device).native_handle();
}

// Checks shared by both ops; returns the kernels' dtype code (0 = fp32, 1 = bf16).
int check_logits_and_targets(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                             int64_t vocab_start, int64_t vocab_size) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [N, V_local], got shape ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kFloat, op,
              ": logits must be bfloat16 or float32, got ", logits.scalar_type());
  TORCH_CHECK(logits.size(0) <= kIntMax, op, ": at most 2^31 - 1 rows, got ", logits.size(0));
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(1) <= kIntMax, op, ": logits need 1 to 2^31 - 1 columns, got ",
              logits.size(1));
  TORCH_CHECK(targets.device() == logits.device(), op, ": targets must be on ", logits.device(), ", got ",
              targets.device());
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0), op, ": targets must be [N] with N = ",
              logits.size(0), ", got shape ", targets.sizes());
  TORCH_CHECK(vocab_start >= 0 && vocab_size >= 1, op, ": need vocab_start >= 0 and vocab_size >= 1, got ",
              vocab_start, " and ", vocab_size);
  return logits.scalar_type() == at::kBFloat16 ? 1 : 0;
}

void check_row_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on ", logits.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), op, ": ", name, " must be [N] with N = ",
              logits.size(0), ", got shape ", t.sizes());
}

// logits: [N, V_local] bf16/fp32; targets: [N] int64 global ids -> (local max, local sum of exp(logit - local max),
// target logit or 0 outside this shard), each [N] fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& targets,
                                                                 int64_t vocab_start, int64_t vocab_size) {
  const int dtype_code = check_logits_and_targets("cross_entropy_fwd", logits, targets, vocab_start, vocab_size);
  c10::DeviceGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = targets.contiguous();
  const auto options = x.options().dtype(at::kFloat);
  at::Tensor row_max = at::empty({x.size(0)}, options);
  at::Tensor row_sumexp = at::empty({x.size(0)}, options);
  at::Tensor target_logit = at::empty({x.size(0)}, options);
  const char* err = herd_cross_entropy_fwd(x.data_ptr(), t.data_ptr<int64_t>(), row_max.data_ptr<float>(),
                                           row_sumexp.data_ptr<float>(), target_logit.data_ptr<float>(), x.size(0),
                                           x.size(1), vocab_start, vocab_size, dtype_code,
                                           current_stream(x.device()));
  TORCH_CHECK(err == nullptr, "cross_entropy_fwd: kernel launch failed: ", err);
  return {row_max, row_sumexp, target_logit};
}

// grad, lse: [N] fp32 -> dlogits [N, V_local] in logits' dtype.
at::Tensor cross_entropy_bwd(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                             const at::Tensor& lse, int64_t vocab_start, int64_t vocab_size) {
  const int dtype_code = check_logits_and_targets("cross_entropy_bwd", logits, targets, vocab_start, vocab_size);
  check_row_vector("cross_entropy_bwd", "grad", grad, logits);
  check_row_vector("cross_entropy_bwd", "lse", lse, logits);
  c10::DeviceGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = targets.contiguous();
  const at::Tensor g = grad.contiguous();  // the grad of a sum arrives expanded (stride 0)
  const at::Tensor l = lse.contiguous();
  at::Tensor dlogits = at::empty_like(x, at::MemoryFormat::Contiguous);
  const char* err = herd_cross_entropy_bwd(g.data_ptr<float>(), x.data_ptr(), t.data_ptr<int64_t>(),
                                           l.data_ptr<float>(), dlogits.data_ptr(), x.size(0), x.size(1),
                                           vocab_start, vocab_size, dtype_code, current_stream(x.device()));
  TORCH_CHECK(err == nullptr, "cross_entropy_bwd: kernel launch failed: ", err);
  return dlogits;
}

}  // namespace

TORCH_LIBRARY_IMPL(herd, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd);
}

// Torch binding of csrc/rope/rope.cu (schemas in engine/ops/rope.py):
//   herd::rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, bool inverse) -> ()  rotates q and k in place,
//     so it cannot fall back to a contiguous copy: q and k must already be contiguous and must not overlap;
//   herd::rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse) -> (Tensor, Tensor)  writes the rotated
//     q and k to new contiguous tensors (any input layout; q and k may share memory): the backward's one pass.
//
// No CUDA header is included (ATen/cuda/CUDAContext.h and c10/cuda/* need cuSPARSE/cuBLAS headers and torch's
// generated cuda_cmake_macros.h, absent on the CPU build machine where tests/unit/test_csrc_compile.py compiles
// this file); the device-generic equivalents are used instead: c10::DeviceGuard for CUDAGuard, the current stream's
// native handle from the CUDA guard implementation for at::cuda::getCurrentCUDAStream(), and the launcher returns
// the cudaGetLastError() text that C10_CUDA_KERNEL_LAUNCH_CHECK would check (as csrc/fp8_cast does).
#include <ATen/MemoryOverlap.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/extension.h>

#include <cstdint>
#include <limits>

const char* herd_rope(const void* q, const void* k, void* q_out, void* k_out, const float* cos_t,
                      const float* sin_t, int64_t tokens, int64_t hq, int64_t hk, int64_t head_dim, bool inverse,
                      int dtype_code, void* stream);

namespace {

// The current CUDA stream of `device` (what at::cuda::getCurrentCUDAStream gives), as a cudaStream_t.
void* current_stream(const c10::Device& device) {
  return c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(device).native_handle();
}

void check_qk(const at::Tensor& q, const at::Tensor& k, const char* op) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(k.device() == q.device(), op, ": k must be on ", q.device(), ", got ", k.device());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat, op,
              ": q must be bfloat16 or float32, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, op, ": q and k must be [b, s, heads, d], got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": k must match q in b, s and d, got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(q.size(3) % 2 == 0, op, ": head dim must be even, got ", q.size(3));
  const int64_t tokens = q.size(0) * q.size(1);
  // The kernel indexes (token, chunk) pairs and head groups with 32-bit ints and gridDim.y (rope.cu).
  TORCH_CHECK(tokens * (q.size(3) / 2) <= std::numeric_limits<int32_t>::max() - 1024, op, ": b * s * d / 2 = ",
              tokens * (q.size(3) / 2), " is too large for one launch");
  TORCH_CHECK(q.size(2) + k.size(2) <= 4 * 65535, op, ": too many heads (", q.size(2) + k.size(2), ")");
}

// cos or sin [b or 1, s or 1, 1, d/2] fp32 -> contiguous [b*s, d/2] (a no-op for the model's [b, s, 1, d/2]).
at::Tensor table(const at::Tensor& t, const char* name, const at::Tensor& q, const char* op) {
  const int64_t b = q.size(0), s = q.size(1), half = q.size(3) / 2;
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && (t.size(0) == b || t.size(0) == 1) && (t.size(1) == s || t.size(1) == 1) &&
                  t.size(2) == 1 && t.size(3) == half,
              op, ": ", name, " must be [b, s, 1, d/2] = [", b, ", ", s, ", 1, ", half, "], got ", t.sizes());
  return t.expand({b, s, 1, half}).contiguous().view({b * s, half});
}

// Rotates q, k (contiguous) into q_out, k_out (q and k themselves in place, or new tensors).
void launch(const at::Tensor& q, const at::Tensor& k, at::Tensor& q_out, at::Tensor& k_out, const at::Tensor& cos,
            const at::Tensor& sin, bool inverse, const char* op) {
  const int64_t tokens = q.size(0) * q.size(1), hq = q.size(2), hk = k.size(2), head_dim = q.size(3);
  c10::DeviceGuard guard(q.device());
  const at::Tensor cos_t = table(cos, "cos", q, op), sin_t = table(sin, "sin", q, op);  // [b*s, d/2]
  const int dtype_code = q.scalar_type() == at::kBFloat16 ? 1 : 0;
  const char* err = herd_rope(q.data_ptr(), k.data_ptr(), q_out.data_ptr(), k_out.data_ptr(),
                              cos_t.data_ptr<float>(), sin_t.data_ptr<float>(), tokens, hq, hk, head_dim, inverse,
                              dtype_code, current_stream(q.device()));
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
}

void rope_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  const char* op = "herd::rope_";
  check_qk(q, k, op);
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), op, ": q and k must be contiguous (rotated in place)");
  TORCH_CHECK(at::get_overlap_status(q, k) == at::MemOverlapStatus::No, op,
              ": q and k must not share memory (each is rotated once, in place)");
  launch(q, k, q, k, cos, sin, inverse, op);
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos,
                                        const at::Tensor& sin, bool inverse) {
  const char* op = "herd::rope";
  check_qk(q_in, k_in, op);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  launch(q, k, q_out, k_out, cos, sin, inverse, op);
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(herd, CUDA, m) {
  m.impl("rope_", &rope_);
  m.impl("rope", &rope);
}

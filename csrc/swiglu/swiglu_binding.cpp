// Torch binding of csrc/swiglu/swiglu.cu: herd::swiglu_fwd(Tensor gate, Tensor up) -> Tensor and
// herd::swiglu_bwd(Tensor dout, Tensor gate, Tensor up) -> (Tensor, Tensor) (schemas in engine/ops/swiglu.py).
// Inputs of any layout are made contiguous; outputs are new contiguous tensors in the inputs' dtype.
//
// No CUDA header is included, for the reason csrc/rope/rope_binding.cpp gives: c10::DeviceGuard stands for CUDAGuard, the
// CUDA guard implementation's current stream for at::cuda::getCurrentCUDAStream(), and the launchers return the
// cudaGetLastError() text that C10_CUDA_KERNEL_LAUNCH_CHECK would check.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/extension.h>

#include <tuple>
#include <vector>

const char* herd_swiglu_fwd(const void* gate, const void* up, void* out, int64_t n, int dtype_code, void* stream);
const char* herd_swiglu_bwd(const void* dout, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
                            int dtype_code, void* stream);
const char* herd_swiglu_fp8_fwd(const void* gate, const void* up, const float* scale, void* q, void* amax, int64_t n,
                                int dtype_code, void* stream);
// fp8_cast.cu: in [M, K] bytes -> out [K, M] bytes
const char* herd_fp8_transpose(const void* in, int64_t M, int64_t K, void* out, void* stream);

namespace {

// The current CUDA stream of `device` (what at::cuda::getCurrentCUDAStream gives), as a cudaStream_t.
void* current_stream(const c10::Device& device) {
  return c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(device).native_handle();
}

// `other` (named `name`) must sit beside gate on its device with its dtype and shape.
void check_like(const at::Tensor& gate, const at::Tensor& other, const char* op, const char* name) {
  TORCH_CHECK(other.device() == gate.device(), op, ": ", name, " must be on ", gate.device(), ", got ",
              other.device());
  TORCH_CHECK(other.scalar_type() == gate.scalar_type(), op, ": ", name, " must have gate's dtype ",
              gate.scalar_type(), ", got ", other.scalar_type());
  TORCH_CHECK(other.sizes() == gate.sizes(), op, ": ", name, " must have gate's shape ", gate.sizes(), ", got ",
              other.sizes());
}

void check_gate(const at::Tensor& gate, const char* op) {
  TORCH_CHECK(gate.is_cuda(), op, ": gate must be a CUDA tensor, got ", gate.device());
  TORCH_CHECK(gate.scalar_type() == at::kBFloat16 || gate.scalar_type() == at::kFloat, op,
              ": gate must be bfloat16 or float32, got ", gate.scalar_type());
}

int dtype_code(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 ? 1 : 0; }

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check_gate(gate, "herd::swiglu_fwd");
  check_like(gate, up, "herd::swiglu_fwd", "up");
  c10::DeviceGuard guard(gate.device());
  const at::Tensor g = gate.contiguous(), u = up.contiguous();  // [.., ffn]
  at::Tensor out = at::empty(g.sizes(), g.options());            // [.., ffn], contiguous
  if (g.numel() > 0) {
    const char* err = herd_swiglu_fwd(g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(), dtype_code(g),
                                      current_stream(g.device()));
    TORCH_CHECK(err == nullptr, "herd::swiglu_fwd: kernel launch failed: ", err);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dout, const at::Tensor& gate,
                                              const at::Tensor& up) {
  check_gate(gate, "herd::swiglu_bwd");
  check_like(gate, up, "herd::swiglu_bwd", "up");
  check_like(gate, dout, "herd::swiglu_bwd", "dout");
  c10::DeviceGuard guard(gate.device());
  const at::Tensor d = dout.contiguous(), g = gate.contiguous(), u = up.contiguous();  // [.., ffn]
  at::Tensor dgate = at::empty(g.sizes(), g.options()), dup = at::empty(g.sizes(), g.options());
  if (g.numel() > 0) {
    const char* err = herd_swiglu_bwd(d.data_ptr(), g.data_ptr(), u.data_ptr(), dgate.data_ptr(), dup.data_ptr(),
                                      g.numel(), dtype_code(g), current_stream(g.device()));
    TORCH_CHECK(err == nullptr, "herd::swiglu_bwd: kernel launch failed: ", err);
  }
  return {dgate, dup};
}

// swiglu_fwd's output written only as e4m3 (engine/ops/fp8_fused.py): gate, up [..., F] -> (q [M, F], q^T [F, M]
// or [0], amax fp32 0-dim) with M the product of the leading dims.
std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_fp8_fwd(const at::Tensor& gate, const at::Tensor& up,
                                                              const at::Tensor& scale, at::ScalarType dtype,
                                                              bool transpose) {
  const char* op = "herd::swiglu_fp8_fwd";
  check_gate(gate, op);
  check_like(gate, up, op, "up");
  TORCH_CHECK(gate.dim() >= 1, op, ": gate must have at least one dimension");
  TORCH_CHECK(dtype == at::kFloat8_e4m3fn, op, ": dtype must be float8_e4m3fn, got ", dtype);
  TORCH_CHECK(scale.device() == gate.device() && scale.scalar_type() == at::kFloat && scale.numel() == 1, op,
              ": scale must be one float32 on gate's device");
  c10::DeviceGuard guard(gate.device());
  const at::Tensor g = gate.contiguous(), u = up.contiguous(), s = scale.contiguous();
  const int64_t cols = g.size(-1), rows = cols > 0 ? g.numel() / cols : 0;
  TORCH_CHECK(!transpose || cols <= int64_t{65535} * 64, op, ": last dim ", cols, " too large for the transpose");
  at::Tensor q = at::empty({rows, cols}, g.options().dtype(dtype));
  at::Tensor q_t = at::empty(transpose ? std::vector<int64_t>{cols, rows} : std::vector<int64_t>{0},
                             g.options().dtype(dtype));
  at::Tensor amax = at::zeros({}, g.options().dtype(at::kFloat));  // the launcher zeroes it again, async
  if (g.numel() == 0) return {q, q_t, amax};
  void* stream = current_stream(g.device());
  const char* err = herd_swiglu_fp8_fwd(g.data_ptr(), u.data_ptr(), s.data_ptr<float>(), q.data_ptr(),
                                        amax.data_ptr(), g.numel(), dtype_code(g), stream);
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
  if (transpose) {
    err = herd_fp8_transpose(q.data_ptr(), rows, cols, q_t.data_ptr(), stream);
    TORCH_CHECK(err == nullptr, op, ": transpose launch failed: ", err);
  }
  return {q, q_t, amax};
}

}  // namespace

TORCH_LIBRARY_IMPL(herd, CUDA, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("swiglu_fp8_fwd", &swiglu_fp8_fwd);
}

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

const char* herd_swiglu_fwd(const void* gate, const void* up, void* out, int64_t n, int dtype_code, void* stream);
const char* herd_swiglu_bwd(const void* dout, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
                            int dtype_code, void* stream);

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

}  // namespace

TORCH_LIBRARY_IMPL(herd, CUDA, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
}

// The Python module entry of the herd_kernels extension. Importing it loads the shared library, whose
// TORCH_LIBRARY_IMPL(herd, CUDA, m) blocks (one per csrc/<op>/<op>.cpp) attach the CUDA kernels to the herd::
// ops that engine/ops/library.py defined first. No functions are exported through pybind.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "herd CUDA kernels; use them through torch.ops.herd (see engine/ops)";
}

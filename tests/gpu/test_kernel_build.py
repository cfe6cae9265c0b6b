"""The built extension itself: it must share torch's C++ runtime so that a binding's TORCH_CHECK reaches Python as a
RuntimeError. (On the H200 build machine g++ linked libstdc++ statically and the first such error segfaulted.)"""

import shutil
import subprocess

import pytest
import torch

from engine.ops import library

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _extension():
    library.load_extension()
    try:
        import herd_kernels
    except ImportError as err:
        pytest.fail(f"herd_kernels is not built (python setup.py build_ext --inplace): {err}")
    return herd_kernels.__file__


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_extension_links_the_shared_libstdcxx():
    needed = subprocess.run(["ldd", _extension()], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so.6" in needed, needed


def test_binding_error_reaches_python_with_its_message():
    _extension()
    x, weight = torch.randn(2, 3, device="cuda"), torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError, match=r"weight must be \[3\], got \[4\]"):
        torch.ops.herd.rms_norm_fwd(x, weight, 1e-5, torch.float32)

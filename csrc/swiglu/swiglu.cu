// SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6 without the projections): out = silu(g) * u
// with silu(g) = g * sigmoid(g) (Elfwing et al. 2018; Ramachandran et al. 2017), and its backward
//   dgate = dout * u * d silu/dg = dout * u * sig(g) * (1 + g * (1 - sig(g)))
//   dup   = dout * silu(g)
// elementwise, math in fp32, results stored in the inputs' dtype (reference: engine/ops/reference.py swiglu).
//
// Launch shape: every thread handles kUnroll 16-byte vectors per input (kThreads * kUnroll vectors per block, the
// kUnroll accesses of a warp each covering 512 contiguous bytes), issuing all its loads before any math so
// 2 * kUnroll (fwd) or 3 * kUnroll (bwd) loads are in flight. The n % VEC elements after the last whole vector are
// done one each by the first threads of block 0. When a pointer is not 16-byte aligned the same kernels run with
// VEC = 1 (scalar accesses).
#include "common.cuh"

namespace herd {
namespace swiglu_impl {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

// 1 / (1 + e^-g). __expf is ex2.approx (a few ulp for the |g| < ~20 that matter); for g < -88 it gives inf and
// the quotient 0, the correct limit.
__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

__device__ __forceinline__ float swiglu_value(float g, float u) { return g * sigmoid(g) * u; }

__device__ __forceinline__ void swiglu_grads(float d, float g, float u, float& dg, float& du) {
  const float sg = sigmoid(g);
  dg = d * u * (sg * (1.f + g * (1.f - sg)));  // d(g * sig(g))/dg = sig + g * sig * (1 - sig)
  du = d * (g * sg);
}

// This thread's kUnroll vectors of gate and up (vector i = first + r * kThreads for r < kUnroll, those below
// nvec), every load issued before any math.
template <typename P>
__device__ __forceinline__ void load_vectors(const void* gate, const void* up, int64_t first, int64_t nvec,
                                             P (&g)[kUnroll], P (&u)[kUnroll]) {
#pragma unroll
  for (int r = 0; r < kUnroll; ++r) {
    const int64_t i = first + r * kThreads;
    if (i < nvec) {
      g[r] = reinterpret_cast<const P*>(gate)[i];
      u[r] = reinterpret_cast<const P*>(up)[i];
    }
  }
}

// gate, up, out: [n] contiguous. For VEC > 1 all three are 16-byte aligned (host check).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    swiglu_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t n) {
  using P = VecPack<T, VEC>;
  const int64_t nvec = n / VEC;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * (kThreads * kUnroll) + threadIdx.x;
  P g[kUnroll], u[kUnroll];
  load_vectors(gate, up, first, nvec, g, u);
#pragma unroll
  for (int r = 0; r < kUnroll; ++r) {
    const int64_t i = first + r * kThreads;
    if (i < nvec) {
      P o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(swiglu_value(as_float(g[r].v[e]), as_float(u[r].v[e])));
      reinterpret_cast<P*>(out)[i] = o;
    }
  }
  if (VEC > 1 && blockIdx.x == 0) {  // scalar tail: fewer than VEC (<= 7) elements, one per thread
    const int64_t i = nvec * VEC + threadIdx.x;
    if (i < n) out[i] = from_float<T>(swiglu_value(as_float(gate[i]), as_float(up[i])));
  }
}

// The forward writing e4m3 (engine/ops/fp8_fused.py swiglu_fp8_fwd): each value as swiglu_fwd_kernel stores it
// (from_float<T>), then q = saturate(value * *scale) in e4m3 (round to nearest even, as csrc/fp8_cast), and the
// largest |value| into *amax_bits (fp32 bits, zeroed by the launcher; one atomicMax per block). So q is bit for bit
// the cast of swiglu_fwd's output, which is never stored. VEC values -> VEC bytes of q per vector.
__device__ __forceinline__ uint32_t fp8_byte(float v, float scale) {
  return static_cast<uint32_t>(__nv_cvt_float_to_fp8(v * scale, __NV_SATFINITE, __NV_E4M3));
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    swiglu_fp8_kernel(const T* __restrict__ gate, const T* __restrict__ up, const float* __restrict__ scale_ptr,
                      uint8_t* __restrict__ q, unsigned int* __restrict__ amax_bits, int64_t n) {
  using P = VecPack<T, VEC>;
  using Q = VecPack<uint8_t, VEC>;
  __shared__ unsigned int scratch[32];
  const float scale = __ldg(scale_ptr);
  const int64_t nvec = n / VEC;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * (kThreads * kUnroll) + threadIdx.x;
  P g[kUnroll], u[kUnroll];
  load_vectors(gate, up, first, nvec, g, u);
  unsigned int amax = 0u;
#pragma unroll
  for (int r = 0; r < kUnroll; ++r) {
    const int64_t i = first + r * kThreads;
    if (i < nvec) {
      Q o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float v = as_float(from_float<T>(swiglu_value(as_float(g[r].v[e]), as_float(u[r].v[e]))));
        amax = max(amax, __float_as_uint(v) & 0x7fffffffu);
        o.v[e] = static_cast<uint8_t>(fp8_byte(v, scale));
      }
      reinterpret_cast<Q*>(q)[i] = o;
    }
  }
  if (VEC > 1 && blockIdx.x == 0) {  // scalar tail, as in swiglu_fwd_kernel
    const int64_t i = nvec * VEC + threadIdx.x;
    if (i < n) {
      const float v = as_float(from_float<T>(swiglu_value(as_float(gate[i]), as_float(up[i]))));
      amax = max(amax, __float_as_uint(v) & 0x7fffffffu);
      q[i] = static_cast<uint8_t>(fp8_byte(v, scale));
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  amax = __reduce_max_sync(0xffffffffu, amax);
  if (lane == 0) scratch[warp] = amax;
  __syncthreads();
  if (warp == 0) {
    amax = __reduce_max_sync(0xffffffffu, lane < kThreads / 32 ? scratch[lane] : 0u);
    if (lane == 0 && amax != 0u) atomicMax(amax_bits, amax);
  }
}

// dout, gate, up, dgate, dup: [n] contiguous. For VEC > 1 all five are 16-byte aligned (host check).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    swiglu_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ gate, const T* __restrict__ up,
                      T* __restrict__ dgate, T* __restrict__ dup, int64_t n) {
  using P = VecPack<T, VEC>;
  const int64_t nvec = n / VEC;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * (kThreads * kUnroll) + threadIdx.x;
  P d[kUnroll], g[kUnroll], u[kUnroll];
#pragma unroll
  for (int r = 0; r < kUnroll; ++r) {
    const int64_t i = first + r * kThreads;
    if (i < nvec) {
      d[r] = reinterpret_cast<const P*>(dout)[i];
      g[r] = reinterpret_cast<const P*>(gate)[i];
      u[r] = reinterpret_cast<const P*>(up)[i];
    }
  }
#pragma unroll
  for (int r = 0; r < kUnroll; ++r) {
    const int64_t i = first + r * kThreads;
    if (i < nvec) {
      P og, ou;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float dg, du;
        swiglu_grads(as_float(d[r].v[e]), as_float(g[r].v[e]), as_float(u[r].v[e]), dg, du);
        og.v[e] = from_float<T>(dg);
        ou.v[e] = from_float<T>(du);
      }
      reinterpret_cast<P*>(dgate)[i] = og;
      reinterpret_cast<P*>(dup)[i] = ou;
    }
  }
  if (VEC > 1 && blockIdx.x == 0) {  // scalar tail, as in the forward
    const int64_t i = nvec * VEC + threadIdx.x;
    if (i < n) {
      float dg, du;
      swiglu_grads(as_float(dout[i]), as_float(gate[i]), as_float(up[i]), dg, du);
      dgate[i] = from_float<T>(dg);
      dup[i] = from_float<T>(du);
    }
  }
}

// Blocks to cover n elements as vectors of VEC (at least one, for a tail-only n < VEC).
template <int VEC>
unsigned blocks_for(int64_t n) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t blocks = (n / VEC + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks > 0 ? blocks : 1);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
void fwd(const void* gate, const void* up, void* out, int64_t n, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const T* g = static_cast<const T*>(gate);
  const T* u = static_cast<const T*>(up);
  T* o = static_cast<T*>(out);
  if (aligned16(gate) && aligned16(up) && aligned16(out)) {
    swiglu_fwd_kernel<T, VEC><<<blocks_for<VEC>(n), kThreads, 0, stream>>>(g, u, o, n);
  } else {
    swiglu_fwd_kernel<T, 1><<<blocks_for<1>(n), kThreads, 0, stream>>>(g, u, o, n);
  }
}

template <typename T>
void fwd_fp8(const void* gate, const void* up, const float* scale, void* q, unsigned int* amax, int64_t n,
             cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const T* g = static_cast<const T*>(gate);
  const T* u = static_cast<const T*>(up);
  uint8_t* o = static_cast<uint8_t*>(q);
  if (aligned16(gate) && aligned16(up) && aligned16(q)) {
    swiglu_fp8_kernel<T, VEC><<<blocks_for<VEC>(n), kThreads, 0, stream>>>(g, u, scale, o, amax, n);
  } else {
    swiglu_fp8_kernel<T, 1><<<blocks_for<1>(n), kThreads, 0, stream>>>(g, u, scale, o, amax, n);
  }
}

template <typename T>
void bwd(const void* dout, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
         cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const T* d = static_cast<const T*>(dout);
  const T* g = static_cast<const T*>(gate);
  const T* u = static_cast<const T*>(up);
  T* dg = static_cast<T*>(dgate);
  T* du = static_cast<T*>(dup);
  if (aligned16(dout) && aligned16(gate) && aligned16(up) && aligned16(dgate) && aligned16(dup)) {
    swiglu_bwd_kernel<T, VEC><<<blocks_for<VEC>(n), kThreads, 0, stream>>>(d, g, u, dg, du, n);
  } else {
    swiglu_bwd_kernel<T, 1><<<blocks_for<1>(n), kThreads, 0, stream>>>(d, g, u, dg, du, n);
  }
}

}  // namespace swiglu_impl
}  // namespace herd

// dtype_code: 0 = float32, 1 = bfloat16. Every pointer addresses n contiguous elements of that dtype; outputs do
// not overlap inputs. n > 0 (the binding skips empty tensors). `stream` is a cudaStream_t. Returns nullptr, or the
// launch error's text.
const char* herd_swiglu_fwd(const void* gate, const void* up, void* out, int64_t n, int dtype_code, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype_code == 1) {
    herd::swiglu_impl::fwd<__nv_bfloat16>(gate, up, out, n, s);
  } else {
    herd::swiglu_impl::fwd<float>(gate, up, out, n, s);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* herd_swiglu_bwd(const void* dout, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
                            int dtype_code, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype_code == 1) {
    herd::swiglu_impl::bwd<__nv_bfloat16>(dout, gate, up, dgate, dup, n, s);
  } else {
    herd::swiglu_impl::bwd<float>(dout, gate, up, dgate, dup, n, s);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// gate, up: n elements (dtype_code as above); scale: one fp32 on the device; q: n e4m3 bytes; amax: one fp32,
// zeroed here first, gets max |swiglu value|. Returns nullptr, or the launch error's text.
const char* herd_swiglu_fp8_fwd(const void* gate, const void* up, const float* scale, void* q, void* amax, int64_t n,
                                int dtype_code, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaMemsetAsync(amax, 0, sizeof(unsigned int), s);
  unsigned int* bits = static_cast<unsigned int*>(amax);
  if (dtype_code == 1) {
    herd::swiglu_impl::fwd_fp8<__nv_bfloat16>(gate, up, scale, q, bits, n, s);
  } else {
    herd::swiglu_impl::fwd_fp8<float>(gate, up, scale, q, bits, n, s);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

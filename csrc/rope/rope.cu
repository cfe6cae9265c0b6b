// Rotary position embedding (Su et al. 2021, RoFormer eq. 34), half-split layout, on q and k in one launch: in place
// (outputs = inputs, the forward) or into new tensors (the backward: one read and one write of the gradients
// instead of a copy followed by an in-place pass).
//
// Pair i of a head is (x[i], x[i + d/2]); with c = cos(angle_i), s = sin(angle_i) of the head's token it becomes
//   (x[i] * c - x[i + d/2] * s,  x[i + d/2] * c + x[i] * s)
// computed in fp32 and stored in x's dtype, bit for bit what the reference (engine/ops/reference.py apply_rope)
// computes with eager torch ops. `inverse` rotates by
// minus the angle (s -> -s): the rotation is orthogonal, so that is its transpose, which maps output gradients to
// input gradients (the backward) and undoes the forward.
//
// Launch shape: one thread per (token, chunk of VEC pairs), blockIdx.y picks a group of kHeadsPerThread heads of
// the q and k heads seen as one list [q heads..., k heads...]. A thread loads its chunk of cos/sin once, then the
// two halves of each head of its group (2 * kHeadsPerThread independent 16-byte loads in flight) before it computes
// and stores. A warp covers 32 / (d/2/VEC) consecutive tokens, each reading d/2 * sizeof(T) contiguous bytes per
// half: every 32-byte sector fetched is used. Each element is read and written exactly once, so threads never
// share data: no shared memory, no barriers, and in-place is safe (inputs and outputs are therefore not declared
// __restrict__: they are the same memory in place).
#include <type_traits>

#include "common.cuh"

namespace herd {
namespace rope_impl {

constexpr int kThreads = 256;
constexpr int kHeadsPerThread = 4;

// out[0..VEC) = src[0..VEC) (fp32 table values), in loads of up to 16 bytes. src is aligned to 4 * min(VEC, 4)
// bytes (host check), so each VecPack<float, W> load is aligned.
template <int VEC>
__device__ __forceinline__ void load_table(const float* __restrict__ src, float out[VEC]) {
  constexpr int W = VEC < 4 ? VEC : 4;
  static_assert(VEC % W == 0, "table chunk must be a whole number of loads");
#pragma unroll
  for (int i = 0; i < VEC; i += W) {
    const VecPack<float, W> p = *reinterpret_cast<const VecPack<float, W>*>(src + i);
#pragma unroll
    for (int j = 0; j < W; ++j) out[i + j] = p.v[j];
  }
}

// q_in, q_out: [tokens, hq, 2*half], k_in, k_out: [tokens, hk, 2*half], cos_t/sin_t: [tokens, half] (all
// contiguous; out == in, or outputs not overlapping anything). Host guarantees: half % VEC == 0; for VEC > 1 every
// pointer is 16-byte aligned; tokens * (half / VEC) + kThreads fits in int; gridDim.y * kHeadsPerThread >= hq + hk.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(const T* q_in, const T* k_in, T* q_out, T* k_out, const float* __restrict__ cos_t,
                const float* __restrict__ sin_t, int tokens, int hq, int hk, int half, float sign) {
  using P = VecPack<T, VEC>;
  const int chunks = half / VEC;  // chunks per half-head
  const int item = blockIdx.x * kThreads + threadIdx.x;
  if (item >= tokens * chunks) return;  // no barriers below, so an early exit is safe
  const int t = item / chunks;
  const int col = (item - t * chunks) * VEC;  // first pair index of this thread's chunk
  const int head_dim = 2 * half;

  float c[VEC], s[VEC];
  load_table<VEC>(cos_t + static_cast<int64_t>(t) * half + col, c);
  load_table<VEC>(sin_t + static_cast<int64_t>(t) * half + col, s);
#pragma unroll
  for (int i = 0; i < VEC; ++i) s[i] *= sign;  // inverse: rotate by -angle (exact: a sign flip)

  const int h0 = blockIdx.y * kHeadsPerThread;
  const int heads_here = min(kHeadsPerThread, hq + hk - h0);  // >= 1 by the grid shape
  int64_t offset[kHeadsPerThread];  // of the chunk in q (heads < hq) or k
  P lo[kHeadsPerThread], hi[kHeadsPerThread];
#pragma unroll
  for (int j = 0; j < kHeadsPerThread; ++j) {  // issue all loads first: 2 * kHeadsPerThread in flight
    if (j < heads_here) {
      const int h = h0 + j;
      offset[j] = (h < hq ? (static_cast<int64_t>(t) * hq + h) : (static_cast<int64_t>(t) * hk + (h - hq))) *
                      head_dim + col;
      const T* src = (h < hq ? q_in : k_in) + offset[j];
      lo[j] = *reinterpret_cast<const P*>(src);
      hi[j] = *reinterpret_cast<const P*>(src + half);
    }
  }
#pragma unroll
  for (int j = 0; j < kHeadsPerThread; ++j) {
    if (j < heads_here) {
      P out_lo, out_hi;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float x1 = as_float(lo[j].v[i]), x2 = as_float(hi[j].v[i]);
        // each product and the sum rounded on its own, as the reference's eager ops round them: no FMA
        // contraction, so every instantiation (vector or scalar, in place or not) gives the reference's bits
        out_lo.v[i] = from_float<T>(__fsub_rn(__fmul_rn(x1, c[i]), __fmul_rn(x2, s[i])));
        out_hi.v[i] = from_float<T>(__fadd_rn(__fmul_rn(x2, c[i]), __fmul_rn(x1, s[i])));
      }
      T* dst = (h0 + j < hq ? q_out : k_out) + offset[j];
      *reinterpret_cast<P*>(dst) = out_lo;
      *reinterpret_cast<P*>(dst + half) = out_hi;
    }
  }
}

template <typename T, int VEC>
void launch(const T* q, const T* k, T* q_out, T* k_out, const float* cos_t, const float* sin_t, int64_t tokens,
            int64_t hq, int64_t hk, int64_t half, float sign, cudaStream_t stream) {
  const int64_t items = tokens * (half / VEC);
  const dim3 grid(static_cast<unsigned>((items + kThreads - 1) / kThreads),
                  static_cast<unsigned>((hq + hk + kHeadsPerThread - 1) / kHeadsPerThread));
  rope_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(q, k, q_out, k_out, cos_t, sin_t, static_cast<int>(tokens),
                                                     static_cast<int>(hq), static_cast<int>(hk),
                                                     static_cast<int>(half), sign);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
void dispatch(const void* q, const void* k, void* q_out, void* k_out, const float* cos_t, const float* sin_t,
              int64_t tokens, int64_t hq, int64_t hk, int64_t half, float sign, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);  // 8 bf16 or 4 fp32 per 16-byte access
  const T* qt = static_cast<const T*>(q);
  const T* kt = static_cast<const T*>(k);
  T* qo = static_cast<T*>(q_out);
  T* ko = static_cast<T*>(k_out);
  // 16-byte accesses need every row start and chunk aligned: base pointers aligned and half a multiple of VEC
  // (then d * sizeof(T) and the table row length are multiples of 16 bytes too).
  if (half % VEC == 0 && aligned16(q) && aligned16(k) && aligned16(q_out) && aligned16(k_out) &&
      aligned16(cos_t) && aligned16(sin_t)) {
    launch<T, VEC>(qt, kt, qo, ko, cos_t, sin_t, tokens, hq, hk, half, sign, stream);
  } else {
    launch<T, 1>(qt, kt, qo, ko, cos_t, sin_t, tokens, hq, hk, half, sign, stream);
  }
}

}  // namespace rope_impl
}  // namespace herd

// dtype_code: 0 = float32, 1 = bfloat16. q: [tokens, hq, head_dim], k: [tokens, hk, head_dim] in that dtype,
// contiguous; q_out, k_out: the same shapes, either q and k themselves (in place: then q and k must not overlap)
// or new memory overlapping nothing (q and k may then even be one tensor); cos_t, sin_t: [tokens, head_dim / 2]
// fp32 contiguous. head_dim even. The caller checks tokens * head_dim / 2 <= INT32_MAX - 1024 and
// hq + hk <= 4 * 65535. `stream` is a cudaStream_t. Returns nullptr, or the launch error's text.
const char* herd_rope(const void* q, const void* k, void* q_out, void* k_out, const float* cos_t,
                      const float* sin_t, int64_t tokens, int64_t hq, int64_t hk, int64_t head_dim, bool inverse,
                      int dtype_code, void* stream) {
  const int64_t half = head_dim / 2;
  if (tokens == 0 || hq + hk == 0 || half == 0) return nullptr;  // nothing to rotate (an empty grid is an error)
  const float sign = inverse ? -1.f : 1.f;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype_code == 1) {
    herd::rope_impl::dispatch<__nv_bfloat16>(q, k, q_out, k_out, cos_t, sin_t, tokens, hq, hk, half, sign, s);
  } else {
    herd::rope_impl::dispatch<float>(q, k, q_out, k_out, cos_t, sin_t, tokens, hq, hk, half, sign, s);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

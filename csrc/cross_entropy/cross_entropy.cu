// Fused cross-entropy over one vocabulary shard (reference: engine/ops/reference.py cross_entropy_sum and
// vocab_parallel_cross_entropy_sum; Python glue and the cross-shard combine: engine/ops/cross_entropy.py).
//
// Forward: one block per row reads the row once and keeps, per thread, the online pair (running max m, sum of
// exp(x - m)) of Milakov & Gimelshein 2018 ("Online normalizer calculation for softmax", algorithm 3); the block
// then merges the pairs: M = max_t m_t, S = sum_t s_t * exp(m_t - M). Outputs per row, fp32: M, S and the logit of
// the target (0 when the target is not in this shard). Columns whose global id is >= vocab_size (vocabulary
// padding under tensor parallelism) are always the last ones of a shard and are skipped.
// Backward: dlogits = (exp(x - lse) - onehot(target)) * grad[row], 0 in padding columns, one block per row.
//
// Rows of any length and offset: a scalar head up to the first 16-byte boundary, 16-byte vectors (8 bf16 or
// 4 fp32), a scalar tail. All math in fp32; exponentials as exp2((x - m) * log2 e), which --use_fast_math maps
// to ex2.approx (relative error ~2^-22).
#include "common.cuh"

namespace herd {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void store_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// A 16-byte vector of T and its conversion to / from kSize floats.
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  static constexpr int kSize = 4;
  using Raw = float4;
  __device__ static __forceinline__ void to_floats(const float4& r, float out[4]) {
    out[0] = r.x;
    out[1] = r.y;
    out[2] = r.z;
    out[3] = r.w;
  }
  __device__ static __forceinline__ float4 from_floats(const float in[4]) {
    return make_float4(in[0], in[1], in[2], in[3]);
  }
};

// Raw is uint4, not Bf16x8: a struct of four bf16x2 copies as four 4-byte loads, a uint4 as one 16-byte load.
// A bf16 is the top half of an fp32, so widening is a shift (element 0 is the low half: little-endian).
template <>
struct Vec<__nv_bfloat16> {
  static constexpr int kSize = 8;
  using Raw = uint4;
  __device__ static __forceinline__ void to_floats(const uint4& r, float out[8]) {
    const uint32_t words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
  __device__ static __forceinline__ uint4 from_floats(const float in[8]) {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 pair = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);  // .x = in[2i] (low half)
      memcpy(&words[i], &pair, sizeof(uint32_t));
    }
    return make_uint4(words[0], words[1], words[2], words[3]);
  }
};

// Elements of `row` before its first 16-byte boundary (torch data pointers are multiples of sizeof(T), so the
// division is exact), at most n.
template <typename T>
__device__ __forceinline__ int head_elements(const T* row, int n) {
  const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(row) & 15);
  return min(((16 - misalign) & 15) / static_cast<int>(sizeof(T)), n);
}

// Folds v[0..K) into the running pair (m, s = sum exp(x - m)); K is 1, 4 or 8. The K exponentials are summed
// pairwise before joining s, which keeps the sequential fp32 chain short.
template <int K>
__device__ __forceinline__ void fold(float& m, float& s, const float (&v)[K]) {
  float vmax = v[0];
#pragma unroll
  for (int k = 1; k < K; ++k) vmax = fmaxf(vmax, v[k]);
  if (vmax > m) {  // rescale the sum to the new max (m = -inf: s is 0 and stays 0)
    s *= exp2f((m - vmax) * kLog2e);
    m = vmax;
  }
  const float base = m == -INFINITY ? 0.f : m;  // every value so far -inf: exp(-inf - 0) = 0, not NaN
  float e[K];
#pragma unroll
  for (int k = 0; k < K; ++k) e[k] = exp2f((v[k] - base) * kLog2e);
#pragma unroll
  for (int width = K / 2; width > 0; width /= 2) {
#pragma unroll
    for (int k = 0; k < width; ++k) e[k] += e[k + width];
  }
  s += e[0];
}

template <typename T>
__device__ __forceinline__ void fold_scalar(float& m, float& s, T x) {
  const float v[1] = {to_float(x)};
  fold<1>(m, s, v);
}

// One block per row. logits: [rows, cols] T; targets: [rows] global ids; outputs: [rows] fp32.
// valid = columns of this shard below vocab_size (the rest are padding).
template <typename T>
__global__ void __launch_bounds__(512) cross_entropy_fwd_kernel(
    const T* __restrict__ logits, const int64_t* __restrict__ targets, float* __restrict__ row_max,
    float* __restrict__ row_sumexp, float* __restrict__ target_logit, int cols, int valid, int64_t vocab_start) {
  using V = Vec<T>;
  constexpr int K = V::kSize;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = logits + row * cols;  // [cols]
  const int head = head_elements(x, valid);
  const int vectors = (valid - head) / K;
  const int tail = head + vectors * K;
  const int stride = blockDim.x;

  float m = -INFINITY, s = 0.f;
  for (int j = threadIdx.x; j < head; j += stride) fold_scalar(m, s, x[j]);
  for (int j = tail + threadIdx.x; j < valid; j += stride) fold_scalar(m, s, x[j]);
  const typename V::Raw* xv = reinterpret_cast<const typename V::Raw*>(x + head);  // 16-byte aligned
  for (int i = threadIdx.x; i < vectors; i += stride * kUnroll) {
    typename V::Raw raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // issue every load before the first use
      if (i + u * stride < vectors) raw[u] = xv[i + u * stride];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * stride < vectors) {
        float v[K];
        V::to_floats(raw[u], v);
        fold<K>(m, s, v);
      }
    }
  }

  // Merge the per-thread pairs: S = sum_t s_t * exp(m_t - M).
  const float block_m = block_max(m, scratch);
  const float scaled = m == -INFINITY ? 0.f : s * exp2f((m - block_m) * kLog2e);
  const float block_s = block_sum(scaled, scratch);
  if (threadIdx.x == 0) {
    row_max[row] = block_m;
    row_sumexp[row] = block_s;
    const int64_t t = targets[row] - vocab_start;  // local column of the target
    target_logit[row] = (t >= 0 && t < valid) ? to_float(x[t]) : 0.f;
  }
}

// One block per row. grad, lse: [rows] fp32; logits, dlogits: [rows, cols] T. vec_ok: logits and dlogits have
// the same offset modulo 16 bytes, so one head length aligns both (else every element takes the scalar path).
// A row with grad 0 (a masked token) is all zeros: its logits are not read.
template <typename T>
__global__ void __launch_bounds__(512) cross_entropy_bwd_kernel(
    const float* __restrict__ grad, const T* __restrict__ logits, const int64_t* __restrict__ targets,
    const float* __restrict__ lse, T* __restrict__ dlogits, int cols, int valid, int64_t vocab_start, bool vec_ok) {
  using V = Vec<T>;
  constexpr int K = V::kSize;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * cols;  // [cols]
  T* d = dlogits + row * cols;       // [cols]
  const float g = grad[row];
  const bool zero_row = g == 0.f;
  const float l = lse[row];
  const int64_t t = targets[row] - vocab_start;
  const int target = (t >= 0 && t < valid) ? static_cast<int>(t) : -1;
  // d loss / d x_j = softmax_j - [j == target] (times the upstream gradient); padding columns get 0.
  auto value = [&](int j, float xj) -> float {
    if (zero_row || j >= valid) return 0.f;
    return (exp2f((xj - l) * kLog2e) - (j == target ? 1.f : 0.f)) * g;
  };
  const int head = vec_ok ? head_elements(x, cols) : cols;
  const int vectors = (cols - head) / K;
  const int tail = head + vectors * K;
  const int stride = blockDim.x;

  for (int j = threadIdx.x; j < head; j += stride) store_float(d + j, value(j, zero_row ? 0.f : to_float(x[j])));
  for (int j = tail + threadIdx.x; j < cols; j += stride) {
    store_float(d + j, value(j, zero_row ? 0.f : to_float(x[j])));
  }
  const typename V::Raw* xv = reinterpret_cast<const typename V::Raw*>(x + head);  // 16-byte aligned
  typename V::Raw* dv = reinterpret_cast<typename V::Raw*>(d + head);              // 16-byte aligned
  for (int i = threadIdx.x; i < vectors; i += stride * kUnroll) {
    typename V::Raw raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!zero_row && i + u * stride < vectors) raw[u] = xv[i + u * stride];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int index = i + u * stride;
      if (index < vectors) {
        float v[K] = {};
        if (!zero_row) V::to_floats(raw[u], v);
        float out[K];
#pragma unroll
        for (int k = 0; k < K; ++k) out[k] = value(head + index * K + k, v[k]);
        dv[index] = V::from_floats(out);
      }
    }
  }
}

// Threads per row: enough for a few 16-byte vectors each, 128 to 512 (multiples of 32, as block_sum needs).
int threads_for(int64_t cols, int vec) {
  const int64_t vectors = cols / vec;
  return vectors <= 4 * 128 ? 128 : vectors <= 8 * 256 ? 256 : 512;
}

int valid_columns(int64_t cols, int64_t vocab_start, int64_t vocab_size) {
  const int64_t valid = vocab_size - vocab_start;
  return static_cast<int>(valid < 0 ? 0 : valid > cols ? cols : valid);
}

}  // namespace
}  // namespace herd

// dtype_code: 0 = fp32, 1 = bf16. rows < 2^31, 1 <= cols < 2^31 (checked by the binding). stream: a cudaStream_t.
// Each launcher returns nullptr, or the launch error's text (what C10_CUDA_KERNEL_LAUNCH_CHECK would report).
const char* herd_cross_entropy_fwd(const void* logits, const int64_t* targets, float* row_max, float* row_sumexp,
                                   float* target_logit, int64_t rows, int64_t cols, int64_t vocab_start,
                                   int64_t vocab_size, int dtype_code, void* stream) {
  if (rows == 0) return nullptr;
  const int valid = herd::valid_columns(cols, vocab_start, vocab_size);
  const dim3 grid(static_cast<unsigned>(rows));
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype_code == 1) {
    herd::cross_entropy_fwd_kernel<__nv_bfloat16><<<grid, herd::threads_for(cols, 8), 0, s>>>(
        static_cast<const __nv_bfloat16*>(logits), targets, row_max, row_sumexp, target_logit,
        static_cast<int>(cols), valid, vocab_start);
  } else {
    herd::cross_entropy_fwd_kernel<float><<<grid, herd::threads_for(cols, 4), 0, s>>>(
        static_cast<const float*>(logits), targets, row_max, row_sumexp, target_logit, static_cast<int>(cols),
        valid, vocab_start);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* herd_cross_entropy_bwd(const float* grad, const void* logits, const int64_t* targets, const float* lse,
                                   void* dlogits, int64_t rows, int64_t cols, int64_t vocab_start,
                                   int64_t vocab_size, int dtype_code, void* stream) {
  if (rows == 0) return nullptr;
  const int valid = herd::valid_columns(cols, vocab_start, vocab_size);
  const bool vec_ok = (reinterpret_cast<uintptr_t>(logits) & 15) == (reinterpret_cast<uintptr_t>(dlogits) & 15);
  const dim3 grid(static_cast<unsigned>(rows));
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype_code == 1) {
    herd::cross_entropy_bwd_kernel<__nv_bfloat16><<<grid, herd::threads_for(cols, 8), 0, s>>>(
        grad, static_cast<const __nv_bfloat16*>(logits), targets, lse, static_cast<__nv_bfloat16*>(dlogits),
        static_cast<int>(cols), valid, vocab_start, vec_ok);
  } else {
    herd::cross_entropy_bwd_kernel<float><<<grid, herd::threads_for(cols, 4), 0, s>>>(
        grad, static_cast<const float*>(logits), targets, lse, static_cast<float*>(dlogits),
        static_cast<int>(cols), valid, vocab_start, vec_ok);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

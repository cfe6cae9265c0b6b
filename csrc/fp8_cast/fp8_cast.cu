// FP8 quantization for the FP8 linear layers: amax = max|x| (the statistic delayed scaling keeps, Micikevicius et
// al. 2022, "FP8 Formats for Deep Learning", sec. 4.3), out = saturate(x * scale) in e4m3fn or e5m2, and optionally
// out_t, the [K, M] row-major copy of out that the weight-gradient GEMM reads. One pass over x for all three.
// Matches engine/ops/reference.py fp8_amax / fp8_cast; see README.md for the numerics (rounding, NaN, denormals).
//
// amax runs on the float bit patterns: for a non-negative IEEE float, the unsigned int order of its bits is the
// numeric order, and every NaN's |bits| (> 0x7f800000) is above +inf's, so an unsigned max of (bits & 0x7fffffff)
// is exactly max|x| and propagates NaN like torch's max. Blocks combine with one atomicMax each on the output's
// bits (zeroed first by the launcher); a bf16 value's bits shifted left by 16 are the bits of the same fp32 value.
#include <algorithm>

#include "common.cuh"

namespace herd {
namespace {

constexpr int kCastThreads = 256;  // flat cast: threads per block
constexpr int kCastUnroll = 2;     // flat cast: 16-element chunks per thread, loaded together
constexpr int kAmaxThreads = 256;
constexpr int kAmaxUnroll = 4;     // amax: 16-byte vectors per thread per loop trip, loaded together
constexpr int kTileM = 128;        // transpose tile: rows of x (m) ...
constexpr int kTileK = 64;         // ... by columns of x (k)
constexpr int kTileThreads = 128;
constexpr int kTileWords = kTileK / 4 + 1;  // smem row stride in 32-bit words: 16 + 1 pad word (bank spread)

// Largest v over the block, returned to every lane of warp 0 (0 elsewhere). Every thread of the block must call
// it; blockDim.x a multiple of 32.
__device__ __forceinline__ unsigned int block_max_bits(unsigned int v) {
  __shared__ unsigned int scratch[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = __reduce_max_sync(0xffffffffu, v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp == 0 ? __reduce_max_sync(0xffffffffu, lane < warps ? scratch[lane] : 0u) : 0u;
}

// Largest |bits| over a block, then one atomicMax into *amax_bits. Every thread of the block must call it.
__device__ __forceinline__ void block_amax_commit(unsigned int v, unsigned int* amax_bits) {
  v = block_max_bits(v);
  if (threadIdx.x == 0 && v != 0u) atomicMax(amax_bits, v);
}

__device__ __forceinline__ unsigned int abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

template <typename T>
__device__ __forceinline__ float load_scalar(const T* p);
template <>
__device__ __forceinline__ float load_scalar<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <>
__device__ __forceinline__ float load_scalar<float>(const float* p) { return *p; }

// 16 consecutive elements of x at p (16-byte aligned) as floats: 2 (bf16) or 4 (fp32) 16-byte loads.
template <typename T>
__device__ __forceinline__ void load16_vec(const T* p, float v[16]);
template <>
__device__ __forceinline__ void load16_vec<__nv_bfloat16>(const __nv_bfloat16* p, float v[16]) {
  const Bf16x8* q = reinterpret_cast<const Bf16x8*>(p);
  const Bf16x8 a = q[0], b = q[1];
  unpack(a, v);
  unpack(b, v + 8);
}
template <>
__device__ __forceinline__ void load16_vec<float>(const float* p, float v[16]) {
  const float4* q = reinterpret_cast<const float4*>(p);
  float4 f[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) f[i] = q[i];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[4 * i] = f[i].x, v[4 * i + 1] = f[i].y, v[4 * i + 2] = f[i].z, v[4 * i + 3] = f[i].w;
  }
}

// Up to 16 elements of x at p, `n` of them valid (0 <= n <= 16); the rest read as 0 (neutral for amax).
template <typename T>
__device__ __forceinline__ void load16_scalar(const T* p, int64_t n, float v[16]) {
#pragma unroll
  for (int e = 0; e < 16; ++e) v[e] = e < n ? load_scalar(p + e) : 0.f;
}

// saturate(v * scale) as 16 fp8 bytes packed little-endian in 4 words (byte e of the chunk = element e; common.cuh
// fp8x4: SATFINITE clamps like the reference, round to nearest even).
template <__nv_fp8_interpretation_t kFmt>
__device__ __forceinline__ uint4 to_fp8x16(const float v[16], float scale) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = fp8x4<kFmt>(v + 4 * i, scale);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ uint32_t chunk_amax(const float v[16]) {
  uint32_t m = 0;
#pragma unroll
  for (int e = 0; e < 16; ++e) m = max(m, abs_bits(v[e]));
  return m;
}

// Stores the first n (<= 16) bytes of the chunk c one by one (tails and unaligned rows).
__device__ __forceinline__ void store_bytes(uint8_t* p, const uint4& c, int64_t n) {
  const uint32_t w[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
  for (int e = 0; e < 16; ++e)
    if (e < n) p[e] = static_cast<uint8_t>(w[e >> 2] >> (8 * (e & 3)));
}

// ---- amax alone ----------------------------------------------------------------------------------------------

// x viewed as n elements; its first nvec * 16 bytes are read as 16-byte vectors (0 when x is not 16-byte aligned),
// the remaining elements one by one. Grid-stride, kAmaxUnroll vectors in flight per thread.
template <typename T>
__global__ void __launch_bounds__(kAmaxThreads) amax_kernel(const T* __restrict__ x, int64_t n, int64_t nvec,
                                                            unsigned int* __restrict__ amax_bits) {
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kAmaxThreads * kAmaxUnroll;
  uint32_t m = 0;   // fp32: max |bits|; bf16: two packed 16-bit |bits| maxima (__vmaxu2)
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kAmaxThreads * kAmaxUnroll + threadIdx.x; base < nvec;
       base += stride) {
    uint4 v[kAmaxUnroll];
#pragma unroll
    for (int u = 0; u < kAmaxUnroll; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * kAmaxThreads;
      v[u] = i < nvec ? xv[i] : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kAmaxUnroll; ++u) {
      const uint32_t w[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (sizeof(T) == 2) m = __vmaxu2(m, w[j] & 0x7fff7fffu);
        else m = max(m, w[j] & 0x7fffffffu);
      }
    }
  }
  if constexpr (sizeof(T) == 2) m = max(m & 0xffffu, m >> 16) << 16;  // the larger bf16 |bits| as fp32 bits
  const int64_t first = nvec * (16 / static_cast<int64_t>(sizeof(T)));  // elements covered by the vectors
  for (int64_t i = first + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    m = max(m, abs_bits(load_scalar(x + i)));
  block_amax_commit(m, amax_bits);
}

// ---- cast without transpose: x and out as flat arrays of n elements --------------------------------------------

// Chunk c = elements [16c, 16c + 16). kVec: x is 16-byte aligned, so every whole chunk is read with 16-byte loads
// and written with one 16-byte store (out is 16-byte aligned by allocation); the last partial chunk goes bytewise.
template <typename T, __nv_fp8_interpretation_t kFmt, bool kVec>
__global__ void __launch_bounds__(kCastThreads) cast_flat_kernel(const T* __restrict__ x,
                                                                 const float* __restrict__ scale_ptr, int64_t n,
                                                                 uint8_t* __restrict__ out,
                                                                 unsigned int* __restrict__ amax_bits) {
  const float scale = __ldg(scale_ptr);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kCastThreads * kCastUnroll + threadIdx.x;
  float v[kCastUnroll][16];
#pragma unroll
  for (int u = 0; u < kCastUnroll; ++u) {  // all loads first: several in flight per thread
    const int64_t e0 = (first + static_cast<int64_t>(u) * kCastThreads) * 16;
    const int64_t valid = n - e0;  // may be <= 0 (chunk past the end) or >= 16 (whole chunk)
    if (kVec && valid >= 16) load16_vec(x + e0, v[u]);
    else load16_scalar(x + e0, valid, v[u]);
  }
  uint32_t m = 0;
#pragma unroll
  for (int u = 0; u < kCastUnroll; ++u) {
    const int64_t e0 = (first + static_cast<int64_t>(u) * kCastThreads) * 16;
    const int64_t valid = n - e0;
    if (valid <= 0) continue;
    m = max(m, chunk_amax(v[u]));
    const uint4 q = to_fp8x16<kFmt>(v[u], scale);
    if (kVec && valid >= 16) *reinterpret_cast<uint4*>(out + e0) = q;
    else store_bytes(out + e0, q, valid);
  }
  block_amax_commit(m, amax_bits);
}

// ---- cast with transpose: one kTileM x kTileK tile of x [M, K] per block -------------------------------------------

// 4x4 byte transpose: w[i] holds bytes (row i, cols 0..3); returns in c[j] the bytes (rows 0..3, col j).
__device__ __forceinline__ void transpose4x4(const uint32_t w[4], uint32_t c[4]) {
  const uint32_t t0 = __byte_perm(w[0], w[1], 0x5140);  // r0c0 r1c0 r0c1 r1c1
  const uint32_t t1 = __byte_perm(w[0], w[1], 0x7362);  // r0c2 r1c2 r0c3 r1c3
  const uint32_t t2 = __byte_perm(w[2], w[3], 0x5140);  // r2c0 r3c0 r2c1 r3c1
  const uint32_t t3 = __byte_perm(w[2], w[3], 0x7362);  // r2c2 r3c2 r2c3 r3c3
  c[0] = __byte_perm(t0, t2, 0x5410);                   // r0c0 r1c0 r2c0 r3c0
  c[1] = __byte_perm(t0, t2, 0x7632);
  c[2] = __byte_perm(t1, t3, 0x5410);
  c[3] = __byte_perm(t1, t3, 0x7632);
}

// Phase 1: thread t quantizes 16-element chunks (row (t >> 2) + 32 i, columns 16 (t & 3) .. +15 of the tile), writes
// them to out and to the smem tile (fp8 bytes, row stride kTileWords words). kVecIn: K % 16 == 0 and x 16-byte
// aligned, so each chunk is wholly inside or outside [0, K) and 16-byte loads/stores are aligned.
// Phase 2: thread t owns 4 columns k (word kq of each smem row) by 16 rows m (16 ms .. 16 ms + 15): it reads 16
// words, transposes four 4x4 byte blocks and writes 4 rows of out_t, 16 bytes each (kVecOut: M % 16 == 0).
// Banks: phase 2 reads word (16 ms + i) * 17 + kq; a warp has kq = 0..15 and two ms of opposite parity, so the bank
// (16 ms + 17 i + kq) mod 32 differs across its 32 lanes. Phase 1's 4-byte smem stores conflict at most 2-way.
template <typename T, __nv_fp8_interpretation_t kFmt, bool kVecIn, bool kVecOut>
__global__ void __launch_bounds__(kTileThreads) cast_transpose_kernel(const T* __restrict__ x,
                                                                      const float* __restrict__ scale_ptr,
                                                                      int64_t M, int64_t K,
                                                                      uint8_t* __restrict__ out,
                                                                      uint8_t* __restrict__ out_t,
                                                                      unsigned int* __restrict__ amax_bits) {
  __shared__ uint32_t tile[kTileM * kTileWords];  // [kTileM rows m][kTileK / 4 words of 4 k bytes + 1 pad]
  const float scale = __ldg(scale_ptr);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM, k0 = static_cast<int64_t>(blockIdx.y) * kTileK;
  constexpr int kChunks = kTileM * (kTileK / 16) / kTileThreads;  // 4 chunks per thread
  const int seg = threadIdx.x & 3, r0 = threadIdx.x >> 2;
  const int64_t kc = k0 + 16 * seg, kvalid = K - kc;  // columns of this thread's chunks inside [0, K)

  float v[kChunks][16];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {  // all loads first
    const int64_t m = m0 + r0 + 32 * i;
    const T* p = x + m * K + kc;
    if (m >= M || kvalid <= 0) load16_scalar(p, 0, v[i]);  // zeros; never stored
    else if (kVecIn) load16_vec(p, v[i]);
    else load16_scalar(p, kvalid, v[i]);
  }
  uint32_t amax = 0;
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int r = r0 + 32 * i;
    const int64_t m = m0 + r;
    amax = max(amax, chunk_amax(v[i]));  // out-of-range elements were read as 0
    const uint4 q = to_fp8x16<kFmt>(v[i], scale);
    if (m < M && kvalid > 0) {
      if (kVecIn) *reinterpret_cast<uint4*>(out + m * K + kc) = q;
      else store_bytes(out + m * K + kc, q, kvalid);
    }
    uint32_t* row = tile + r * kTileWords + 4 * seg;
    row[0] = q.x, row[1] = q.y, row[2] = q.z, row[3] = q.w;
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, kq = lane & 15, ms = (lane >> 4) + 2 * (threadIdx.x >> 5);
  uint32_t cols[4][4];  // cols[j][b]: bytes of column 4 kq + j, rows 16 ms + 4 b .. + 3
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = tile[(16 * ms + 4 * b + i) * kTileWords + kq];
    uint32_t c[4];
    transpose4x4(w, c);
#pragma unroll
    for (int j = 0; j < 4; ++j) cols[j][b] = c[j];
  }
  const int64_t mc = m0 + 16 * ms, mvalid = M - mc;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t k = k0 + 4 * kq + j;
    if (k >= K || mvalid <= 0) continue;
    const uint4 q = make_uint4(cols[j][0], cols[j][1], cols[j][2], cols[j][3]);
    if (kVecOut) *reinterpret_cast<uint4*>(out_t + k * M + mc) = q;
    else store_bytes(out_t + k * M + mc, q, mvalid);
  }
  block_amax_commit(amax, amax_bits);
}

// ---- launchers ---------------------------------------------------------------------------------------------------

template <typename T>
void launch_amax(const void* x, int64_t n, unsigned int* amax_bits, int num_sms, cudaStream_t stream) {
  constexpr int64_t kPerVec = 16 / static_cast<int64_t>(sizeof(T));  // elements per 16-byte vector
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const int64_t nvec = aligned ? n / kPerVec : 0, tail = n - nvec * kPerVec;
  const int64_t per_block = static_cast<int64_t>(kAmaxThreads) * kAmaxUnroll;
  int64_t blocks = std::max((nvec + per_block - 1) / per_block, (tail + kAmaxThreads - 1) / kAmaxThreads);
  blocks = std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(num_sms) * 8));  // grid-stride
  amax_kernel<T><<<static_cast<unsigned int>(blocks), kAmaxThreads, 0, stream>>>(static_cast<const T*>(x), n, nvec,
                                                                                 amax_bits);
}

template <typename T, __nv_fp8_interpretation_t kFmt>
void launch_cast(const void* x, const float* scale, int64_t M, int64_t K, bool transpose, void* out, void* out_t,
                 unsigned int* amax_bits, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  uint8_t *o = static_cast<uint8_t*>(out), *ot = static_cast<uint8_t*>(out_t);
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (!transpose) {
    const int64_t n = M * K, chunks = (n + 15) / 16;
    const int64_t blocks = (chunks + kCastThreads * kCastUnroll - 1) / (kCastThreads * kCastUnroll);
    const unsigned int grid = static_cast<unsigned int>(blocks);
    auto kernel = aligned ? cast_flat_kernel<T, kFmt, true> : cast_flat_kernel<T, kFmt, false>;
    kernel<<<grid, kCastThreads, 0, stream>>>(xp, scale, n, o, amax_bits);
    return;
  }
  // m tiles on grid.x (up to 2^31 - 1), k tiles on grid.y (the binding checks K <= 65535 * 64)
  const dim3 grid(static_cast<unsigned int>((M + kTileM - 1) / kTileM),
                  static_cast<unsigned int>((K + kTileK - 1) / kTileK));
  const bool vec_in = aligned && K % 16 == 0, vec_out = M % 16 == 0;
  auto kernel = vec_in ? (vec_out ? cast_transpose_kernel<T, kFmt, true, true>
                                  : cast_transpose_kernel<T, kFmt, true, false>)
                       : (vec_out ? cast_transpose_kernel<T, kFmt, false, true>
                                  : cast_transpose_kernel<T, kFmt, false, false>);
  kernel<<<grid, kTileThreads, 0, stream>>>(xp, scale, M, K, o, ot, amax_bits);
}

template <typename T>
void launch_cast_fmt(const void* x, const float* scale, int64_t M, int64_t K, bool transpose, void* out, void* out_t,
                     unsigned int* amax_bits, int fp8_code, cudaStream_t stream) {
  if (fp8_code == 0) launch_cast<T, __NV_E4M3>(x, scale, M, K, transpose, out, out_t, amax_bits, stream);
  else launch_cast<T, __NV_E5M2>(x, scale, M, K, transpose, out, out_t, amax_bits, stream);
}

// Delayed scaling's bookkeeping for one tensor (engine/ops/reference.py fp8_delayed_update), one block:
// inv_used = 1/scale; overflows += (amax finite and amax * scale > limit); the window [H] shifts by one with amax
// in front unless amax is inf/NaN; scale = limit / max(max(window), 1e-12) when max(window) > 0. The window is
// staged in shared memory (all reads before any write: the shift is in place). Built with --use_fast_math, so the
// arithmetic is spelled with round-to-nearest intrinsics and the max / sign tests work on bits (no flush of
// subnormals): torch computes limit / w as reciprocal(w) * limit, rounded twice, and so does this.
__global__ void delayed_update_kernel(float* __restrict__ history, float* __restrict__ scale,
                                      long long* __restrict__ overflows, const float* __restrict__ amax_in,
                                      float limit, int H, float* __restrict__ inv_used) {
  extern __shared__ float window[];  // [H]
  const float amax = *amax_in, used = *scale;
  const bool finite = abs_bits(amax) < 0x7f800000u;
  for (int i = threadIdx.x; i < H; i += blockDim.x) window[i] = history[i];
  __syncthreads();
  unsigned int top = 0u;  // largest |bits| of the new window: its max, as the entries are >= 0
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    const float v = finite ? (i == 0 ? amax : window[i - 1]) : window[i];
    if (finite) history[i] = v;
    top = max(top, abs_bits(v));
  }
  top = block_max_bits(top);
  if (threadIdx.x == 0) {
    *inv_used = __frcp_rn(used);
    if (finite && __fmul_rn(amax, used) > limit) *overflows += 1;
    if (top > 0u) *scale = __fmul_rn(__frcp_rn(__uint_as_float(max(top, __float_as_uint(1e-12f)))), limit);
  }
}

// ---- transpose of fp8 bytes: in [M, K] -> out [K, M] (the weight-gradient copy of an FP8 tensor written by an op
// with the cast fused in: csrc/rms_norm, csrc/swiglu) --------------------------------------------------------------

constexpr int kTrTile = 64;       // tile: 64 rows (m) by 64 columns (k) of bytes
constexpr int kTrThreads = 256;   // each thread moves 16 bytes in and 16 bytes out
constexpr int kTrStride = kTrTile + 4;  // smem row stride in bytes: a multiple of 4, off the 32-bank period

// Load: thread t reads row m0 + t / 4, bytes 16 (t % 4) .. + 15 of the tile (one 16-byte load when kVecIn: K % 16 ==
// 0 and `in` 16-byte aligned). Store: thread t writes row k0 + t / 4 of out, bytes m0 + 16 (t % 4) .. + 15, gathered
// from one smem column (one 16-byte store when kVecOut: M % 16 == 0 and `out` 16-byte aligned).
template <bool kVecIn, bool kVecOut>
__global__ void __launch_bounds__(kTrThreads) transpose_bytes_kernel(const uint8_t* __restrict__ in, int64_t M,
                                                                     int64_t K, uint8_t* __restrict__ out) {
  __shared__ __align__(16) uint8_t tile[kTrTile * kTrStride];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTrTile, k0 = static_cast<int64_t>(blockIdx.y) * kTrTile;
  const int r = threadIdx.x >> 2, seg = threadIdx.x & 3;
  {
    const int64_t m = m0 + r, k = k0 + 16 * seg;
    uint32_t w[4] = {0u, 0u, 0u, 0u};
    if (m < M && k < K) {
      const uint8_t* p = in + m * K + k;
      if (kVecIn) {
        const uint4 v = *reinterpret_cast<const uint4*>(p);
        w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
      } else {
        for (int e = 0; e < 16 && k + e < K; ++e) w[e >> 2] |= static_cast<uint32_t>(p[e]) << (8 * (e & 3));
      }
    }
    uint32_t* row = reinterpret_cast<uint32_t*>(tile + r * kTrStride + 16 * seg);
    row[0] = w[0], row[1] = w[1], row[2] = w[2], row[3] = w[3];
  }
  __syncthreads();
  const int64_t k = k0 + r, m = m0 + 16 * seg;
  if (k >= K || m >= M) return;
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < 16; ++e)
    w[e >> 2] |= static_cast<uint32_t>(tile[(16 * seg + e) * kTrStride + r]) << (8 * (e & 3));
  uint8_t* p = out + k * M + m;
  if (kVecOut) {
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    for (int e = 0; e < 16 && m + e < M; ++e) p[e] = static_cast<uint8_t>(w[e >> 2] >> (8 * (e & 3)));
  }
}

}  // namespace
}  // namespace herd

// The launchers take the stream as void* and return nullptr or the CUDA error text, so that the torch binding
// (fp8_cast_binding.cpp) needs no CUDA header. None of them synchronizes.

// x: n elements on `device`, dtype_code 0 = bf16, 1 = fp32. amax: one fp32, gets max|x| (zeroed here first, by an
// async memset: cheaper on the host than a torch zeros kernel).
const char* herd_fp8_amax(const void* x, int64_t n, int dtype_code, void* amax, int device, void* stream) {
  unsigned int* bits = static_cast<unsigned int*>(amax);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaMemsetAsync(bits, 0, sizeof(unsigned int), s);
  int num_sms = 132;  // an attribute query (no synchronization); the H100's figure if it fails
  if (cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) num_sms = 132;
  if (dtype_code == 0) herd::launch_amax<__nv_bfloat16>(x, n, bits, num_sms, s);
  else herd::launch_amax<float>(x, n, bits, num_sms, s);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// x [M, K] contiguous (dtype_code 0 = bf16, 1 = fp32); scale: one fp32 on the device; fp8_code 0 = e4m3fn,
// 1 = e5m2. out [M, K] and (when transpose) out_t [K, M] fp8 bytes, 16-byte aligned; amax: one fp32 (zeroed
// here first).
const char* herd_fp8_cast(const void* x, const float* scale, int64_t M, int64_t K, int dtype_code, int fp8_code,
                          bool transpose, void* out, void* out_t, void* amax, void* stream) {
  unsigned int* bits = static_cast<unsigned int*>(amax);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaMemsetAsync(bits, 0, sizeof(unsigned int), s);
  if (dtype_code == 0)
    herd::launch_cast_fmt<__nv_bfloat16>(x, scale, M, K, transpose, out, out_t, bits, fp8_code, s);
  else herd::launch_cast_fmt<float>(x, scale, M, K, transpose, out, out_t, bits, fp8_code, s);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// history [H] fp32, scale fp32, overflows int64, amax fp32 (one each), inv_used fp32 (one), all on the device;
// H <= 8192 (the window fills at most 32 KiB of shared memory). One block of up to 1024 threads.
const char* herd_fp8_delayed_update(void* history, void* scale, void* overflows, const void* amax, double limit,
                                    int64_t H, void* inv_used, void* stream) {
  const int threads = static_cast<int>(std::min<int64_t>(1024, (H + 31) / 32 * 32));
  herd::delayed_update_kernel<<<1, threads, static_cast<size_t>(H) * sizeof(float),
                                static_cast<cudaStream_t>(stream)>>>(
      static_cast<float*>(history), static_cast<float*>(scale), static_cast<long long*>(overflows),
      static_cast<const float*>(amax), static_cast<float>(limit), static_cast<int>(H), static_cast<float*>(inv_used));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// in [M, K] fp8 bytes, row-major -> out [K, M] row-major; M, K >= 1, K <= 65535 * 64 (the grid's y). No sync.
const char* herd_fp8_transpose(const void* in, int64_t M, int64_t K, void* out, void* stream) {
  const dim3 grid(static_cast<unsigned int>((M + herd::kTrTile - 1) / herd::kTrTile),
                  static_cast<unsigned int>((K + herd::kTrTile - 1) / herd::kTrTile));
  const bool vec_in = K % 16 == 0 && reinterpret_cast<uintptr_t>(in) % 16 == 0;
  const bool vec_out = M % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const uint8_t* i = static_cast<const uint8_t*>(in);
  uint8_t* o = static_cast<uint8_t*>(out);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (vec_in && vec_out) herd::transpose_bytes_kernel<true, true><<<grid, herd::kTrThreads, 0, s>>>(i, M, K, o);
  else if (vec_in) herd::transpose_bytes_kernel<true, false><<<grid, herd::kTrThreads, 0, s>>>(i, M, K, o);
  else if (vec_out) herd::transpose_bytes_kernel<false, true><<<grid, herd::kTrThreads, 0, s>>>(i, M, K, o);
  else herd::transpose_bytes_kernel<false, false><<<grid, herd::kTrThreads, 0, s>>>(i, M, K, o);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

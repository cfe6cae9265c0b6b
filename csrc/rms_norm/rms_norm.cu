// Fused RMSNorm (Zhang & Sennrich 2019, eq. 4) forward and backward, optionally fused with the residual add of a
// pre-norm block (h = residual + x; y = rmsnorm(h) * weight). Matches engine/ops/reference.py `rms_norm`:
// normalize in fp32, round to the normalized tensor's dtype, multiply by weight in fp32, round to the output dtype.
//
// Layout: a row is `dim` contiguous elements (all leading dims flattened). A row is split into chunks of 8
// consecutive elements; a group of `tpr` threads (a multiple of 32, so whole warps) owns one row and thread t of
// the group holds chunks t, t + tpr, t + 2 tpr, ... (at most kChunks of them, kept in registers between the
// sum-of-squares pass and the write). A block holds blockDim.x / tpr groups, each on its own row.
// VEC = true: every chunk is one 16-byte load per 8 bf16 (two per 8 fp32): needs dim % 8 == 0 and 16-byte aligned
// base pointers (the binding checks both). VEC = false: element-wise loads masked at `dim`, for any dim.
#include <type_traits>

#include "common.cuh"

namespace herd {
namespace rmsnorm {

constexpr int kChunks = 4;       // chunks of 8 elements per thread: the row lives in registers
constexpr int kMaxThreads = 512;  // block size bound: max dim = kMaxThreads * kChunks * 8 = 16384
constexpr int kFwdBlock = 256;    // forward: rows are packed into blocks of about this many threads
constexpr int kBwdBlock = 256;    // backward with at most 2 chunks per thread: blocks of this many threads
constexpr int kBwdBlocksPerSM = 3;  // ... and at least this many resident per SM (caps registers at 80)

// 8 consecutive elements of T in registers: 16 bytes for bf16, 32 bytes for fp32.
template <typename T> struct Pack;
template <> struct Pack<float> { float4 lo, hi; };
template <> struct Pack<__nv_bfloat16> { Bf16x8 v; };
static_assert(sizeof(Pack<float>) == 32 && sizeof(Pack<__nv_bfloat16>) == 16, "Pack: whole 16-byte vectors");

__device__ __forceinline__ void to_float8(const Pack<float>& p, float out[8]) {
  out[0] = p.lo.x; out[1] = p.lo.y; out[2] = p.lo.z; out[3] = p.lo.w;
  out[4] = p.hi.x; out[5] = p.hi.y; out[6] = p.hi.z; out[7] = p.hi.w;
}
__device__ __forceinline__ void to_float8(const Pack<__nv_bfloat16>& p, float out[8]) { unpack(p.v, out); }

template <typename T> __device__ __forceinline__ Pack<T> from_float8(const float in[8]);
template <> __device__ __forceinline__ Pack<float> from_float8<float>(const float in[8]) {
  return {make_float4(in[0], in[1], in[2], in[3]), make_float4(in[4], in[5], in[6], in[7])};
}
template <> __device__ __forceinline__ Pack<__nv_bfloat16> from_float8<__nv_bfloat16>(const float in[8]) {
  return {pack(in)};  // round to nearest even, as torch's .to(bfloat16)
}

// The fp32 value v takes once stored as T (the reference's `.type_as(x)` rounding).
template <typename T> __device__ __forceinline__ float round_to(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return __bfloat162float(__float2bfloat16_rn(v));
}
__device__ __forceinline__ float load_one(const float* p) { return *p; }
__device__ __forceinline__ float load_one(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_one(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_one(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Chunk c (elements [8c, 8c + 8)) of the row starting at `row`. The scalar path reads 0 past `dim`.
template <bool VEC, typename T>
__device__ __forceinline__ Pack<T> load_chunk(const T* __restrict__ row, int c, int dim) {
  if constexpr (VEC) {
    const uint4* p = reinterpret_cast<const uint4*>(row + 8 * c);  // one (bf16) or two (fp32) 16-byte loads
    uint4 u[sizeof(Pack<T>) / 16];
#pragma unroll
    for (int j = 0; j < static_cast<int>(sizeof(Pack<T>) / 16); ++j) u[j] = p[j];
    Pack<T> v;
    memcpy(&v, u, sizeof(v));  // register reinterpretation (a struct copy would load bf16 pairs 4 bytes at a time)
    return v;
  } else {
    float f[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] = 8 * c + k < dim ? load_one(row + 8 * c + k) : 0.f;
    return from_float8<T>(f);  // exact: every value is representable in T
  }
}

template <bool VEC, typename T>
__device__ __forceinline__ void store_chunk(T* __restrict__ row, int c, int dim, const Pack<T>& v) {
  if constexpr (VEC) {
    uint4 u[sizeof(Pack<T>) / 16];
    memcpy(u, &v, sizeof(v));
    uint4* p = reinterpret_cast<uint4*>(row + 8 * c);
#pragma unroll
    for (int j = 0; j < static_cast<int>(sizeof(Pack<T>) / 16); ++j) p[j] = u[j];
  } else {
    float f[8];
    to_float8(v, f);
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (8 * c + k < dim) store_one(row + 8 * c + k, f[k]);  // exact round trip
  }
}

template <bool VEC, typename T>
__device__ __forceinline__ void load_floats(const T* __restrict__ row, int c, int dim, float out[8]) {
  to_float8(load_chunk<VEC>(row, c, dim), out);
}

template <bool VEC, typename T>
__device__ __forceinline__ void store_floats(T* __restrict__ row, int c, int dim, const float in[8]) {
  store_chunk<VEC>(row, c, dim, from_float8<T>(in));
}

// Sum over the `tpr` threads of one group (whole warps); every thread gets its group's total. All threads of the
// block must call it (it holds two barriers). `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float group_sum(float v, float* scratch, int tpr) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps_per_group = tpr >> 5, first_warp = (warp / warps_per_group) * warps_per_group;
  v = warp_sum(v);
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps_per_group ? scratch[first_warp + lane] : 0.f;
  return warp_sum(v);
}

// The FP8 output of the forward (FP8 = true; engine/ops/fp8_fused.py rms_norm_fp8_fwd): y rounded to TO as the
// plain forward stores it, then q = saturate(y * *scale) in e4m3 (round to nearest even, as csrc/fp8_cast), and
// max |y| into *amax_bits (fp32 bits; the launcher zeroes them): one atomicMax per block.
struct Fp8Out {
  const float* scale;
  uint8_t* q;  // [rows, dim] e4m3 bytes, 8-byte aligned rows when VEC
  unsigned int* amax_bits;
};

// Chunk c of a row as 8 e4m3 bytes at q_row + 8c (one 8-byte store when VEC, else byte by byte up to dim).
template <bool VEC>
__device__ __forceinline__ void store_fp8_chunk(uint8_t* __restrict__ q_row, int c, int dim, const float f[8],
                                                float scale) {
  uint32_t w[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) w[i] = fp8x4<__NV_E4M3>(f + 4 * i, scale);
  if constexpr (VEC) {
    *reinterpret_cast<uint2*>(q_row + 8 * c) = make_uint2(w[0], w[1]);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (8 * c + k < dim) q_row[8 * c + k] = static_cast<uint8_t>(w[k >> 2] >> (8 * (k & 3)));
  }
}

// Largest `bits` over the block into *amax_bits (one atomicMax). Every thread of the block must call it; `scratch`
// (32 words of shared memory) may still be read by a group_sum: the first barrier waits for that.
__device__ __forceinline__ void block_amax_commit(unsigned int bits, unsigned int* scratch,
                                                  unsigned int* __restrict__ amax_bits) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  bits = __reduce_max_sync(0xffffffffu, bits);
  __syncthreads();
  if (lane == 0) scratch[warp] = bits;
  __syncthreads();
  if (warp == 0) {
    bits = __reduce_max_sync(0xffffffffu, lane < warps ? scratch[lane] : 0u);
    if (lane == 0 && bits != 0u) atomicMax(amax_bits, bits);
  }
}

// Forward. TN: the dtype of the normalized tensor (h's = TR with the residual add, else x's).
// x, residual: [rows, dim]; weight: [dim] -> y: [rows, dim] TO (or with FP8 its e4m3 bytes in fp8.q and the amax,
// y itself not stored), h_out: [rows, dim] TR (ADD only), rstd: [rows].
template <typename TX, typename TR, typename TW, typename TO, bool ADD, bool VEC, bool FP8 = false>
__global__ void __launch_bounds__(kMaxThreads)
fwd_kernel(const TX* __restrict__ x, const TR* __restrict__ residual, const TW* __restrict__ weight,
           TO* __restrict__ y, TR* __restrict__ h_out, float* __restrict__ rstd, int64_t rows, int dim, int tpr,
           float eps, float inv_dim, Fp8Out fp8) {
  using TN = std::conditional_t<ADD, TR, TX>;
  __shared__ float scratch[32];
  const int t = threadIdx.x % tpr, nchunks = (dim + 7) / 8;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  const bool active = row < rows;  // inactive groups still join the barriers in group_sum
  const int64_t base = active ? row * dim : 0;
  Pack<TN> v[kChunks];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int c = t + i * tpr;
    if (!active || c >= nchunks) continue;
    float f[8];
    if constexpr (ADD) {
      float r[8];
      load_floats<VEC>(x + base, c, dim, f);
      load_floats<VEC>(residual + base, c, dim, r);
#pragma unroll
      for (int k = 0; k < 8; ++k) f[k] += r[k];  // the residual add in fp32
      v[i] = from_float8<TR>(f);                  // h as stored: the tensor the reference normalizes
      store_chunk<VEC>(h_out + base, c, dim, v[i]);
    } else {
      v[i] = load_chunk<VEC>(x + base, c, dim);
    }
    to_float8(v[i], f);
#pragma unroll
    for (int k = 0; k < 8; ++k) ss += f[k] * f[k];  // masked elements are 0
  }
  ss = group_sum(ss, scratch, tpr);
  const float r = rsqrtf(ss * inv_dim + eps);  // 1 / sqrt(mean(h^2) + eps)
  if constexpr (!FP8) {
    if (!active) return;  // no barrier follows
  }
  unsigned int amax = 0u;  // FP8: max |bits| of this thread's y values (masked elements are 0)
  const float scale = FP8 ? __ldg(fp8.scale) : 1.f;
  if (active) {
    if (t == 0) rstd[row] = r;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int c = t + i * tpr;
      if (c >= nchunks) continue;
      float f[8], w[8];
      to_float8(v[i], f);
      load_floats<VEC>(weight, c, dim, w);
#pragma unroll
      for (int k = 0; k < 8; ++k) f[k] = w[k] * round_to<TN>(f[k] * r);  // weight * normed.type_as(h)
      if constexpr (FP8) {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          f[k] = round_to<TO>(f[k]);  // the value the plain forward stores, which the unfused cast reads
          amax = max(amax, __float_as_uint(f[k]) & 0x7fffffffu);
        }
        store_fp8_chunk<VEC>(fp8.q + base, c, dim, f, scale);
      } else {
        store_floats<VEC>(y + base, c, dim, f);
      }
    }
  }
  if constexpr (FP8) block_amax_commit(amax, reinterpret_cast<unsigned int*>(scratch), fp8.amax_bits);
}

// Backward. With n = h * rstd and g = dy * weight, d rstd / dh_j = -rstd^3 h_j / dim gives
//   dx_j = rstd * (g_j - n_j * mean_k(g_k n_k))  (+ dh_extra_j, the gradient reaching h along the residual path);
// the reference's cast of n to h's dtype passes gradients through unchanged, and its `weight * normed` makes
//   dweight = sum over rows of dy * round_TH(n).
// Each block walks rows in steps of its groups (grid-stride) with dweight in registers (a thread always owns the
// same columns), then sums its groups through shared memory into one fp32 row of dw_partial [gridDim.x, dim]:
// stage 1 of the two-stage reduction (no atomics; dw_reduce_kernel is stage 2).
// CH chunks of 8 per thread (bwd_chunks: 2 for dim 4096, so a row is one 256-thread block). With CH <= 2 and
// 16-byte loads (KEEP) the thread keeps its dy and h chunks in registers between the two passes, and registers are
// capped at 80 so that kBwdBlocksPerSM blocks share an SM: while one block waits at its row's reduction barrier,
// the others' loads are in flight (the first version ran one 512-thread block per SM with 4 chunks per thread and
// reached about half the copy bandwidth on an H200). Otherwise (dims above 4096, the masked scalar path) the
// second pass reloads dy and h (L1/L2 hits): keeping them beside dweight's registers would spill. The weight is
// reloaded in both passes (the same columns for every row: L1 hits).
// dy: [rows, dim] TDY; h, dh_extra (nullable): [rows, dim] TH; rstd: [rows] -> dx: [rows, dim] TH.
template <typename TDY, typename TH, typename TW, bool VEC, int CH>
__global__ void __launch_bounds__(CH <= 2 ? kBwdBlock : kMaxThreads, CH <= 2 ? kBwdBlocksPerSM : 1)
bwd_kernel(const TDY* __restrict__ dy, const TH* __restrict__ h, const TW* __restrict__ weight,
           const float* __restrict__ rstd, const TH* __restrict__ dh_extra, TH* __restrict__ dx,
           float* __restrict__ dw_partial, int64_t rows, int dim, int tpr, float inv_dim) {
  constexpr bool KEEP = VEC && CH <= 2;  // the masked scalar path would spill
  constexpr int kRedCols = CH <= 2 ? kBwdBlock : kMaxThreads;
  __shared__ float scratch[32];
  __shared__ float red[8][kRedCols];  // groups 1.. hand their dweight to group 0 (groups > 1 only for tpr < 256)
  const int groups = blockDim.x / tpr, group = threadIdx.x / tpr, t = threadIdx.x % tpr;
  const int nchunks = (dim + 7) / 8;
  float dw[CH][8];
#pragma unroll
  for (int i = 0; i < CH; ++i)
#pragma unroll
    for (int k = 0; k < 8; ++k) dw[i][k] = 0.f;
  // `first` depends on blockIdx only, so every thread of the block runs the same iterations (barriers inside)
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * groups; first < rows;
       first += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t row = first + group;
    const bool active = row < rows;
    const int64_t base = active ? row * dim : 0;
    const float r = active ? rstd[row] : 0.f;
    Pack<TDY> gp[KEEP ? CH : 1];
    Pack<TH> hp[KEEP ? CH : 1];
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int c = t + i * tpr;
      if (!active || c >= nchunks) continue;
      float g[8], n[8], w[8];
      if constexpr (KEEP) {
        gp[i] = load_chunk<VEC>(dy + base, c, dim);
        hp[i] = load_chunk<VEC>(h + base, c, dim);
        to_float8(gp[i], g);
        to_float8(hp[i], n);
      } else {
        load_floats<VEC>(dy + base, c, dim, g);
        load_floats<VEC>(h + base, c, dim, n);
      }
      load_floats<VEC>(weight, c, dim, w);  // the same columns every row: an L1 hit after the first
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        n[k] *= r;
        dw[i][k] += g[k] * round_to<TH>(n[k]);
        dot += g[k] * w[k] * n[k];  // masked elements are 0
      }
    }
    const float mean_gn = group_sum(dot, scratch, tpr) * inv_dim;
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int c = t + i * tpr;
      if (!active || c >= nchunks) continue;
      float g[8], n[8], w[8], out[8];
      if constexpr (KEEP) {
        to_float8(gp[i], g);
        to_float8(hp[i], n);
      } else {
        load_floats<VEC>(dy + base, c, dim, g);  // again: the row was just read, an L1/L2 hit
        load_floats<VEC>(h + base, c, dim, n);
      }
      load_floats<VEC>(weight, c, dim, w);
      if (dh_extra != nullptr) {
        load_floats<VEC>(dh_extra + base, c, dim, out);
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) out[k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) out[k] += r * (g[k] * w[k] - n[k] * r * mean_gn);
      store_floats<VEC>(dx + base, c, dim, out);
    }
  }
  float* partial = dw_partial + static_cast<int64_t>(blockIdx.x) * dim;
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    const int c = t + i * tpr;
    if (groups > 1) {  // uniform over the block: every thread reaches both barriers
      if (group > 0 && c < nchunks)
#pragma unroll
        for (int k = 0; k < 8; ++k) red[k][threadIdx.x - tpr] = dw[i][k];
      __syncthreads();
      if (group == 0 && c < nchunks)
        for (int g = 1; g < groups; ++g)  // fixed order: dweight is deterministic
#pragma unroll
          for (int k = 0; k < 8; ++k) dw[i][k] += red[k][(g - 1) * tpr + t];
      __syncthreads();  // red is rewritten for the next chunk slot
    }
    if (group == 0 && c < nchunks) store_floats<VEC>(partial, c, dim, dw[i]);
  }
}

// Stage 2: dweight [dim] = sum of dw_partial [nblocks, dim] over its rows, cast to TW. Block (32, 8): 32 columns
// (128-byte coalesced rows) by 8 row slices, summed in a fixed order.
template <typename TW>
__global__ void __launch_bounds__(256)
dw_reduce_kernel(const float* __restrict__ partial, TW* __restrict__ dweight, int nblocks, int dim) {
  __shared__ float sums[8][32];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (col < dim)
    for (int b = threadIdx.y; b < nblocks; b += 8) s += partial[static_cast<int64_t>(b) * dim + col];
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || col >= dim) return;
#pragma unroll
  for (int j = 1; j < 8; ++j) s += sums[j][threadIdx.x];
  store_one(dweight + col, s);
}

// ---- host side -------------------------------------------------------------------------------------------------

constexpr int kBFloat16 = 1;  // dtype codes shared with rms_norm_binding.cpp: 0 float32, 1 bfloat16

template <typename T> struct Tag { using type = T; };

template <typename F> void with_dtype(int code, F&& f) {
  if (code == kBFloat16) f(Tag<__nv_bfloat16>{});
  else f(Tag<float>{});
}

// Threads per row: whole warps, each thread holding at most `chunks_per_thread` chunks of 8.
inline int threads_per_row(int64_t dim, int chunks_per_thread = kChunks) {
  const int64_t chunks = (dim + 7) / 8, threads = (chunks + chunks_per_thread - 1) / chunks_per_thread;
  return static_cast<int>((threads + 31) / 32 * 32);
}

// The backward's chunks per thread: the fewest (1, 2 or 4) that keep a row within kBwdBlock threads, else 4.
inline int bwd_chunks(int64_t dim) {
  for (int ch = 1; ch < kChunks; ch *= 2)
    if (threads_per_row(dim, ch) <= kBwdBlock) return ch;
  return kChunks;
}

// The backward's launch shape: threads per row and rows (groups) per block.
struct BwdShape {
  int chunks, tpr, groups;
};
inline BwdShape bwd_shape(int64_t dim) {
  const int ch = bwd_chunks(dim), tpr = threads_per_row(dim, ch);
  const int block = ch <= 2 ? kBwdBlock : kMaxThreads;
  return {ch, tpr, tpr >= block ? 1 : block / tpr};
}

template <typename TDY, typename TH, typename TW>
auto bwd_kernel_for(bool vec, int chunks) {
  if (chunks == 1) return vec ? bwd_kernel<TDY, TH, TW, true, 1> : bwd_kernel<TDY, TH, TW, false, 1>;
  if (chunks == 2) return vec ? bwd_kernel<TDY, TH, TW, true, 2> : bwd_kernel<TDY, TH, TW, false, 2>;
  return vec ? bwd_kernel<TDY, TH, TW, true, kChunks> : bwd_kernel<TDY, TH, TW, false, kChunks>;
}

}  // namespace rmsnorm
}  // namespace herd

using namespace herd::rmsnorm;

int64_t herd_rms_norm_max_dim() { return static_cast<int64_t>(kMaxThreads) * kChunks * 8; }

// The launchers return nullptr, or the text of the launch's error (the binding raises it).
static const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// residual == nullptr: plain RMSNorm (y only); else h_out = residual + x too. Pointers are to [rows, dim] rows
// (weight [dim]); `vec`: dim % 8 == 0 and every pointer 16-byte aligned. Requires rows >= 1, 1 <= dim <= max dim.
const char* herd_rms_norm_fwd(const void* x, const void* residual, const void* weight, void* y, void* h_out,
                              float* rstd, int64_t rows, int64_t dim, double eps, int x_dtype, int residual_dtype,
                              int weight_dtype, int out_dtype, bool vec, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int tpr = threads_per_row(dim), groups = tpr >= kFwdBlock ? 1 : kFwdBlock / tpr;
  const dim3 grid(static_cast<unsigned>((rows + groups - 1) / groups)), block(groups * tpr);
  const float eps_f = static_cast<float>(eps), inv_dim = static_cast<float>(1.0 / static_cast<double>(dim));
  with_dtype(x_dtype, [&](auto tx) { with_dtype(weight_dtype, [&](auto tw) { with_dtype(out_dtype, [&](auto to) {
    using TX = typename decltype(tx)::type;
    using TW = typename decltype(tw)::type;
    using TO = typename decltype(to)::type;
    if (residual == nullptr) {
      auto kernel = vec ? fwd_kernel<TX, TX, TW, TO, false, true> : fwd_kernel<TX, TX, TW, TO, false, false>;
      kernel<<<grid, block, 0, stream>>>(static_cast<const TX*>(x), nullptr, static_cast<const TW*>(weight),
                                         static_cast<TO*>(y), nullptr, rstd, rows, static_cast<int>(dim), tpr,
                                         eps_f, inv_dim, Fp8Out{});
      return;
    }
    with_dtype(residual_dtype, [&](auto tr) {
      using TR = typename decltype(tr)::type;
      auto kernel = vec ? fwd_kernel<TX, TR, TW, TO, true, true> : fwd_kernel<TX, TR, TW, TO, true, false>;
      kernel<<<grid, block, 0, stream>>>(static_cast<const TX*>(x), static_cast<const TR*>(residual),
                                         static_cast<const TW*>(weight), static_cast<TO*>(y),
                                         static_cast<TR*>(h_out), rstd, rows, static_cast<int>(dim), tpr, eps_f,
                                         inv_dim, Fp8Out{});
    });
  }); }); });
  return launch_error();
}

// The forward with the FP8 output (Fp8Out): y rounded to out_dtype is cast to e4m3 by *scale into q [rows, dim]
// (8-byte aligned, `vec` as above) and max |y| goes to *amax (zeroed here first); y is not stored. h_out and rstd
// as herd_rms_norm_fwd. The same launch shape and arithmetic as herd_rms_norm_fwd, so q is bit for bit the cast
// of what herd_rms_norm_fwd stores.
const char* herd_rms_norm_fp8_fwd(const void* x, const void* residual, const void* weight, void* q, void* h_out,
                                  float* rstd, const float* scale, void* amax, int64_t rows, int64_t dim, double eps,
                                  int x_dtype, int residual_dtype, int weight_dtype, int out_dtype, bool vec,
                                  void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int tpr = threads_per_row(dim), groups = tpr >= kFwdBlock ? 1 : kFwdBlock / tpr;
  const dim3 grid(static_cast<unsigned>((rows + groups - 1) / groups)), block(groups * tpr);
  const float eps_f = static_cast<float>(eps), inv_dim = static_cast<float>(1.0 / static_cast<double>(dim));
  const Fp8Out fp8{scale, static_cast<uint8_t*>(q), static_cast<unsigned int*>(amax)};
  cudaMemsetAsync(amax, 0, sizeof(unsigned int), stream);
  with_dtype(x_dtype, [&](auto tx) { with_dtype(weight_dtype, [&](auto tw) { with_dtype(out_dtype, [&](auto to) {
    using TX = typename decltype(tx)::type;
    using TW = typename decltype(tw)::type;
    using TO = typename decltype(to)::type;
    if (residual == nullptr) {
      auto kernel = vec ? fwd_kernel<TX, TX, TW, TO, false, true, true>
                        : fwd_kernel<TX, TX, TW, TO, false, false, true>;
      kernel<<<grid, block, 0, stream>>>(static_cast<const TX*>(x), nullptr, static_cast<const TW*>(weight),
                                         nullptr, nullptr, rstd, rows, static_cast<int>(dim), tpr, eps_f, inv_dim,
                                         fp8);
      return;
    }
    with_dtype(residual_dtype, [&](auto tr) {
      using TR = typename decltype(tr)::type;
      auto kernel = vec ? fwd_kernel<TX, TR, TW, TO, true, true, true> : fwd_kernel<TX, TR, TW, TO, true, false, true>;
      kernel<<<grid, block, 0, stream>>>(static_cast<const TX*>(x), static_cast<const TR*>(residual),
                                         static_cast<const TW*>(weight), nullptr, static_cast<TR*>(h_out), rstd,
                                         rows, static_cast<int>(dim), tpr, eps_f, inv_dim, fp8);
    });
  }); }); });
  return launch_error();
}

// Blocks of the backward's stage 1 (rows of its fp32 dweight workspace): as many as fit on the device at once.
int64_t herd_rms_norm_bwd_blocks(int64_t rows, int64_t dim, int dy_dtype, int h_dtype, int weight_dtype, bool vec) {
  const BwdShape shape = bwd_shape(dim);
  const int groups = shape.groups;
  int device = 0, sms = 1, per_sm = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  with_dtype(dy_dtype, [&](auto tdy) { with_dtype(h_dtype, [&](auto th) { with_dtype(weight_dtype, [&](auto tw) {
    auto kernel = bwd_kernel_for<typename decltype(tdy)::type, typename decltype(th)::type,
                                 typename decltype(tw)::type>(vec, shape.chunks);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, groups * shape.tpr, 0);
  }); }); });
  const int64_t needed = (rows + groups - 1) / groups, resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  return needed < resident ? needed : resident;
}

// dh_extra may be nullptr (else h's dtype). dw_partial: fp32 [blocks, dim] workspace, blocks from
// herd_rms_norm_bwd_blocks with the same arguments; dweight: [dim] in weight's dtype.
const char* herd_rms_norm_bwd(const void* dy, const void* h, const void* weight, const float* rstd,
                              const void* dh_extra, void* dx, void* dweight, float* dw_partial, int64_t blocks,
                              int64_t rows, int64_t dim, int dy_dtype, int h_dtype, int weight_dtype, bool vec,
                              void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const BwdShape shape = bwd_shape(dim);
  const float inv_dim = static_cast<float>(1.0 / static_cast<double>(dim));
  with_dtype(dy_dtype, [&](auto tdy) { with_dtype(h_dtype, [&](auto th) { with_dtype(weight_dtype, [&](auto tw) {
    using TDY = typename decltype(tdy)::type;
    using TH = typename decltype(th)::type;
    using TW = typename decltype(tw)::type;
    bwd_kernel_for<TDY, TH, TW>(vec, shape.chunks)<<<static_cast<unsigned>(blocks), shape.groups * shape.tpr, 0,
                                                    stream>>>(
        static_cast<const TDY*>(dy), static_cast<const TH*>(h), static_cast<const TW*>(weight), rstd,
        static_cast<const TH*>(dh_extra), static_cast<TH*>(dx), dw_partial, rows, static_cast<int>(dim),
        shape.tpr, inv_dim);
    dw_reduce_kernel<TW><<<static_cast<unsigned>((dim + 31) / 32), dim3(32, 8), 0, stream>>>(
        dw_partial, static_cast<TW*>(dweight), static_cast<int>(blocks), static_cast<int>(dim));
  }); }); });
  return launch_error();
}

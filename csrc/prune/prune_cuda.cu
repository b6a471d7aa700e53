// Attention-score token pruning on CUDA: context_scores (two tiled passes) and
// select_tokens (radix select of the k-th best score per sample).
//
// context_scores never materializes the T x N probability matrix. Both passes work on the
// "group rows" of a kv head: the query rows of its G = Hq / Hkv query heads, row-major (row
// r is query row r / G of query head hk G + r % G), so the G heads of a GQA group share
// every key tile they read, and a tile of 64 rows is full even when T < 64.
//   pass 1 (row_lse_kernel):   a block per (b, kv head, tile slot) takes the tiles of 64 group
//                              rows of its slot, keeps each tile's q rows in shared memory and
//                              sweeps the keys (up to the tile's last position when causal),
//                              writing each row's log-sum-exp to the workspace. The grid
//                              holds at most a few waves of slots and each block loops over
//                              its slot's tiles, so a row capacity far above the real counts
//                              (Tmax = Nq: the glue reads no count back) costs no empty waves.
//   pass 2 (col_sum_kernel):   a block per (b, 64 keys) loads the key tile of each kv head once
//                              and streams that head's group rows past it (from the first row
//                              at or after the tile when causal), recomputing the logits and
//                              summing exp(logit - lse) per key.
// Each block owns its outputs, so no atomics. Both passes share tile_logits(): a 64 x 64 tile
// of q . k computed with plain FMAs in 32-wide head-dim slices (converted to float on load,
// double for fp64 inputs). The tile that stays (q rows in pass 1, keys in pass 2) sits whole
// in dynamic shared memory when two blocks per SM still fit (fp32: dh <= 256 on sm_80 and
// sm_90; fp64: dh <= 96 on sm_80, 128 on sm_90), else it is reloaded slice by slice with the
// streamed one (plan_stationary). Query row t is read in place from q at row
// query_index[b, t] and masked causally by its key position query_pos[b, t] (the same array
// unless q holds only some rows).
//
// select_tokens finds the k-th largest context score with an MSB-first radix select
// (8 bits per pass, shared-memory histograms) over an order-preserving unsigned encoding of
// the scores, then writes keep[] in one sweep with a block-wide scan that hands the
// threshold ties to the earliest tokens. NaN scores rank below every other score
// (-inf included) and tie among themselves by token index; -0.0 and +0.0 are equal.
#include "prune.h"
#include "../cuda_try.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cub/cub.cuh>

#include <algorithm>
#include <climits>
#include <cstdint>

namespace lyra {
namespace {

// ---------------------------------------------------------------------------------------
// context_scores
// ---------------------------------------------------------------------------------------

constexpr int kTile = 64;      // group rows and keys per tile
constexpr int kSlice = 32;     // head-dim slice of one product step
constexpr int kThreads = 256;  // a 16 x 16 grid of threads, each owning a 4 x 4 patch
constexpr int kPatch = kTile / 16;
// Row stride of a one-slice buffer: one column of padding, so the 16 threads of a half-warp
// reading 16 different rows at one column hit 16 different banks (for float and double).
constexpr int kSliceLd = kSlice + 1;
// Pass-1 tile slots: the grid holds at most this many blocks per SM (a few waves of the two
// blocks per SM the launch bounds ask for); each block loops over its slot's tiles.
constexpr int kRowBlocksPerSm = 16;

// Row stride of a whole stationary tile: dh rounded up to whole slices (zero-filled, so the
// last slice reads zeros past dh), plus one column (odd, bank-conflict free as above).
inline int whole_ld(int dh) { return (dh + kSlice - 1) / kSlice * kSlice + 1; }

__device__ __forceinline__ float to_acc(float x, float) { return x; }
__device__ __forceinline__ float to_acc(__half x, float) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x, float) { return __bfloat162float(x); }
__device__ __forceinline__ double to_acc(double x, double) { return x; }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t pos_inf();
template <>
__device__ __forceinline__ float pos_inf<float>() { return CUDART_INF_F; }
template <>
__device__ __forceinline__ double pos_inf<double>() { return CUDART_INF; }

// dst[r * ld + c] = element d0 + c of row r for r < 64, c < width: the row starts at
// src + row_off[r] (-1: absent, reads as zeros), elements at or past dh read as zeros.
// Consecutive threads read consecutive elements of a row: coalesced.
template <typename in_t, typename acc_t>
__device__ __forceinline__ void load_rows(acc_t* dst, int ld, const in_t* src,
                                          const int64_t* row_off, int d0, int width, int dh) {
  for (int e = threadIdx.x; e < kTile * width; e += kThreads) {
    const int r = e / width, c = e - r * width;
    const int64_t off = row_off[r];
    dst[r * ld + c] = (off >= 0 && d0 + c < dh) ? to_acc(src[off + d0 + c], acc_t()) : acc_t(0);
  }
}

// acc[r][c] += sum_{kk < kSlice} a[(ty + 16 r) a_ld + kk] b[(tx + 16 c) b_ld + kk]: rows of a
// are query rows, rows of b keys. The 16 threads of a half-warp share ty (a: one address,
// broadcast) and read 16 rows of b (distinct banks for an odd b_ld).
template <typename acc_t>
__device__ __forceinline__ void slice_product(acc_t (&acc)[kPatch][kPatch], const acc_t* a,
                                              int a_ld, const acc_t* b, int b_ld) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const acc_t* a_row = a + ty * a_ld;
  const acc_t* b_row = b + tx * b_ld;
#pragma unroll 8
  for (int kk = 0; kk < kSlice; ++kk) {
    acc_t av[kPatch], bv[kPatch];
#pragma unroll
    for (int r = 0; r < kPatch; ++r) av[r] = a_row[16 * r * a_ld + kk];
#pragma unroll
    for (int c = 0; c < kPatch; ++c) bv[c] = b_row[16 * c * b_ld + kk];
#pragma unroll
    for (int r = 0; r < kPatch; ++r)
#pragma unroll
      for (int c = 0; c < kPatch; ++c) acc[r][c] = fma(av[r], bv[c], acc[r][c]);
  }
}

// The operand a block keeps across tiles (q rows in pass 1, keys in pass 2), in dynamic
// shared memory: whole (kTile x whole_ld(dh), loaded by the caller once per tile or kv head)
// or, when that does not fit, one slice (kTile x kSliceLd) that tile_logits reloads.
template <typename acc_t>
struct Stationary {
  acc_t* rows;
  int ld;
  bool whole;
};

// acc[r][c] = q_row(ty + 16 r) . k_row(tx + 16 c) (unscaled) for the rows whose offsets are in
// q_off / k_off. kQStationary: q is the stationary operand (pass 1), else k (pass 2); the
// other one streams through `slice` (kTile x kSliceLd). The caller must have synchronized
// after writing the offsets and, for a whole stationary tile, after loading it; the function
// ends with a barrier, so `slice` (and a reloaded stationary slice) may be reused right after.
template <bool kQStationary, typename in_t, typename acc_t>
__device__ __forceinline__ void tile_logits(acc_t (&acc)[kPatch][kPatch],
                                            const Stationary<acc_t>& st, acc_t* slice,
                                            const in_t* q, const int64_t* q_off, const in_t* k,
                                            const int64_t* k_off, int dh) {
#pragma unroll
  for (int r = 0; r < kPatch; ++r)
#pragma unroll
    for (int c = 0; c < kPatch; ++c) acc[r][c] = acc_t(0);
  const in_t* st_src = kQStationary ? q : k;
  const int64_t* st_off = kQStationary ? q_off : k_off;
  for (int d0 = 0; d0 < dh; d0 += kSlice) {
    if (!st.whole) load_rows(st.rows, kSliceLd, st_src, st_off, d0, kSlice, dh);
    load_rows(slice, kSliceLd, kQStationary ? k : q, kQStationary ? k_off : q_off, d0, kSlice,
              dh);
    __syncthreads();
    const acc_t* st_slice = st.rows + (st.whole ? d0 : 0);
    if (kQStationary) {
      slice_product(acc, st_slice, st.ld, slice, kSliceLd);
    } else {
      slice_product(acc, slice, kSliceLd, st_slice, st.ld);
    }
    __syncthreads();
  }
}

struct ScoreArgs {
  const void* q;
  int64_t q_sb, q_sh, q_sn;
  const void* k;
  int64_t k_sb, k_sh, k_sn;
  const int64_t* query_index;  // (B, Tmax) row of q of each query row
  const int64_t* query_pos;    // (B, Tmax) key position of each query row, ascending
  const int64_t* query_count;  // (B)
  int64_t Tmax;                // row capacity: at least every sample's count (may be Nq)
  const bool* key_mask;        // (B, N)
  int64_t Hq, Hkv, group;      // group = Hq / Hkv query heads per kv head
  int64_t N;
  int dh;
  int st_ld;      // row stride of the stationary tile: whole_ld(dh), or kSliceLd
  bool st_whole;  // the stationary tile is whole (else reloaded per slice)
  bool causal;
  double scale;
};

__device__ __forceinline__ int64_t query_rows(const ScoreArgs& a, int64_t b) {
  return min(max(a.query_count[b], int64_t(0)), a.Tmax);
}

template <typename acc_t>
__device__ __forceinline__ Stationary<acc_t> stationary(const ScoreArgs& a) {
  extern __shared__ __align__(16) unsigned char fma_dynamic_smem[];
  return {reinterpret_cast<acc_t*>(fma_dynamic_smem), a.st_ld, a.st_whole};
}

// Pass 1: lse[b, h, t] = log sum_j exp(scale * q[b,h,index_t] . k[b,h/G,j]) over the valid
// keys of row t (j <= pos_t when causal), +inf when it has none (so that pass 2 adds
// exp(-inf) = 0 for it). Block (b, hk, slot) takes the group-row tiles slot, slot + slots, ...
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
    row_lse_kernel(ScoreArgs a, int64_t slots, acc_t* lse) {
  const Stationary<acc_t> sq = stationary<acc_t>(a);  // this tile's q rows
  __shared__ acc_t sk[kTile * kSliceLd];               // a slice of the streamed keys
  __shared__ int64_t q_off[kTile], k_off[kTile], q_pos[kTile], lse_at[kTile];
  __shared__ bool k_ok[kTile];
  __shared__ int64_t max_pos;

  const int64_t slot = blockIdx.x % slots;
  const int64_t b = blockIdx.x / slots / a.Hkv;
  const int64_t hk = blockIdx.x / slots % a.Hkv;
  const int64_t rows = a.group * query_rows(a, b);  // group rows of (b, hk)
  const in_t* q = static_cast<const in_t*>(a.q);
  const in_t* k = static_cast<const in_t*>(a.k);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const acc_t neg_inf = -pos_inf<acc_t>();

  for (int64_t r0 = slot * kTile; r0 < rows; r0 += slots * kTile) {
    __syncthreads();  // the previous tile's readers of q_off / q_pos / lse_at / sq are done
    if (tid < kTile) {
      const int64_t r = r0 + tid;
      if (r < rows) {
        const int64_t t = r / a.group, h = hk * a.group + r % a.group;
        q_pos[tid] = a.query_pos[b * a.Tmax + t];
        q_off[tid] = b * a.q_sb + h * a.q_sh + a.query_index[b * a.Tmax + t] * a.q_sn;
        lse_at[tid] = (b * a.Hq + h) * a.Tmax + t;
      } else {
        q_pos[tid] = -1;
        q_off[tid] = -1;
        lse_at[tid] = -1;
      }
    }
    __syncthreads();
    if (tid == 0) {  // the last key any row of the tile may see
      int64_t m = -1;
      for (int r = 0; r < kTile; ++r) m = max(m, q_pos[r]);
      max_pos = m;
    }
    if (sq.whole) load_rows(sq.rows, sq.ld, q, q_off, 0, sq.ld - 1, a.dh);
    __syncthreads();  // max_pos (and the whole q tile) are visible
    const int64_t key_end = a.causal ? min(a.N, max_pos + 1) : a.N;

    // Online log-sum-exp of each of this thread's 4 rows over its own columns (tx + 16 c);
    // the 16 threads of a row merge their partial (max, sum) pairs at the end.
    acc_t row_max[kPatch], row_sum[kPatch];
#pragma unroll
    for (int r = 0; r < kPatch; ++r) row_max[r] = neg_inf, row_sum[r] = acc_t(0);

    for (int64_t j0 = 0; j0 < key_end; j0 += kTile) {
      __syncthreads();  // the previous key tile's readers of k_ok / k_off are done
      bool ok = false;
      if (tid < kTile) {
        const int64_t j = j0 + tid;
        ok = j < a.N && a.key_mask[b * a.N + j];
        k_ok[tid] = ok;
        k_off[tid] = j < a.N ? b * a.k_sb + hk * a.k_sh + j * a.k_sn : -1;
      }
      // Barrier that publishes k_ok / k_off and skips tiles of padding.
      if (!__syncthreads_or(ok)) continue;
      acc_t acc[kPatch][kPatch];
      tile_logits<true, in_t, acc_t>(acc, sq, sk, q, q_off, k, k_off, a.dh);
#pragma unroll
      for (int r = 0; r < kPatch; ++r) {
        const int64_t pos = q_pos[ty + 16 * r];
#pragma unroll
        for (int c = 0; c < kPatch; ++c) {
          const int col = tx + 16 * c;
          if (!k_ok[col] || (a.causal && j0 + col > pos)) continue;
          const acc_t s = scale * acc[r][c];
          if (s > row_max[r]) {
            row_sum[r] = row_sum[r] * exp_acc(row_max[r] - s) + acc_t(1);
            row_max[r] = s;
          } else {
            row_sum[r] += exp_acc(s - row_max[r]);
          }
        }
      }
    }

    // Merge across the 16 lanes tx = 0..15 of each row (they share a half-warp).
#pragma unroll
    for (int r = 0; r < kPatch; ++r) {
#pragma unroll
      for (int offset = 8; offset >= 1; offset /= 2) {
        const acc_t m2 = __shfl_xor_sync(0xffffffffu, row_max[r], offset);
        const acc_t s2 = __shfl_xor_sync(0xffffffffu, row_sum[r], offset);
        const acc_t m = max(row_max[r], m2);
        if (m != neg_inf) {  // else both are empty: keep (-inf, 0), avoid -inf - -inf
          row_sum[r] = row_sum[r] * exp_acc(row_max[r] - m) + s2 * exp_acc(m2 - m);
          row_max[r] = m;
        }
      }
      const int64_t at = lse_at[ty + 16 * r];
      if (tx == 0 && at >= 0) {
        lse[at] = row_max[r] == neg_inf ? pos_inf<acc_t>() : row_max[r] + log_acc(row_sum[r]);
      }
    }
  }
}

// The first of the T ascending positions pos[0..T) that is >= j0 (T if none): a 256-way
// search, one probe per thread and round, O(log_256 T) rounds. Every thread of the block must
// call it; all get the same answer.
__device__ __forceinline__ int64_t first_row_at_or_after(const int64_t* pos, int64_t T,
                                                         int64_t j0) {
  int64_t lo = 0, hi = T;  // the answer lies in [lo, hi]
  while (lo < hi) {
    const int64_t step = (hi - lo + kThreads - 1) / kThreads;
    const int64_t t = lo + threadIdx.x * step;
    // The probes before the answer are a prefix of the threads (positions ascend).
    const int64_t below = __syncthreads_count(t < hi && pos[t] < j0);
    const int64_t new_lo = below == 0 ? lo : lo + (below - 1) * step + 1;
    hi = min(hi, lo + below * step);
    lo = new_lo;
  }
  return lo;
}

// Pass 2: scores[b, j] = sum_{h, t} exp(scale * q[b,h,index_t] . k[b,h/G,j] - lse[b,h,t]) / (Hq T)
// over the rows t that may see key j; zero for invalid keys and for samples without rows.
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
    col_sum_kernel(ScoreArgs a, const acc_t* lse, acc_t* scores) {
  const Stationary<acc_t> sk = stationary<acc_t>(a);  // this block's keys, one kv head
  __shared__ union {
    acc_t q[kTile * kSliceLd];         // a slice of the streamed group rows
    acc_t partial[16][kTile + 1];      // at the end: per-ty column sums
  } smem;
  __shared__ int64_t q_off[kTile], k_off[kTile], q_pos[kTile];
  __shared__ acc_t q_lse[kTile];
  __shared__ bool k_ok[kTile];

  const int64_t k_tiles = (a.N + kTile - 1) / kTile;
  const int64_t b = blockIdx.x / k_tiles;
  const int64_t j0 = (blockIdx.x % k_tiles) * kTile;
  const int64_t T = query_rows(a, b);
  const in_t* q = static_cast<const in_t*>(a.q);
  const in_t* k = static_cast<const in_t*>(a.k);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  bool ok = false;
  if (tid < kTile) {
    const int64_t j = j0 + tid;
    ok = j < a.N && a.key_mask[b * a.N + j];
    k_ok[tid] = ok;
  }
  if (!__syncthreads_or(ok) || T == 0) {  // nothing to sum: all zeros
    if (tid < kTile && j0 + tid < a.N) scores[b * a.N + j0 + tid] = acc_t(0);
    return;
  }
  const acc_t scale = static_cast<acc_t>(a.scale);
  // Causal: the rows before t_start sit before j0 and see no key of this tile.
  const int64_t t_start =
      a.causal ? first_row_at_or_after(a.query_pos + b * a.Tmax, T, j0) : int64_t(0);
  const int64_t rows_end = a.group * T;
  acc_t col_sum[kPatch] = {};

  for (int64_t hk = 0; hk < a.Hkv && t_start < T; ++hk) {
    __syncthreads();  // the previous kv head's readers of k_off / sk are done
    if (tid < kTile) {
      const int64_t j = j0 + tid;
      k_off[tid] = j < a.N ? b * a.k_sb + hk * a.k_sh + j * a.k_sn : -1;
    }
    __syncthreads();
    // The whole key tile, once per kv head: the first product's barrier publishes it.
    if (sk.whole) load_rows(sk.rows, sk.ld, k, k_off, 0, sk.ld - 1, a.dh);
    for (int64_t r0 = a.group * t_start; r0 < rows_end; r0 += kTile) {
      __syncthreads();  // the previous tile's readers of q_pos / q_lse / q_off are done
      bool sees = false;  // does some row of this tile see some key of this tile?
      if (tid < kTile) {
        const int64_t r = r0 + tid;
        int64_t pos = -1, off = -1;
        acc_t l = pos_inf<acc_t>();
        if (r < rows_end) {
          const int64_t t = r / a.group, h = hk * a.group + r % a.group;
          pos = a.query_pos[b * a.Tmax + t];
          l = lse[(b * a.Hq + h) * a.Tmax + t];
          off = b * a.q_sb + h * a.q_sh + a.query_index[b * a.Tmax + t] * a.q_sn;
          sees = l != pos_inf<acc_t>() && (!a.causal || pos >= j0);
        }
        q_pos[tid] = pos;
        q_lse[tid] = l;
        q_off[tid] = off;
      }
      if (!__syncthreads_or(sees)) continue;
      acc_t acc[kPatch][kPatch];
      tile_logits<false, in_t, acc_t>(acc, sk, smem.q, q, q_off, k, k_off, a.dh);
#pragma unroll
      for (int r = 0; r < kPatch; ++r) {
        const int row = ty + 16 * r;
        const acc_t l = q_lse[row];
        const int64_t pos = q_pos[row];
        if (l == pos_inf<acc_t>()) continue;  // absent row, or a row without valid keys
#pragma unroll
        for (int c = 0; c < kPatch; ++c) {
          const int col = tx + 16 * c;
          if (!k_ok[col] || (a.causal && j0 + col > pos)) continue;
          col_sum[c] += exp_acc(scale * acc[r][c] - l);
        }
      }
    }
  }

  // Sum the 16 partial column sums (one per ty) of each key.
  __syncthreads();  // smem.partial overlays the streamed slice
#pragma unroll
  for (int c = 0; c < kPatch; ++c) smem.partial[ty][tx + 16 * c] = col_sum[c];
  __syncthreads();
  if (tid < kTile && j0 + tid < a.N) {
    acc_t sum = acc_t(0);
    for (int y = 0; y < 16; ++y) sum += smem.partial[y][tid];
    const acc_t denom = static_cast<acc_t>(static_cast<double>(a.Hq) * static_cast<double>(T));
    scores[b * a.N + j0 + tid] = k_ok[tid] ? sum / denom : acc_t(0);
  }
}

// Whether the stationary tile fits whole: with it, two blocks of either kernel must still fit
// an SM (the launch bounds' occupancy), and one block the per-block opt-in limit.
template <typename in_t, typename acc_t>
cudaError_t plan_stationary(int dh, bool* whole, size_t* dynamic_bytes) {
  int device = 0, optin = 0, per_sm = 0, reserved = 0;
  LYRA_CUDA_TRY(cudaGetDevice(&device));
  LYRA_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  LYRA_CUDA_TRY(
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  LYRA_CUDA_TRY(
      cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
  cudaFuncAttributes row_attr{}, col_attr{};
  LYRA_CUDA_TRY(cudaFuncGetAttributes(&row_attr, row_lse_kernel<in_t, acc_t>));
  LYRA_CUDA_TRY(cudaFuncGetAttributes(&col_attr, col_sum_kernel<in_t, acc_t>));
  const size_t static_bytes = std::max(row_attr.sharedSizeBytes, col_attr.sharedSizeBytes);
  const size_t whole_bytes = size_t(kTile) * size_t(whole_ld(dh)) * sizeof(acc_t);
  const size_t block = static_bytes + whole_bytes;
  *whole = block <= size_t(optin) && 2 * (block + size_t(reserved)) <= size_t(per_sm);
  *dynamic_bytes = *whole ? whole_bytes : size_t(kTile) * kSliceLd * sizeof(acc_t);
  return cudaSuccess;
}

template <typename in_t, typename acc_t>
cudaError_t launch_context_scores(ScoreArgs a, int64_t B, void* scores, void* workspace,
                                  cudaStream_t stream) {
  size_t dynamic_bytes = 0;
  const cudaError_t planned = plan_stationary<in_t, acc_t>(a.dh, &a.st_whole, &dynamic_bytes);
  if (planned != cudaSuccess) return planned;
  a.st_ld = a.st_whole ? whole_ld(a.dh) : kSliceLd;
  auto* row_kernel = row_lse_kernel<in_t, acc_t>;
  auto* col_kernel = col_sum_kernel<in_t, acc_t>;
  LYRA_CUDA_TRY(cudaFuncSetAttribute(row_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(dynamic_bytes)));
  LYRA_CUDA_TRY(cudaFuncSetAttribute(col_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(dynamic_bytes)));
  int device = 0, sms = 0;
  LYRA_CUDA_TRY(cudaGetDevice(&device));
  LYRA_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));

  acc_t* lse = static_cast<acc_t*>(workspace);
  // Pass 1: every (b, kv head) gets `slots` blocks, enough for its most group rows (G Tmax)
  // but no more than kRowBlocksPerSm waves' worth over the whole batch.
  const int64_t row_tiles = (a.group * a.Tmax + kTile - 1) / kTile;
  const int64_t fill = (int64_t(kRowBlocksPerSm) * sms + B * a.Hkv - 1) / (B * a.Hkv);
  const int64_t slots = std::min(row_tiles, std::max<int64_t>(fill, 1));
  const int64_t row_blocks = B * a.Hkv * slots;
  const int64_t col_blocks = B * ((a.N + kTile - 1) / kTile);
  if (row_blocks > INT_MAX || col_blocks > INT_MAX) return cudaErrorInvalidValue;
  if (row_blocks > 0) {
    row_kernel<<<static_cast<unsigned>(row_blocks), kThreads, dynamic_bytes, stream>>>(a, slots,
                                                                                       lse);
    LYRA_CUDA_TRY(cudaGetLastError());
  }
  col_kernel<<<static_cast<unsigned>(col_blocks), kThreads, dynamic_bytes, stream>>>(
      a, lse, static_cast<acc_t*>(scores));
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------
// select_tokens
// ---------------------------------------------------------------------------------------

constexpr int kSelectThreads = 512;
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

// Order-preserving map to unsigned integers: x < y  <=>  encode(x) < encode(y) for non-NaN
// scores. Negative values have all bits flipped, non-negative ones only the sign bit.
// -0.0 becomes +0.0 first (they compare equal); NaN maps to 0, below -inf.
__device__ __forceinline__ uint32_t encode_score(float x) {
  if (isnan(x)) return 0u;
  const uint32_t u = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ uint64_t encode_score(double x) {
  if (isnan(x)) return 0ull;
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(x == 0.0 ? 0.0 : x));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// One block per sample.
template <typename score_t, typename key_t>
__global__ void __launch_bounds__(kSelectThreads)
    select_tokens_kernel(const score_t* scores, const bool* context_mask, const bool* key_mask,
                         int64_t N, double keep_ratio, int64_t min_keep, bool* keep) {
  using BlockReduce = cub::BlockReduce<int64_t, kSelectThreads>;
  using BlockScan = cub::BlockScan<int64_t, kSelectThreads>;
  __shared__ union {
    typename BlockReduce::TempStorage reduce;
    typename BlockScan::TempStorage scan;
  } cub_tmp;
  __shared__ unsigned int hist[kRadixBins];
  __shared__ int64_t s_n, s_remaining;
  __shared__ int s_digit;

  const int64_t row = static_cast<int64_t>(blockIdx.x) * N;
  scores += row;
  context_mask += row;
  key_mask += row;
  keep += row;
  const int tid = threadIdx.x;
  auto is_candidate = [&](int64_t j) { return context_mask[j] && key_mask[j]; };

  // n = number of valid context tokens; k by the rule of keep_count.h, like the CPU.
  int64_t local = 0;
  for (int64_t j = tid; j < N; j += kSelectThreads) local += is_candidate(j) ? 1 : 0;
  const int64_t n_total = BlockReduce(cub_tmp.reduce).Sum(local);  // valid in thread 0
  if (tid == 0) s_n = n_total;
  __syncthreads();
  const int64_t n = s_n;
  const int64_t k = min(max(keep_count(n, keep_ratio, min_keep), int64_t(0)), n);
  const bool keep_all = k == n, keep_none = k == 0;

  // Radix select: after the pass at `shift`, `prefix` holds the top bits of the k-th largest
  // key and `remaining` its rank among the keys that share them. At the end, prefix is the
  // threshold and remaining the number of ties to keep.
  key_t prefix = 0, mask = 0;
  int64_t remaining = k;
  if (!keep_all && !keep_none) {
    for (int shift = 8 * int(sizeof(key_t)) - kRadixBits; shift >= 0; shift -= kRadixBits) {
      for (int i = tid; i < kRadixBins; i += kSelectThreads) hist[i] = 0u;
      __syncthreads();
      for (int64_t j = tid; j < N; j += kSelectThreads) {
        if (!is_candidate(j)) continue;
        const key_t u = encode_score(scores[j]);
        if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & (kRadixBins - 1)], 1u);
      }
      __syncthreads();
      if (tid == 0) {  // walk the digits from the top until `remaining` keys are covered
        int64_t above = 0;
        int digit = kRadixBins - 1;
        for (; digit > 0; --digit) {
          if (above + hist[digit] >= remaining) break;
          above += hist[digit];
        }
        s_digit = digit;
        s_remaining = remaining - above;
      }
      __syncthreads();
      prefix |= static_cast<key_t>(s_digit) << shift;
      mask |= static_cast<key_t>(kRadixBins - 1) << shift;
      remaining = s_remaining;
    }
  }
  const key_t threshold = prefix;

  // keep: padding false, non-context true, context by threshold; among ties, the first
  // `remaining` in token order (running count over chunks of kSelectThreads tokens).
  int64_t ties_before = 0;
  for (int64_t base = 0; base < N; base += kSelectThreads) {
    const int64_t j = base + tid;
    bool valid = false, context = false, above = false;
    int64_t tie = 0;
    if (j < N) {
      valid = key_mask[j];
      context = context_mask[j];
      if (valid && context && !keep_all && !keep_none) {
        const key_t u = encode_score(scores[j]);
        above = u > threshold;
        tie = u == threshold ? 1 : 0;
      }
    }
    int64_t ties_here = 0, ties_chunk = 0;
    BlockScan(cub_tmp.scan).ExclusiveSum(tie, ties_here, ties_chunk);
    if (j < N) {
      bool kept;
      if (!valid) kept = false;
      else if (!context || keep_all) kept = true;
      else if (keep_none) kept = false;
      else kept = above || (tie && ties_before + ties_here < remaining);
      keep[j] = kept;
    }
    ties_before += ties_chunk;
    __syncthreads();  // cub_tmp is reused by the next chunk's scan
  }
}


}  // namespace

int64_t context_scores_cuda_workspace(int64_t B, int64_t Hq, int64_t Tmax) {
  // One log-sum-exp per (b, h, t); sized for double so that every dtype fits.
  return B * Hq * Tmax * static_cast<int64_t>(sizeof(double));
}

int64_t context_scores_cuda_workspace(KernelDtype dtype, int64_t B, int64_t Hq, int64_t Tmax) {
  const int64_t acc_bytes = dtype == KernelDtype::kFloat64 ? sizeof(double) : sizeof(float);
  return B * Hq * Tmax * acc_bytes;
}

int context_scores_cuda(KernelDtype dtype, const void* q, int64_t q_sb, int64_t q_sh,
                        int64_t q_sn, const void* k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                        const int64_t* query_index, const int64_t* query_pos,
                        const int64_t* query_count, int64_t Tmax, const bool* key_mask,
                        int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t dh, bool causal,
                        double scale, void* scores, void* workspace, void* stream) {
  // The kernels slice the head dim, so any dh works; beyond what a whole tile of shared
  // memory holds (about 256 in fp32), the stationary tile is reloaded slice by slice.
  if (B < 0 || Tmax < 0 || N < 0 || Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0 || dh <= 0 ||
      dh > INT_MAX - kSlice)
    return cudaErrorInvalidValue;
  if (B == 0 || N == 0) return cudaSuccess;
  ScoreArgs a{};
  a.q = q;
  a.q_sb = q_sb, a.q_sh = q_sh, a.q_sn = q_sn;
  a.k = k;
  a.k_sb = k_sb, a.k_sh = k_sh, a.k_sn = k_sn;
  a.query_index = query_index;
  a.query_pos = query_pos;
  a.query_count = query_count;
  a.Tmax = Tmax;
  a.key_mask = key_mask;
  a.Hq = Hq, a.Hkv = Hkv, a.group = Hq / Hkv;
  a.N = N;
  a.dh = static_cast<int>(dh);
  a.causal = causal;
  a.scale = scale;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case KernelDtype::kFloat32: return launch_context_scores<float, float>(a, B, scores, workspace, s);
    case KernelDtype::kFloat64: return launch_context_scores<double, double>(a, B, scores, workspace, s);
    case KernelDtype::kFloat16: return launch_context_scores<__half, float>(a, B, scores, workspace, s);
    case KernelDtype::kBFloat16:
      return launch_context_scores<__nv_bfloat16, float>(a, B, scores, workspace, s);
  }
  return cudaErrorInvalidValue;
}

int select_tokens_cuda(const void* scores, bool scores_are_double, const bool* context_mask,
                       const bool* key_mask, int64_t B, int64_t N, double keep_ratio,
                       int64_t min_keep, bool* keep, void* stream) {
  if (B < 0 || B > INT_MAX || N < 0) return cudaErrorInvalidValue;
  if (B == 0 || N == 0) return cudaSuccess;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (scores_are_double) {
    select_tokens_kernel<double, uint64_t><<<static_cast<unsigned>(B), kSelectThreads, 0, s>>>(
        static_cast<const double*>(scores), context_mask, key_mask, N, keep_ratio, min_keep, keep);
  } else {
    select_tokens_kernel<float, uint32_t><<<static_cast<unsigned>(B), kSelectThreads, 0, s>>>(
        static_cast<const float*>(scores), context_mask, key_mask, N, keep_ratio, min_keep, keep);
  }
  return cudaGetLastError();
}

}  // namespace lyra

// Attention-score token pruning on CUDA: context_scores (two tiled passes) and
// select_tokens (radix select of the k-th best score per sample).
//
// context_scores never materializes the T x N probability matrix:
//   pass 1 (row_lse_kernel):   one block per (b, query head, 64 query rows) sweeps all keys
//                              and writes each row's log-sum-exp to the workspace;
//   pass 2 (col_sum_kernel):   one block per (b, 64 keys) sweeps all heads and query rows,
//                              recomputes the logits and sums exp(logit - lse) per key.
// Each block owns its outputs, so no atomics. Both passes share tile_logits(): a 64 x 64
// tile of scale * q . k computed with plain FMAs from 64 x 32 slices of q and k staged in
// shared memory (converted to float on load, double for fp64 inputs). Query row t is read in
// place from q at row query_index[b, t] and masked causally by its key position
// query_pos[b, t] (the same array unless q holds only some rows); GQA query head h reads kv
// head h / (Hq / Hkv).
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

#include <climits>
#include <cstdint>

namespace lyra {
namespace {

// ---------------------------------------------------------------------------------------
// context_scores
// ---------------------------------------------------------------------------------------

constexpr int kTile = 64;      // query rows and keys per tile
constexpr int kSlice = 32;     // head-dim slice staged in shared memory at a time
constexpr int kThreads = 256;  // a 16 x 16 grid of threads, each owning a 4 x 4 patch
constexpr int kPatch = kTile / 16;

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

// Shared memory of one tile product: 64 x 32 slices of q and k (padded by one column so
// that the 16 threads of a half-warp reading 16 different k rows hit 16 different banks),
// and the element offset of every q row / k row of the tile (-1: row absent, reads as 0).
template <typename acc_t>
struct TileSmem {
  acc_t q[kTile][kSlice + 1];
  acc_t k[kTile][kSlice + 1];
  int64_t q_off[kTile];
  int64_t k_off[kTile];
};

template <typename in_t, typename acc_t>
__device__ __forceinline__ void load_slice(acc_t (*dst)[kSlice + 1], const in_t* src,
                                           const int64_t* row_off, int d0, int dh) {
  // Consecutive threads read consecutive head-dim elements of a row: coalesced.
  for (int e = threadIdx.x; e < kTile * kSlice; e += kThreads) {
    const int r = e / kSlice, c = e % kSlice;
    const int64_t off = row_off[r];
    dst[r][c] = (off >= 0 && d0 + c < dh) ? to_acc(src[off + d0 + c], acc_t()) : acc_t(0);
  }
}

// acc[r][c] = q_row(ty + 16 r) . k_row(tx + 16 c) for the rows whose offsets are in
// sm.q_off / sm.k_off. The caller must have synchronized after writing the offsets; the
// function ends with a barrier, so sm.q / sm.k may be reused right after.
template <typename in_t, typename acc_t>
__device__ __forceinline__ void tile_logits(acc_t (&acc)[kPatch][kPatch], TileSmem<acc_t>& sm,
                                            const in_t* q, const in_t* k, int dh) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int r = 0; r < kPatch; ++r)
#pragma unroll
    for (int c = 0; c < kPatch; ++c) acc[r][c] = acc_t(0);
  for (int d0 = 0; d0 < dh; d0 += kSlice) {
    load_slice(sm.q, q, sm.q_off, d0, dh);
    load_slice(sm.k, k, sm.k_off, d0, dh);
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kSlice; ++kk) {
      acc_t a[kPatch], b[kPatch];
#pragma unroll
      for (int r = 0; r < kPatch; ++r) a[r] = sm.q[ty + 16 * r][kk];
#pragma unroll
      for (int c = 0; c < kPatch; ++c) b[c] = sm.k[tx + 16 * c][kk];
#pragma unroll
      for (int r = 0; r < kPatch; ++r)
#pragma unroll
        for (int c = 0; c < kPatch; ++c) acc[r][c] = fma(a[r], b[c], acc[r][c]);
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
  const int64_t* query_pos;    // (B, Tmax) key position of each query row (causality)
  const int64_t* query_count;  // (B)
  int64_t Tmax;
  const bool* key_mask;  // (B, N)
  int64_t Hq, group;     // group = Hq / Hkv query heads per kv head
  int64_t N;
  int dh;
  bool causal;
  double scale;
};

__device__ __forceinline__ int64_t query_rows(const ScoreArgs& a, int64_t b) {
  return min(max(a.query_count[b], int64_t(0)), a.Tmax);
}

// Pass 1: lse[b, h, t] = log sum_j exp(scale * q[b,h,index_t] . k[b,h/G,j]) over the valid
// keys of row t (j <= pos_t when causal), +inf when it has none (so that pass 2 adds
// exp(-inf) = 0 for it).
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2) row_lse_kernel(ScoreArgs a, acc_t* lse) {
  __shared__ TileSmem<acc_t> sm;
  __shared__ int64_t q_pos[kTile];
  __shared__ bool k_ok[kTile];
  __shared__ int64_t max_pos;

  const int64_t q_tiles = (a.Tmax + kTile - 1) / kTile;
  const int64_t b = blockIdx.x / (a.Hq * q_tiles);
  const int64_t h = (blockIdx.x / q_tiles) % a.Hq;
  const int64_t t0 = (blockIdx.x % q_tiles) * kTile;
  const int64_t T = query_rows(a, b);
  if (t0 >= T) return;  // whole block: no rows here
  const in_t* q = static_cast<const in_t*>(a.q);
  const in_t* k = static_cast<const in_t*>(a.k);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  if (tid < kTile) {
    const int64_t t = t0 + tid;
    q_pos[tid] = t < T ? a.query_pos[b * a.Tmax + t] : -1;
    sm.q_off[tid] = t < T ? b * a.q_sb + h * a.q_sh + a.query_index[b * a.Tmax + t] * a.q_sn : -1;
  }
  __syncthreads();
  if (tid == 0) {  // last key any row of the tile may see (positions need not be sorted here)
    int64_t m = -1;
    for (int r = 0; r < kTile; ++r) m = max(m, q_pos[r]);
    max_pos = m;
  }
  __syncthreads();
  const int64_t key_end = a.causal ? min(a.N, max_pos + 1) : a.N;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const acc_t neg_inf = -pos_inf<acc_t>();

  // Online log-sum-exp of each of this thread's 4 rows over its own columns (tx + 16 c);
  // the 16 threads of a row merge their partial (max, sum) pairs at the end.
  acc_t row_max[kPatch], row_sum[kPatch];
#pragma unroll
  for (int r = 0; r < kPatch; ++r) row_max[r] = neg_inf, row_sum[r] = acc_t(0);

  for (int64_t j0 = 0; j0 < key_end; j0 += kTile) {
    __syncthreads();  // the previous tile's readers of k_ok are done
    bool ok = false;
    if (tid < kTile) {
      const int64_t j = j0 + tid;
      ok = j < a.N && a.key_mask[b * a.N + j];
      k_ok[tid] = ok;
      sm.k_off[tid] = j < a.N ? b * a.k_sb + (h / a.group) * a.k_sh + j * a.k_sn : -1;
    }
    // Barrier that publishes k_ok / k_off and skips tiles of padding.
    if (!__syncthreads_or(ok)) continue;
    acc_t acc[kPatch][kPatch];
    tile_logits<in_t, acc_t>(acc, sm, q, k, a.dh);
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
    const int64_t t = t0 + ty + 16 * r;
    if (tx == 0 && t < T) {
      lse[(b * a.Hq + h) * a.Tmax + t] =
          row_max[r] == neg_inf ? pos_inf<acc_t>() : row_max[r] + log_acc(row_sum[r]);
    }
  }
}

// Pass 2: scores[b, j] = sum_{h, t} exp(scale * q[b,h,index_t] . k[b,h/G,j] - lse[b,h,t]) / (Hq T)
// over the rows t that may see key j; zero for invalid keys and for samples without rows.
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
    col_sum_kernel(ScoreArgs a, const acc_t* lse, acc_t* scores) {
  __shared__ TileSmem<acc_t> sm;
  __shared__ int64_t q_pos[kTile];
  __shared__ acc_t q_lse[kTile];
  __shared__ bool k_ok[kTile];
  __shared__ acc_t partial[16][kTile + 1];

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
  acc_t col_sum[kPatch] = {};

  for (int64_t h = 0; h < a.Hq; ++h) {
    for (int64_t t0 = 0; t0 < T; t0 += kTile) {
      __syncthreads();  // the previous tile's readers of q_pos / q_lse / offsets are done
      bool sees = false;  // does some row of this tile see some key of this tile?
      if (tid < kTile) {
        const int64_t t = t0 + tid;
        const int64_t j = j0 + tid;
        const int64_t pos = t < T ? a.query_pos[b * a.Tmax + t] : -1;
        const acc_t l = t < T ? lse[(b * a.Hq + h) * a.Tmax + t] : pos_inf<acc_t>();
        q_pos[tid] = pos;
        q_lse[tid] = l;
        sm.q_off[tid] =
            t < T ? b * a.q_sb + h * a.q_sh + a.query_index[b * a.Tmax + t] * a.q_sn : -1;
        sm.k_off[tid] = j < a.N ? b * a.k_sb + (h / a.group) * a.k_sh + j * a.k_sn : -1;
        sees = t < T && l != pos_inf<acc_t>() && (!a.causal || pos >= j0);
      }
      if (!__syncthreads_or(sees)) continue;
      acc_t acc[kPatch][kPatch];
      tile_logits<in_t, acc_t>(acc, sm, q, k, a.dh);
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
#pragma unroll
  for (int c = 0; c < kPatch; ++c) partial[ty][tx + 16 * c] = col_sum[c];
  __syncthreads();
  if (tid < kTile && j0 + tid < a.N) {
    acc_t sum = acc_t(0);
    for (int y = 0; y < 16; ++y) sum += partial[y][tid];
    const acc_t denom = static_cast<acc_t>(static_cast<double>(a.Hq) * static_cast<double>(T));
    scores[b * a.N + j0 + tid] = k_ok[tid] ? sum / denom : acc_t(0);
  }
}

template <typename in_t, typename acc_t>
cudaError_t launch_context_scores(const ScoreArgs& a, int64_t B, void* scores, void* workspace,
                                  cudaStream_t stream) {
  acc_t* lse = static_cast<acc_t*>(workspace);
  const int64_t row_blocks = B * a.Hq * ((a.Tmax + kTile - 1) / kTile);
  const int64_t col_blocks = B * ((a.N + kTile - 1) / kTile);
  if (row_blocks > INT_MAX || col_blocks > INT_MAX) return cudaErrorInvalidValue;
  if (row_blocks > 0) {
    row_lse_kernel<in_t, acc_t><<<static_cast<unsigned>(row_blocks), kThreads, 0, stream>>>(a, lse);
    LYRA_CUDA_TRY(cudaGetLastError());
  }
  col_sum_kernel<in_t, acc_t><<<static_cast<unsigned>(col_blocks), kThreads, 0, stream>>>(
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

int context_scores_cuda(KernelDtype dtype, const void* q, int64_t q_sb, int64_t q_sh,
                        int64_t q_sn, const void* k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                        const int64_t* query_index, const int64_t* query_pos,
                        const int64_t* query_count, int64_t Tmax, const bool* key_mask,
                        int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t dh, bool causal,
                        double scale, void* scores, void* workspace, void* stream) {
  // The kernels slice the head dim, so any dh works; 256 is the largest used by our models.
  if (B < 0 || Tmax < 0 || N < 0 || Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0 || dh <= 0 ||
      dh > INT_MAX)
    return cudaErrorInvalidValue;
  if (B == 0 || N == 0) return cudaSuccess;
  const ScoreArgs a{q,           q_sb,        q_sh,      q_sn,        k,
                    k_sb,        k_sh,        k_sn,      query_index, query_pos,
                    query_count, Tmax,        key_mask,  Hq,          Hq / Hkv,
                    N,           static_cast<int>(dh), causal, scale};
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

// Tensor-core context_scores for bf16/fp16 inputs (the contract of prune.h): both passes as
// mma.sync.m16n8k16 products of bf16/fp16 fragments with fp32 accumulation, tiled like flash
// attention 2. prune_cuda.cu holds the FMA kernels, the fp32/fp64 path and this one's reference.
//
//   pass 1 (row_stats_tc_kernel): one CTA per (b, query head, tile of 128 or 64 query rows,
//       split of kSplitKeys keys). The Q tile stays in shared memory; the split's key tiles
//       (64 keys) stream through a cp.async pipeline. Each thread keeps an online (max, sum) of
//       2^(logit * log2 e) over its own columns for its rows; the 4 lanes of a quad merge them
//       at the end into one partial (max, sum) per row and split.
//   lse_combine_kernel: one thread per query row merges its splits, in order, into the row's
//       base-2 log-sum-exp (+inf for a row without a visible valid key). The splits give pass 1
//       enough CTAs: at Base's shapes (T 256, Hq 28, N 2^17) row tiles alone would be 56 CTAs
//       per sample, each sweeping 2^17 keys; with 4096-key splits there are 32 times as many.
//   pass 2 (col_sums_tc_kernel): one CTA per (b, tile of 128 or 64 keys) loops over the kv
//       heads. For each, the K tile stays in shared memory and the query-row tiles (64 rows) of
//       the G query heads that read it stream through the pipeline (GQA in place: one K load
//       serves G heads). The product is K Q^T, so keys are the mma rows and each thread sums
//       2^(logit2 - lse2) of its keys over its row columns in registers; the quad merges the
//       sums at the end.
// Every CTA owns what it writes (partials, log-sum-exps, scores) and sums in a fixed order: no
// atomics, the same bits run to run.
//
// Tiles: 4 warps; a warp owns kMTiles m16 tiles (16 or 32 rows of the stationary tile) against
// all 8 n8 tiles (64 rows) of a streamed tile, so each k16 step loads kMTiles + 4 ldmatrix.x4
// fragments for 8 kMTiles mmas. Shared-memory rows are padded by 16 bytes, which puts the 8 rows
// that one ldmatrix phase reads in 8 different bank groups for every head_dim that is a multiple
// of 16. Causality: pass 1 stops at the tile's last query position, pass 2 starts at the first
// query row at or after the key tile; boundary tiles are masked by position. Masked keys get
// -inf logits (pass 1) and zero scores (pass 2). Query positions ascend (prune.h), which the
// tile skipping relies on.
#include "prune.h"
#include "../cuda_try.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <climits>
#include <cstdint>

// mma.sync m16n8k16 with bf16 operands, ldmatrix and cp.async need sm_80. Older targets
// compile the kernels to a trap (the glue never sends them there).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define LYRA_TC_UNSUPPORTED_ARCH 1
#endif

namespace lyra {
namespace {

constexpr int kTcWarps = 4;
constexpr int kTcThreads = 32 * kTcWarps;
constexpr int kStreamRows = 64;                // rows of a streamed tile: keys (1), query rows (2)
constexpr int kNTiles = kStreamRows / 8;       // n8 tiles across a streamed tile
constexpr int64_t kSplitKeys = 4096;           // keys per pass-1 CTA
constexpr int kRowPad = 8;                     // elements of padding per shared-memory row
constexpr int kMinHeadDim = 16, kMaxHeadDim = 256;
constexpr double kLog2e = 1.4426950408889634;

// kMTiles m16 tiles per warp; kStages streamed tiles in flight.
template <int kMTiles_, int kStages_>
struct TcConfig {
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kStages = kStages_;
  static constexpr int kStationaryRows = kTcWarps * 16 * kMTiles;
  static size_t smem_bytes(int dh) {
    return size_t(kStationaryRows + kStages * kStreamRows) * size_t(dh + kRowPad) * 2;
  }
};
// head_dim <= 128: 128 stationary rows and double buffering; (128 + 2 x 64) rows of dh + 8
// elements: <= 68 KiB of dynamic shared memory (+ 2 KiB static).
using WideConfig = TcConfig<2, 2>;
// 128 < head_dim <= 256: 64 stationary rows, one stage; <= 66 KiB (+ 1 KiB static), which fits
// the 99 KiB per CTA of sm_86/sm_89 and 2 CTAs per SM on sm_80.
using NarrowConfig = TcConfig<1, 1>;
// Both kernels run under __launch_bounds__(128, 3): at most 168 registers (no spills for sm_80
// and sm_90, -Xptxas -v), so 3 CTAs fit an SM's 64K registers; shared memory then admits 3 per
// SM on sm_90 (227 KiB) and 2 on sm_80 (163 KiB) at dh 128.
constexpr int kTcMinBlocks = 3;

struct TcArgs {
  const void* q;
  int64_t q_sb, q_sh, q_sn;
  const void* k;
  int64_t k_sb, k_sh, k_sn;
  const int64_t* query_index;  // (B, Tmax)
  const int64_t* query_pos;    // (B, Tmax), ascending over each sample's rows
  const int64_t* query_count;  // (B)
  int64_t Tmax;
  const bool* key_mask;  // (B, N)
  int64_t Hq, Hkv, group;
  int64_t N;
  int64_t splits;  // pass-1 key splits: ceil(N / kSplitKeys)
  int dh;          // multiple of 16 in [16, 256]
  int ld;          // shared-memory row stride in elements: dh + kRowPad
  float scale2;    // scale * log2(e): logits in base 2
  bool causal;
  bool aligned;  // every q/k row starts 16-byte aligned: cp.async, else element loads
};

__device__ __forceinline__ int64_t tc_query_rows(const TcArgs& a, int64_t b) {
  return min(max(a.query_count[b], int64_t(0)), a.Tmax);
}

// ---------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------

#ifndef LYRA_TC_UNSUPPORTED_ARCH
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// 16 bytes global -> shared, zero-filled when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#ifndef LYRA_TC_UNSUPPORTED_ARCH
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef LYRA_TC_UNSUPPORTED_ARCH
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifndef LYRA_TC_UNSUPPORTED_ARCH
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#ifndef LYRA_TC_UNSUPPORTED_ARCH
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#else
  __trap();
#endif
}

// d += a b for a 16 x 16 (row-major) and a 16 x 8 (column-major) fragment, fp32 accumulators.
template <typename in_t>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
#ifndef LYRA_TC_UNSUPPORTED_ARCH
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
#ifndef LYRA_TC_UNSUPPORTED_ARCH
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};

// 2^x on the SFU (at most 2 ulp off); 2^-inf = 0, results below 2^-126 flush to 0.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------------------
// Tiles
// ---------------------------------------------------------------------------------------

// Copies `rows` rows of dh elements into shared rows of stride a.ld; row r is read from
// src_of(r), or zero-filled where that is nullptr. 16-byte cp.async (the caller commits) when
// rows are 16-byte aligned, else element loads stored directly.
template <typename in_t, typename SrcOf>
__device__ __forceinline__ void copy_tile(in_t* dst, int rows, const TcArgs& a, SrcOf src_of) {
  const int chunks = a.dh / 8;  // 16-byte chunks per row; consecutive threads, consecutive chunks
  for (int e = threadIdx.x; e < rows * chunks; e += kTcThreads) {
    const int r = e / chunks, c = e - r * chunks;
    const in_t* src = src_of(r);
    in_t* d = dst + r * a.ld + c * 8;
    if (a.aligned) {
      cp_async_16(d, src != nullptr ? src + c * 8 : a.q, src != nullptr);
    } else {
      union {
        uint16_t h[8];
        uint4 v;
      } chunk;
      const uint16_t* s = src != nullptr ? reinterpret_cast<const uint16_t*>(src + c * 8) : nullptr;
#pragma unroll
      for (int i = 0; i < 8; ++i) chunk.h[i] = s != nullptr ? s[i] : uint16_t(0);
      *reinterpret_cast<uint4*>(d) = chunk.v;
    }
  }
}

// acc[mt][nt] = A rows (16 mt .. 16 mt + 15 of this warp's stationary rows `sa`) times the
// streamed rows 8 nt .. 8 nt + 7 of `sb`, over dh = 16 ksteps elements: a 16 kMTiles x 64 block
// of dot products. Both tiles hold rows of dh contiguous elements (stride ld), so A is row-major
// and B column-major, as mma .row.col wants, with no transpose.
template <typename in_t, int kMTiles>
__device__ __forceinline__ void warp_product(float (&acc)[kMTiles][kNTiles][4], const in_t* sa,
                                             const in_t* sb, int ld, int ksteps) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;
  // ldmatrix.x4 row addresses: lanes 8i .. 8i + 7 give the rows of 8 x 8 matrix i.
  // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
  const in_t* pa = sa + (lane & 15) * ld + (lane >> 4) * 8;
  // B, two n8 tiles: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
  const in_t* pb = sb + ((lane & 7) + ((lane >> 4) << 3)) * ld + ((lane >> 3) & 1) * 8;
#pragma unroll 2
  for (int ks = 0; ks < ksteps; ++ks) {
    uint32_t af[kMTiles][4];
    uint32_t bf[kNTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(af[mt], pa + mt * 16 * ld + ks * 16);
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t r[4];
      ldmatrix_x4(r, pb + np * 16 * ld + ks * 16);
      bf[2 * np][0] = r[0];
      bf[2 * np][1] = r[1];
      bf[2 * np + 1][0] = r[2];
      bf[2 * np + 1][1] = r[3];
    }
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
        Mma<in_t>::run(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
  }
}

// Merges (m2, l2) into the running (m, l) of sum 2^x = l 2^m; m = -inf means empty.
__device__ __forceinline__ void merge_stats(float& m, float& l, float m2, float l2) {
  const float mn = fmaxf(m, m2);
  if (mn == -CUDART_INF_F) return;  // both empty: avoid -inf - -inf
  l = l * ex2(m - mn) + l2 * ex2(m2 - mn);
  m = mn;
}

// ---------------------------------------------------------------------------------------
// Pass 1: per-split row statistics
// ---------------------------------------------------------------------------------------

// partial[((b Hq + h) Tmax + t) splits + s] = (m, l) with sum over the keys j of split s that
// row t sees of 2^(scale2 q_t . k_j) = l 2^m; (-inf, 0) when it sees none. Written for the rows
// of the tile whose position reaches the split (lse_combine_kernel reads only those).
template <typename in_t, typename Cfg>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks)
    row_stats_tc_kernel(TcArgs a, float2* partial) {
  constexpr int kRows = Cfg::kStationaryRows;
  constexpr int kMT = Cfg::kMTiles;
  constexpr int kStages = Cfg::kStages;
  extern __shared__ __align__(16) unsigned char tc_smem[];
  in_t* sq = reinterpret_cast<in_t*>(tc_smem);  // kRows x ld
  in_t* sk = sq + kRows * a.ld;                  // kStages x kStreamRows x ld
  __shared__ int64_t q_off[kRows];
  __shared__ int64_t q_pos[kRows];
  __shared__ uint32_t k_bits[kStages][2];  // valid keys of each staged tile

  // Row tiles vary fastest, then heads: the CTAs of one split read the same keys together (L2).
  const int64_t row_tiles = (a.Tmax + kRows - 1) / kRows;
  int64_t x = blockIdx.x;
  const int64_t rt = x % row_tiles;
  x /= row_tiles;
  const int64_t h = x % a.Hq;
  x /= a.Hq;
  const int64_t split = x % a.splits;
  const int64_t b = x / a.splits;
  const int64_t T = tc_query_rows(a, b);
  const int64_t t0 = rt * kRows;
  if (t0 >= T) return;
  const int rows = static_cast<int>(min(T - t0, int64_t(kRows)));
  const int64_t* pos_b = a.query_pos + b * a.Tmax;
  const int64_t key_begin = split * kSplitKeys;
  const int64_t split_end = min(a.N, key_begin + kSplitKeys);
  const int64_t key_end = a.causal ? min(split_end, pos_b[t0 + rows - 1] + 1) : split_end;
  if (key_begin >= key_end) return;  // no row of the tile reaches this split
  const int n_tiles = static_cast<int>((key_end - key_begin + kStreamRows - 1) / kStreamRows);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const in_t* q = static_cast<const in_t*>(a.q);
  const in_t* k_head = static_cast<const in_t*>(a.k) + b * a.k_sb + (h / a.group) * a.k_sh;
  const bool* mask_b = a.key_mask + b * a.N;

  if (tid < kRows) {
    const int64_t t = t0 + tid;
    const bool present = tid < rows;
    q_off[tid] = present ? b * a.q_sb + h * a.q_sh + a.query_index[b * a.Tmax + t] * a.q_sn : -1;
    q_pos[tid] = present ? pos_b[t] : -1;
  }
  // Validity of key tid of the next tile to stage (threads < 64), loaded a tile ahead.
  auto load_key_ok = [&](int i) {
    const int64_t j = key_begin + int64_t(i) * kStreamRows + tid;
    return tid < kStreamRows && j < split_end && mask_b[j];
  };
  bool key_ok_next = load_key_ok(0);
  __syncthreads();
  copy_tile<in_t>(sq, kRows, a, [&](int r) -> const in_t* {
    const int64_t o = q_off[r];
    return o >= 0 ? q + o : nullptr;
  });
  cp_async_commit();

  // This thread's rows: g and g + 8 of each of its warp's m16 tiles.
  int64_t row_pos[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      row_pos[mt][half] = q_pos[warp * 16 * kMT + mt * 16 + half * 8 + (lane >> 2)];

  // Stages key tile i (always commits a group, empty past the end, so the waits count right).
  auto issue = [&](int i) {
    if (i < n_tiles) {
      const int slot = i % kStages;
      const int64_t j0 = key_begin + int64_t(i) * kStreamRows;
      const uint32_t bits = __ballot_sync(0xffffffffu, key_ok_next);
      if (warp < 2 && lane == 0) k_bits[slot][warp] = bits;
      key_ok_next = load_key_ok(i + 1);
      copy_tile<in_t>(sk + slot * kStreamRows * a.ld, kStreamRows, a, [&](int r) -> const in_t* {
        const int64_t j = j0 + r;
        return j < split_end ? k_head + j * a.k_sn : nullptr;
      });
    }
    cp_async_commit();
  };

  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      row_max[mt][half] = -CUDART_INF_F;
      row_sum[mt][half] = 0.0f;
    }

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue(i);
  for (int i = 0; i < n_tiles; ++i) {
    issue(i + kStages - 1);
    cp_async_wait<kStages - 1>();
    __syncthreads();  // tile i (and the Q tile) landed for every thread
    const int slot = i % kStages;
    const uint64_t kbits = uint64_t(k_bits[slot][0]) | (uint64_t(k_bits[slot][1]) << 32);
    if (kbits != 0) {  // else a tile of padding: skip
      float acc[kMT][kNTiles][4];
      warp_product<in_t, kMT>(acc, sq + warp * 16 * kMT * a.ld, sk + slot * kStreamRows * a.ld,
                              a.ld, a.dh / 16);
      const int64_t j0 = key_begin + int64_t(i) * kStreamRows;
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          // Bit c of `vis`: key j0 + c is valid and visible to this row (causal: c <= pos - j0).
          uint64_t vis = kbits;
          if (a.causal) {
            const int64_t last = row_pos[mt][half] - j0;
            vis &= last < 0 ? 0ull : last >= 63 ? ~0ull : (2ull << last) - 1ull;
          }
          vis >>= 2 * (lane & 3);  // this thread's columns are 8 nt + 2 (lane % 4) + {0, 1}
          float tile_max = -CUDART_INF_F;
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& v = acc[mt][nt][2 * half + e];
              v = (vis >> (8 * nt + e)) & 1ull ? __fmul_rn(v, a.scale2) : -CUDART_INF_F;
              tile_max = fmaxf(tile_max, v);
            }
          if (tile_max == -CUDART_INF_F) continue;
          const float m_new = fmaxf(row_max[mt][half], tile_max);
          float sum = 0.0f;
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) sum += ex2(acc[mt][nt][2 * half + e] - m_new);
          row_sum[mt][half] = row_sum[mt][half] * ex2(row_max[mt][half] - m_new) + sum;
          row_max[mt][half] = m_new;
        }
      }
    }
    __syncthreads();  // every warp is done with slot before it is staged again
  }

  // Merge the quad (its 4 lanes hold the same rows, different columns) and write.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float m = row_max[mt][half], l = row_sum[mt][half];
#pragma unroll
      for (int offset = 1; offset <= 2; offset *= 2) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
        const float l2 = __shfl_xor_sync(0xffffffffu, l, offset);
        merge_stats(m, l, m2, l2);
      }
      const int row = warp * 16 * kMT + mt * 16 + half * 8 + (lane >> 2);
      if ((lane & 3) == 0 && row < rows)
        partial[((b * a.Hq + h) * a.Tmax + t0 + row) * a.splits + split] = make_float2(m, l);
    }
  }
}

// lse2[(b Hq + h) Tmax + t] = log2 of the sum over the keys row t sees of 2^(scale2 q_t . k_j):
// its splits merged in order; +inf when it sees no valid key (pass 2 then adds 2^-inf = 0).
// Causal rows read only the splits that start at or before their position (the others were
// not written).
__global__ void __launch_bounds__(256) lse_combine_kernel(TcArgs a, int64_t B,
                                                          const float2* partial, float* lse2) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * a.Hq * a.Tmax) return;
  const int64_t t = idx % a.Tmax, b = idx / (a.Hq * a.Tmax);
  if (t >= tc_query_rows(a, b)) return;
  int64_t splits = a.splits;
  if (a.causal) splits = min(splits, a.query_pos[b * a.Tmax + t] / kSplitKeys + 1);
  float m = -CUDART_INF_F, l = 0.0f;
  for (int64_t s = 0; s < splits; ++s) {
    const float2 p = partial[idx * a.splits + s];
    merge_stats(m, l, p.x, p.y);
  }
  lse2[idx] = m == -CUDART_INF_F ? CUDART_INF_F : m + log2f(l);
}

// ---------------------------------------------------------------------------------------
// Pass 2: column sums
// ---------------------------------------------------------------------------------------

// scores[b, j] = sum_{h, t} 2^(scale2 q_t . k_j - lse2[b, h, t]) / (Hq T) over the rows t that
// see key j; zero for invalid keys and for samples without rows.
template <typename in_t, typename Cfg>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks)
    col_sums_tc_kernel(TcArgs a, const float* lse2, float* scores) {
  constexpr int kKeys = Cfg::kStationaryRows;
  constexpr int kMT = Cfg::kMTiles;
  constexpr int kStages = Cfg::kStages;
  extern __shared__ __align__(16) unsigned char tc_smem[];
  in_t* sk = reinterpret_cast<in_t*>(tc_smem);  // kKeys x ld
  in_t* sq = sk + kKeys * a.ld;                  // kStages x kStreamRows x ld
  __shared__ int64_t q_off[kStages][kStreamRows];
  __shared__ __align__(8) float q_lse[kStages][kStreamRows];  // lse2 of the row, +inf if absent
  __shared__ __align__(8) int q_last[kStages][kStreamRows];   // causal: pos - j0 in [-1, kKeys]
  __shared__ int warp_count[kTcWarps];

  const int64_t key_tiles = (a.N + kKeys - 1) / kKeys;
  const int64_t b = blockIdx.x / key_tiles;
  const int64_t j0 = (blockIdx.x % key_tiles) * kKeys;
  const int64_t T = tc_query_rows(a, b);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t* pos_b = a.query_pos + b * a.Tmax;
  float* scores_b = scores + b * a.N;

  // This thread's keys: rows g and g + 8 of its warp's m16 tiles (shared by the 4 lanes of a
  // quad, which hold different query rows of them).
  auto key_of = [&](int mt, int half) {
    return warp * 16 * kMT + mt * 16 + half * 8 + (lane >> 2);
  };
  bool key_ok[kMT][2];
  bool any_key = false;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t j = j0 + key_of(mt, half);
      key_ok[mt][half] = j < a.N && a.key_mask[b * a.N + j];
      any_key |= key_ok[mt][half];
    }

  // Causal: rows at positions before j0 see no key of the tile. Positions ascend, so they are
  // the first t_start rows.
  int count = 0;
  if (a.causal) {
    for (int64_t t = tid; t < T; t += kTcThreads) count += pos_b[t] < j0 ? 1 : 0;
#pragma unroll
    for (int offset = 16; offset >= 1; offset /= 2)
      count += __shfl_xor_sync(0xffffffffu, count, offset);
  }
  if (lane == 0) warp_count[warp] = count;
  any_key = __syncthreads_or(any_key);
  int64_t t_start = 0;
#pragma unroll
  for (int w = 0; w < kTcWarps; ++w) t_start += warp_count[w];
  const int64_t n_rows = T - t_start;

  if (!any_key || n_rows <= 0) {  // nothing to sum: zeros
    if ((lane & 3) == 0) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int64_t j = j0 + key_of(mt, half);
          if (j < a.N) scores_b[j] = 0.0f;
        }
    }
    return;
  }

  const in_t* q = static_cast<const in_t*>(a.q);
  const in_t* k = static_cast<const in_t*>(a.k);
  const int64_t row_tiles = (n_rows + kStreamRows - 1) / kStreamRows;
  const int64_t n_stream = a.group * row_tiles;  // streamed tiles per kv head

  // Metadata of query row tid of the next tile to stage (threads < 64), loaded a tile ahead.
  int64_t next_off = -1;
  float next_lse = CUDART_INF_F;
  int next_last = -1;
  auto load_meta = [&](int64_t hk, int64_t i) {
    if (tid >= kStreamRows || i >= n_stream) return;
    const int64_t h = hk * a.group + i / row_tiles;
    const int64_t t = t_start + (i % row_tiles) * kStreamRows + tid;
    const bool present = t < T;
    next_off = present ? b * a.q_sb + h * a.q_sh + a.query_index[b * a.Tmax + t] * a.q_sn : -1;
    next_lse = present ? lse2[(b * a.Hq + h) * a.Tmax + t] : CUDART_INF_F;
    next_last = present ? static_cast<int>(min(max(pos_b[t] - j0, int64_t(-1)), int64_t(kKeys)))
                        : -1;
  };
  // Stages streamed tile i of kv head hk (always commits a group).
  auto issue = [&](int64_t hk, int64_t i) {
    if (i < n_stream) {
      const int slot = static_cast<int>(i % kStages);
      if (tid < kStreamRows) {
        q_off[slot][tid] = next_off;
        q_lse[slot][tid] = next_lse;
        q_last[slot][tid] = next_last;
      }
      __syncthreads();  // the offsets are read by every thread below
      load_meta(hk, i + 1);
      copy_tile<in_t>(sq + slot * kStreamRows * a.ld, kStreamRows, a, [&](int r) -> const in_t* {
        const int64_t o = q_off[slot][r];
        return o >= 0 ? q + o : nullptr;
      });
    }
    cp_async_commit();
  };

  float col_sum[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) col_sum[mt][0] = col_sum[mt][1] = 0.0f;

  for (int64_t hk = 0; hk < a.Hkv; ++hk) {
    __syncthreads();  // the previous kv head's readers of sk are done
    copy_tile<in_t>(sk, kKeys, a, [&](int r) -> const in_t* {
      const int64_t j = j0 + r;
      return j < a.N ? k + b * a.k_sb + hk * a.k_sh + j * a.k_sn : nullptr;
    });
    cp_async_commit();
    load_meta(hk, 0);
#pragma unroll
    for (int i = 0; i < kStages - 1; ++i) issue(hk, i);
    for (int64_t i = 0; i < n_stream; ++i) {
      issue(hk, i + kStages - 1);
      cp_async_wait<kStages - 1>();
      __syncthreads();  // tile i (and the K tile) landed for every thread
      const int slot = static_cast<int>(i % kStages);
      float acc[kMT][kNTiles][4];
      warp_product<in_t, kMT>(acc, sk + warp * 16 * kMT * a.ld, sq + slot * kStreamRows * a.ld,
                              a.ld, a.dh / 16);
      // This thread's query rows: 8 nt + 2 (lane % 4) + {0, 1}.
      const int r0 = 2 * (lane & 3);
      float row_lse[kNTiles][2];
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        const float2 v = *reinterpret_cast<const float2*>(&q_lse[slot][8 * nt + r0]);
        row_lse[nt][0] = v.x;
        row_lse[nt][1] = v.y;
      }
      // Row 0 has the tile's lowest position: if it sees every key, all rows do.
      if (!a.causal || q_last[slot][0] >= kKeys - 1) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e)
                sum += ex2(__fmul_rn(acc[mt][nt][2 * half + e], a.scale2) - row_lse[nt][e]);
            col_sum[mt][half] += sum;
          }
      } else {
        int row_last[kNTiles][2];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          const int2 v = *reinterpret_cast<const int2*>(&q_last[slot][8 * nt + r0]);
          row_last[nt][0] = v.x;
          row_last[nt][1] = v.y;
        }
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int key = key_of(mt, half);
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const float x = __fmul_rn(acc[mt][nt][2 * half + e], a.scale2) - row_lse[nt][e];
                sum += key <= row_last[nt][e] ? ex2(x) : 0.0f;
              }
            col_sum[mt][half] += sum;
          }
      }
      __syncthreads();  // every warp is done with slot before it is staged again
    }
  }

  const float denom = static_cast<float>(static_cast<double>(a.Hq) * static_cast<double>(T));
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float s = col_sum[mt][half];
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      const int64_t j = j0 + key_of(mt, half);
      if ((lane & 3) == 0 && j < a.N) scores_b[j] = key_ok[mt][half] ? s / denom : 0.0f;
    }
}

template <typename in_t, typename Cfg>
cudaError_t launch_tc(const TcArgs& a, int64_t B, float* scores, void* workspace,
                      cudaStream_t stream) {
  const size_t smem = Cfg::smem_bytes(a.dh);
  auto* row_kernel = row_stats_tc_kernel<in_t, Cfg>;
  auto* col_kernel = col_sums_tc_kernel<in_t, Cfg>;
  LYRA_CUDA_TRY(cudaFuncSetAttribute(row_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem)));
  LYRA_CUDA_TRY(cudaFuncSetAttribute(col_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem)));
  const int64_t rows_total = B * a.Hq * a.Tmax;
  float2* partial = static_cast<float2*>(workspace);
  float* lse2 = reinterpret_cast<float*>(partial + rows_total * a.splits);
  constexpr int64_t kRows = Cfg::kStationaryRows;
  const int64_t row_blocks = B * a.splits * a.Hq * ((a.Tmax + kRows - 1) / kRows);
  const int64_t combine_blocks = (rows_total + 255) / 256;
  const int64_t col_blocks = B * ((a.N + kRows - 1) / kRows);
  if (row_blocks > INT_MAX || combine_blocks > INT_MAX || col_blocks > INT_MAX)
    return cudaErrorInvalidValue;
  if (row_blocks > 0) {
    row_kernel<<<static_cast<unsigned>(row_blocks), kTcThreads, smem, stream>>>(a, partial);
    LYRA_CUDA_TRY(cudaGetLastError());
    lse_combine_kernel<<<static_cast<unsigned>(combine_blocks), 256, 0, stream>>>(a, B, partial,
                                                                                 lse2);
    LYRA_CUDA_TRY(cudaGetLastError());
  }
  col_kernel<<<static_cast<unsigned>(col_blocks), kTcThreads, smem, stream>>>(a, lse2, scores);
  return cudaGetLastError();
}

int64_t key_splits(int64_t N) { return N <= 0 ? 0 : (N + kSplitKeys - 1) / kSplitKeys; }

}  // namespace

int64_t context_scores_tc_cuda_workspace(int64_t B, int64_t Hq, int64_t Tmax, int64_t N) {
  const int64_t rows = B * Hq * Tmax;
  return rows * key_splits(N) * static_cast<int64_t>(sizeof(float2)) +
         rows * static_cast<int64_t>(sizeof(float));
}

int context_scores_tc_cuda(KernelDtype dtype, const void* q, int64_t q_sb, int64_t q_sh,
                           int64_t q_sn, const void* k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                           const int64_t* query_index, const int64_t* query_pos,
                           const int64_t* query_count, int64_t Tmax, const bool* key_mask,
                           int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t dh, bool causal,
                           double scale, void* scores, void* workspace, void* stream) {
  if (B < 0 || Tmax < 0 || N < 0 || Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0)
    return cudaErrorInvalidValue;
  if ((dtype != KernelDtype::kFloat16 && dtype != KernelDtype::kBFloat16) || dh < kMinHeadDim ||
      dh > kMaxHeadDim || dh % 16 != 0)
    return cudaErrorInvalidValue;
  if (B == 0 || N == 0) return cudaSuccess;
  // 16-byte rows: the base pointers and every row stride (in 2-byte elements) a multiple of 16 B.
  const bool aligned = reinterpret_cast<uintptr_t>(q) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(k) % 16 == 0 && q_sb % 8 == 0 &&
                       q_sh % 8 == 0 && q_sn % 8 == 0 && k_sb % 8 == 0 && k_sh % 8 == 0 &&
                       k_sn % 8 == 0;
  TcArgs a{};
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
  a.splits = key_splits(N);
  a.dh = static_cast<int>(dh);
  a.ld = static_cast<int>(dh) + kRowPad;
  a.scale2 = static_cast<float>(scale * kLog2e);
  a.causal = causal;
  a.aligned = aligned;
  float* out = static_cast<float*>(scores);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool wide = dh <= 128;
  if (dtype == KernelDtype::kBFloat16) {
    return wide ? launch_tc<__nv_bfloat16, WideConfig>(a, B, out, workspace, s)
                : launch_tc<__nv_bfloat16, NarrowConfig>(a, B, out, workspace, s);
  }
  return wide ? launch_tc<__half, WideConfig>(a, B, out, workspace, s)
              : launch_tc<__half, NarrowConfig>(a, B, out, workspace, s);
}

}  // namespace lyra

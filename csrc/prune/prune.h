// Attention-score token pruning kernels: the torch-free API shared by the CPU and CUDA backends.
//
// context_scores: for each sample b and key j,
//   scores[b, j] = 1 / (Hq * T_b) * sum_h sum_{t < T_b} softmax_{j'}(scale * q[b,h,index_t] . k[b,h/G,j'])[j]
// with G = Hq / Hkv (GQA: query head h reads kv head h / G), the softmax over the valid keys
// (key_mask) and, when causal, only keys j' <= pos_t. Query row t of sample b is read from q at
// row index_t = query_index[b, t] and sits at key position pos_t = query_pos[b, t]: the same
// array when q holds a row for every key (row i at position i), and different when q holds
// only some rows (context parallelism: a rank's own rows scoring every rank's keys). A query
// row with no valid key adds nothing; a sample with no query rows gets all-zero scores;
// invalid keys get zero.
// Computed in two tiled passes (row log-sum-exp, then column sums of the probabilities), so
// neither the T x N nor the N x N matrix is ever materialized.
//
// select_tokens: keep[b, j] = key_mask[b, j] && (!context_mask[b, j] || j is among the k best
// context tokens of sample b), k = keep_count(n, keep_ratio, min_keep) (keep_count.h: n if
// n < min_keep, else max(min_keep, floor(keep_ratio * n)) with the floor of exact decimal
// arithmetic), n = number of valid context tokens. "Best" orders by score descending, then
// index ascending, so ties are broken towards earlier tokens. Found by a k-th value search, not
// a sort.
#pragma once
#include <cstdint>

#include "keep_count.h"

namespace lyra {

// Element (b, h, n, d) of q is q[b*q_sb + h*q_sh + n*q_sn + d] (the head dim is contiguous);
// likewise k, whose n runs over the N keys. query_index: (B, Tmax) row indices into q of each
// sample's query rows; query_pos: (B, Tmax) their key positions, strictly ascending in [0, N)
// (may be query_index itself). The first query_count[b] entries of each are valid (counts
// above Tmax are clamped to it): Tmax is a capacity, and may exceed every count (the CUDA
// glue passes Nq, so that it reads no count back).
// key_mask: (B, N). scores: (B, N) output.
// scalar_t/acc_t: (float, float) or (double, double).
template <typename scalar_t, typename acc_t>
void context_scores_cpu(const scalar_t* q, int64_t q_sb, int64_t q_sh, int64_t q_sn,
                        const scalar_t* k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                        const int64_t* query_index, const int64_t* query_pos,
                        const int64_t* query_count, int64_t Tmax, const bool* key_mask,
                        int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t dh, bool causal,
                        double scale, acc_t* scores, int num_threads);

// scores, context_mask, key_mask: (B, N); keep: (B, N) output.
template <typename score_t>
void select_tokens_cpu(const score_t* scores, const bool* context_mask, const bool* key_mask,
                       int64_t B, int64_t N, double keep_ratio, int64_t min_keep, bool* keep,
                       int num_threads);

// CUDA launchers: same contracts, device pointers, `stream` is a cudaStream_t; return a
// cudaError_t value (0 = ok). q/k element type by `dtype`; scores are float, or double when
// dtype is kFloat64.
enum class KernelDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

int context_scores_cuda(KernelDtype dtype, const void* q, int64_t q_sb, int64_t q_sh,
                        int64_t q_sn, const void* k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                        const int64_t* query_index, const int64_t* query_pos,
                        const int64_t* query_count, int64_t Tmax, const bool* key_mask,
                        int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t dh, bool causal,
                        double scale, void* scores, void* workspace, void* stream);

// Bytes of device workspace context_scores_cuda needs (for the row log-sum-exps): for any
// dtype (sized for double), or for `dtype` (4 bytes a row, 8 for kFloat64).
int64_t context_scores_cuda_workspace(int64_t B, int64_t Hq, int64_t Tmax);
int64_t context_scores_cuda_workspace(KernelDtype dtype, int64_t B, int64_t Hq, int64_t Tmax);

// The tensor-core kernel (prune_tc_cuda.cu): the same contract and arguments as
// context_scores_cuda for dtype kFloat16 / kBFloat16 and dh a multiple of 16 in [16, 256], on a
// device of compute capability 8.0 or newer (mma.sync m16n8k16); cudaErrorInvalidValue for any
// other dtype or dh. scores are float. Any alignment of q and k works (rows that start 16-byte
// aligned load faster). Which kernel a call takes is decided in one place, the torch glue
// (prune_op.cpp, use_tensor_cores).
int context_scores_tc_cuda(KernelDtype dtype, const void* q, int64_t q_sb, int64_t q_sh,
                           int64_t q_sn, const void* k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                           const int64_t* query_index, const int64_t* query_pos,
                           const int64_t* query_count, int64_t Tmax, const bool* key_mask,
                           int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t dh, bool causal,
                           double scale, void* scores, void* workspace, void* stream);

// Bytes of device workspace context_scores_tc_cuda needs (per key split row statistics and the
// row log-sum-exps).
int64_t context_scores_tc_cuda_workspace(int64_t B, int64_t Hq, int64_t Tmax, int64_t N);

// scores are float, or double when scores_are_double.
int select_tokens_cuda(const void* scores, bool scores_are_double, const bool* context_mask,
                       const bool* key_mask, int64_t B, int64_t N, double keep_ratio,
                       int64_t min_keep, bool* keep, void* stream);

}  // namespace lyra

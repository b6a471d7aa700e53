// CPU attention-score token pruning: two tiled passes for the scores, nth_element selection.
//
// Pass 1, parallel over (sample, kv head): the log-sum-exp of every query row of the group's
// heads, streaming over key tiles with an online max. Pass 2, parallel over (sample, key tile):
// for every head and query row, exp(logit - lse) summed into the tile's column sums. Only one
// (rows x tile) block of logits exists per thread at a time.
#include "prune.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../vector_math.h"

namespace lyra {
namespace {

constexpr int64_t kTile = 64;  // keys per tile: the logits block is rows x kTile

template <typename acc_t>
struct Problem {
  const int64_t* query_index;
  const int64_t* query_count;
  int64_t Tmax;
  const bool* key_mask;
  int64_t Hq, Hkv, N, dh;
  bool causal;
  acc_t scale;
};

// Copies keys [j0, j0 + n) of one kv head into `kt` transposed (dh x kTile), so the logits of a
// query row against the tile are a contiguous, vectorizable axpy over the head dimension.
template <typename scalar_t, typename acc_t>
void load_key_tile(const scalar_t* k, int64_t k_sn, int64_t j0, int64_t n, int64_t dh,
                   acc_t* kt) {
  for (int64_t jj = 0; jj < kTile; ++jj) {
    const scalar_t* row = k + (j0 + jj) * k_sn;
    for (int64_t d = 0; d < dh; ++d) kt[d * kTile + jj] = jj < n ? static_cast<acc_t>(row[d]) : 0;
  }
}

// logits[jj] = q . k[j0 + jj] (q already scaled), masked to -inf for invalid keys and, when
// causal, keys after the query position.
template <typename acc_t>
void tile_logits(const acc_t* q, const acc_t* kt, int64_t dh, const bool* valid, int64_t n,
                 int64_t limit, acc_t* logits) {
  acc_t acc[kTile] = {};
  for (int64_t d = 0; d < dh; ++d) {
    const acc_t qd = q[d];
    const acc_t* kd = kt + d * kTile;
#pragma omp simd
    for (int64_t jj = 0; jj < kTile; ++jj) acc[jj] += qd * kd[jj];
  }
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t jj = 0; jj < kTile; ++jj) {
    logits[jj] = (jj < n && jj < limit && valid[jj]) ? acc[jj] : neg_inf;
  }
}

// Gathers the scaled query rows of heads [h0, h0 + G) of one sample: row (h - h0) * T + t.
template <typename scalar_t, typename acc_t>
void gather_queries(const scalar_t* q, int64_t q_sh, int64_t q_sn, const int64_t* rows,
                    int64_t T, int64_t h0, int64_t G, int64_t dh, acc_t scale, acc_t* out) {
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t* src = q + (h0 + g) * q_sh + rows[t] * q_sn;
      acc_t* dst = out + (g * T + t) * dh;
      for (int64_t d = 0; d < dh; ++d) dst[d] = static_cast<acc_t>(src[d]) * scale;
    }
  }
}

// How many keys of the tile starting at j0 the query at `pos` may see.
inline int64_t visible(bool causal, int64_t pos, int64_t j0) {
  return causal ? pos - j0 + 1 : kTile;
}

}  // namespace

template <typename scalar_t, typename acc_t>
void context_scores_cpu(const scalar_t* q, int64_t q_sb, int64_t q_sh, int64_t q_sn,
                        const scalar_t* k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                        const int64_t* query_index, const int64_t* query_count, int64_t Tmax,
                        const bool* key_mask, int64_t B, int64_t Hq, int64_t Hkv, int64_t N,
                        int64_t dh, bool causal, double scale, acc_t* scores, int num_threads) {
  const int64_t G = Hq / Hkv;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  // lse[b][h][t]: log-sum-exp of query row t of head h; +inf for rows that see no valid key.
  std::vector<acc_t> lse(static_cast<size_t>(B * Hq * std::max<int64_t>(Tmax, 1)));
  const int64_t n_tiles = (N + kTile - 1) / kTile;

  // Pass 1: row log-sum-exps, one (sample, kv head) per task.
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<acc_t> qs(G * std::max<int64_t>(Tmax, 1) * dh), kt(dh * kTile), logits(kTile);
    std::vector<acc_t> row_max(G * std::max<int64_t>(Tmax, 1)), row_sum(row_max.size());
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * Hkv; ++task) {
      const int64_t b = task / Hkv, kvh = task % Hkv, T = query_count[b];
      const int64_t* rows = query_index + b * Tmax;
      if (T == 0) continue;
      gather_queries(q + b * q_sb, q_sh, q_sn, rows, T, kvh * G, G, dh, static_cast<acc_t>(scale),
                     qs.data());
      std::fill(row_max.begin(), row_max.end(), neg_inf);
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      const int64_t last_tile = causal ? rows[T - 1] / kTile : n_tiles - 1;
      for (int64_t tile = 0; tile <= last_tile; ++tile) {
        const int64_t j0 = tile * kTile, n = std::min(kTile, N - j0);
        load_key_tile(k + b * k_sb + kvh * k_sh, k_sn, j0, n, dh, kt.data());
        // Rows are sorted by position: with causal masking, rows before j0 see nothing here.
        const int64_t t0 = causal ? std::lower_bound(rows, rows + T, j0) - rows : 0;
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t t = t0; t < T; ++t) {
            const int64_t r = g * T + t;
            tile_logits(qs.data() + r * dh, kt.data(), dh, key_mask + b * N + j0, n,
                        visible(causal, rows[t], j0), logits.data());
            acc_t m = row_max[r];
            for (int64_t jj = 0; jj < kTile; ++jj) m = std::max(m, logits[jj]);
            if (m == neg_inf) continue;  // nothing visible in this tile yet
            acc_t s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t jj = 0; jj < kTile; ++jj) {
              s += logits[jj] == neg_inf ? acc_t(0) : exp_nonpositive(logits[jj] - m);
            }
            const acc_t old = row_max[r];
            row_sum[r] = (old == neg_inf ? acc_t(0) : row_sum[r] * std::exp(old - m)) + s;
            row_max[r] = m;
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t t = 0; t < T; ++t) {
          const int64_t r = g * T + t;
          lse[(b * Hq + kvh * G + g) * Tmax + t] =
              row_max[r] == neg_inf ? std::numeric_limits<acc_t>::infinity()
                                    : row_max[r] + std::log(row_sum[r]);
        }
      }
    }
  }

  // Pass 2: column sums of the probabilities, one (sample, key tile) per task.
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<acc_t> qs(dh), kt(dh * kTile), logits(kTile), col(kTile);
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < B * n_tiles; ++task) {
      const int64_t b = task / n_tiles, j0 = (task % n_tiles) * kTile;
      const int64_t n = std::min(kTile, N - j0), T = query_count[b];
      const int64_t* rows = query_index + b * Tmax;
      std::fill(col.begin(), col.end(), acc_t(0));
      const int64_t t0 = causal ? std::lower_bound(rows, rows + T, j0) - rows : 0;
      for (int64_t kvh = 0; kvh < Hkv && t0 < T; ++kvh) {
        load_key_tile(k + b * k_sb + kvh * k_sh, k_sn, j0, n, dh, kt.data());
        for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
          for (int64_t t = t0; t < T; ++t) {
            gather_queries(q + b * q_sb, q_sh, q_sn, rows + t, 1, h, 1, dh,
                           static_cast<acc_t>(scale), qs.data());
            tile_logits(qs.data(), kt.data(), dh, key_mask + b * N + j0, n,
                        visible(causal, rows[t], j0), logits.data());
            const acc_t l = lse[(b * Hq + h) * Tmax + t];
#pragma omp simd
            for (int64_t jj = 0; jj < kTile; ++jj) {
              col[jj] += logits[jj] == neg_inf ? acc_t(0) : exp_nonpositive(logits[jj] - l);
            }
          }
        }
      }
      const acc_t norm = T > 0 ? acc_t(1) / static_cast<acc_t>(Hq * T) : acc_t(0);
      for (int64_t jj = 0; jj < n; ++jj) scores[b * N + j0 + jj] = col[jj] * norm;
    }
  }
}

namespace {

// Order-preserving integer key of a score: larger score, larger key; NaN below everything,
// -0.0 equal to +0.0.
inline uint64_t order_key(double x) {
  if (std::isnan(x)) return 0;
  if (x == 0) x = 0;
  uint64_t bits;
  std::memcpy(&bits, &x, 8);
  return (bits >> 63) ? ~bits : (bits | (uint64_t(1) << 63));
}

}  // namespace

template <typename score_t>
void select_tokens_cpu(const score_t* scores, const bool* context_mask, const bool* key_mask,
                       int64_t B, int64_t N, double keep_ratio, int64_t min_keep, bool* keep,
                       int num_threads) {
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<uint64_t> keys;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const score_t* s = scores + b * N;
      const bool* ctx = context_mask + b * N;
      const bool* valid = key_mask + b * N;
      bool* out = keep + b * N;
      keys.clear();
      for (int64_t j = 0; j < N; ++j) {
        if (valid[j] && ctx[j]) keys.push_back(order_key(static_cast<double>(s[j])));
      }
      const int64_t n = static_cast<int64_t>(keys.size());
      const int64_t k = n < min_keep
                            ? n
                            : std::max<int64_t>(min_keep, static_cast<int64_t>(
                                                              std::floor(keep_ratio * n)));
      // The k-th largest key; context tokens above it are kept, and of those equal to it the
      // earliest ones until k are reached.
      uint64_t threshold = 0;
      int64_t ties_left = 0;
      if (k > 0 && k < n) {
        std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(),
                         [](uint64_t x, uint64_t y) { return x > y; });
        threshold = keys[k - 1];
        int64_t above = 0;
        for (int64_t i = 0; i < n; ++i) above += keys[i] > threshold;
        ties_left = k - above;
      }
      for (int64_t j = 0; j < N; ++j) {
        bool kept = valid[j];
        if (kept && ctx[j] && k < n) {
          const uint64_t key = order_key(static_cast<double>(s[j]));
          kept = k > 0 && (key > threshold || (key == threshold && ties_left-- > 0));
        }
        out[j] = kept;
      }
    }
  }
}

template void context_scores_cpu<float, float>(const float*, int64_t, int64_t, int64_t,
                                               const float*, int64_t, int64_t, int64_t,
                                               const int64_t*, const int64_t*, int64_t,
                                               const bool*, int64_t, int64_t, int64_t, int64_t,
                                               int64_t, bool, double, float*, int);
template void context_scores_cpu<double, double>(const double*, int64_t, int64_t, int64_t,
                                                 const double*, int64_t, int64_t, int64_t,
                                                 const int64_t*, const int64_t*, int64_t,
                                                 const bool*, int64_t, int64_t, int64_t,
                                                 int64_t, int64_t, bool, double, double*, int);
template void select_tokens_cpu<float>(const float*, const bool*, const bool*, int64_t, int64_t,
                                       double, int64_t, bool*, int);
template void select_tokens_cpu<double>(const double*, const bool*, const bool*, int64_t,
                                        int64_t, double, int64_t, bool*, int);

}  // namespace lyra

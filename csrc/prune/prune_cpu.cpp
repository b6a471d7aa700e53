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

constexpr int kRows = 4;  // query rows per register block

// dots[r][jj] = q[r] . k[j0 + jj] for a block of kRows query rows (already scaled) against the
// transposed key tile: each key vector loaded feeds kRows FMAs, the accumulators stay in
// registers.
template <typename acc_t>
LYRA_SIMD_CLONES void block_dots(const acc_t* const* q, const acc_t* __restrict kt, int64_t dh,
                                 acc_t* __restrict dots) {
  constexpr int64_t kChunk = 128 / sizeof(acc_t);  // two 64-byte vectors of keys
  for (int64_t c = 0; c < kTile; c += kChunk) {
    acc_t acc[kRows][kChunk] = {};
    for (int64_t d = 0; d < dh; ++d) {
      const acc_t* kd = kt + d * kTile + c;
      for (int r = 0; r < kRows; ++r) {
        const acc_t qd = q[r][d];
#pragma omp simd
        for (int64_t v = 0; v < kChunk; ++v) acc[r][v] += qd * kd[v];
      }
    }
    for (int r = 0; r < kRows; ++r) {
      for (int64_t v = 0; v < kChunk; ++v) dots[r * kTile + c + v] = acc[r][v];
    }
  }
}

// Masks one row of dots in place: -inf for invalid keys, keys past the tile's end and, when
// causal, keys after the query position (`limit` keys visible).
template <typename acc_t>
void mask_row(acc_t* logits, const bool* valid, int64_t n, int64_t limit) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t jj = 0; jj < kTile; ++jj) {
    logits[jj] = (jj < n && jj < limit && valid[jj]) ? logits[jj] : neg_inf;
  }
}

// How many keys of the tile starting at j0 the query at key position `pos` may see.
inline int64_t visible(bool causal, int64_t pos, int64_t j0) {
  return causal ? pos - j0 + 1 : kTile;
}

// Calls fn(g, t, logits) for every query row t of every head g of one kv-head group that can
// see a key of the tile [j0, j0 + n), with its masked logits against the tile (kt). The
// group's scaled query rows are qs[(g * Tmax + t) * dh]; `pos` are their key positions,
// ascending, so with causal masking the rows before j0 are skipped. Rows go through
// block_dots kRows at a time; a short last block repeats its last row.
template <typename acc_t, typename Fn>
void for_visible_rows(const acc_t* qs, int64_t Tmax, int64_t G, const int64_t* pos, int64_t T,
                      bool causal, int64_t j0, int64_t n, const bool* valid, const acc_t* kt,
                      int64_t dh, acc_t* dots, Fn fn) {
  const int64_t t0 = causal ? std::lower_bound(pos, pos + T, j0) - pos : 0;
  const int64_t per_head = T - t0, count = G * per_head;
  for (int64_t first = 0; first < count; first += kRows) {
    const acc_t* q[kRows];
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = std::min(first + r, count - 1);
      q[r] = qs + ((i / per_head) * Tmax + t0 + i % per_head) * dh;
    }
    block_dots(q, kt, dh, dots);
    for (int64_t r = 0; r < std::min<int64_t>(kRows, count - first); ++r) {
      const int64_t g = (first + r) / per_head, t = t0 + (first + r) % per_head;
      acc_t* logits = dots + r * kTile;
      mask_row(logits, valid, n, visible(causal, pos[t], j0));
      fn(g, t, logits);
    }
  }
}

// Copies the scaled query rows of every sample and head, read from q at their row indices:
// out[((b*Hq + h)*Tmax + t)*dh + d].
template <typename scalar_t, typename acc_t>
void gather_queries(const scalar_t* q, int64_t q_sb, int64_t q_sh, int64_t q_sn,
                    const int64_t* query_index, const int64_t* query_count, int64_t Tmax,
                    int64_t B, int64_t Hq, int64_t dh, acc_t scale, acc_t* out) {
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      for (int64_t t = 0; t < query_count[b]; ++t) {
        const scalar_t* src = q + b * q_sb + h * q_sh + query_index[b * Tmax + t] * q_sn;
        acc_t* dst = out + ((b * Hq + h) * Tmax + t) * dh;
        for (int64_t d = 0; d < dh; ++d) dst[d] = static_cast<acc_t>(src[d]) * scale;
      }
    }
  }
}

}  // namespace

template <typename scalar_t, typename acc_t>
void context_scores_cpu(const scalar_t* q, int64_t q_sb, int64_t q_sh, int64_t q_sn,
                        const scalar_t* k, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                        const int64_t* query_index, const int64_t* query_pos,
                        const int64_t* query_count, int64_t Tmax, const bool* key_mask,
                        int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t dh, bool causal,
                        double scale, acc_t* scores, int num_threads) {
  const int64_t G = Hq / Hkv;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t n_tiles = (N + kTile - 1) / kTile;
  const size_t rows_total = static_cast<size_t>(B * Hq * std::max<int64_t>(Tmax, 1));
  // The scaled query rows (both passes read them) and lse[b][h][t], the log-sum-exp of each;
  // +inf for rows that see no valid key.
  std::vector<acc_t> qs(rows_total * dh), lse(rows_total);
  gather_queries(q, q_sb, q_sh, q_sn, query_index, query_count, Tmax, B, Hq, dh,
                 static_cast<acc_t>(scale), qs.data());
  auto row_of = [&](int64_t b, int64_t h, int64_t t) { return (b * Hq + h) * Tmax + t; };

  // Pass 1: row log-sum-exps, one (sample, kv head) per task, online over key tiles.
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<acc_t> kt(dh * kTile), dots(kRows * kTile);
    std::vector<acc_t> row_max(G * std::max<int64_t>(Tmax, 1)), row_sum(row_max.size());
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * Hkv; ++task) {
      const int64_t b = task / Hkv, kvh = task % Hkv, T = query_count[b];
      const int64_t* pos = query_pos + b * Tmax;
      if (T == 0) continue;
      std::fill(row_max.begin(), row_max.end(), neg_inf);
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      const int64_t last_tile = causal ? std::min(pos[T - 1] / kTile, n_tiles - 1) : n_tiles - 1;
      for (int64_t tile = 0; tile <= last_tile; ++tile) {
        const int64_t j0 = tile * kTile, n = std::min(kTile, N - j0);
        load_key_tile(k + b * k_sb + kvh * k_sh, k_sn, j0, n, dh, kt.data());
        for_visible_rows(qs.data() + row_of(b, kvh * G, 0) * dh, Tmax, G, pos, T, causal, j0,
                         n, key_mask + b * N + j0, kt.data(), dh, dots.data(),
                         [&](int64_t g, int64_t t, const acc_t* logits) {
          acc_t& mx = row_max[g * T + t];
          acc_t& sum = row_sum[g * T + t];
          acc_t m = mx;
          for (int64_t jj = 0; jj < kTile; ++jj) m = std::max(m, logits[jj]);
          if (m == neg_inf) return;  // nothing visible in this tile yet
          acc_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t jj = 0; jj < kTile; ++jj) {
            s += logits[jj] == neg_inf ? acc_t(0) : exp_nonpositive(logits[jj] - m);
          }
          sum = (mx == neg_inf ? acc_t(0) : sum * std::exp(mx - m)) + s;
          mx = m;
        });
      }
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t t = 0; t < T; ++t) {
          const acc_t mx = row_max[g * T + t];
          lse[row_of(b, kvh * G + g, t)] = mx == neg_inf ? std::numeric_limits<acc_t>::infinity()
                                                         : mx + std::log(row_sum[g * T + t]);
        }
      }
    }
  }

  // Pass 2: column sums of the probabilities, one (sample, key tile) per task.
#pragma omp parallel num_threads(std::max(1, num_threads))
  {
    std::vector<acc_t> kt(dh * kTile), dots(kRows * kTile), col(kTile);
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < B * n_tiles; ++task) {
      const int64_t b = task / n_tiles, j0 = (task % n_tiles) * kTile;
      const int64_t n = std::min(kTile, N - j0), T = query_count[b];
      const int64_t* pos = query_pos + b * Tmax;
      std::fill(col.begin(), col.end(), acc_t(0));
      for (int64_t kvh = 0; kvh < Hkv && T > 0 && (!causal || pos[T - 1] >= j0); ++kvh) {
        load_key_tile(k + b * k_sb + kvh * k_sh, k_sn, j0, n, dh, kt.data());
        for_visible_rows(qs.data() + row_of(b, kvh * G, 0) * dh, Tmax, G, pos, T, causal, j0,
                         n, key_mask + b * N + j0, kt.data(), dh, dots.data(),
                         [&](int64_t g, int64_t t, const acc_t* logits) {
          const acc_t l = lse[row_of(b, kvh * G + g, t)];
#pragma omp simd
          for (int64_t jj = 0; jj < kTile; ++jj) {
            col[jj] += logits[jj] == neg_inf ? acc_t(0) : exp_nonpositive(logits[jj] - l);
          }
        });
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
      const int64_t k = keep_count(n, keep_ratio, min_keep);
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
                                               const int64_t*, const int64_t*, const int64_t*,
                                               int64_t, const bool*, int64_t, int64_t, int64_t,
                                               int64_t, int64_t, bool, double, float*, int);
template void context_scores_cpu<double, double>(const double*, int64_t, int64_t, int64_t,
                                                 const double*, int64_t, int64_t, int64_t,
                                                 const int64_t*, const int64_t*,
                                                 const int64_t*, int64_t, const bool*, int64_t,
                                                 int64_t, int64_t, int64_t, int64_t, bool, double,
                                                 double*, int);
template void select_tokens_cpu<float>(const float*, const bool*, const bool*, int64_t, int64_t,
                                       double, int64_t, bool*, int);
template void select_tokens_cpu<double>(const double*, const bool*, const bool*, int64_t,
                                        int64_t, double, int64_t, bool*, int);

}  // namespace lyra

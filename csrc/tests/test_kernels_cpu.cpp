// Standalone test and timing driver of the CPU kernels (no torch): run by ctest.
// Compares the kernels with plain double-precision loops on random variable-length inputs,
// then prints a few timings. Exit code 0 = all checks passed.
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "prune/prune.h"
#include "soft_dtw/soft_dtw.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, double err) {
  std::printf("  %-58s %s (err %.3g)\n", what, ok ? "ok" : "FAILED", err);
  if (!ok) ++failures;
}

// Textbook soft-DTW of one sample: full R, then E from R (recomputing the weights).
void naive_soft_dtw(const std::vector<double>& D, int64_t Smax, int64_t L, int64_t S,
                    double gamma, int64_t band, double* value, std::vector<double>* grad) {
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> R((L + 2) * (S + 2), inf), E((L + 2) * (S + 2), 0.0);
  auto r = [&](int64_t i, int64_t j) -> double& { return R[i * (S + 2) + j]; };
  auto in_band = [&](int64_t i, int64_t j) { return band < 0 || std::llabs(i - j) <= band; };
  r(0, 0) = 0;
  for (int64_t i = 1; i <= L; ++i) {
    for (int64_t j = 1; j <= S; ++j) {
      if (!in_band(i, j)) continue;
      const double p[3] = {r(i - 1, j - 1), r(i - 1, j), r(i, j - 1)};
      const double m = std::min({p[0], p[1], p[2]});
      double s = 0;
      for (double x : p) s += std::exp(-(x - m) / gamma);
      r(i, j) = D[(i - 1) * Smax + (j - 1)] + m - gamma * std::log(s);
    }
  }
  *value = r(L, S);
  auto e = [&](int64_t i, int64_t j) -> double& { return E[i * (S + 2) + j]; };
  auto cost = [&](int64_t i, int64_t j) { return D[(i - 1) * Smax + (j - 1)]; };
  e(L, S) = 1;
  for (int64_t i = L; i >= 1; --i) {
    for (int64_t j = S; j >= 1; --j) {
      if ((i == L && j == S) || !in_band(i, j)) continue;
      double acc = 0;
      const int64_t succ[3][2] = {{i + 1, j}, {i, j + 1}, {i + 1, j + 1}};
      for (const auto& sc : succ) {
        if (sc[0] > L || sc[1] > S || !std::isfinite(r(sc[0], sc[1]))) continue;
        acc += e(sc[0], sc[1]) *
               std::exp((r(sc[0], sc[1]) - r(i, j) - cost(sc[0], sc[1])) / gamma);
      }
      e(i, j) = acc;
    }
  }
  for (int64_t i = 1; i <= L; ++i)
    for (int64_t j = 1; j <= S; ++j) (*grad)[(i - 1) * Smax + (j - 1)] = e(i, j);
}

template <typename T>
void check_soft_dtw(int64_t B, int64_t Lmax, int64_t Smax, int64_t band, std::mt19937_64& rng,
                    double tol_value, double tol_grad) {
  std::uniform_real_distribution<double> u(0.0, 4.0);
  std::vector<T> D(B * Lmax * Smax);
  for (auto& x : D) x = static_cast<T>(u(rng));
  std::vector<int64_t> xl(B), yl(B);
  for (int64_t b = 0; b < B; ++b) {
    xl[b] = b == 0 ? Lmax : 1 + rng() % Lmax;
    yl[b] = b == 0 ? Smax : 1 + rng() % Smax;
    if (band >= 0) {  // keep the end cell inside the band: |x - y| <= band
      xl[b] = std::min<int64_t>(xl[b], Smax + band);
      yl[b] = std::min<int64_t>(std::max<int64_t>(yl[b], xl[b] - band), xl[b] + band);
      yl[b] = std::min<int64_t>(yl[b], Smax);
    }
  }
  std::vector<T> value(B), grad(B, T(1)), dD(B * Lmax * Smax);
  std::vector<T> weights(B * Lmax * Smax * 3);
  lyra::soft_dtw_forward_cpu<T, T>(D.data(), xl.data(), yl.data(), B, Lmax, Smax, 0.1, band,
                                   value.data(), weights.data(), 2);
  lyra::soft_dtw_backward_cpu<T, T>(grad.data(), weights.data(), xl.data(), yl.data(), B, Lmax,
                                    Smax, band, dD.data(), 2);
  double value_err = 0, grad_err = 0;
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> Db(D.begin() + b * Lmax * Smax, D.begin() + (b + 1) * Lmax * Smax);
    std::vector<double> g(Lmax * Smax, 0.0);
    double v;
    naive_soft_dtw(Db, Smax, xl[b], yl[b], 0.1, band, &v, &g);
    value_err = std::max(value_err, std::fabs(value[b] - v) / std::max(1.0, std::fabs(v)));
    for (int64_t c = 0; c < Lmax * Smax; ++c) {
      grad_err = std::max(grad_err, std::fabs(double(dD[b * Lmax * Smax + c]) - g[c]));
    }
  }
  char what[128];
  std::snprintf(what, sizeof what, "soft_dtw %s B=%lld L=%lld S=%lld band=%lld value",
                sizeof(T) == 8 ? "f64" : "f32", (long long)B, (long long)Lmax, (long long)Smax,
                (long long)band);
  expect(value_err < tol_value, what, value_err);
  std::snprintf(what, sizeof what, "soft_dtw %s B=%lld L=%lld S=%lld band=%lld gradient",
                sizeof(T) == 8 ? "f64" : "f32", (long long)B, (long long)Lmax, (long long)Smax,
                (long long)band);
  expect(grad_err < tol_grad, what, grad_err);
}

// Forward (value, weights) and backward (dD, grad 1) of the CPU kernels on one batch.
template <typename T>
struct CpuDtw {
  std::vector<T> value, weights, dD;
  CpuDtw(const std::vector<T>& D, const std::vector<int64_t>& xl, const std::vector<int64_t>& yl,
         int64_t Lmax, int64_t Smax, double gamma, int64_t band)
      : value(xl.size()), weights(xl.size() * Lmax * Smax * 3), dD(xl.size() * Lmax * Smax) {
    const int64_t B = static_cast<int64_t>(xl.size());
    const std::vector<T> grad(B, T(1));
    lyra::soft_dtw_forward_cpu<T, T>(D.data(), xl.data(), yl.data(), B, Lmax, Smax, gamma, band,
                                     value.data(), weights.data(), 2);
    lyra::soft_dtw_backward_cpu<T, T>(grad.data(), weights.data(), xl.data(), yl.data(), B, Lmax,
                                      Smax, band, dD.data(), 2);
  }
};

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// A band of Lmax + Smax or more excludes nothing: up to INT64_MAX it must give the outputs of
// no band, bit for bit, without overflowing k + bandwidth (issue 16).
void check_huge_bandwidth(std::mt19937_64& rng) {
  const int64_t Lmax = 23, Smax = 17;
  std::uniform_real_distribution<double> u(0.0, 4.0);
  std::vector<double> D(3 * Lmax * Smax);
  for (auto& x : D) x = u(rng);
  const std::vector<int64_t> xl = {23, 5, 1}, yl = {17, 17, 2};
  const CpuDtw<double> none(D, xl, yl, Lmax, Smax, 0.3, -1);
  for (int64_t band : {Lmax + Smax, int64_t(INT_MAX) - 1, std::numeric_limits<int64_t>::max()}) {
    const CpuDtw<double> out(D, xl, yl, Lmax, Smax, 0.3, band);
    char what[128];
    std::snprintf(what, sizeof what, "soft_dtw band=%lld: the outputs of no band", (long long)band);
    const bool same = same_bits(out.value, none.value) && same_bits(out.weights, none.weights) &&
                      same_bits(out.dD, none.dD);
    expect(same, what, same ? 0.0 : 1.0);
  }
}

// NaN semantics of soft_dtw.h, written out: a cell with a NaN predecessor has R and all three
// weights NaN, also where its smallest predecessor is +inf (row 0, column 0, the band's edges),
// and E[i,j] sums (weight towards (i, j)) * E over the successors in the sample and the band.
// Returns W (L, S, 3) and E (L, S) of one sample.
void nan_aware_reference(const std::vector<double>& D, int64_t Smax, int64_t L, int64_t S,
                         int64_t band, double gamma, std::vector<double>& W,
                         std::vector<double>& E) {
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto in_band = [&](int64_t i, int64_t j) { return band < 0 || std::llabs(i - j) <= band; };
  std::vector<double> R((L + 1) * (S + 1), inf);
  R[0] = 0.0;
  W.assign(L * S * 3, 0.0);
  for (int64_t i = 1; i <= L; ++i) {
    for (int64_t j = 1; j <= S; ++j) {
      if (!in_band(i - 1, j - 1)) continue;
      const double p[3] = {R[(i - 1) * (S + 1) + j - 1], R[(i - 1) * (S + 1) + j],
                           R[i * (S + 1) + j - 1]};
      double* w = &W[((i - 1) * S + (j - 1)) * 3];
      if (std::isnan(p[0] + p[1] + p[2])) {
        R[i * (S + 1) + j] = w[0] = w[1] = w[2] = nan;
        continue;
      }
      const double m = std::min({p[0], p[1], p[2]});
      double e[3], sum = 0.0;
      for (int k = 0; k < 3; ++k) sum += e[k] = p[k] == inf ? 0.0 : std::exp((m - p[k]) / gamma);
      R[i * (S + 1) + j] = D[(i - 1) * Smax + (j - 1)] + m - gamma * std::log(sum);
      for (int k = 0; k < 3; ++k) w[k] = e[k] / sum;
    }
  }
  E.assign(L * S, 0.0);
  auto w = [&](int64_t i, int64_t j, int k) { return W[(i * S + j) * 3 + k]; };
  for (int64_t i = L - 1; i >= 0; --i) {
    for (int64_t j = S - 1; j >= 0; --j) {
      if (!in_band(i, j)) continue;
      double e = i == L - 1 && j == S - 1 ? 1.0 : 0.0;
      if (i + 1 < L && j + 1 < S) e += w(i + 1, j + 1, lyra::kDiag) * E[(i + 1) * S + j + 1];
      if (i + 1 < L && in_band(i + 1, j)) e += w(i + 1, j, lyra::kUp) * E[(i + 1) * S + j];
      if (j + 1 < S && in_band(i, j + 1)) e += w(i, j + 1, lyra::kLeft) * E[i * S + j + 1];
      E[i * S + j] = e;
    }
  }
}

// |a - b|, NaN against NaN counting as equal and NaN against a number as infinitely far.
double nan_aware_diff(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) {
    return std::isnan(a) && std::isnan(b) ? 0.0 : std::numeric_limits<double>::infinity();
  }
  return std::fabs(a - b);
}

// NaN costs beside +inf predecessors (issue 16): the CPU's weights and dD against the written-out
// semantics, NaN exactly where it has NaN. The weights are read through the layout of
// soft_dtw.h (valid cells packed diagonal by diagonal, rows ascending, in three planes).
void check_nan_semantics() {
  struct Design {
    int64_t L, S, band;
    std::vector<std::pair<int64_t, int64_t>> nan_cells;
  };
  const std::vector<Design> designs = {
      {1, 7, -1, {{0, 2}}},  {7, 1, -1, {{3, 0}}},  {6, 6, -1, {{0, 0}}}, {6, 6, -1, {{5, 5}}},
      {6, 6, 0, {{2, 2}}},   {8, 8, 2, {{0, 0}}},   {8, 7, 2, {{0, 2}}},  {7, 8, 2, {{3, 1}, {6, 7}}},
      {9, 9, 3, {{4, 7}}},
  };
  std::mt19937_64 rng(99);
  std::uniform_real_distribution<double> u(0.0, 4.0);
  double weight_err = 0, grad_err = 0;
  for (const Design& d : designs) {
    std::vector<double> D(d.L * d.S);
    for (auto& x : D) x = u(rng);
    for (const auto& [i, j] : d.nan_cells) D[i * d.S + j] = std::numeric_limits<double>::quiet_NaN();
    const CpuDtw<double> out(D, {d.L}, {d.S}, d.L, d.S, 0.2, d.band);
    std::vector<double> W, E;
    nan_aware_reference(D, d.S, d.L, d.S, d.band, 0.2, W, E);
    const int64_t plane = d.L * d.S;
    int64_t p = 0;
    for (int64_t k = 0; k <= d.L + d.S - 2; ++k) {
      for (int64_t i = std::max<int64_t>(0, k - (d.S - 1)); i <= std::min(k, d.L - 1); ++i) {
        const int64_t j = k - i;
        if (d.band >= 0 && std::llabs(i - j) > d.band) continue;
        for (int q = 0; q < 3; ++q)
          weight_err = std::max(weight_err, nan_aware_diff(out.weights[q * plane + p], W[(i * d.S + j) * 3 + q]));
        ++p;
      }
    }
    for (int64_t c = 0; c < plane; ++c) grad_err = std::max(grad_err, nan_aware_diff(out.dD[c], E[c]));
  }
  expect(weight_err < 1e-12, "soft_dtw NaN beside +inf predecessors: weights NaN as specified", weight_err);
  expect(grad_err < 1e-12, "soft_dtw NaN beside +inf predecessors: dD NaN as specified", grad_err);
}

// B x Lmax x Smax > 2^31 elements of D (int64 offsets), forward, value only. D is mapped without
// reserving memory: the kernel reads only the valid cells, so only the pages of the few checked
// samples (and the first cell of each 1 x 1 sample) are ever touched, ~20 MB. Each checked
// sample, the last ones past element 2^31, must equal the same call on its own slice.
void check_past_int32_offsets(std::mt19937_64& rng) {
  const int64_t B = 2049, Lmax = 1024, Smax = 1024, plane = Lmax * Smax;
  const size_t bytes = size_t(B * plane) * sizeof(float);
  void* map = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (map == MAP_FAILED) {
    std::printf("  soft_dtw past 2^31 elements: skipped (no %.1f GB mapping)\n", bytes / 1e9);
    return;
  }
  float* D = static_cast<float*>(map);
  std::vector<int64_t> xl(B, 1), yl(B, 1);
  for (int64_t b = 0; b < B; ++b) D[b * plane] = 1.0f;
  const std::pair<int64_t, std::pair<int64_t, int64_t>> checked[] = {
      {0, {1024, 1024}}, {1500, {300, 1000}}, {2047, {1024, 9}}, {2048, {517, 1024}}};
  std::uniform_real_distribution<float> u(0.0f, 4.0f);
  for (const auto& [b, len] : checked) {
    xl[b] = len.first;
    yl[b] = len.second;
    for (int64_t i = 0; i < len.first; ++i)
      for (int64_t j = 0; j < len.second; ++j) D[b * plane + i * Smax + j] = u(rng);
  }
  std::vector<float> value(B);
  lyra::soft_dtw_forward_cpu<float, float>(D, xl.data(), yl.data(), B, Lmax, Smax, 0.1, -1,
                                           value.data(), nullptr, 2);
  int64_t wrong = 0;
  for (const auto& [b, len] : checked) {
    const auto [L, S] = len;
    std::vector<float> slice(L * S);
    for (int64_t i = 0; i < L; ++i)
      std::copy_n(D + b * plane + i * Smax, S, slice.begin() + i * S);
    float one = 0;
    lyra::soft_dtw_forward_cpu<float, float>(slice.data(), &xl[b], &yl[b], 1, L, S, 0.1, -1, &one,
                                             nullptr, 2);
    wrong += std::memcmp(&one, &value[b], sizeof(float)) != 0;
  }
  for (int64_t b = 1; b < 1500; ++b) wrong += value[b] != 1.0f;  // 1 x 1 samples: their cost
  munmap(map, bytes);
  expect(wrong == 0, "soft_dtw B*Lmax*Smax > 2^31: samples past 2^31 == own slice", double(wrong));
}

// context_scores of one layout against a direct softmax per query row: q (B, Hq, Nq, dh)
// contiguous, query row t of sample b read at q row index[b*Tmax + t], at key position
// pos[b*Tmax + t]. Returns the kernel's scores.
std::vector<double> check_scores(const std::vector<double>& q, int64_t Nq,
                                 const std::vector<double>& k, const std::vector<int64_t>& index,
                                 const std::vector<int64_t>& pos,
                                 const std::vector<int64_t>& count, int64_t Tmax, const bool* key,
                                 int64_t B, int64_t Hq, int64_t Hkv, int64_t N, int64_t dh,
                                 bool causal, const char* what) {
  const int64_t G = Hq / Hkv;
  const double scale = 1.0 / std::sqrt(double(dh));
  std::vector<double> scores(B * N), ref(B * N, 0.0);
  lyra::context_scores_cpu<double, double>(q.data(), Hq * Nq * dh, Nq * dh, dh, k.data(),
                                           Hkv * N * dh, N * dh, dh, index.data(), pos.data(),
                                           count.data(), Tmax, key, B, Hq, Hkv, N, dh, causal,
                                           scale, scores.data(), 2);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      for (int64_t t = 0; t < count[b]; ++t) {
        const int64_t i = index[b * Tmax + t], p = pos[b * Tmax + t];
        std::vector<double> logit(N, -std::numeric_limits<double>::infinity());
        double m = logit[0];
        for (int64_t j = 0; j < N; ++j) {
          if (!key[b * N + j] || (causal && j > p)) continue;
          double dot = 0;
          for (int64_t d = 0; d < dh; ++d)
            dot += q[((b * Hq + h) * Nq + i) * dh + d] * k[((b * Hkv + h / G) * N + j) * dh + d];
          logit[j] = dot * scale;
          m = std::max(m, logit[j]);
        }
        double s = 0;
        for (double l : logit) s += std::exp(l - m);
        for (int64_t j = 0; j < N; ++j)
          ref[b * N + j] += std::exp(logit[j] - m) / s / double(Hq * count[b]);
      }
    }
  }
  double err = 0;
  for (int64_t c = 0; c < B * N; ++c) err = std::max(err, std::fabs(scores[c] - ref[c]));
  expect(err < 1e-12, what, err);
  return scores;
}

void check_pruning(std::mt19937_64& rng) {
  const int64_t B = 2, Hq = 6, Hkv = 2, N = 150, dh = 16;
  std::normal_distribution<double> n01;
  std::vector<double> q(B * Hq * N * dh), k(B * Hkv * N * dh);
  for (auto& x : q) x = n01(rng);
  for (auto& x : k) x = n01(rng);
  std::vector<char> key_c(B * N), ctx_c(B * N), query_c(B * N);
  std::vector<int64_t> index(B * N, 0), count(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = b == 0 ? N : 111;
    for (int64_t j = 0; j < N; ++j) {
      key_c[b * N + j] = j < len;
      ctx_c[b * N + j] = j >= 3 && j < 90;
      query_c[b * N + j] = j < len && j >= 95 && rng() % 2;
      if (query_c[b * N + j]) index[b * N + count[b]++] = j;
    }
  }
  const bool* key = reinterpret_cast<const bool*>(key_c.data());
  const bool* ctx = reinterpret_cast<const bool*>(ctx_c.data());
  // The same query rows held alone, as a context-parallel rank holds them: q row 2 t + 1 of
  // a (B, Hq, 2 Tmax, dh) q is query row t (the even rows are not queries), its position
  // index[t] passed apart. Scores must match the full layout's.
  const int64_t Tmax = *std::max_element(count.begin(), count.end()), Nq = 2 * Tmax;
  std::vector<double> q_own(B * Hq * Nq * dh);
  for (auto& x : q_own) x = n01(rng);
  std::vector<int64_t> own_index(B * Tmax, 0), own_pos(B * Tmax, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < count[b]; ++t) {
      own_index[b * Tmax + t] = 2 * t + 1;
      own_pos[b * Tmax + t] = index[b * N + t];
      for (int64_t h = 0; h < Hq; ++h)
        std::copy_n(q.begin() + ((b * Hq + h) * N + index[b * N + t]) * dh, dh,
                    q_own.begin() + ((b * Hq + h) * Nq + 2 * t + 1) * dh);
    }
  }
  for (bool causal : {true, false}) {
    const std::vector<double> scores =
        check_scores(q, N, k, index, index, count, N, key, B, Hq, Hkv, N, dh, causal,
                     causal ? "context_scores f64 causal" : "context_scores f64 non-causal");
    const std::vector<double> own = check_scores(
        q_own, Nq, k, own_index, own_pos, count, Tmax, key, B, Hq, Hkv, N, dh, causal,
        causal ? "context_scores f64 causal, own rows at positions"
               : "context_scores f64 non-causal, own rows at positions");
    double diff = 0;
    for (int64_t c = 0; c < B * N; ++c) diff = std::max(diff, std::fabs(own[c] - scores[c]));
    expect(diff < 1e-12, "context_scores own rows at positions == all rows", diff);
    // Selection: the top k context tokens by a full sort.
    std::vector<char> keep_c(B * N);
    lyra::select_tokens_cpu<double>(scores.data(), ctx, key, B, N, 0.3, 8,
                                    reinterpret_cast<bool*>(keep_c.data()), 2);
    int64_t wrong = 0;
    for (int64_t b = 0; b < B; ++b) {
      std::vector<int64_t> cand;
      for (int64_t j = 0; j < N; ++j)
        if (key[b * N + j] && ctx[b * N + j]) cand.push_back(j);
      std::stable_sort(cand.begin(), cand.end(), [&](int64_t x, int64_t y) {
        return scores[b * N + x] > scores[b * N + y];
      });
      const int64_t n = cand.size();
      const int64_t kk = lyra::keep_count(n, 0.3, 8);
      std::vector<char> want(N, 0);
      for (int64_t j = 0; j < N; ++j) want[j] = key[b * N + j] && !ctx[b * N + j];
      for (int64_t r = 0; r < kk; ++r) want[cand[r]] = 1;
      for (int64_t j = 0; j < N; ++j) wrong += want[j] != keep_c[b * N + j];
    }
    expect(wrong == 0, "select_tokens equals a full stable sort", double(wrong));
  }
}

// Decimal keep ratios p / scale, whose exact kept count is the integer floor p * n / scale.
struct DecimalRatio {
  int64_t p, scale;
  double value() const { return double(p) / double(scale); }  // the double nearest p / scale
};
const DecimalRatio kRatios[] = {{35, 100}, {57, 100},   {7, 10},         {5, 10},
                                {3, 10},   {1, 1},      {1, 100},        {99, 100},
                                {333, 1000}, {12345, 100000}, {99999, 100000}};

int64_t exact_keep(int64_t n, DecimalRatio r, int64_t min_keep) {
  return n < min_keep ? n : std::max(min_keep, r.p * n / r.scale);
}

// keep_count, and the kernel's kept count, against exact integer arithmetic.
void check_keep_count() {
  int64_t wrong = 0;
  for (const DecimalRatio& r : kRatios) {
    for (int64_t n = 0; n <= 20000; ++n) {
      for (int64_t min_keep : {0, 32})
        wrong += lyra::keep_count(n, r.value(), min_keep) != exact_keep(n, r, min_keep);
    }
    for (int64_t n = (int64_t(1) << 31) - 20000; n < (int64_t(1) << 31); ++n)
      wrong += lyra::keep_count(n, r.value(), 0) != exact_keep(n, r, 0);
  }
  expect(wrong == 0, "keep_count == exact decimal floor (n <= 20000, n ~ 2^31)", double(wrong));
  const int64_t pinned = std::abs(lyra::keep_count(90, 0.7, 32) - 63) +
                         std::abs(lyra::keep_count(170, 0.7, 32) - 119) +
                         std::abs(lyra::keep_count(180, 0.7, 32) - 126) +
                         std::abs(lyra::keep_count(330, 0.7, 32) - 231);
  expect(pinned == 0, "keep_count(90|170|180|330, 0.7) = 63|119|126|231", double(pinned));

  // Row b holds b context tokens out of N: the kernel keeps exact_keep(b) of them.
  const int64_t B = 400, N = 400;
  std::vector<double> scores(B * N);
  std::vector<char> ctx_c(B * N), key_c(B * N, 1), keep_c(B * N);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < N; ++j) {
      scores[b * N + j] = double((j * 7919) % N);
      ctx_c[b * N + j] = j < b;
    }
  }
  int64_t wrong_rows = 0;
  for (const DecimalRatio& r : kRatios) {
    lyra::select_tokens_cpu<double>(scores.data(), reinterpret_cast<const bool*>(ctx_c.data()),
                                    reinterpret_cast<const bool*>(key_c.data()), B, N, r.value(),
                                    0, reinterpret_cast<bool*>(keep_c.data()), 2);
    for (int64_t b = 0; b < B; ++b) {
      int64_t kept = 0;
      for (int64_t j = 0; j < b; ++j) kept += keep_c[b * N + j];
      wrong_rows += kept != exact_keep(b, r, 0);
    }
  }
  expect(wrong_rows == 0, "select_tokens keeps the exact decimal count (n = 0..399)",
         double(wrong_rows));
}

template <typename Fn>
double time_ms(Fn fn, int repeats) {
  fn();
  std::vector<double> t;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                    .count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void bench_soft_dtw(int64_t B, int64_t L, int64_t S, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> u(0.0f, 4.0f);
  std::vector<float> D(B * L * S), value(B), grad(B, 1.0f), dD(B * L * S), W(B * L * S * 3);
  for (auto& x : D) x = u(rng);
  std::vector<int64_t> xl(B, L), yl(B, S);
  const double ms = time_ms(
      [&] {
        lyra::soft_dtw_forward_cpu<float, float>(D.data(), xl.data(), yl.data(), B, L, S, 0.1,
                                                 -1, value.data(), W.data(), 2);
        lyra::soft_dtw_backward_cpu<float, float>(grad.data(), W.data(), xl.data(), yl.data(),
                                                  B, L, S, -1, dD.data(), 2);
      },
      5);
  std::printf("  soft_dtw f32 fwd+bwd B=%lld L=%lld S=%lld (2 threads): %.2f ms\n",
              (long long)B, (long long)L, (long long)S, ms);
}

}  // namespace

int main() {
  std::mt19937_64 rng(1234);
  std::printf("CPU kernels vs double-precision loops\n");
  for (int64_t band : {-1, 0, 2, 7}) {
    check_soft_dtw<double>(5, 23, 17, band, rng, 1e-12, 1e-10);
    check_soft_dtw<float>(5, 23, 17, band, rng, 1e-5, 1e-5);
  }
  check_soft_dtw<double>(3, 1, 9, -1, rng, 1e-12, 1e-10);
  check_soft_dtw<double>(3, 9, 1, -1, rng, 1e-12, 1e-10);
  check_soft_dtw<double>(1, 700, 600, -1, rng, 1e-12, 1e-9);  // diagonals split across threads
  check_huge_bandwidth(rng);
  check_nan_semantics();
  check_past_int32_offsets(rng);
  check_pruning(rng);
  check_keep_count();
  std::printf("timings (median of 5)\n");
  bench_soft_dtw(16, 300, 60, rng);
  bench_soft_dtw(1, 4500, 1000, rng);
  std::printf("%s\n", failures == 0 ? "all checks passed" : "SOME CHECKS FAILED");
  return failures == 0 ? 0 : 1;
}

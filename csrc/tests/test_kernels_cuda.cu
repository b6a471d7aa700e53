// Standalone check of the CUDA kernels (soft-DTW, context scores, token selection) against
// plain double-precision CPU loops written here. Exit code: 0 pass, 1 fail, 77 skipped
// (no CUDA device), as ctest's SKIP_RETURN_CODE expects.
//
// Output buffers are filled with 0xFF bytes (NaN / true-ish garbage) before every call, so
// entries a kernel forgets to write show up as errors instead of as lucky zeros.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "prune/prune.h"
#include "soft_dtw/soft_dtw.h"

namespace {

using lyra::KernelDtype;

#define CHECK_CUDA(expr)                                                              \
  do {                                                                                \
    const cudaError_t err_ = static_cast<cudaError_t>(expr);                          \
    if (err_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d: %s -> %s\n", __FILE__, __LINE__, #expr,            \
                   cudaGetErrorString(err_));                                         \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

const double kInf = std::numeric_limits<double>::infinity();
int g_failures = 0;
cudaStream_t g_stream = nullptr;

// worst = max(worst, e), where a NaN error counts as infinitely bad (std::max would drop it).
void track(double& worst, double e) { worst = std::isnan(e) ? kInf : std::max(worst, e); }

void report(const std::string& what, double err, double tol) {
  const bool ok = err <= tol;  // false for NaN too
  if (!ok) ++g_failures;
  std::printf("  %-58s max err %.3e (tol %.1e)  %s\n", what.c_str(), err, tol, ok ? "ok" : "FAIL");
}

// Device array of n elements of T, filled with 0xFF bytes.
template <typename T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceArray(size_t count) : n(count) {
    CHECK_CUDA(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)));
    CHECK_CUDA(cudaMemset(ptr, 0xFF, std::max<size_t>(n, 1) * sizeof(T)));
  }
  template <typename H>
  DeviceArray(const std::vector<H>& host) : DeviceArray(host.size()) {
    static_assert(sizeof(H) == sizeof(T), "host and device element sizes differ");
    CHECK_CUDA(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceArray() { cudaFree(ptr); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  template <typename H = T>
  std::vector<H> download() const {
    static_assert(sizeof(H) == sizeof(T), "host and device element sizes differ");
    std::vector<H> host(n);
    CHECK_CUDA(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
};

// ======================================================================================
// soft-DTW
// ======================================================================================

bool in_band(int64_t i, int64_t j, int64_t bw) { return bw < 0 || std::llabs(i - j) <= bw; }

// The recursion of soft_dtw.h on one sample, in double. W: (L, S, 3), E: (L, S).
void soft_dtw_reference(const std::vector<double>& D, int64_t Smax, int64_t L, int64_t S,
                        int64_t bw, double gamma, double& value, std::vector<double>& W,
                        std::vector<double>& E) {
  std::vector<double> R((L + 1) * (S + 1), kInf);
  R[0] = 0.0;
  W.assign(L * S * 3, 0.0);
  for (int64_t i = 1; i <= L; ++i) {
    for (int64_t j = 1; j <= S; ++j) {
      if (!in_band(i - 1, j - 1, bw)) continue;
      const double pred[3] = {R[(i - 1) * (S + 1) + j - 1], R[(i - 1) * (S + 1) + j],
                              R[i * (S + 1) + j - 1]};  // kDiag, kUp, kLeft
      const double m = std::min({pred[0], pred[1], pred[2]});
      if (m == kInf) continue;
      double e[3], sum = 0.0;
      for (int k = 0; k < 3; ++k) sum += e[k] = pred[k] == kInf ? 0.0 : std::exp(-(pred[k] - m) / gamma);
      R[i * (S + 1) + j] = D[(i - 1) * Smax + (j - 1)] + m - gamma * std::log(sum);
      for (int k = 0; k < 3; ++k) W[((i - 1) * S + (j - 1)) * 3 + k] = e[k] / sum;
    }
  }
  value = R[L * (S + 1) + S];
  // E[i,j] = sum over successors of (their weight towards (i,j)) * E[successor]. Weights
  // outside the band are zero, so no band test is needed here.
  E.assign(L * S, 0.0);
  auto w = [&](int64_t i, int64_t j, int k) { return W[(i * S + j) * 3 + k]; };
  for (int64_t i = L - 1; i >= 0; --i) {
    for (int64_t j = S - 1; j >= 0; --j) {
      if (i == L - 1 && j == S - 1) {
        E[i * S + j] = 1.0;
        continue;
      }
      double e = 0.0;
      if (i + 1 < L && j + 1 < S) e += w(i + 1, j + 1, lyra::kDiag) * E[(i + 1) * S + j + 1];
      if (i + 1 < L) e += w(i + 1, j, lyra::kUp) * E[(i + 1) * S + j];
      if (j + 1 < S) e += w(i, j + 1, lyra::kLeft) * E[i * S + j + 1];
      E[i * S + j] = e;
    }
  }
}

struct DtwCase {
  std::string name;
  std::vector<std::pair<int64_t, int64_t>> lengths;  // (x_len, y_len) per sample
  int64_t Lmax, Smax, bandwidth;
  double gamma;
};

template <typename T>
void run_soft_dtw_case(const DtwCase& c, std::mt19937_64& rng) {
  const bool is_double = sizeof(T) == 8;
  std::printf("soft_dtw %s [%s]\n", c.name.c_str(), is_double ? "float64" : "float32");
  const int64_t B = static_cast<int64_t>(c.lengths.size()), Lmax = c.Lmax, Smax = c.Smax;
  std::uniform_real_distribution<double> cost(0.0, 4.0), grad_dist(0.5, 2.0);
  std::vector<T> D(B * Lmax * Smax);
  std::vector<int64_t> x_len(B), y_len(B);
  std::vector<T> grad(B);
  for (int64_t b = 0; b < B; ++b) {
    x_len[b] = c.lengths[b].first;
    y_len[b] = c.lengths[b].second;
    grad[b] = static_cast<T>((b % 2 ? -1.0 : 1.0) * grad_dist(rng));
    for (int64_t i = 0; i < Lmax; ++i)
      for (int64_t j = 0; j < Smax; ++j)  // padding is NaN: reading it would poison the result
        D[(b * Lmax + i) * Smax + j] = (i < x_len[b] && j < y_len[b])
                                           ? static_cast<T>(cost(rng))
                                           : std::numeric_limits<T>::quiet_NaN();
  }

  DeviceArray<T> d_D(D), d_grad(grad), d_value(B), d_value_only(B), d_W(B * Lmax * Smax * 3),
      d_dD(B * Lmax * Smax);
  DeviceArray<int64_t> d_x(x_len), d_y(y_len);
  CHECK_CUDA((lyra::soft_dtw_forward_cuda<T, T>(d_D.ptr, d_x.ptr, d_y.ptr, B, Lmax, Smax, c.gamma,
                                                c.bandwidth, d_value.ptr, d_W.ptr, g_stream)));
  CHECK_CUDA((lyra::soft_dtw_forward_cuda<T, T>(d_D.ptr, d_x.ptr, d_y.ptr, B, Lmax, Smax, c.gamma,
                                                c.bandwidth, d_value_only.ptr, nullptr,
                                                g_stream)));
  CHECK_CUDA((lyra::soft_dtw_backward_cuda<T, T>(d_grad.ptr, d_W.ptr, d_x.ptr, d_y.ptr, B, Lmax,
                                                 Smax, c.bandwidth, d_dD.ptr, g_stream)));
  CHECK_CUDA(cudaStreamSynchronize(g_stream));
  const std::vector<T> value = d_value.download(), value_only = d_value_only.download();
  const std::vector<T> W = d_W.download(), dD = d_dD.download();

  // Tolerances. R is double on both sides, but GPU and CPU exp/log may differ by an ulp, so
  // neighbouring R values can drift apart by a few ulps of |R| (we allow 64), which moves a
  // weight exp(-dR / gamma) by a relative 64 * |R| * 2.2e-16 / gamma; float weights are also
  // rounded to 6e-8 relative. E (a probability, <= 1) sums products of up to L + S weights,
  // so to first order |dE| <= (L + S) * w_rel. Errors are divided by their tolerance (pass: <= 1).
  double value_err = 0.0, weight_err = 0.0, grad_err = 0.0, value_only_err = 0.0;
  int64_t nonzero_outside = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = x_len[b], S = y_len[b];
    std::vector<double> Db(Lmax * Smax);
    for (int64_t e = 0; e < Lmax * Smax; ++e) Db[e] = static_cast<double>(D[b * Lmax * Smax + e]);
    double ref_value;
    std::vector<double> ref_W, ref_E;
    soft_dtw_reference(Db, Smax, L, S, c.bandwidth, c.gamma, ref_value, ref_W, ref_E);
    track(value_err, std::fabs(value[b] - ref_value) / std::max(1.0, std::fabs(ref_value)));
    track(value_only_err, std::fabs(double(value_only[b]) - double(value[b])));
    const double w_rel = (is_double ? 0.0 : 6e-8) + 64 * 2.2e-16 * (1.0 + std::fabs(ref_value)) / c.gamma;
    const double g = static_cast<double>(grad[b]);
    const double grad_tol = std::fabs(g) * (2.0 * double(L + S) * w_rel + (is_double ? 1e-14 : 1e-6));
    for (int64_t i = 0; i < Lmax; ++i) {
      for (int64_t j = 0; j < Smax; ++j) {
        const int64_t cell = (b * Lmax + i) * Smax + j;
        if (i < L && j < S && in_band(i, j, c.bandwidth)) {
          for (int k = 0; k < 3; ++k)
            track(weight_err, std::fabs(W[cell * 3 + k] - ref_W[(i * S + j) * 3 + k]) / w_rel);
          track(grad_err, std::fabs(dD[cell] - g * ref_E[i * S + j]) / grad_tol);
        } else {  // must be exactly zero
          nonzero_outside += (W[cell * 3] != 0) + (W[cell * 3 + 1] != 0) + (W[cell * 3 + 2] != 0) +
                             (dD[cell] != 0);
        }
      }
    }
  }
  report("value (relative)", value_err, is_double ? 1e-10 : 2e-7);
  report("value with weights=nullptr vs with weights", value_only_err, 0.0);
  report("weights / tol", weight_err, 1.0);
  report("dD / tol", grad_err, 1.0);
  report("entries outside sample/band that are not exactly 0", double(nonzero_outside), 0.0);
}

void run_soft_dtw_tests(std::mt19937_64& rng) {
  const std::vector<DtwCase> cases = {
      {"mixed lengths (L=1, S=1, S>L, padding)",
       {{1, 1}, {1, 6}, {6, 1}, {7, 13}, {13, 7}, {40, 40}, {25, 3}}, 40, 41, -1, 0.1},
      {"band 4", {{1, 1}, {10, 12}, {30, 27}, {50, 50}, {3, 7}}, 52, 50, 4, 1.0},
      {"band 0 (diagonal only)", {{1, 1}, {9, 9}, {17, 17}}, 20, 18, 0, 0.5},
      {"long with short (3000 x 700)", {{3000, 700}, {20, 35}, {5, 5}, {1, 1}}, 3000, 700, -1, 0.1},
      {"very long (20000 x 300)", {{20000, 300}, {123, 45}}, 20000, 300, -1, 0.1},
      {"band 32, diagonals > 48 KB of smem", {{3000, 2990}, {40, 45}}, 3000, 2990, 32, 0.1},
  };
  for (const DtwCase& c : cases) {
    run_soft_dtw_case<float>(c, rng);
    run_soft_dtw_case<double>(c, rng);
  }
  // The global-memory scratch path (taken for min(L, S) above ~9,600), forced on small inputs.
  setenv("LYRA_SOFT_DTW_GLOBAL_SCRATCH", "1", 1);
  for (int idx : {0, 1, 3}) {
    DtwCase c = cases[idx];
    c.name += ", global scratch";
    run_soft_dtw_case<float>(c, rng);
    run_soft_dtw_case<double>(c, rng);
  }
  unsetenv("LYRA_SOFT_DTW_GLOBAL_SCRATCH");
}

// ======================================================================================
// context_scores
// ======================================================================================

template <typename T>
struct Element;
template <>
struct Element<float> {
  static constexpr KernelDtype kDtype = KernelDtype::kFloat32;
  static float make(double x) { return static_cast<float>(x); }
  static double value(float x) { return x; }
};
template <>
struct Element<double> {
  static constexpr KernelDtype kDtype = KernelDtype::kFloat64;
  static double make(double x) { return x; }
  static double value(double x) { return x; }
};
template <>
struct Element<__half> {
  static constexpr KernelDtype kDtype = KernelDtype::kFloat16;
  static __half make(double x) { return __float2half_rn(static_cast<float>(x)); }
  static double value(__half x) { return __half2float(x); }
};
template <>
struct Element<__nv_bfloat16> {
  static constexpr KernelDtype kDtype = KernelDtype::kBFloat16;
  static __nv_bfloat16 make(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }
  static double value(__nv_bfloat16 x) { return __bfloat162float(x); }
};

struct ScoreCase {
  std::string name;
  int64_t B, Hq, Hkv, N, dh, Tmax;
  bool causal;
  // q holds only the query rows, as a context-parallel rank does: (B, 2 Tmax) rows, query row
  // t at q row 2 t + 1, its key position passed apart. Otherwise q has a row per key.
  bool own_rows = false;
};

template <typename in_t, typename acc_t>
void run_scores_case(const ScoreCase& c, std::mt19937_64& rng) {
  std::printf("context_scores %s\n", c.name.c_str());
  const int64_t B = c.B, Hq = c.Hq, Hkv = c.Hkv, N = c.N, dh = c.dh, Tmax = c.Tmax;
  const double scale = 2.0 / std::sqrt(double(dh));  // sharper than usual: tests large logits
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);

  // q as a (B, Nq, Hq, dh) tensor seen as (B, Hq, Nq, dh) (strided); k contiguous
  // (B, Hkv, N, dh).
  const int64_t Nq = c.own_rows ? 2 * Tmax : N;
  const int64_t q_sb = Nq * Hq * dh, q_sh = dh, q_sn = Hq * dh;
  const int64_t k_sb = Hkv * N * dh, k_sh = N * dh, k_sn = dh;
  std::vector<in_t> q(B * Nq * Hq * dh), k(B * Hkv * N * dh);
  for (auto& x : q) x = Element<in_t>::make(normal(rng));
  for (auto& x : k) x = Element<in_t>::make(normal(rng));

  // Samples: padding at the end, a few holes; sample 1 of 3+ has no query rows; the last
  // sample of 3+ masks its first 10 keys and puts a query at position 2 (causal: no key).
  std::vector<uint8_t> key_mask(B * N, 0);
  std::vector<int64_t> query_index(B * Tmax, 0), query_pos(B * Tmax, 0), query_count(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Nb = N - 13 * b;
    const bool blind_row = B >= 3 && b == B - 1;
    for (int64_t j = 0; j < Nb; ++j) key_mask[b * N + j] = uniform(rng) > 0.05 && !(blind_row && j < 10);
    const int64_t T = (B >= 3 && b == 1) ? 0 : std::max<int64_t>(1, Tmax - 7 * b);
    query_count[b] = T;
    std::vector<int64_t> positions(Nb - 10);
    std::iota(positions.begin(), positions.end(), 10);
    std::shuffle(positions.begin(), positions.end(), rng);
    positions.resize(T);
    if (blind_row) positions[0] = 2;
    std::sort(positions.begin(), positions.end());
    std::copy(positions.begin(), positions.end(), query_pos.begin() + b * Tmax);
    for (int64_t t = 0; t < T; ++t)
      query_index[b * Tmax + t] = c.own_rows ? 2 * t + 1 : positions[t];
  }

  // Reference: a direct softmax per query row.
  std::vector<double> ref(B * N, 0.0);
  const int64_t G = Hq / Hkv;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t T = query_count[b];
    for (int64_t h = 0; h < Hq; ++h) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = query_index[b * Tmax + t], pos = query_pos[b * Tmax + t];
        std::vector<double> logit(N, -kInf);
        double m = -kInf;
        for (int64_t j = 0; j < N; ++j) {
          if (!key_mask[b * N + j] || (c.causal && j > pos)) continue;
          double dot = 0.0;
          for (int64_t d = 0; d < dh; ++d)
            dot += Element<in_t>::value(q[b * q_sb + h * q_sh + row * q_sn + d]) *
                   Element<in_t>::value(k[b * k_sb + (h / G) * k_sh + j * k_sn + d]);
          logit[j] = scale * dot;
          m = std::max(m, logit[j]);
        }
        if (m == -kInf) continue;  // a row with no valid key adds nothing
        double sum = 0.0;
        for (int64_t j = 0; j < N; ++j) sum += std::exp(logit[j] - m);
        for (int64_t j = 0; j < N; ++j) ref[b * N + j] += std::exp(logit[j] - m) / sum;
      }
    }
    for (int64_t j = 0; j < N; ++j) ref[b * N + j] = T > 0 ? ref[b * N + j] / double(Hq * T) : 0.0;
  }

  DeviceArray<in_t> d_q(q), d_k(k);
  DeviceArray<int64_t> d_qi(query_index), d_qp(query_pos), d_qc(query_count);
  DeviceArray<bool> d_mask(key_mask);
  DeviceArray<acc_t> d_scores(B * N);
  DeviceArray<uint8_t> d_ws(lyra::context_scores_cuda_workspace(B, Hq, Tmax));
  CHECK_CUDA(lyra::context_scores_cuda(Element<in_t>::kDtype, d_q.ptr, q_sb, q_sh, q_sn, d_k.ptr,
                                       k_sb, k_sh, k_sn, d_qi.ptr, d_qp.ptr, d_qc.ptr, Tmax,
                                       d_mask.ptr, B, Hq, Hkv, N, dh, c.causal, scale,
                                       d_scores.ptr, d_ws.ptr, g_stream));
  CHECK_CUDA(cudaStreamSynchronize(g_stream));
  const std::vector<acc_t> scores = d_scores.download();

  // Relative error per key, floored at 1e-3 of the largest score of the sample.
  double err = 0.0;
  int64_t nonzero_zero = 0;
  for (int64_t b = 0; b < B; ++b) {
    const double top = *std::max_element(ref.begin() + b * N, ref.begin() + (b + 1) * N);
    for (int64_t j = 0; j < N; ++j) {
      const double got = scores[b * N + j], want = ref[b * N + j];
      if (want == 0.0) {
        nonzero_zero += got != 0.0;  // invalid keys, samples without rows: exactly 0
      } else {
        track(err, std::fabs(got - want) / (std::fabs(want) + 1e-3 * top));
      }
    }
  }
  report("scores (relative)", err, sizeof(acc_t) == 8 ? 1e-10 : 1e-4);
  report("scores that must be exactly 0 and are not", double(nonzero_zero), 0.0);
}

void run_scores_tests(std::mt19937_64& rng) {
  run_scores_case<float, float>({"fp32, GQA 8/2, causal, dh 64", 3, 8, 2, 300, 64, 40, true}, rng);
  run_scores_case<double, double>({"fp64, MHA, non-causal, dh 80, 2 row tiles", 3, 4, 4, 1000, 80, 70, false}, rng);
  run_scores_case<double, double>({"fp64, GQA 4/2, causal, dh 32", 3, 4, 2, 129, 32, 65, true}, rng);
  run_scores_case<__half, float>({"fp16, GQA 6/2, causal, dh 128", 3, 6, 2, 517, 128, 90, true}, rng);
  run_scores_case<__nv_bfloat16, float>({"bf16, GQA 4/1, causal, dh 256", 2, 4, 1, 200, 256, 20, true}, rng);
  run_scores_case<float, float>({"fp32, 5000 keys, causal, dh 128", 1, 2, 1, 5000, 128, 150, true}, rng);
  // A rank's own query rows at their positions among all keys (q rows != key positions).
  run_scores_case<double, double>({"fp64, own rows, GQA 6/2, causal, dh 40", 3, 6, 2, 300, 40, 70, true, true}, rng);
  run_scores_case<double, double>({"fp64, own rows, MHA, non-causal, dh 16", 3, 4, 4, 200, 16, 30, false, true}, rng);
  run_scores_case<float, float>({"fp32, own rows, GQA 8/2, causal, dh 64", 3, 8, 2, 517, 64, 90, true, true}, rng);
}

// ======================================================================================
// select_tokens
// ======================================================================================

// Reference: stable sort of the context tokens by score descending (NaN last), take k.
std::vector<uint8_t> select_reference(const std::vector<double>& scores,
                                      const std::vector<uint8_t>& context,
                                      const std::vector<uint8_t>& valid, int64_t B, int64_t N,
                                      double keep_ratio, int64_t min_keep) {
  std::vector<uint8_t> keep(B * N, 0);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> cand;
    for (int64_t j = b * N; j < (b + 1) * N; ++j) {
      if (valid[j] && context[j]) cand.push_back(j);
      else keep[j] = valid[j];
    }
    const int64_t n = static_cast<int64_t>(cand.size());
    const int64_t k = std::min(lyra::keep_count(n, keep_ratio, min_keep), n);
    std::stable_sort(cand.begin(), cand.end(), [&](int64_t x, int64_t y) {
      const bool nx = std::isnan(scores[x]), ny = std::isnan(scores[y]);
      if (nx || ny) return !nx && ny;
      return scores[x] > scores[y];
    });
    for (int64_t r = 0; r < k; ++r) keep[cand[r]] = 1;
  }
  return keep;
}

template <typename score_t>
void run_select_tests(std::mt19937_64& rng) {
  const bool is_double = sizeof(score_t) == 8;
  std::printf("select_tokens [%s]\n", is_double ? "float64" : "float32");
  const int64_t B = 7, N = 1500;  // three chunks of 512 tokens
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<double> scores(B * N);
  std::vector<uint8_t> context(B * N), valid(B * N);
  const double specials[] = {std::numeric_limits<double>::quiet_NaN(), kInf, -kInf, 0.0, -0.0};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = b * N; j < (b + 1) * N; ++j) {
      double s = uniform(rng) * 1e-3;
      if (b == 1) s = std::floor(uniform(rng) * 4.0) / 4.0;              // many ties
      if (b == 2 && uniform(rng) < 0.2) s = specials[j % 5];             // NaN, +-inf, +-0
      if (b == 6) s = (j % 2 ? -0.0 : 0.0);                              // all zero ties
      scores[j] = static_cast<double>(static_cast<score_t>(s));
      valid[j] = b == 5 ? 0 : uniform(rng) < 0.95;                       // 5: all padding
      context[j] = b == 3 ? 0 : b == 4 ? (j % N) < 10 : uniform(rng) < 0.6;  // 3: n = 0, 4: n < 32
    }
  }
  std::vector<score_t> typed(scores.begin(), scores.end());
  DeviceArray<score_t> d_scores(typed);
  DeviceArray<bool> d_context(context), d_valid(valid);
  for (double ratio : {0.3, 0.0, 0.57, 0.7, 0.999, 1.0}) {
    DeviceArray<bool> d_keep(B * N);
    CHECK_CUDA(lyra::select_tokens_cuda(d_scores.ptr, is_double, d_context.ptr, d_valid.ptr, B, N,
                                        ratio, 32, d_keep.ptr, g_stream));
    CHECK_CUDA(cudaStreamSynchronize(g_stream));
    const std::vector<uint8_t> keep = d_keep.download<uint8_t>();
    const std::vector<uint8_t> ref = select_reference(scores, context, valid, B, N, ratio, 32);
    int64_t mismatches = 0;
    for (int64_t j = 0; j < B * N; ++j) mismatches += keep[j] != ref[j];
    report("keep_ratio " + std::to_string(ratio) + ": mismatching tokens", double(mismatches), 0.0);
  }
}

// Row b holds b context tokens: the kernel keeps floor(p * b / scale) of them for the decimal
// ratio p / scale, counted in exact integer arithmetic (0.7 * 90 is 62.99999999999999 in
// double; 70% of 90 is 63).
void run_keep_count_tests() {
  std::printf("select_tokens kept counts vs exact decimal arithmetic\n");
  const int64_t B = 400, N = 400;
  std::vector<float> scores(B * N);
  std::vector<uint8_t> context(B * N), valid(B * N, 1);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < N; ++j) {
      scores[b * N + j] = static_cast<float>((j * 7919) % N);
      context[b * N + j] = j < b;
    }
  }
  DeviceArray<float> d_scores(scores);
  DeviceArray<bool> d_context(context), d_valid(valid);
  const std::pair<int64_t, int64_t> ratios[] = {{35, 100}, {57, 100}, {7, 10}, {5, 10},
                                                {3, 10},   {1, 1},    {333, 1000}};
  for (const auto& [p, scale] : ratios) {
    DeviceArray<bool> d_keep(B * N);
    CHECK_CUDA(lyra::select_tokens_cuda(d_scores.ptr, false, d_context.ptr, d_valid.ptr, B, N,
                                        double(p) / double(scale), 0, d_keep.ptr, g_stream));
    CHECK_CUDA(cudaStreamSynchronize(g_stream));
    const std::vector<uint8_t> keep = d_keep.download<uint8_t>();
    int64_t wrong_rows = 0;
    for (int64_t b = 0; b < B; ++b) {
      int64_t kept = 0;
      for (int64_t j = 0; j < b; ++j) kept += keep[b * N + j];
      wrong_rows += kept != p * b / scale;
    }
    report("keep_ratio " + std::to_string(p) + "/" + std::to_string(scale) +
               ": rows with a wrong count (n = 0..399)",
           double(wrong_rows), 0.0);
  }
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  CHECK_CUDA(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
  std::mt19937_64 rng(1234);
  run_soft_dtw_tests(rng);
  run_scores_tests(rng);
  run_select_tests<float>(rng);
  run_select_tests<double>(rng);
  run_keep_count_tests();
  CHECK_CUDA(cudaStreamDestroy(g_stream));
  if (g_failures != 0) {
    std::printf("%d CUDA kernel checks FAILED\n", g_failures);
    return 1;
  }
  std::printf("all CUDA kernel tests passed\n");
  return 0;
}

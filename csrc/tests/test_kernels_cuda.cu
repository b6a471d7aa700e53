// Standalone check of the CUDA kernels (soft-DTW, context scores on FMAs and on tensor cores,
// token selection) against plain double-precision CPU loops written here. Exit code: 0 pass,
// 1 fail, 77 skipped (no CUDA device), as ctest's SKIP_RETURN_CODE expects.
//
// Output buffers are filled with 0xFF bytes (NaN / true-ish garbage) before every call, so
// entries a kernel forgets to write show up as errors instead of as lucky zeros.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <climits>
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
// LYRA_CUDA_TEST_SMALL=1: only cases of at most ~1M elements, for compute-sanitizer, which
// runs kernels 10-100x slower (bash .ci/gpu a runs racecheck, synccheck, initcheck, memcheck).
bool g_small = false;
bool too_big_for_small(int64_t elements, const std::string& name) {
  if (!g_small || elements <= (int64_t(1) << 20)) return false;
  std::printf("  %s: skipped (LYRA_CUDA_TEST_SMALL)\n", name.c_str());
  return true;
}

// worst = max(worst, e), where a NaN error counts as infinitely bad (std::max would drop it).
void track(double& worst, double e) { worst = std::isnan(e) ? kInf : std::max(worst, e); }

void report(const std::string& what, double err, double tol) {
  const bool ok = err <= tol;  // false for NaN too
  if (!ok) ++g_failures;
  std::printf("  %-58s max err %.3e (tol %.1e)  %s\n", what.c_str(), err, tol, ok ? "ok" : "FAIL");
}

// Device array of n elements of T, filled with 0xFF bytes. Every set-up copy, fill and read-back
// goes through g_stream, the stream the kernels run on: g_stream is non-blocking (so a launcher
// that ignores its stream argument shows up), which means work on the legacy default stream
// (plain cudaMemset / cudaMemcpy) would not be ordered with the kernels, and a 0xFF fill could
// land after a kernel wrote its output. download() waits for the stream before it returns.
template <typename T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceArray(size_t count) : n(count) {
    CHECK_CUDA(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)));
    CHECK_CUDA(cudaMemsetAsync(ptr, 0xFF, std::max<size_t>(n, 1) * sizeof(T), g_stream));
  }
  template <typename H>
  DeviceArray(const std::vector<H>& host) : DeviceArray(host.size()) {
    upload(host);
  }
  ~DeviceArray() {
    cudaStreamSynchronize(g_stream);  // nothing queued may still use the memory
    cudaFree(ptr);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  // Copies host into elements [offset, offset + host.size()), ordered on g_stream. A pageable
  // source is staged before the call returns, so `host` may change afterwards.
  template <typename H>
  void upload(const std::vector<H>& host, size_t offset = 0) {
    static_assert(sizeof(H) == sizeof(T), "host and device element sizes differ");
    if (offset + host.size() > n) {
      std::fprintf(stderr, "upload of %zu elements at %zu into %zu\n", host.size(), offset, n);
      std::exit(1);
    }
    CHECK_CUDA(cudaMemcpyAsync(ptr + offset, host.data(), host.size() * sizeof(T),
                               cudaMemcpyHostToDevice, g_stream));
  }
  // Elements [offset, offset + count) (all by default), after everything queued on g_stream.
  template <typename H = T>
  std::vector<H> download(size_t offset = 0, size_t count = SIZE_MAX) const {
    static_assert(sizeof(H) == sizeof(T), "host and device element sizes differ");
    count = std::min(count, n - offset);
    std::vector<H> host(count);
    CHECK_CUDA(cudaMemcpyAsync(host.data(), ptr + offset, count * sizeof(T),
                               cudaMemcpyDeviceToHost, g_stream));
    CHECK_CUDA(cudaStreamSynchronize(g_stream));
    return host;
  }
};

// ======================================================================================
// soft-DTW
// ======================================================================================

bool in_band(int64_t i, int64_t j, int64_t bw) { return bw < 0 || std::llabs(i - j) <= bw; }

// The recursion of soft_dtw.h on one sample, in double. W: (L, S, 3), E: (L, S), both zero
// outside the band. NaN as in the kernels: a NaN predecessor makes R and all three weights NaN.
void soft_dtw_reference(const std::vector<double>& D, int64_t Smax, int64_t L, int64_t S,
                        int64_t bw, double gamma, double& value, std::vector<double>& W,
                        std::vector<double>& E) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> R((L + 1) * (S + 1), kInf);
  R[0] = 0.0;
  W.assign(L * S * 3, 0.0);
  for (int64_t i = 1; i <= L; ++i) {
    for (int64_t j = 1; j <= S; ++j) {
      if (!in_band(i - 1, j - 1, bw)) continue;
      const double pred[3] = {R[(i - 1) * (S + 1) + j - 1], R[(i - 1) * (S + 1) + j],
                              R[i * (S + 1) + j - 1]};  // kDiag, kUp, kLeft
      double* w = &W[((i - 1) * S + (j - 1)) * 3];
      if (std::isnan(pred[0] + pred[1] + pred[2])) {
        R[i * (S + 1) + j] = w[0] = w[1] = w[2] = nan;
        continue;
      }
      const double m = std::min({pred[0], pred[1], pred[2]});
      if (m == kInf) continue;
      double e[3], sum = 0.0;
      for (int k = 0; k < 3; ++k) sum += e[k] = pred[k] == kInf ? 0.0 : std::exp(-(pred[k] - m) / gamma);
      R[i * (S + 1) + j] = D[(i - 1) * Smax + (j - 1)] + m - gamma * std::log(sum);
      for (int k = 0; k < 3; ++k) w[k] = e[k] / sum;
    }
  }
  value = R[L * (S + 1) + S];
  // E[i,j] = sum over the successors inside the sample and the band of (their weight towards
  // (i,j)) * E[successor]; E[L-1,S-1] = 1.
  E.assign(L * S, 0.0);
  auto w = [&](int64_t i, int64_t j, int k) { return W[(i * S + j) * 3 + k]; };
  for (int64_t i = L - 1; i >= 0; --i) {
    for (int64_t j = S - 1; j >= 0; --j) {
      if (!in_band(i, j, bw)) continue;
      if (i == L - 1 && j == S - 1) {
        E[i * S + j] = 1.0;
        continue;
      }
      double e = 0.0;
      if (i + 1 < L && j + 1 < S) e += w(i + 1, j + 1, lyra::kDiag) * E[(i + 1) * S + j + 1];
      if (i + 1 < L && in_band(i + 1, j, bw)) e += w(i + 1, j, lyra::kUp) * E[(i + 1) * S + j];
      if (j + 1 < S && in_band(i, j + 1, bw)) e += w(i, j + 1, lyra::kLeft) * E[i * S + j + 1];
      E[i * S + j] = e;
    }
  }
}

// The place of each cell (i, j) of an L x S sample in a weight plane (soft_dtw.h): diagonal by
// diagonal, rows ascending, cells outside the band left out (-1). Returns how many are placed.
int64_t packed_layout(int64_t L, int64_t S, int64_t bw, std::vector<int64_t>& index) {
  index.assign(L * S, -1);
  int64_t p = 0;
  for (int64_t d = 0; d <= L + S - 2; ++d) {
    for (int64_t i = std::max<int64_t>(0, d - (S - 1)); i <= std::min(d, L - 1); ++i) {
      if (in_band(i, d - i, bw)) index[i * S + (d - i)] = p++;
    }
  }
  return p;
}

// |got - want|, NaN against NaN counting as equal and NaN against a number as infinitely far.
double nan_aware_diff(double got, double want) {
  const bool got_nan = std::isnan(got), want_nan = std::isnan(want);
  if (got_nan || want_nan) return got_nan && want_nan ? 0.0 : kInf;
  return std::fabs(got - want);
}

// Entries still holding DeviceArray's 0xFF fill, bit for bit: never written. (That pattern is a
// NaN with the sign bit and every payload bit set; the kernels' NaNs are the canonical ones or
// propagated input NaNs, so this tells "written NaN" from "not written" where NaN is expected.)
template <typename T>
int64_t unwritten(const std::vector<T>& v) {
  T fill;
  std::memset(&fill, 0xFF, sizeof(T));
  int64_t n = 0;
  for (const T& x : v) n += std::memcmp(&x, &fill, sizeof(T)) == 0;
  return n;
}

// Bound on |dD float32 - dD float64| / |grad| for the same (float32) costs, whatever L + S. Both
// kernels compute R and the weights in double; they differ only by the float32 rounding of the
// stored weights (6e-8 relative). The backward divides each cell's weights by their sum, so E
// stays the visit probability of a Markov chain whose transitions sum to 1: a rounding moves a
// little mass between neighbouring paths, it neither creates nor loses any, and the error does
// not grow with L + S. A host emulation of these kernels measured at most 5.8e-8 on this file's
// cases (three seeds); with unnormalized weights the long cases gave 5.8e-7 to 3e-6, growing with
// L + S (a weight just below 1 rounds up to 1: the rounding has a sign), which this bound catches.
constexpr double kF32GradTol = 2e-7;

struct DtwCase {
  std::string name;
  std::vector<std::pair<int64_t, int64_t>> lengths;  // (x_len, y_len) per sample
  int64_t Lmax, Smax, bandwidth;
  double gamma;
  std::vector<std::array<int64_t, 3>> nan_costs = {};  // (b, i, j): costs set to NaN
};

template <typename T>
struct DtwOutputs {
  std::vector<T> value, value_only, W, dD;
};

// Forward with and without weights, then backward, with the launchers' `bandwidth` argument.
template <typename T>
DtwOutputs<T> run_soft_dtw_kernels(const std::vector<T>& D, const std::vector<int64_t>& x_len,
                                   const std::vector<int64_t>& y_len, const std::vector<T>& grad,
                                   int64_t Lmax, int64_t Smax, double gamma, int64_t bandwidth) {
  const int64_t B = static_cast<int64_t>(x_len.size());
  DeviceArray<T> d_D(D), d_grad(grad), d_value(B), d_value_only(B), d_W(B * Lmax * Smax * 3),
      d_dD(B * Lmax * Smax);
  DeviceArray<int64_t> d_x(x_len), d_y(y_len);
  DeviceArray<uint8_t> d_ws(lyra::soft_dtw_cuda_workspace(B, Lmax, Smax));
  CHECK_CUDA((lyra::soft_dtw_forward_cuda<T, T>(d_D.ptr, d_x.ptr, d_y.ptr, B, Lmax, Smax, gamma,
                                                bandwidth, d_value.ptr, d_W.ptr, d_ws.ptr,
                                                g_stream)));
  CHECK_CUDA((lyra::soft_dtw_forward_cuda<T, T>(d_D.ptr, d_x.ptr, d_y.ptr, B, Lmax, Smax, gamma,
                                                bandwidth, d_value_only.ptr, nullptr, d_ws.ptr,
                                                g_stream)));
  CHECK_CUDA((lyra::soft_dtw_backward_cuda<T, T>(d_grad.ptr, d_W.ptr, d_x.ptr, d_y.ptr, B, Lmax,
                                                 Smax, bandwidth, d_dD.ptr, d_ws.ptr, g_stream)));
  return {d_value.download(), d_value_only.download(), d_W.download(), d_dD.download()};
}

// Random costs in [0, 4) on each sample's valid cells inside the band; NaN everywhere else
// (padding and outside the band: reading it would poison the result) and at c.nan_costs.
template <typename T>
std::vector<T> random_costs(const DtwCase& c, std::mt19937_64& rng) {
  const int64_t B = static_cast<int64_t>(c.lengths.size());
  std::uniform_real_distribution<double> cost(0.0, 4.0);
  std::vector<T> D(B * c.Lmax * c.Smax, std::numeric_limits<T>::quiet_NaN());
  for (int64_t b = 0; b < B; ++b) {
    const auto [L, S] = c.lengths[b];
    for (int64_t i = 0; i < L; ++i) {
      const int64_t jlo = c.bandwidth < 0 ? 0 : std::max<int64_t>(0, i - c.bandwidth);
      const int64_t jhi = c.bandwidth < 0 ? S - 1 : std::min<int64_t>(S - 1, i + c.bandwidth);
      for (int64_t j = jlo; j <= jhi; ++j)
        D[(b * c.Lmax + i) * c.Smax + j] = static_cast<T>(cost(rng));
    }
  }
  for (const auto& [b, i, j] : c.nan_costs)
    D[(b * c.Lmax + i) * c.Smax + j] = std::numeric_limits<T>::quiet_NaN();
  return D;
}

template <typename T>
void run_soft_dtw_case(const DtwCase& c, std::mt19937_64& rng) {
  if (too_big_for_small(int64_t(c.lengths.size()) * c.Lmax * c.Smax, c.name)) return;
  const bool is_double = sizeof(T) == 8;
  std::printf("soft_dtw %s [%s]\n", c.name.c_str(), is_double ? "float64" : "float32");
  const int64_t B = static_cast<int64_t>(c.lengths.size()), Lmax = c.Lmax, Smax = c.Smax;
  const int64_t plane = Lmax * Smax;
  std::uniform_real_distribution<double> grad_dist(0.5, 2.0);
  const std::vector<T> D = random_costs<T>(c, rng);
  std::vector<int64_t> x_len(B), y_len(B);
  std::vector<T> grad(B);
  for (int64_t b = 0; b < B; ++b) {
    x_len[b] = c.lengths[b].first;
    y_len[b] = c.lengths[b].second;
    grad[b] = static_cast<T>((b % 2 ? -1.0 : 1.0) * grad_dist(rng));
  }
  const DtwOutputs<T> out =
      run_soft_dtw_kernels(D, x_len, y_len, grad, Lmax, Smax, c.gamma, c.bandwidth);
  // float32: the float64 kernels on the same costs, for the bound kF32GradTol.
  std::vector<double> dD64;
  if (!is_double) {
    const std::vector<double> D64(D.begin(), D.end()), grad64(grad.begin(), grad.end());
    dD64 = run_soft_dtw_kernels(D64, x_len, y_len, grad64, Lmax, Smax, c.gamma, c.bandwidth).dD;
  }

  // Tolerances against the host reference. R is double on both sides, but GPU and CPU exp/log
  // may differ by an ulp, so neighbouring R values can drift apart by a few ulps of |R| (we
  // allow 64), which moves a weight exp(-dR / gamma) by a relative 64 * |R| * 2.2e-16 / gamma;
  // float weights are also rounded to 6e-8 relative. E (a probability, <= 1) sums products of
  // up to L + S weights, so to first order |dE| <= (L + S) * w_rel: a loose bound, the float32
  // rounding is held to kF32GradTol by the comparison with the float64 kernels instead. Errors
  // are divided by their tolerance (pass: <= 1).
  double value_err = 0.0, weight_err = 0.0, grad_err = 0.0, value_only_err = 0.0, f32_err = 0.0;
  int64_t nonzero_outside = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = x_len[b], S = y_len[b];
    const std::vector<double> Db(D.begin() + b * plane, D.begin() + (b + 1) * plane);
    double ref_value;
    std::vector<double> ref_W, ref_E;
    soft_dtw_reference(Db, Smax, L, S, c.bandwidth, c.gamma, ref_value, ref_W, ref_E);
    std::vector<int64_t> packed;
    const int64_t cells = packed_layout(L, S, c.bandwidth, packed);
    track(value_err, nan_aware_diff(out.value[b], ref_value) /
                         (std::isfinite(ref_value) ? std::max(1.0, std::fabs(ref_value)) : 1.0));
    track(value_only_err, nan_aware_diff(out.value_only[b], out.value[b]));
    const double ref_abs = std::isfinite(ref_value) ? std::fabs(ref_value) : 0.0;
    const double w_rel = (is_double ? 0.0 : 6e-8) + 64 * 2.2e-16 * (1.0 + ref_abs) / c.gamma;
    const double g = static_cast<double>(grad[b]);
    const double grad_tol = std::fabs(g) * (2.0 * double(L + S) * w_rel + (is_double ? 1e-14 : 1e-6));
    const T* Wb = out.W.data() + b * 3 * plane;
    for (int64_t i = 0; i < Lmax; ++i) {
      for (int64_t j = 0; j < Smax; ++j) {
        const int64_t cell = (b * Lmax + i) * Smax + j;
        if (i < L && j < S && in_band(i, j, c.bandwidth)) {
          const int64_t p = packed[i * S + j];
          for (int k = 0; k < 3; ++k)
            track(weight_err, nan_aware_diff(Wb[k * plane + p], ref_W[(i * S + j) * 3 + k]) / w_rel);
          track(grad_err, nan_aware_diff(out.dD[cell], g * ref_E[i * S + j]) / grad_tol);
          if (!is_double) track(f32_err, nan_aware_diff(out.dD[cell], dD64[cell]) / std::fabs(g));
        } else {
          nonzero_outside += out.dD[cell] != 0;  // must be exactly zero
        }
      }
    }
    for (int k = 0; k < 3; ++k) {  // each plane: the packed cells, then exactly zeros
      for (int64_t p = cells; p < plane; ++p) nonzero_outside += Wb[k * plane + p] != 0;
    }
  }
  report("value (relative)", value_err, is_double ? 1e-10 : 2e-7);
  report("value with weights=nullptr vs with weights", value_only_err, 0.0);
  report("weights / tol", weight_err, 1.0);
  report("dD / tol", grad_err, 1.0);
  if (!is_double) report("dD float32 vs float64 kernels / |grad|", f32_err, kF32GradTol);
  report("dD and weight entries that must be exactly 0 and are not", double(nonzero_outside), 0.0);
  report("value, weight and dD entries never written (still 0xFF)",
         double(unwritten(out.value) + unwritten(out.value_only) + unwritten(out.W) + unwritten(out.dD)), 0.0);
}

// A band of Lmax + Smax or more is no band, up to INT64_MAX: the launchers must neither reject
// it nor overflow in d + bandwidth (issue 16). Outputs equal bitwise those of bandwidth -1.
template <typename T>
void run_huge_band_case(std::mt19937_64& rng) {
  const DtwCase c{"huge bandwidth", {{40, 33}, {7, 40}, {1, 1}}, 41, 40, -1, 0.3};
  std::printf("soft_dtw bandwidth >= Lmax + Smax is no band [%s]\n", sizeof(T) == 8 ? "float64" : "float32");
  const std::vector<T> D = random_costs<T>(c, rng);
  const std::vector<int64_t> x_len = {40, 7, 1}, y_len = {33, 40, 1};
  const std::vector<T> grad = {T(1), T(-0.5), T(2)};
  const DtwOutputs<T> none = run_soft_dtw_kernels(D, x_len, y_len, grad, c.Lmax, c.Smax, c.gamma, -1);
  for (int64_t bw : {c.Lmax + c.Smax, int64_t(INT_MAX) - 1, int64_t(INT_MAX),
                     std::numeric_limits<int64_t>::max()}) {
    const DtwOutputs<T> out = run_soft_dtw_kernels(D, x_len, y_len, grad, c.Lmax, c.Smax, c.gamma, bw);
    const bool same = std::memcmp(out.value.data(), none.value.data(), out.value.size() * sizeof(T)) == 0 &&
                      std::memcmp(out.W.data(), none.W.data(), out.W.size() * sizeof(T)) == 0 &&
                      std::memcmp(out.dD.data(), none.dD.data(), out.dD.size() * sizeof(T)) == 0;
    report("bandwidth " + std::to_string(bw) + ": outputs differing from no band", same ? 0.0 : 1.0, 0.0);
  }
}

// Sizes the 32-bit offsets of the past could not reach: B x Lmax x Smax > 2^31 elements of D
// and dD, 3x that of weights (44 GB of device memory in all, skipped with less), with most
// samples 1 x 1 and a few of full size, the last ones past element 2^31. Only the few samples
// are uploaded (the others are NaN) and checked against the host reference.
void run_soft_dtw_past_int32_case(std::mt19937_64& rng) {
  using T = float;
  const int64_t B = 2049, Lmax = 1024, Smax = 1024, plane = Lmax * Smax;
  if (too_big_for_small(B * plane, "past 2^31 elements")) return;
  const int64_t elements = B * plane;
  const size_t need = size_t(elements) * sizeof(T) * 5 + (size_t(1) << 30);
  size_t free_bytes = 0, total_bytes = 0;
  CHECK_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
  std::printf("soft_dtw B x Lmax x Smax = %lld > 2^31 elements [float32]\n", (long long)elements);
  if (free_bytes < need) {
    std::printf("  skipped: needs %.1f GB of device memory, %.1f GB free\n", need / 1e9, free_bytes / 1e9);
    return;
  }
  const double gamma = 0.2;
  const std::vector<std::pair<int64_t, std::pair<int64_t, int64_t>>> checked = {
      {0, {1024, 1024}}, {1500, {300, 1000}}, {2047, {1024, 9}}, {2048, {517, 1024}}};
  std::vector<int64_t> x_len(B, 1), y_len(B, 1);
  std::vector<T> grad(B, T(1));
  DeviceArray<T> d_D(elements), d_value(B), d_value_only(B), d_W(3 * elements), d_dD(elements);
  std::uniform_real_distribution<double> cost(0.0, 4.0);
  std::vector<std::vector<double>> costs;
  for (const auto& [b, len] : checked) {
    x_len[b] = len.first;
    y_len[b] = len.second;
    grad[b] = T(b % 2 ? -1.5 : 0.75);
    std::vector<T> slab(plane, std::numeric_limits<T>::quiet_NaN());
    for (int64_t i = 0; i < len.first; ++i)
      for (int64_t j = 0; j < len.second; ++j) slab[i * Smax + j] = static_cast<T>(cost(rng));
    d_D.upload(slab, size_t(b * plane));
    costs.emplace_back(slab.begin(), slab.end());
  }
  DeviceArray<T> d_grad(grad);
  DeviceArray<int64_t> d_x(x_len), d_y(y_len);
  DeviceArray<uint8_t> d_ws(lyra::soft_dtw_cuda_workspace(B, Lmax, Smax));
  CHECK_CUDA((lyra::soft_dtw_forward_cuda<T, T>(d_D.ptr, d_x.ptr, d_y.ptr, B, Lmax, Smax, gamma,
                                                -1, d_value.ptr, d_W.ptr, d_ws.ptr, g_stream)));
  CHECK_CUDA((lyra::soft_dtw_forward_cuda<T, T>(d_D.ptr, d_x.ptr, d_y.ptr, B, Lmax, Smax, gamma,
                                                -1, d_value_only.ptr, nullptr, d_ws.ptr, g_stream)));
  CHECK_CUDA((lyra::soft_dtw_backward_cuda<T, T>(d_grad.ptr, d_W.ptr, d_x.ptr, d_y.ptr, B, Lmax,
                                                 Smax, -1, d_dD.ptr, d_ws.ptr, g_stream)));
  const std::vector<T> value = d_value.download(), value_only = d_value_only.download();
  double value_err = 0.0, weight_err = 0.0, grad_err = 0.0, value_only_err = 0.0;
  int64_t nonzero_outside = 0;
  for (size_t n = 0; n < checked.size(); ++n) {
    const int64_t b = checked[n].first, L = x_len[b], S = y_len[b];
    const std::vector<T> W = d_W.download(size_t(3 * b * plane), size_t(3 * plane));
    const std::vector<T> dD = d_dD.download(size_t(b * plane), size_t(plane));
    nonzero_outside += unwritten(W) + unwritten(dD);
    double ref_value;
    std::vector<double> ref_W, ref_E;
    soft_dtw_reference(costs[n], Smax, L, S, -1, gamma, ref_value, ref_W, ref_E);
    std::vector<int64_t> packed;
    const int64_t cells = packed_layout(L, S, -1, packed);
    track(value_err, nan_aware_diff(value[b], ref_value) / std::max(1.0, std::fabs(ref_value)));
    track(value_only_err, nan_aware_diff(value_only[b], value[b]));
    const double g = static_cast<double>(grad[b]);
    for (int64_t i = 0; i < Lmax; ++i) {
      for (int64_t j = 0; j < Smax; ++j) {
        if (i < L && j < S) {
          for (int k = 0; k < 3; ++k)
            track(weight_err, nan_aware_diff(W[k * plane + packed[i * S + j]], ref_W[(i * S + j) * 3 + k]));
          track(grad_err, nan_aware_diff(dD[i * Smax + j], g * ref_E[i * S + j]) / std::fabs(g));
        } else {
          nonzero_outside += dD[i * Smax + j] != 0;
        }
      }
    }
    for (int k = 0; k < 3; ++k)
      for (int64_t p = cells; p < plane; ++p) nonzero_outside += W[k * plane + p] != 0;
  }
  report("value (relative), samples 0, 1500, 2047, 2048", value_err, 2e-7);
  report("value with weights=nullptr vs with weights", value_only_err, 0.0);
  report("weights (absolute)", weight_err, 1e-6);
  report("dD / |grad| (absolute)", grad_err, 1e-5);
  report("dD and weight entries that must be 0 (or written) and are not", double(nonzero_outside), 0.0);
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
      // NaN costs where a cell's smallest predecessor is +inf: in row 0 and column 0 (two
      // predecessors on the border), on the band's edges and with band 0 (predecessors outside
      // the band). R and all three weights must be NaN there, as on the CPU, not 0; a NaN at
      // the end cell leaves dD finite.
      {"NaN costs beside +inf predecessors: row 0, column 0, end cell",
       {{1, 9}, {9, 1}, {7, 7}, {6, 8}}, 9, 9, -1, 0.2, {{0, 0, 2}, {1, 3, 0}, {2, 6, 6}, {3, 0, 0}}},
      {"NaN costs beside +inf predecessors: band 2's edges",
       {{12, 12}, {12, 10}, {6, 6}}, 12, 12, 2, 0.2, {{0, 0, 0}, {1, 1, 3}, {2, 4, 2}}},
      {"NaN costs, band 0", {{8, 8}, {5, 5}}, 8, 8, 0, 0.5, {{0, 3, 3}}},
  };
  for (const DtwCase& c : cases) {
    run_soft_dtw_case<float>(c, rng);
    run_soft_dtw_case<double>(c, rng);
  }
  run_huge_band_case<float>(rng);
  run_huge_band_case<double>(rng);
  // The global-memory scratch path (taken for min(Lmax, Smax) above ~9,600), forced on small inputs.
  setenv("LYRA_SOFT_DTW_GLOBAL_SCRATCH", "1", 1);
  for (int idx : {0, 1, 3, 6}) {
    DtwCase c = cases[idx];
    c.name += ", global scratch";
    run_soft_dtw_case<float>(c, rng);
    run_soft_dtw_case<double>(c, rng);
  }
  unsetenv("LYRA_SOFT_DTW_GLOBAL_SCRATCH");
  // ... and reached by size: three live diagonals of min(Lmax, Smax) doubles past the device's
  // opt-in shared memory per block (9,686 on an H100), a narrow band to keep the work small.
  int device = 0, optin = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  CHECK_CUDA(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t n = optin / int64_t(3 * sizeof(double)) + 1;
  // float64 only (the placement does not depend on the type; forced above for both), B = 1: the
  // host side of one n x n sample already takes ~8 GB and a few seconds.
  const DtwCase big{"min(Lmax, Smax) = " + std::to_string(n) + ": global scratch by size, band 40",
                    {{n, n - 30}}, n, n, 40, 0.1};
  size_t free_bytes = 0, total_bytes = 0;
  CHECK_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (free_bytes < size_t(n * n) * sizeof(double) * 6) {
    std::printf("soft_dtw %s: skipped, %.1f GB of device memory free\n", big.name.c_str(), free_bytes / 1e9);
  } else {
    run_soft_dtw_case<double>(big, rng);
  }
  run_soft_dtw_past_int32_case(rng);
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

// One context_scores call: sizes, element strides of q (B, Hq, Nq, dh) and k (B, Hkv, N, dh),
// causality and logit scale.
struct ScoreShape {
  int64_t B, Hq, Hkv, N, dh, Tmax;
  int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn;
  bool causal;
  double scale;
};

// Reference: a direct softmax per query row, in double, over the (already rounded) inputs.
// max_abs_dot (when given) receives the largest sum_d |q_d k_d| over the (row, key) pairs that
// enter a softmax, for the error bound of fp32 accumulation (fp32_score_tolerance).
template <typename in_t>
std::vector<double> scores_reference(const ScoreShape& s, const std::vector<in_t>& q,
                                     const std::vector<in_t>& k,
                                     const std::vector<uint8_t>& key_mask,
                                     const std::vector<int64_t>& query_index,
                                     const std::vector<int64_t>& query_pos,
                                     const std::vector<int64_t>& query_count,
                                     double* max_abs_dot = nullptr) {
  const int64_t N = s.N, Tmax = s.Tmax, G = s.Hq / s.Hkv;
  std::vector<double> ref(s.B * N, 0.0);
  double abs_dot_max = 0.0;
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t T = query_count[b];
    for (int64_t h = 0; h < s.Hq; ++h) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = query_index[b * Tmax + t], pos = query_pos[b * Tmax + t];
        const in_t* qr = q.data() + b * s.q_sb + h * s.q_sh + row * s.q_sn;
        std::vector<double> logit(N, -kInf);
        double m = -kInf;
        for (int64_t j = 0; j < N; ++j) {
          if (!key_mask[b * N + j] || (s.causal && j > pos)) continue;
          const in_t* kr = k.data() + b * s.k_sb + (h / G) * s.k_sh + j * s.k_sn;
          double dot = 0.0, abs_dot = 0.0;
          for (int64_t d = 0; d < s.dh; ++d) {
            const double p = Element<in_t>::value(qr[d]) * Element<in_t>::value(kr[d]);
            dot += p;
            abs_dot += std::fabs(p);
          }
          abs_dot_max = std::max(abs_dot_max, abs_dot);
          logit[j] = s.scale * dot;
          m = std::max(m, logit[j]);
        }
        if (m == -kInf) continue;  // a row with no valid key adds nothing
        double sum = 0.0;
        for (int64_t j = 0; j < N; ++j) sum += std::exp(logit[j] - m);
        for (int64_t j = 0; j < N; ++j) ref[b * N + j] += std::exp(logit[j] - m) / sum;
      }
    }
    for (int64_t j = 0; j < N; ++j)
      ref[b * N + j] = T > 0 ? ref[b * N + j] / double(s.Hq * T) : 0.0;
  }
  if (max_abs_dot != nullptr) *max_abs_dot = abs_dot_max;
  return ref;
}

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
  if (too_big_for_small(c.B * c.Hq * c.N * c.dh, c.name)) return;
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

  const ScoreShape shape{B, Hq, Hkv, N, dh, Tmax, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, c.causal, scale};
  const std::vector<double> ref =
      scores_reference(shape, q, k, key_mask, query_index, query_pos, query_count);

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
// context_scores on tensor cores
// ======================================================================================

// Bound on the relative error of every score computed in fp32 from bf16/fp16 inputs, against the
// double reference on the same inputs; both CUDA kernels must meet it. u = 2^-24 (fp32).
//  * Products: a bf16 (8 significant bits) or fp16 (11 bits) product has at most 22 bits, so it
//    is exact in fp32; the inputs' own rounding is shared by the reference and costs nothing.
//  * Logits: dh exact products summed in fp32 are off by at most gamma_dh sum_d |q_d k_d|,
//    gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), for
//    FMAs rounding to nearest; tensor cores align and truncate inside an mma (Fasi et al., PeerJ
//    Computer Science 2021), at most doubling u. So |d logit| <= E = 2 dh u scale A, A the largest
//    sum_d |q_d k_d|.
//  * A probability exp(s - lse): its logit and the log-sum-exp (1-Lipschitz in the logits) move
//    by at most E each: 2E relative.
//  * The rest rounds: the sum of up to N exponentials (N u relative), the sum of up to Hq T
//    probabilities (Hq T u), the exps (2 ulp = 4u each, a few per probability: 16u), and the
//    base-2 logits and log-sum-exps, each with an absolute u |x| for
//    |x| <= log2(e) |s|max + log2 N (8 such, generously).
//  * A score is a mean of probabilities: its relative error is at most the largest of theirs.
// A worst case, printed per case: ~9e-5 (dh 16) to ~1.8e-3 (dh 256) for these inputs (scale A
// ~ 14 to 29); typical errors are far smaller (they grow like sqrt(dh) u, not dh u).
// Whatever the input type, a kernel that reads a wrong row, head, key or k16 slice, masks
// wrongly or loses a split or a row's log-sum-exp is off by far more.
double fp32_score_tolerance(int64_t dh, double scale, double max_abs_dot, int64_t N, int64_t Hq,
                            int64_t Tmax) {
  const double u = std::ldexp(1.0, -24);
  const double logit_err = 2.0 * double(dh) * u * scale * max_abs_dot;
  const double base2_max =
      1.4426950408889634 * scale * max_abs_dot + std::log2(double(std::max<int64_t>(N, 2)));
  return 2.0 * logit_err + (double(N) + double(Hq * Tmax) + 16.0 + 8.0 * base2_max) * u;
}

struct TcCase {
  std::string name;
  int64_t B, Hkv, G, N, dh, Tmax;  // Hq = G Hkv
  bool causal;
  bool own_rows = false;    // q holds only the query rows: 2 Tmax rows, query row t at row 2 t + 1
  bool misaligned = false;  // q and k start 2 bytes past a 16-byte boundary: element loads
};

// The tensor-core launcher against the FMA launcher on the same bf16/fp16 inputs, both against
// the double reference, and against itself (two runs give the same bits).
template <typename in_t>
void run_tc_case(const TcCase& c, std::mt19937_64& rng) {
  if (too_big_for_small(c.B * c.Hkv * c.G * c.N * c.dh, c.name)) return;
  constexpr KernelDtype kDtype = Element<in_t>::kDtype;
  std::printf("context_scores tensor cores [%s] %s\n",
              kDtype == KernelDtype::kBFloat16 ? "bf16" : "fp16", c.name.c_str());
  const int64_t B = c.B, Hkv = c.Hkv, Hq = c.Hkv * c.G, N = c.N, dh = c.dh, Tmax = c.Tmax;
  const double scale = 2.0 / std::sqrt(double(dh));  // sharper than usual: tests large logits
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);

  // q and k as (B, Nq, Hq, dh) and (B, N, Hkv, dh) tensors seen as (B, H, N, dh) (strided), as
  // attention layers produce them.
  const int64_t Nq = c.own_rows ? 2 * Tmax : N;
  const int64_t q_sb = Nq * Hq * dh, q_sh = dh, q_sn = Hq * dh;
  const int64_t k_sb = N * Hkv * dh, k_sh = dh, k_sn = Hkv * dh;
  std::vector<in_t> q(B * Nq * Hq * dh), k(B * N * Hkv * dh);
  for (auto& x : q) x = Element<in_t>::make(normal(rng));
  for (auto& x : k) x = Element<in_t>::make(normal(rng));

  // Samples: trailing padding and 10% holes. With N >= 1000, sample 0 masks keys [128, 256): a
  // whole key tile of each kernel is padding. With B >= 3, sample 1 has no query rows and the
  // last sample masks its first keys and has a query row at position 0 (causal: it sees no key).
  // Sample 0's last query row sits at its last key, so causal rows reach every key split.
  std::vector<uint8_t> key_mask(B * N, 0);
  std::vector<int64_t> query_index(B * Tmax, 0), query_pos(B * Tmax, 0), query_count(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t Nb = std::max<int64_t>(1, N - 13 * b);
    const bool blind = B >= 3 && b == B - 1;
    const int64_t blind_keys = std::max<int64_t>(1, std::min<int64_t>(10, N / 2));
    for (int64_t j = 0; j < Nb; ++j) {
      const bool hole = uniform(rng) < 0.1 || (blind && j < blind_keys) ||
                        (b == 0 && N >= 1000 && j >= 128 && j < 256);
      key_mask[b * N + j] = !hole;
    }
    const int64_t T = (B >= 3 && b == 1) ? 0 : std::max<int64_t>(1, std::min(Tmax - 7 * b, Nb));
    query_count[b] = T;
    std::vector<int64_t> pool(Nb), positions;
    std::iota(pool.begin(), pool.end(), 0);
    std::shuffle(pool.begin(), pool.end(), rng);
    if (blind && T > 0) positions.push_back(0);
    if (b == 0 && T >= 2) positions.push_back(Nb - 1);
    for (int64_t p : pool) {
      if (static_cast<int64_t>(positions.size()) == T) break;
      if (std::find(positions.begin(), positions.end(), p) == positions.end()) positions.push_back(p);
    }
    std::sort(positions.begin(), positions.end());
    for (int64_t t = 0; t < T; ++t) {
      query_pos[b * Tmax + t] = positions[t];
      query_index[b * Tmax + t] = c.own_rows ? 2 * t + 1 : positions[t];
    }
  }

  const size_t offset = c.misaligned ? 1 : 0;
  DeviceArray<in_t> d_q(q.size() + offset), d_k(k.size() + offset);
  d_q.upload(q, offset);
  d_k.upload(k, offset);
  DeviceArray<int64_t> d_qi(query_index), d_qp(query_pos), d_qc(query_count);
  DeviceArray<bool> d_mask(key_mask);
  DeviceArray<float> d_tc(B * N), d_tc_again(B * N), d_fma(B * N);
  DeviceArray<uint8_t> d_ws_tc(lyra::context_scores_tc_cuda_workspace(B, Hq, Tmax, N));
  DeviceArray<uint8_t> d_ws_fma(lyra::context_scores_cuda_workspace(B, Hq, Tmax));
  for (float* out : {d_tc.ptr, d_tc_again.ptr}) {
    CHECK_CUDA(lyra::context_scores_tc_cuda(kDtype, d_q.ptr + offset, q_sb, q_sh, q_sn,
                                            d_k.ptr + offset, k_sb, k_sh, k_sn, d_qi.ptr, d_qp.ptr,
                                            d_qc.ptr, Tmax, d_mask.ptr, B, Hq, Hkv, N, dh,
                                            c.causal, scale, out, d_ws_tc.ptr, g_stream));
  }
  CHECK_CUDA(lyra::context_scores_cuda(kDtype, d_q.ptr + offset, q_sb, q_sh, q_sn,
                                       d_k.ptr + offset, k_sb, k_sh, k_sn, d_qi.ptr, d_qp.ptr,
                                       d_qc.ptr, Tmax, d_mask.ptr, B, Hq, Hkv, N, dh, c.causal,
                                       scale, d_fma.ptr, d_ws_fma.ptr, g_stream));
  CHECK_CUDA(cudaStreamSynchronize(g_stream));
  const std::vector<float> tc = d_tc.download(), tc_again = d_tc_again.download();
  const std::vector<float> fma = d_fma.download();

  const ScoreShape shape{B, Hq, Hkv, N, dh, Tmax, q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, c.causal, scale};
  double max_abs_dot = 0.0;
  const std::vector<double> ref =
      scores_reference(shape, q, k, key_mask, query_index, query_pos, query_count, &max_abs_dot);
  const double tol = fp32_score_tolerance(dh, scale, max_abs_dot, N, Hq, Tmax);
  std::printf("  tolerance (relative per score, fp32 accumulation bound) %.2e\n", tol);

  // Errors divided by what the bound allows (pass: <= 1); 2^-120 absolute covers probabilities
  // that flush to zero below 2^-126. Entries whose reference is exactly 0 (invalid keys, samples
  // without rows, keys no row sees) must be exactly 0.
  const double floor = std::ldexp(1.0, -120);
  double err_tc = 0.0, err_fma = 0.0, err_cross = 0.0;
  int64_t nonzero_zero = 0, differing_bits = 0;
  for (int64_t i = 0; i < B * N; ++i) {
    const double want = ref[i], got_tc = tc[i], got_fma = fma[i];
    differing_bits += std::memcmp(&tc[i], &tc_again[i], sizeof(float)) != 0;
    if (want == 0.0) {
      nonzero_zero += (got_tc != 0.0) + (got_fma != 0.0);
      continue;
    }
    const double allowed = tol * want + floor;
    track(err_tc, std::fabs(got_tc - want) / allowed);
    track(err_fma, std::fabs(got_fma - want) / allowed);
    track(err_cross, std::fabs(got_tc - got_fma) / (2.0 * allowed));
  }
  report("tensor cores vs double reference / tol", err_tc, 1.0);
  report("FMA kernel vs double reference / tol", err_fma, 1.0);
  report("tensor cores vs FMA kernel / (2 tol)", err_cross, 1.0);
  report("scores that must be exactly 0 and are not", double(nonzero_zero), 0.0);
  report("tensor-core scores differing between two runs", double(differing_bits), 0.0);
}

void run_tc_tests(std::mt19937_64& rng) {
  // Wide tiles (dh <= 128): 128 query rows / keys per CTA, 64 streamed; narrow (dh > 128): 64.
  const std::vector<TcCase> cases = {
      {"N 1, T 1, G 1, dh 64, causal", 3, 2, 1, 1, 64, 1, true},
      {"N 1, T 1, G 4, dh 128, non-causal", 3, 1, 4, 1, 128, 1, false},
      {"N 63, T 17, G 4, dh 64, causal", 3, 1, 4, 63, 64, 17, true},
      {"N 63, T 17, G 7, dh 128, non-causal, own rows", 3, 1, 7, 63, 128, 17, false, true},
      {"N 64, T 64, G 7, dh 128, causal", 3, 2, 7, 64, 128, 64, true},
      {"N 64, T 1, G 1, dh 64, non-causal", 3, 4, 1, 64, 64, 1, false},
      {"N 65, T 65, G 1, dh 64, causal", 3, 3, 1, 65, 64, 65, true},
      {"N 65, T 64, G 4, dh 128, non-causal, misaligned", 3, 2, 4, 65, 128, 64, false, false, true},
      {"N 1000, T 65, G 7, dh 128, causal", 3, 2, 7, 1000, 128, 65, true},
      {"N 1000, T 17, G 4, dh 64, non-causal, own rows", 3, 2, 4, 1000, 64, 17, false, true},
      {"N 1000, T 130 (2 row tiles), G 4, dh 64, causal, misaligned", 3, 1, 4, 1000, 64, 130, true, false, true},
      {"N 4097 (2 key splits), T 65, G 4, dh 128, causal", 3, 1, 4, 4097, 128, 65, true},
      {"N 4097, T 1, G 7, dh 64, non-causal", 3, 1, 7, 4097, 64, 1, false},
      {"N 4097, T 17, G 1, dh 64, causal, own rows", 3, 2, 1, 4097, 64, 17, true, true},
      {"N 517, T 40, G 2, dh 80 (5 k16 steps), causal", 3, 2, 2, 517, 80, 40, true},
      {"N 517, T 40, G 3, dh 96, non-causal", 3, 1, 3, 517, 96, 40, false},
      {"N 300, T 17, G 2, dh 16, causal", 3, 2, 2, 300, 16, 17, true},
      {"N 700, T 65, G 4, dh 256 (narrow tiles), causal", 3, 1, 4, 700, 256, 65, true},
      {"N 300, T 20, G 7, dh 144 (narrow tiles), non-causal, own rows", 3, 1, 7, 300, 144, 20, false, true},
  };
  for (const TcCase& c : cases) {
    run_tc_case<__nv_bfloat16>(c, rng);
    run_tc_case<__half>(c, rng);
  }
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
  const char* small = std::getenv("LYRA_CUDA_TEST_SMALL");
  g_small = small != nullptr && std::string(small) == "1";
  CHECK_CUDA(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
  std::mt19937_64 rng(1234);
  run_soft_dtw_tests(rng);
  run_scores_tests(rng);
  run_tc_tests(rng);
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

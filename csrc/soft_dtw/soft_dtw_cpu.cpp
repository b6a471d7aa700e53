// CPU soft-DTW: anti-diagonal wavefront, vectorized along each diagonal.
//
// Cells on one anti-diagonal k = i + j (1-based R indices) are independent, so each diagonal is
// a vectorizable loop over rows i. Only three diagonals of R are live; they are indexed by the
// row i, so every read of a predecessor is contiguous. Parallelism: across samples when the
// batch has at least as many samples as threads, otherwise across each diagonal of one sample
// (one barrier per diagonal, worth it only for long diagonals).
#include "soft_dtw.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../vector_math.h"

namespace lyra {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Below this many cells a diagonal is done by one thread: a barrier costs more than the work.
constexpr int64_t kMinCellsPerThread = 256;

// The range of rows [lo, hi] (1-based) of diagonal k inside the L x S matrix and the band.
struct DiagRange {
  int64_t lo, hi;
};
inline DiagRange diag_range(int64_t k, int64_t L, int64_t S, int64_t bandwidth) {
  int64_t lo = std::max<int64_t>(1, k - S);
  int64_t hi = std::min<int64_t>(L, k - 1);
  if (bandwidth >= 0) {  // |i - j| = |2i - k| <= bandwidth
    lo = std::max<int64_t>(lo, (k - bandwidth + 1) / 2);
    hi = std::min<int64_t>(hi, (k + bandwidth) / 2);
  }
  return {lo, hi};
}

// This thread's share [lo, hi] of a diagonal's rows.
inline DiagRange thread_share(DiagRange r, int tid, int nthreads) {
  const int64_t n = r.hi - r.lo + 1;
  if (nthreads == 1 || n < kMinCellsPerThread * 2) {
    return tid == 0 ? r : DiagRange{1, 0};
  }
  const int64_t chunk = (n + nthreads - 1) / nthreads;
  const int64_t lo = r.lo + tid * chunk;
  return {lo, std::min(r.hi, lo + chunk - 1)};
}

// The per-sample weight layout of the CPU backend: three planes (diag, up, left) of Lmax*Smax
// entries each, the valid cells packed diagonal by diagonal (row order inside a diagonal), so
// forward stores and backward loads are contiguous along a diagonal.
struct DiagLayout {
  std::vector<int64_t> offset;  // offset[k]: first packed cell of diagonal k
  DiagLayout(int64_t L, int64_t S, int64_t bandwidth) : offset(L + S + 2, 0) {
    for (int64_t k = 2; k <= L + S; ++k) {
      const DiagRange r = diag_range(k, L, S, bandwidth);
      offset[k + 1] = offset[k] + std::max<int64_t>(0, r.hi - r.lo + 1);
    }
  }
};

// One diagonal's cells [lo, hi] of the forward recursion. p2/p1/cur hold diagonals k-2, k-1, k
// (by row); w* point at this diagonal's packed weights, indexed by i - first_row.
// Branch-free so that it vectorizes; kStore is a template flag for the same reason.
template <bool kStore, typename scalar_t, typename weight_t>
LYRA_SIMD_CLONES void forward_cells(int64_t k, DiagRange r, int64_t first_row,
                                    const scalar_t* __restrict D, int64_t Smax,
                                    const double* __restrict p2, const double* __restrict p1,
                                    double* __restrict cur, weight_t* __restrict wd,
                                    weight_t* __restrict wu, weight_t* __restrict wl,
                                    double gamma) {
  const double inv_gamma = 1.0 / gamma;
#pragma omp simd
  for (int64_t i = r.lo; i <= r.hi; ++i) {
    const double a = p2[i - 1], b = p1[i - 1], c = p1[i];
    const double m = std::min(a, std::min(b, c));
    const bool reachable = m < kInf;
    const double ms = reachable ? m : 0.0;
    // Computed unconditionally and then selected: conditional calls would block vectorization.
    const double xa = exp_nonpositive((ms - a) * inv_gamma);
    const double xb = exp_nonpositive((ms - b) * inv_gamma);
    const double xc = exp_nonpositive((ms - c) * inv_gamma);
    const double ea = a < kInf ? xa : 0.0, eb = b < kInf ? xb : 0.0, ec = c < kInf ? xc : 0.0;
    const double s = reachable ? ea + eb + ec : 1.0;
    const double cost = static_cast<double>(D[(i - 1) * Smax + (k - i - 1)]);
    const double rv = cost + m - gamma * log_1_to_4(s);
    cur[i] = reachable ? rv : kInf;
    if constexpr (kStore) {
      const double inv_s = 1.0 / s;
      wd[i - first_row] = static_cast<weight_t>(ea * inv_s);
      wu[i - first_row] = static_cast<weight_t>(eb * inv_s);
      wl[i - first_row] = static_cast<weight_t>(ec * inv_s);
    }
  }
}

// The packed weights of one successor diagonal, read at row i + shift. Rows outside the
// diagonal are clamped to a real entry: their successor is invalid, its E is the sentinel 0,
// so the (finite) weight read there is multiplied by zero.
template <typename weight_t>
struct SuccessorWeights {
  const weight_t* w;
  int64_t first_row, last;  // w[0..last] are the diagonal's cells, rows first_row...
  inline weight_t at(int64_t i) const {
    const int64_t pos = i - first_row;
    return w[pos < 0 ? 0 : (pos > last ? last : pos)];
  }
};

// One diagonal's cells [lo, hi] of the backward recursion, E(i,j) from its successors
// (i+1,j+1) on diagonal k+2 (E by row in e2) and (i+1,j), (i,j+1) on diagonal k+1 (e1).
template <typename weight_t>
LYRA_SIMD_CLONES void backward_cells(DiagRange r, SuccessorWeights<weight_t> diag2,
                                     SuccessorWeights<weight_t> up1,
                                     SuccessorWeights<weight_t> left1,
                                     const double* __restrict e2, const double* __restrict e1,
                                     double* __restrict cur) {
#pragma omp simd
  for (int64_t i = r.lo; i <= r.hi; ++i) {
    cur[i] = static_cast<double>(diag2.at(i + 1)) * e2[i + 1] +
             static_cast<double>(up1.at(i + 1)) * e1[i + 1] +
             static_cast<double>(left1.at(i)) * e1[i];
  }
}

// Writes `value` just outside a diagonal's range so the next two diagonals read it there.
inline void set_sentinels(double* diag, DiagRange r, int64_t last, double value) {
  if (r.lo - 1 >= 0 && r.lo - 1 <= last) diag[r.lo - 1] = value;
  if (r.hi + 1 >= 0 && r.hi + 1 <= last) diag[r.hi + 1] = value;
}

template <typename scalar_t, typename weight_t>
void forward_sample(const scalar_t* D, int64_t L, int64_t S, int64_t Smax, double gamma,
                    int64_t bandwidth, scalar_t* value, weight_t* W, int64_t plane,
                    int nthreads) {
  std::vector<double> buf(3 * (L + 1), kInf);
  double* diags[3] = {buf.data(), buf.data() + (L + 1), buf.data() + 2 * (L + 1)};
  diags[0][0] = 0.0;  // diagonal 0 is R[0,0]; diagonal 1 is all border (+inf)
  const DiagLayout layout(W != nullptr ? L : 0, W != nullptr ? S : 0, bandwidth);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    const int tid = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    for (int64_t k = 2; k <= L + S; ++k) {
      double* cur = diags[k % 3];
      const DiagRange r = diag_range(k, L, S, bandwidth);
      const DiagRange mine = thread_share(r, tid, nt);
      const double* p2 = diags[(k - 2) % 3];
      const double* p1 = diags[(k - 1) % 3];
      if (W != nullptr) {
        weight_t* wd = W + layout.offset[k];
        forward_cells<true>(k, mine, r.lo, D, Smax, p2, p1, cur, wd, wd + plane, wd + 2 * plane,
                            gamma);
      } else {
        forward_cells<false, scalar_t, weight_t>(k, mine, r.lo, D, Smax, p2, p1, cur, nullptr,
                                                 nullptr, nullptr, gamma);
      }
      if (tid == 0) set_sentinels(cur, r, L, kInf);
#pragma omp barrier
    }
  }
  *value = static_cast<scalar_t>(diags[(L + S) % 3][L]);
  if (W != nullptr) {  // the unused tail of each plane: zero, so the output is deterministic
    for (int64_t p = 0; p < 3; ++p) {
      std::fill(W + p * plane + layout.offset[L + S + 1], W + (p + 1) * plane, weight_t(0));
    }
  }
}

template <typename scalar_t, typename weight_t>
void backward_sample(scalar_t grad, const weight_t* W, int64_t plane, int64_t L, int64_t S,
                     int64_t Smax, int64_t bandwidth, scalar_t* dD, int nthreads) {
  std::vector<double> buf(3 * (L + 2), 0.0);
  double* diags[3] = {buf.data(), buf.data() + (L + 2), buf.data() + 2 * (L + 2)};
  const double g = static_cast<double>(grad);
  const DiagLayout layout(L, S, bandwidth);
  static const weight_t kZero[1] = {weight_t(0)};
  // Successor weights of plane p on diagonal k (a zero stand-in past the end or when empty).
  auto successor = [&](int64_t k, int64_t p) -> SuccessorWeights<weight_t> {
    if (k > L + S) return {kZero, 0, 0};
    const DiagRange r = diag_range(k, L, S, bandwidth);
    if (r.hi < r.lo) return {kZero, 0, 0};
    return {W + p * plane + layout.offset[k], r.lo, r.hi - r.lo};
  };
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    const int tid = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    for (int64_t k = L + S; k >= 2; --k) {
      double* cur = diags[k % 3];
      const DiagRange r = diag_range(k, L, S, bandwidth);
      const DiagRange mine = thread_share(r, tid, nt);
      if (k == L + S) {
        if (tid == 0) cur[L] = 1.0;
      } else {
        backward_cells(mine, successor(k + 2, kDiag), successor(k + 1, kUp),
                       successor(k + 1, kLeft), diags[(k + 2) % 3], diags[(k + 1) % 3], cur);
      }
      for (int64_t i = mine.lo; i <= mine.hi; ++i) {
        dD[(i - 1) * Smax + (k - i - 1)] = static_cast<scalar_t>(g * cur[i]);
      }
      if (tid == 0) set_sentinels(cur, r, L + 1, 0.0);
#pragma omp barrier
    }
  }
}

// Runs fn(b, threads_for_that_sample) over the batch: samples in parallel when there are
// enough of them, else one after another with all threads inside each.
template <typename Fn>
void for_each_sample(int64_t B, int num_threads, Fn fn) {
  num_threads = std::max(1, num_threads);
  if (B >= num_threads || num_threads == 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (num_threads > 1)
    for (int64_t b = 0; b < B; ++b) fn(b, 1);
  } else {
    for (int64_t b = 0; b < B; ++b) fn(b, num_threads);
  }
}

}  // namespace

template <typename scalar_t, typename weight_t>
void soft_dtw_forward_cpu(const scalar_t* D, const int64_t* x_len, const int64_t* y_len,
                          int64_t B, int64_t Lmax, int64_t Smax, double gamma,
                          int64_t bandwidth, scalar_t* value, weight_t* weights,
                          int num_threads) {
  const int64_t slab = Lmax * Smax;
  for_each_sample(B, num_threads, [&](int64_t b, int nt) {
    weight_t* W = weights == nullptr ? nullptr : weights + b * slab * 3;
    forward_sample(D + b * slab, x_len[b], y_len[b], Smax, gamma, bandwidth, value + b, W, slab,
                   nt);
  });
}

template <typename scalar_t, typename weight_t>
void soft_dtw_backward_cpu(const scalar_t* grad, const weight_t* weights,
                           const int64_t* x_len, const int64_t* y_len, int64_t B,
                           int64_t Lmax, int64_t Smax, int64_t bandwidth, scalar_t* dD,
                           int num_threads) {
  const int64_t slab = Lmax * Smax;
  for_each_sample(B, num_threads, [&](int64_t b, int nt) {
    std::fill(dD + b * slab, dD + (b + 1) * slab, scalar_t(0));
    backward_sample(grad[b], weights + b * slab * 3, slab, x_len[b], y_len[b], Smax, bandwidth,
                    dD + b * slab, nt);
  });
}

#define LYRA_INSTANTIATE(scalar_t, weight_t)                                               \
  template void soft_dtw_forward_cpu<scalar_t, weight_t>(                                \
      const scalar_t*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, double, \
      int64_t, scalar_t*, weight_t*, int);                                                \
  template void soft_dtw_backward_cpu<scalar_t, weight_t>(                               \
      const scalar_t*, const weight_t*, const int64_t*, const int64_t*, int64_t, int64_t, \
      int64_t, int64_t, scalar_t*, int);
LYRA_INSTANTIATE(float, float)
LYRA_INSTANTIATE(double, double)
#undef LYRA_INSTANTIATE

}  // namespace lyra

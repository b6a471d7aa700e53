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
#include <limits>
#include <vector>

#include "../vector_math.h"

namespace lyra {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
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

// exp(-(v - m) / gamma) for v one of the three predecessors, given the exps of the middle and
// the largest value (the minimum's is 1). Written as successive selects: a nested ?: here keeps
// GCC from vectorizing the loop.
template <typename M>
inline M term_of(double v, double m, double mid, M x_mid, M x_top) {
  M e = x_top;
  e = v == mid ? x_mid : e;
  e = v == m ? M(1) : e;
  return e;
}

// One diagonal's cells [lo, hi] of the forward recursion. cost/p2/p1/cur hold the costs and
// diagonals k-2, k-1, k of R (by row); w* point at this diagonal's packed weights, indexed by
// i - first_row. R itself is always double. The soft-min terms are computed in the weights'
// precision: exp/log of the O(1) soft-min terms in float32 perturb each cell of R by ~1e-8
// absolute (gamma * 1e-7), far inside the float32 tolerances, at twice the vector width.
// Branch-free so that it vectorizes; kStore is a template flag for the same reason.
template <bool kStore, typename weight_t>
LYRA_SIMD_CLONES void forward_cells(DiagRange r, int64_t first_row,
                                    const double* __restrict cost,
                                    const double* __restrict p2, const double* __restrict p1,
                                    double* __restrict cur, weight_t* __restrict wd,
                                    weight_t* __restrict wu, weight_t* __restrict wl,
                                    double gamma) {
  using M = weight_t;
  const double inv_gamma = 1.0 / gamma;
#pragma omp simd
  for (int64_t i = r.lo; i <= r.hi; ++i) {
    const double a = p2[i - 1], b = p1[i - 1], c = p1[i];
    // The minimum's term is exp(0) = 1, so only the middle and largest values need an exp.
    // Computed unconditionally and then selected: branches would block vectorization.
    const double m = std::min(a, std::min(b, c));
    const double top = std::max(a, std::max(b, c));
    const double mid = std::max(std::min(a, b), std::min(std::max(a, b), c));
    const bool reachable = m < kInf;
    const double ms = reachable ? m : 0.0;
    const M x_mid = mid < kInf ? exp_nonpositive(static_cast<M>((ms - mid) * inv_gamma)) : M(0);
    const M x_top = top < kInf ? exp_nonpositive(static_cast<M>((ms - top) * inv_gamma)) : M(0);
    const M s = M(1) + x_mid + x_top;
    const double rv = cost[i] + m - gamma * static_cast<double>(log_1_to_4(s));
    // min/max drop NaN operands, so a NaN cost upstream would silently vanish: keep it.
    const bool nan = std::isnan(a + b + c);
    cur[i] = nan ? kNaN : (reachable ? rv : kInf);
    if constexpr (kStore) {
      // Ties share a value, so matching by value hands each predecessor its own term.
      const M inv_s = nan ? M(kNaN) : (reachable ? M(1) : M(0)) / s;
      wd[i - first_row] = term_of(a, m, mid, x_mid, x_top) * inv_s;
      wu[i - first_row] = term_of(b, m, mid, x_mid, x_top) * inv_s;
      wl[i - first_row] = term_of(c, m, mid, x_mid, x_top) * inv_s;
    }
  }
}

// One diagonal's cells [lo, hi] of the backward recursion (E by row). A cell's E is the sum of
// what its successors pass back: up1/left1 from diagonal k+1 (rows i+1 and i), diag2 from
// diagonal k+2 (row i+1). Each cell then passes E times its own three weights (packed, indexed
// by i - first_row) back to its predecessors through up0/left0/diag0. All accesses are
// contiguous, so the loop vectorizes.
template <typename weight_t>
LYRA_SIMD_CLONES void backward_cells(DiagRange r, int64_t first_row,
                                     const weight_t* __restrict wd,
                                     const weight_t* __restrict wu,
                                     const weight_t* __restrict wl,
                                     const double* __restrict up1,
                                     const double* __restrict left1,
                                     const double* __restrict diag2, double* __restrict e,
                                     double* __restrict up0, double* __restrict left0,
                                     double* __restrict diag0) {
#pragma omp simd
  for (int64_t i = r.lo; i <= r.hi; ++i) {
    const double ei = up1[i + 1] + left1[i] + diag2[i + 1];
    e[i] = ei;
    up0[i] = ei * static_cast<double>(wu[i - first_row]);
    left0[i] = ei * static_cast<double>(wl[i - first_row]);
    diag0[i] = ei * static_cast<double>(wd[i - first_row]);
  }
}

// Writes `value` just outside a diagonal's range so the next two diagonals read it there.
inline void set_sentinels(double* diag, DiagRange r, int64_t last, double value) {
  if (r.lo - 1 <= last) diag[r.lo - 1] = value;  // lo >= 1 always
  if (r.hi + 1 >= 0 && r.hi + 1 <= last) diag[r.hi + 1] = value;
}

template <typename scalar_t, typename weight_t>
void forward_sample(const scalar_t* D, int64_t L, int64_t S, int64_t Smax, double gamma,
                    int64_t bandwidth, scalar_t* value, weight_t* W, int64_t plane,
                    int nthreads) {
  std::vector<double> buf(3 * (L + 1), kInf), cost(L + 1);
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
      // Gather the diagonal's strided costs first: the vector loop then reads them contiguously
      // (with the strided load inside, GCC does not vectorize the weight stores).
      for (int64_t i = mine.lo; i <= mine.hi; ++i) {
        cost[i] = static_cast<double>(D[(i - 1) * Smax + (k - i - 1)]);
      }
      if (W != nullptr) {
        weight_t* wd = W + layout.offset[k];
        forward_cells<true>(mine, r.lo, cost.data(), p2, p1, cur, wd, wd + plane, wd + 2 * plane,
                            gamma);
      } else {
        forward_cells<false, weight_t>(mine, r.lo, cost.data(), p2, p1, cur, nullptr, nullptr,
                                       nullptr, gamma);
      }
      if (tid == 0) set_sentinels(cur, r, L, kInf);
      if (nt > 1) {  // a barrier even in a team of one costs as much as a short diagonal
#pragma omp barrier
      }
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
  // Row-indexed buffers: E of the current diagonal, what the last two diagonals pass back
  // (up/left: one diagonal back, diag: two), all zero outside each diagonal's cells.
  const int64_t n = L + 2;
  std::vector<double> buf(8 * n, 0.0);
  double* e = buf.data();
  double* up[2] = {buf.data() + n, buf.data() + 2 * n};
  double* left[2] = {buf.data() + 3 * n, buf.data() + 4 * n};
  double* diag[3] = {buf.data() + 5 * n, buf.data() + 6 * n, buf.data() + 7 * n};
  diag[(L + S + 2) % 3][L + 1] = 1.0;  // seeds E[L, S] = 1 on the last diagonal
  const double g = static_cast<double>(grad);
  const DiagLayout layout(L, S, bandwidth);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    const int tid = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    for (int64_t k = L + S; k >= 2; --k) {
      const DiagRange r = diag_range(k, L, S, bandwidth);
      const DiagRange mine = thread_share(r, tid, nt);
      const weight_t* wd = W + layout.offset[k];
      backward_cells(mine, r.lo, wd, wd + plane, wd + 2 * plane, up[(k + 1) % 2],
                     left[(k + 1) % 2], diag[(k + 2) % 3], e, up[k % 2], left[k % 2],
                     diag[k % 3]);
      for (int64_t i = mine.lo; i <= mine.hi; ++i) {
        dD[(i - 1) * Smax + (k - i - 1)] = static_cast<scalar_t>(g * e[i]);
      }
      if (tid == 0) {
        set_sentinels(up[k % 2], r, L + 1, 0.0);
        set_sentinels(left[k % 2], r, L + 1, 0.0);
        set_sentinels(diag[k % 3], r, L + 1, 0.0);
      }
      if (nt > 1) {
#pragma omp barrier
      }
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
    // Zero what the recursion will not write: padding, and without a band nothing else.
    scalar_t* out = dD + b * slab;
    const int64_t L = x_len[b], S = y_len[b];
    if (bandwidth >= 0) {
      std::fill(out, out + slab, scalar_t(0));
    } else {
      if (S < Smax) {
        for (int64_t i = 0; i < L; ++i) std::fill(out + i * Smax + S, out + (i + 1) * Smax, scalar_t(0));
      }
      std::fill(out + L * Smax, out + slab, scalar_t(0));
    }
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

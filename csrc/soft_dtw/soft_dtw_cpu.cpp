// CPU soft-DTW: anti-diagonal wavefront, vectorized along each diagonal, in row stripes that
// threads claim one after another.
//
// Cells on one anti-diagonal k = i + j (1-based R indices) are independent, so each diagonal is
// a vectorizable loop over rows i. Only three diagonals of R are live; they are indexed by the
// row i, so every read of a predecessor is contiguous.
//
// Parallelism: the batch is cut into work items, a stripe of rows of one sample each (a whole
// sample when the batch has samples enough for the threads), which threads claim in order,
// a sample's stripes top to bottom in the forward and bottom to top in the backward. A stripe
// runs the sample's diagonals over its own rows and trades one row with its neighbour: the
// forward's stripe needs the bottom row of R of the stripe above up to diagonal k-1, the
// backward's what the top row of the stripe below passes up, down to diagonal k+1. A thread
// that must wait for its neighbour sleeps: when another process holds a core (DataLoader
// workers in training), a spinning waiter takes the core that the neighbour needs to catch up.
// (A barrier per diagonal ran 3.5x slower than one thread beside one busy process on 2 cores.)
// The items run on OpenMP's threads, which a judge of each call's gain sends back to one
// thread while other processes hold the cores (Threads, below).
#include "soft_dtw.h"

#include <omp.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "../vector_math.h"

namespace lyra {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
// The vector loops run over whole vectors of kPad cells (the widest: 16 float lanes) past a
// diagonal's last row: a scalar remainder of up to 15 cells costs as much as the vectors
// (short diagonals, S ~ 60, ran 1.5x slower at S = 60 than at S = 64). The extra rows land in
// kPad slack entries of the row-indexed buffers, above the diagonal's end; nothing reads them
// but other padded cells (a real cell reads at most one row past its diagonal's last row,
// where the sentinel is).
constexpr int64_t kPad = 16;

// The range of rows [lo, hi] (1-based) of diagonal k inside the L x S matrix and the band.
struct DiagRange {
  int64_t lo, hi;
};
inline DiagRange diag_range(int64_t k, int64_t L, int64_t S, int64_t bandwidth) {
  int64_t lo = std::max<int64_t>(1, k - S);
  int64_t hi = std::min<int64_t>(L, k - 1);
  if (bandwidth >= 0 && bandwidth < L + S) {  // |i - j| = |2i - k| <= bandwidth; wider: none
    lo = std::max<int64_t>(lo, (k - bandwidth + 1) / 2);
    hi = std::min<int64_t>(hi, (k + bandwidth) / 2);
  }
  return {lo, hi};
}

// `mine` extended to whole vectors of kPad rows when it ends the diagonal and its packed
// weights (`packed` entries from the share's first row, up to `room` left in the plane) still
// fit: the padded cells' weights then land where the next diagonal's will be written, or in
// the plane's unused tail; never past the plane.
inline DiagRange padded(DiagRange mine, DiagRange r, int64_t room) {
  if (mine.hi != r.hi || mine.hi < mine.lo) return mine;
  const int64_t n = (mine.hi - mine.lo + 1 + kPad - 1) / kPad * kPad;
  return n <= room ? DiagRange{mine.lo, mine.lo + n - 1} : mine;
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
// contiguous, so the loop vectorizes. (Storing only E and reading the successors' weights
// instead, one store per cell rather than four, measured 15% slower: five shifted streams.)
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
    // The three weights sum to 1 but their float32 roundings do not (a weight just below 1
    // rounds up to 1): unnormalized, E would drift by up to (L + S) x 6e-8. Passing E times
    // (2 - sum) passes E / sum to second order (sum - 1 is ~1e-7), without a division. A
    // cell whose weights are all 0 is unreachable and has E = 0; NaN weights stay NaN.
    const double u = wu[i - first_row], l = wl[i - first_row], d = wd[i - first_row];
    const double pass = ei * (2.0 - (u + l + d));
    up0[i] = pass * u;
    left0[i] = pass * l;
    diag0[i] = pass * d;
  }
}

// Writes `value` just outside a diagonal's range so the next two diagonals read it there: the
// thread whose share starts the diagonal below it, the one whose share ends it above it (after
// its padded cells, which may have written there).
inline void set_sentinels(double* diag, DiagRange r, DiagRange mine, double value) {
  if (mine.hi < mine.lo) return;
  if (mine.lo == r.lo) diag[r.lo - 1] = value;  // lo >= 1 always
  if (mine.hi == r.hi) diag[r.hi + 1] = value;
}

// How far one stripe has got, and waiting for it without spinning for long.
class Progress {
 public:
  explicit Progress(int64_t start) : value_(start) {}

  void publish(int64_t k) {
    value_.store(k);  // seq_cst, with waiters_ below: a waiter either sees k or gets notified
    if (waiters_.load() != 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      cv_.notify_all();
    }
  }

  // Returns once done(value) holds: after a short spin (the neighbour is usually a diagonal
  // ahead), asleep on a condition variable.
  template <typename Done>
  void wait(Done done) {
    for (int spin = 0; spin < 64; ++spin) {
      if (done(value_.load(std::memory_order_acquire))) return;
      std::this_thread::yield();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    waiters_.fetch_add(1);
    cv_.wait(lock, [&] { return done(value_.load()); });
    waiters_.fetch_sub(1);
  }

 private:
  std::atomic<int64_t> value_;
  std::atomic<int> waiters_{0};
  std::mutex mutex_;
  std::condition_variable cv_;
};

// CPU time the calling thread has run (not the time it waited for a core or slept).
inline int64_t thread_cpu_ns() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return int64_t(t.tv_sec) * 1000000000 + t.tv_nsec;
}

// Runs a call's work items on OpenMP threads, each claiming the next unclaimed item, and judges
// whether the threads paid. They are torch's own intra-op threads: after any torch op they
// spin, hot, for a while, so a team starts at once, where threads of our own would have to
// win their cores from those spinners (2x slower beside torch's ops on 2 cores). The judge:
// the threads' CPU time in the items is what one thread on a free core would take, and a
// call's wall time over it says what the threads gained (0.5 on two free cores). Beside
// another busy process a team thread waits for its core, now and then for a whole time slice
// (a 1 ms call took 6), so one call that happened to gain says little: the judge keeps a
// running mean of the ratio (each call's capped at 2) and, while it is above 0.85, calls run
// alone for a while before threads are tried again: 16 ms after the first bad try, 4x longer
// after each further one, up to 2 s, and 4x shorter after a good one, so that a machine
// that has come free is back on its threads within about 2.7 s. A try beside the load is
// dear (after it torch's OpenMP workers spin for milliseconds on the cores they share with
// the other process, and the next calls alone wait for them too), so it is rare; the wait is
// measured in time, not calls, as load comes and goes in time, whatever the calls' sizes.
class Threads {
 public:
  static Threads& get() {
    static Threads instance;
    return instance;
  }

  // The threads a call that asked for `threads` gets: 1 while calls run alone. Asked before the
  // call cuts its work, so that a call run alone is cut like a one-thread call (whole samples,
  // no stripes to trade rows between).
  int plan(int threads) const {
    return threads <= 1 || now_ns() < alone_until_ns_.load(std::memory_order_relaxed) ? 1
                                                                                      : threads;
  }

  // item(i, slot) for i = 0..n-1 on up to `threads` threads; a call on several is judged
  // unless `judged` is false (a helper call, the gradient's scaling: tries are the
  // recursions').
  template <typename Fn>
  void run(int64_t n, int threads, const Fn& item, bool judged = true) {
    if (threads <= 1 || n <= 1) {
      for (int64_t i = 0; i < n; ++i) item(i, 0);
      return;
    }
    std::atomic<int64_t> next{0}, cpu_ns{0};
    const int64_t start = now_ns();
#pragma omp parallel num_threads(team(n, threads))
    {
      const int slot = omp_get_thread_num();
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
        const int64_t before = thread_cpu_ns();
        item(i, slot);
        cpu_ns.fetch_add(thread_cpu_ns() - before);
      }
    }
    if (judged) judge(start, now_ns(), cpu_ns.load());
  }

  // How many threads run(n, threads, ...) starts: item's `slot` is below it.
  static int team(int64_t n, int threads) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  }

 private:
  static constexpr double kPays = 0.85;  // wall over CPU time below which threads paid
  static constexpr int64_t kFirstNs = 16'000'000, kLongestNs = 2'000'000'000;

  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
  }

  void judge(int64_t start, int64_t end, int64_t cpu_ns) {
    const double ratio = static_cast<double>(end - start) /
                         static_cast<double>(std::max<int64_t>(cpu_ns, 1));
    std::lock_guard<std::mutex> lock(mutex_);
    mean_ratio_ = 0.5 * mean_ratio_ + 0.5 * std::min(ratio, 2.0);
    if (mean_ratio_ <= kPays) {
      alone_ns_ = 0;
      alone_until_ns_.store(0, std::memory_order_relaxed);
      return;
    }
    alone_ns_ = ratio <= kPays ? std::max(kFirstNs, alone_ns_ / 4)
                               : std::min(kLongestNs, alone_ns_ == 0 ? kFirstNs : 4 * alone_ns_);
    alone_until_ns_.store(end + alone_ns_, std::memory_order_relaxed);
  }

  std::mutex mutex_;
  double mean_ratio_ = 0.5;  // running mean of team calls' wall time over their CPU time
  int64_t alone_ns_ = 0;  // how long calls last ran alone
  std::atomic<int64_t> alone_until_ns_{0};  // calls run alone until then
};

// The threads a call may use (Threads::plan); then item(i, slot) for i = 0..n-1 on up to that
// many threads, `slot` the running thread's index in the team (0 .. Threads::team(n, threads)
// - 1). Items may wait only on items before them, which someone has then already claimed.
inline int plan_threads(int threads) { return Threads::get().plan(std::max(1, threads)); }
template <typename Fn>
void run_items(int64_t n, int threads, Fn item) {
  Threads::get().run(n, threads, item);
}

// The stripes a batch is cut into: sample b's rows 1..L_b in `count[b]` stripes of equal
// height (the last one shorter), listed sample by sample.
struct Stripes {
  static constexpr int64_t kMinRows = 64;  // shorter stripes trade rows too often
  std::vector<int64_t> first;  // first[b]: index of sample b's first stripe
  std::vector<int64_t> height;  // rows per stripe of sample b

  Stripes(const int64_t* x_len, int64_t B, int threads) : first(B + 1, 0), height(B) {
    // Whole samples when there are at least as many as threads: independent items, nothing
    // to wait for. Fewer samples: each cut into stripes, about 4 items per thread in all.
    const int64_t per_sample = threads <= 1 || B >= threads
                                   ? 1 : std::max<int64_t>(1, (4 * threads + B - 1) / B);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t L = x_len[b];
      const int64_t n = std::max<int64_t>(1, std::min(per_sample, L / kMinRows));
      height[b] = (L + n - 1) / n;
      first[b + 1] = first[b] + (L + height[b] - 1) / height[b];
    }
  }
  int64_t size() const { return first.back(); }
  // (sample, stripe within the sample) of item i.
  std::pair<int64_t, int64_t> at(int64_t i) const {
    const int64_t b = std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1;
    return {b, i - first[b]};
  }
  int64_t count(int64_t b) const { return first[b + 1] - first[b]; }
};

// A stripe's rows [r0, r1] and the diagonals that touch them.
struct StripeRows {
  int64_t r0, r1, k_first, k_last;
  StripeRows(int64_t stripe, int64_t height, int64_t L, int64_t S)
      : r0(stripe * height + 1), r1(std::min(L, (stripe + 1) * height)),
        k_first(std::max<int64_t>(2, r0 + 1)), k_last(std::min(L + S, r1 + S)) {}
  // The part of diagonal range r inside the stripe, in local rows (row r0 - 1 is local 0).
  DiagRange local(DiagRange r) const {
    return {std::max(r.lo, r0) - (r0 - 1), std::min(r.hi, r1) - (r0 - 1)};
  }
};

// Forward over one stripe. `above`: R[r0 - 1, c] for c = 0..S (the row above the stripe, which
// the previous stripe fills as it goes, `above_done` its last finished diagonal); `below`:
// this stripe's bottom row, filled as it goes, `done` published after each diagonal (null when
// nobody waits for this stripe).
template <typename scalar_t, typename weight_t>
void forward_stripe(const scalar_t* D, int64_t L, int64_t S, int64_t Smax, double gamma,
                    int64_t bandwidth, const DiagLayout& layout, weight_t* W, int64_t plane,
                    const StripeRows& rows, const double* above, Progress* above_done,
                    double* below, Progress* done, scalar_t* value) {
  const FlushDenormals flush;  // the soft-min weights of unlikely moves fall below 1e-38
  const int64_t off = rows.r0 - 1;  // local row 0 is the row above the stripe
  const int64_t n = rows.r1 - rows.r0 + 3 + kPad;
  std::vector<double> buf(3 * n, kInf), cost(n, 0.0);
  double* diags[3] = {buf.data(), buf.data() + n, buf.data() + 2 * n};
  auto row_above = [&](int64_t c) { return 0 <= c && c <= S ? above[c] : kInf; };
  for (int64_t k = rows.k_first; k <= rows.k_last; ++k) {
    if (above_done != nullptr) above_done->wait([k](int64_t v) { return v >= k - 1; });
    double* cur = diags[k % 3];
    double* p2 = diags[(k - 2) % 3];
    double* p1 = diags[(k - 1) % 3];
    p1[0] = row_above(k - rows.r0);  // R[r0 - 1, j] and R[r0 - 1, j - 1] for the top row's j
    p2[0] = row_above(k - rows.r0 - 1);
    const DiagRange r = diag_range(k, L, S, bandwidth);
    const DiagRange mine = rows.local(r);
    if (mine.lo <= mine.hi) {
      // Gather the diagonal's strided costs first: the vector loop then reads them
      // contiguously (with the strided load inside, GCC does not vectorize the weight stores).
      for (int64_t i = mine.lo; i <= mine.hi; ++i) {
        const int64_t row = i + off;
        cost[i] = static_cast<double>(D[(row - 1) * Smax + (k - row - 1)]);
      }
      const DiagRange whole = {r.lo - off, r.hi - off};
      if (W != nullptr) {
        weight_t* wd = W + layout.offset[k];
        // Padded weights spill into the next diagonal's first rows: only when this stripe
        // writes those too (the diagonal starts here), or the stripe below, which runs that
        // diagonal after this one.
        const DiagRange vec = r.lo >= rows.r0
                                  ? padded(mine, whole, plane - layout.offset[k] - (mine.lo - whole.lo))
                                  : mine;
        forward_cells<true>(vec, whole.lo, cost.data(), p2, p1, cur, wd, wd + plane,
                            wd + 2 * plane, gamma);
      } else {
        forward_cells<false, weight_t>(padded(mine, whole, INT64_MAX), whole.lo, cost.data(), p2,
                                       p1, cur, nullptr, nullptr, nullptr, gamma);
      }
      set_sentinels(cur, whole, mine, kInf);
      if (mine.hi + off == rows.r1) below[k - rows.r1] = cur[mine.hi];
    }
    if (done != nullptr) done->publish(k);
  }
  if (rows.r1 == L) *value = static_cast<scalar_t>(diags[(L + S) % 3][L - off]);
  if (done != nullptr) done->publish(std::numeric_limits<int64_t>::max());
}

// Backward over one stripe. `below_up` / `below_diag`: what the row below the stripe passes up
// and diagonally, by column (the next stripe's top row, `below_done` its last finished
// diagonal, descending; or, below the last row, the seed E[L, S] = 1); `top_up` / `top_diag`:
// what this stripe's top row passes up, filled as it goes, `done` as in forward_stripe.
template <typename scalar_t, typename weight_t>
void backward_stripe(double g, const weight_t* W, int64_t plane, int64_t L, int64_t S,
                     int64_t Smax, int64_t bandwidth, const DiagLayout& layout,
                     const StripeRows& rows, const double* below_up, const double* below_diag,
                     Progress* below_done, double* top_up, double* top_diag, Progress* done,
                     scalar_t* dD) {
  const FlushDenormals flush;  // E far from the optimal path falls below 1e-308
  const int64_t off = rows.r0 - 1;
  const int64_t n = rows.r1 - rows.r0 + 3 + kPad;  // local rows 0..r1 - off + 1, the slack
  std::vector<double> buf(8 * n, 0.0);
  double* e = buf.data();
  double* up[2] = {buf.data() + n, buf.data() + 2 * n};
  double* left[2] = {buf.data() + 3 * n, buf.data() + 4 * n};
  double* diag[3] = {buf.data() + 5 * n, buf.data() + 6 * n, buf.data() + 7 * n};
  const int64_t bottom = rows.r1 + 1 - off;  // the local row below the stripe
  auto col = [&](const double* v, int64_t c) { return 0 <= c && c <= S + 1 ? v[c] : 0.0; };
  for (int64_t k = rows.k_last; k >= rows.k_first; --k) {
    if (below_done != nullptr) below_done->wait([k](int64_t v) { return v <= k + 1; });
    double* up1 = up[(k + 1) % 2];
    double* diag2 = diag[(k + 2) % 3];
    up1[bottom] = col(below_up, k + 1 - (rows.r1 + 1));  // from (r1 + 1, j) to (r1, j)
    diag2[bottom] = col(below_diag, k + 2 - (rows.r1 + 1));  // from (r1 + 1, j + 1)
    const DiagRange r = diag_range(k, L, S, bandwidth);
    const DiagRange mine = rows.local(r);
    if (mine.lo <= mine.hi) {
      const DiagRange whole = {r.lo - off, r.hi - off};
      const weight_t* wd = W + layout.offset[k];
      // The padded rows' weights are read from the next diagonal's (or the plane's unused
      // tail); the left plane, the last, must not end before them.
      const DiagRange vec = padded(mine, whole, plane - layout.offset[k] - (mine.lo - whole.lo));
      backward_cells(vec, whole.lo, wd, wd + plane, wd + 2 * plane, up1, left[(k + 1) % 2],
                     diag2, e, up[k % 2], left[k % 2], diag[k % 3]);
      for (int64_t i = mine.lo; i <= mine.hi; ++i) {
        const int64_t row = i + off;
        dD[(row - 1) * Smax + (k - row - 1)] = static_cast<scalar_t>(g * e[i]);
      }
      set_sentinels(up[k % 2], whole, mine, 0.0);
      set_sentinels(left[k % 2], whole, mine, 0.0);
      set_sentinels(diag[k % 3], whole, mine, 0.0);
      if (mine.lo + off == rows.r0) {  // the top row: what it passes to the stripe above
        top_up[k - rows.r0] = up[k % 2][mine.lo];
        top_diag[k - rows.r0] = diag[k % 3][mine.lo];
      }
    }
    if (done != nullptr) done->publish(k);
  }
  if (done != nullptr) done->publish(std::numeric_limits<int64_t>::min());
}

// Zeros what the backward recursion will not write in a stripe's rows of one sample's dD:
// outside the band, the padding columns, and below the sample's last row (with its last stripe).
template <typename scalar_t>
void zero_outside(scalar_t* out, const StripeRows& rows, int64_t L, int64_t S, int64_t Lmax,
                  int64_t Smax, int64_t bandwidth) {
  for (int64_t i = rows.r0 - 1; i < rows.r1; ++i) {
    if (bandwidth >= 0) {
      std::fill(out + i * Smax, out + (i + 1) * Smax, scalar_t(0));
    } else if (S < Smax) {
      std::fill(out + i * Smax + S, out + (i + 1) * Smax, scalar_t(0));
    }
  }
  if (rows.r1 == L) std::fill(out + L * Smax, out + Lmax * Smax, scalar_t(0));
}

// Weights for soft_dtw_alignment_cpu, kept between calls up to kKeepBytes: a fresh buffer costs
// a page fault per 4 KB (13,000, ~15 ms, for one sample of 4500 x 1000 cells, as much as the
// forward's arithmetic), and a small one kept stays in cache. A concurrent call (or a forked
// child whose parent held the lock), or one that needs more, gets a buffer of its own.
template <typename weight_t>
class Scratch {
 public:
  static constexpr size_t kKeepBytes = size_t(64) << 20;

  explicit Scratch(int64_t n) : lock_(mutex(), std::try_to_lock) {
    if (lock_.owns_lock() && static_cast<size_t>(n) * sizeof(weight_t) <= kKeepBytes) {
      std::vector<weight_t>& k = kept();
      if (static_cast<int64_t>(k.size()) < n) k.resize(n);
      data_ = k.data();
    } else {
      if (lock_.owns_lock()) lock_.unlock();
      own_.reset(new weight_t[n]);
      data_ = own_.get();
    }
  }
  weight_t* data() const { return data_; }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::vector<weight_t>& kept() {
    static std::vector<weight_t> k;
    return k;
  }
  std::unique_lock<std::mutex> lock_;
  std::unique_ptr<weight_t[]> own_;
  weight_t* data_ = nullptr;
};

// The batch's forward and backward on `threads` threads, already planned (plan_threads): the
// public calls plan once, and soft_dtw_alignment_cpu, which runs both, plans once for the two.
template <typename scalar_t, typename weight_t>
void forward_batch(const scalar_t* D, const int64_t* x_len, const int64_t* y_len, int64_t B,
                   int64_t Lmax, int64_t Smax, double gamma, int64_t bandwidth, scalar_t* value,
                   weight_t* weights, int threads) {
  const int64_t slab = Lmax * Smax;
  const Stripes stripes(x_len, B, threads);
  std::deque<Progress> done;
  for (int64_t i = 0; i < stripes.size(); ++i) done.emplace_back(0);
  // Row r1 of every stripe (R by column), R[0, c] above each sample's first stripe.
  std::vector<double> rows_r((stripes.size() + B) * (Smax + 1), kInf);
  auto row_of = [&](int64_t item) { return rows_r.data() + item * (Smax + 1); };
  std::vector<DiagLayout> layouts;
  layouts.reserve(B);
  for (int64_t b = 0; b < B; ++b) {
    layouts.emplace_back(weights != nullptr ? x_len[b] : 0, weights != nullptr ? y_len[b] : 0,
                         bandwidth);
    row_of(stripes.size() + b)[0] = 0.0;  // R[0, 0]
  }
  run_items(stripes.size(), threads, [&](int64_t item, int) {
    const auto [b, s] = stripes.at(item);
    const int64_t L = x_len[b], S = y_len[b];
    weight_t* W = weights == nullptr ? nullptr : weights + b * slab * 3;
    const StripeRows rows(s, stripes.height[b], L, S);
    const bool first = s == 0;
    forward_stripe(D + b * slab, L, S, Smax, gamma, bandwidth, layouts[b], W, slab, rows,
                   first ? row_of(stripes.size() + b) : row_of(item - 1),
                   first ? nullptr : &done[item - 1], row_of(item),
                   s + 1 < stripes.count(b) ? &done[item] : nullptr, value + b);
    if (W != nullptr && rows.r1 == L) {
      // The unused tail of each plane: zero, so the output is deterministic. The stripes
      // above have finished (this one ran diagonal L + S after them).
      for (int64_t p = 0; p < 3; ++p) {
        std::fill(W + p * slab + layouts[b].offset[L + S + 1], W + (p + 1) * slab, weight_t(0));
      }
    }
  });
}

template <typename scalar_t, typename weight_t>
void backward_batch(const scalar_t* grad, const weight_t* weights, const int64_t* x_len,
                    const int64_t* y_len, int64_t B, int64_t Lmax, int64_t Smax,
                    int64_t bandwidth, scalar_t* dD, int threads) {
  const int64_t slab = Lmax * Smax;
  const Stripes stripes(x_len, B, threads);
  const int64_t n = stripes.size();
  std::deque<Progress> done;
  for (int64_t i = 0; i < n; ++i) done.emplace_back(std::numeric_limits<int64_t>::max());
  // Per stripe, what its top row passes up and diagonally (by column); per sample, below its
  // last row, the seed: E[L, S] = 1 reaches (L, S) as a diagonal pass from (L + 1, S + 1).
  std::vector<double> passed(2 * (n + B) * (Smax + 2), 0.0);
  auto up_of = [&](int64_t i) { return passed.data() + 2 * i * (Smax + 2); };
  auto diag_of = [&](int64_t i) { return up_of(i) + (Smax + 2); };
  std::vector<DiagLayout> layouts;
  layouts.reserve(B);
  for (int64_t b = 0; b < B; ++b) {
    layouts.emplace_back(x_len[b], y_len[b], bandwidth);
    diag_of(n + b)[y_len[b] + 1] = 1.0;
  }
  // Items in reverse: a sample's stripes bottom to top.
  run_items(n, threads, [&](int64_t reversed, int) {
    const int64_t item = n - 1 - reversed;
    const auto [b, s] = stripes.at(item);
    const int64_t L = x_len[b], S = y_len[b];
    scalar_t* out = dD + b * slab;
    const StripeRows rows(s, stripes.height[b], L, S);
    zero_outside(out, rows, L, S, Lmax, Smax, bandwidth);
    const bool last = s == stripes.count(b) - 1;
    backward_stripe(static_cast<double>(grad[b]), weights + b * slab * 3, slab, L, S, Smax,
                    bandwidth, layouts[b], rows, last ? up_of(n + b) : up_of(item + 1),
                    last ? diag_of(n + b) : diag_of(item + 1), last ? nullptr : &done[item + 1],
                    up_of(item), diag_of(item), s > 0 ? &done[item] : nullptr, out);
  });
}

}  // namespace

template <typename scalar_t, typename weight_t>
void soft_dtw_forward_cpu(const scalar_t* D, const int64_t* x_len, const int64_t* y_len,
                          int64_t B, int64_t Lmax, int64_t Smax, double gamma,
                          int64_t bandwidth, scalar_t* value, weight_t* weights,
                          int num_threads) {
  forward_batch(D, x_len, y_len, B, Lmax, Smax, gamma, bandwidth, value, weights,
                plan_threads(num_threads));
}

template <typename scalar_t, typename weight_t>
void soft_dtw_backward_cpu(const scalar_t* grad, const weight_t* weights,
                           const int64_t* x_len, const int64_t* y_len, int64_t B,
                           int64_t Lmax, int64_t Smax, int64_t bandwidth, scalar_t* dD,
                           int num_threads) {
  backward_batch(grad, weights, x_len, y_len, B, Lmax, Smax, bandwidth, dD,
                 plan_threads(num_threads));
}

template <typename scalar_t, typename weight_t>
void soft_dtw_alignment_cpu(const scalar_t* D, const int64_t* x_len, const int64_t* y_len,
                            int64_t B, int64_t Lmax, int64_t Smax, double gamma,
                            int64_t bandwidth, scalar_t* value, scalar_t* E, int num_threads) {
  const int64_t slab = Lmax * Smax;
  const int threads = plan_threads(num_threads);
  const Stripes stripes(x_len, B, threads);
  if (stripes.size() > B) {
    // Samples cut into stripes: the two passes one after the other, each across the threads,
    // through a batch of weights.
    const Scratch<weight_t> weights(B * slab * 3);
    const std::vector<scalar_t> ones(B, scalar_t(1));
    forward_batch(D, x_len, y_len, B, Lmax, Smax, gamma, bandwidth, value, weights.data(),
                  threads);
    backward_batch(ones.data(), weights.data(), x_len, y_len, B, Lmax, Smax, bandwidth, E,
                   threads);
    return;
  }
  // Whole samples: each runs its forward and then its backward through weights of its own,
  // which stay in the core's cache between the two (at Lyra's LCMR sizes, 300 x 60 cells take
  // 216 KB), instead of going out to memory as a batch and coming back. One slice of the
  // scratch per thread, allocated here: nothing inside the threads' items can fail to allocate
  // a large buffer.
  int64_t cells = 0;
  for (int64_t b = 0; b < B; ++b) cells = std::max(cells, 3 * x_len[b] * y_len[b]);
  const Scratch<weight_t> scratch(Threads::team(B, threads) * cells);
  run_items(B, threads, [&](int64_t b, int slot) {
    const int64_t L = x_len[b], S = y_len[b];
    const int64_t plane = L * S;
    weight_t* W = scratch.data() + slot * cells;
    const DiagLayout layout(L, S, bandwidth);
    const StripeRows rows(0, L, L, S);
    std::vector<double> edge(4 * (S + 2), 0.0);  // R's row 0; the bottom row; two passed rows
    double* r0 = edge.data();
    std::fill(r0, r0 + S + 1, kInf);
    r0[0] = 0.0;  // R[0, 0]
    forward_stripe(D + b * slab, L, S, Smax, gamma, bandwidth, layout, W, plane, rows, r0,
                   nullptr, edge.data() + (S + 2), nullptr, value + b);
    // The seed below the last row: E[L, S] = 1, a diagonal pass from (L + 1, S + 1).
    double* below_up = edge.data() + 2 * (S + 2);
    double* below_diag = edge.data() + 3 * (S + 2);
    below_diag[S + 1] = 1.0;
    scalar_t* out = E + b * slab;
    zero_outside(out, rows, L, S, Lmax, Smax, bandwidth);
    std::vector<double> top(2 * (S + 2), 0.0);  // nobody above reads it
    backward_stripe(1.0, W, plane, L, S, Smax, bandwidth, layout, rows, below_up, below_diag,
                    nullptr, top.data(), top.data() + (S + 2), nullptr, out);
  });
}

template <typename scalar_t>
void soft_dtw_scale_cpu(const scalar_t* grad, const scalar_t* E, int64_t B, int64_t slab,
                        scalar_t* out, int num_threads) {
  Threads::get().run(B, plan_threads(num_threads), [&](int64_t b, int) {
    const scalar_t g = grad[b];
    const scalar_t* e = E + b * slab;
    scalar_t* o = out + b * slab;
    for (int64_t i = 0; i < slab; ++i) o[i] = g * e[i];
  }, /*judged=*/false);
}

#define LYRA_INSTANTIATE(scalar_t, weight_t)                                               \
  template void soft_dtw_forward_cpu<scalar_t, weight_t>(                                \
      const scalar_t*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, double, \
      int64_t, scalar_t*, weight_t*, int);                                                \
  template void soft_dtw_backward_cpu<scalar_t, weight_t>(                               \
      const scalar_t*, const weight_t*, const int64_t*, const int64_t*, int64_t, int64_t, \
      int64_t, int64_t, scalar_t*, int);                                                  \
  template void soft_dtw_alignment_cpu<scalar_t, weight_t>(                              \
      const scalar_t*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, double, \
      int64_t, scalar_t*, scalar_t*, int);                                                \
  template void soft_dtw_scale_cpu<scalar_t>(const scalar_t*, const scalar_t*, int64_t,   \
                                             int64_t, scalar_t*, int);
LYRA_INSTANTIATE(float, float)
LYRA_INSTANTIATE(double, double)
#undef LYRA_INSTANTIATE

}  // namespace lyra

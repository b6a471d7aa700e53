// Batched soft-DTW on CUDA: forward (value + soft-min weights) and backward (E recursion).
//
// One thread block per sample walks the anti-diagonals d = i + j of its (L, S) cost matrix
// (0-based D cells); the cells of one diagonal are independent, so the block's threads
// split its rows i and meet at a barrier before the next diagonal. Only three diagonals are
// live at a time (d, d-1, d-2 forward; d, d+1, d+2 backward), kept as double in dynamic shared
// memory when they fit, else in the caller's workspace (global memory). Any lengths work; cost
// is O(L * S) work and O(L + S) barriers per sample.
//
// A live diagonal is stored compactly: cell (i, d - i) lives at slot i - lo(d), lo(d) being the
// first row of diagonal d inside the sample and the band. A diagonal holds at most min(L, S)
// cells, so a slot array of min(Lmax, Smax) doubles per diagonal always suffices.
//
// Memory layout (soft_dtw.h): the weights have the CPU backend's layout, three planes (diag,
// up, left) of Lmax * Smax entries per sample, each holding the valid cells packed diagonal by
// diagonal (rows ascending), then zeros. A diagonal's cells are adjacent there, so a warp's
// weight stores (forward) and loads (backward) are coalesced. D and dD keep the (B, Lmax, Smax)
// layout of the caller: one element per thread per diagonal at stride Smax - 1. While it
// computes diagonal d, the forward loads (into a register) the cost of its first cell of
// diagonal d + 1, and the backward asks L1 (prefetch hint) for the successor weights of its
// first cell of diagonal d - 1, so that the load latency overlaps the diagonal's work and
// barrier instead of adding to it.
//
// Backward accuracy: each successor's three stored weights are divided by their sum (in
// double) before use. In exact arithmetic they sum to 1; rounded to float32 they do not (a
// weight just below 1 rounds up to 1, so the error has a sign), and an unnormalized E
// (a sum over paths of products of L + S weights) drifts by up to (L + S) x 6e-8 relative.
// Normalized, the backward is a Markov chain whose transition probabilities sum to 1, E[c]
// the probability that its path visits c, and a float32 rounding only moves a little mass
// between neighbouring paths: the error stays ~1e-8 absolute at any L + S (tests:
// test_kernels_cuda.cu "dD float32 vs float64", test_soft_dtw.py
// test_float32_long_sequence_accuracy).
//
// NaN: a NaN predecessor (or +inf next to -inf) makes the cell's R and all three of its weights
// NaN, exactly as on the CPU, so a NaN cost reaches dD the same way on both backends.
//
// Cells outside the sample or the band are never computed; the entries of dD there and the
// unused tail of each weight plane are zeroed by separate, fully parallel kernels (the outputs
// come from torch.empty and must read exactly 0).
//
// The per-block bodies (forward_sample, backward_sample) are __host__ __device__ and take the
// thread index, the block size and the barrier as arguments: the kernels pass threadIdx.x,
// blockDim.x and __syncthreads(); a host harness can run the same code with one host thread
// per CUDA thread to check the indexing without a GPU.
//
// Testing switch: LYRA_SOFT_DTW_GLOBAL_SCRATCH=1 forces the global-memory path even when
// the diagonals fit in shared memory, so tests can cover it on small inputs.
#include "soft_dtw.h"
#include "../cuda_try.h"

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>

namespace lyra {
namespace {

constexpr int kZeroThreads = 256;
constexpr int kMaxThreads = 1024;
constexpr int kDefaultSmemBytes = 48 * 1024;  // usable without opting in
constexpr int64_t kZeroChunk = 16 * kZeroThreads;  // weight-plane entries per zeroing step

__host__ __device__ inline double inf_value() { return HUGE_VAL; }
__host__ __device__ inline double nan_value() { return static_cast<double>(NAN); }
__host__ __device__ inline bool is_nan(double x) { return x != x; }
__host__ __device__ inline int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ inline int imax(int a, int b) { return a > b ? a : b; }
__host__ __device__ inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }

__host__ __device__ inline bool in_band(int i, int j, int bandwidth) {
  return bandwidth < 0 || (i - j <= bandwidth && j - i <= bandwidth);
}

// Rows [lo, hi] of anti-diagonal d that lie in [0, L) x [0, S) and in the band
// (empty when lo > hi). |i - (d - i)| <= bw  <=>  ceil((d - bw) / 2) <= i <= floor((d + bw) / 2).
// d + bw is formed in 64 bits: both may be close to INT_MAX.
struct RowRange {
  int lo, hi;
  __host__ __device__ int count() const { return hi >= lo ? hi - lo + 1 : 0; }
};
__host__ __device__ inline RowRange diagonal_rows(int d, int L, int S, int bandwidth) {
  RowRange r{imax(0, d - (S - 1)), imin(d, L - 1)};
  if (bandwidth >= 0) {
    if (d - bandwidth > 0) r.lo = imax(r.lo, (d - bandwidth + 1) / 2);
    // d + bandwidth >= 0, so / is floor; the result is >= r.hi or fits in int.
    r.hi = static_cast<int>(lmin(r.hi, (static_cast<int64_t>(d) + bandwidth) / 2));
  }
  return r;
}

// 1 + 2 + ... + n, capped at `cap` per term: sum over t = 1..n of min(t, cap). 0 for n <= 0.
__host__ __device__ inline int64_t capped_triangle(int64_t n, int64_t cap) {
  if (n <= 0) return 0;
  if (n <= cap) return n * (n + 1) / 2;
  return cap * (cap + 1) / 2 + (n - cap) * cap;
}

// Cells of the L x S matrix inside the band: the packed length of each weight plane. The band
// cuts off two corners: the cells with j - i > bw (for column j = bw + t, t = 1..S-1-bw, the
// rows 0..min(L, t) - 1) and, symmetrically, those with i - j > bw.
__host__ __device__ inline int64_t valid_cells(int L, int S, int bandwidth) {
  const int64_t cells = static_cast<int64_t>(L) * S;
  if (bandwidth < 0) return cells;
  return cells - capped_triangle(static_cast<int64_t>(S) - 1 - bandwidth, L) -
         capped_triangle(static_cast<int64_t>(L) - 1 - bandwidth, S);
}

// Sample lengths, clamped so that out-of-contract values cannot index out of bounds.
__host__ __device__ inline void sample_lengths(const int64_t* x_len, const int64_t* y_len,
                                               int64_t b, int Lmax, int Smax, int& L, int& S) {
  L = static_cast<int>(lmin(lmax(x_len[b], int64_t(0)), int64_t(Lmax)));
  S = static_cast<int>(lmin(lmax(y_len[b], int64_t(0)), int64_t(Smax)));
}

// What every per-block body gets: one sample's arguments.
template <typename scalar_t, typename weight_t>
struct SoftDtwArgs {
  const scalar_t* D;      // forward: (B, Lmax, Smax) costs
  const scalar_t* grad;   // backward: (B)
  const int64_t* x_len;
  const int64_t* y_len;
  int Lmax, Smax, bandwidth, slot;  // slot: doubles per live diagonal
  double gamma;
  scalar_t* value;        // forward: (B)
  weight_t* weights;      // (B, 3, Lmax * Smax) planes; nullptr: forward stores none
  scalar_t* dD;           // backward: (B, Lmax, Smax)
  double* scratch;        // B x 3 x slot doubles, or nullptr: the caller's shared memory
};

// The forward recursion of sample b, run by thread `tid` of `nthreads`; `diagonals` holds
// 3 * slot doubles shared by the block, `sync()` is the block's barrier.
template <typename scalar_t, typename weight_t, typename Sync>
__host__ __device__ void forward_sample(const SoftDtwArgs<scalar_t, weight_t>& a, int64_t b,
                                        int tid, int nthreads, double* diagonals, Sync sync) {
  int L, S;
  sample_lengths(a.x_len, a.y_len, b, a.Lmax, a.Smax, L, S);
  const double inf = inf_value();
  if (L == 0 || S == 0) {  // out of contract: no cell, no value
    if (tid == 0) a.value[b] = static_cast<scalar_t>(nan_value());
    return;
  }
  const int bw = a.bandwidth;
  // The end cell outside the band is out of contract too: it is never reached, R is +inf.
  if (tid == 0 && !in_band(L - 1, S - 1, bw)) a.value[b] = static_cast<scalar_t>(inf);

  const int64_t plane = static_cast<int64_t>(a.Lmax) * a.Smax;
  const scalar_t* Db = a.D + b * plane;
  weight_t* Wb = a.weights != nullptr ? a.weights + b * 3 * plane : nullptr;
  auto cost_at = [&](int i, int d) {
    return static_cast<double>(Db[static_cast<int64_t>(i) * a.Smax + (d - i)]);
  };

  const int last = L + S - 2;
  RowRange rows = diagonal_rows(0, L, S, bw);
  RowRange rows1{0, -1}, rows2{0, -1};  // rows of diagonals d-1 and d-2
  int64_t off = 0;                       // packed index of diagonal d's first cell
  double next_cost = rows.lo + tid <= rows.hi ? cost_at(rows.lo + tid, 0) : 0.0;
  for (int d = 0; d <= last; ++d) {
    // This thread's first cell of d + 1: its cost is loaded now, used after the barrier.
    const double first_cost = next_cost;
    const RowRange next_rows = d < last ? diagonal_rows(d + 1, L, S, bw) : RowRange{0, -1};
    if (next_rows.lo + tid <= next_rows.hi) next_cost = cost_at(next_rows.lo + tid, d + 1);

    double* cur = diagonals + (d % 3) * a.slot;
    const double* prev1 = diagonals + ((d + 2) % 3) * a.slot;  // diagonal d-1
    const double* prev2 = diagonals + ((d + 1) % 3) * a.slot;  // diagonal d-2
    for (int i = rows.lo + tid; i <= rows.hi; i += nthreads) {
      const int j = d - i;
      // Predecessors R[i-1,j-1], R[i-1,j], R[i,j-1] of cell (i, j); +inf on the R border
      // (except R[0,0] = 0) and outside the band. (i-1, j-1) is in the band when (i, j) is.
      const double r_diag = (i == 0 && j == 0) ? 0.0
                            : (i > 0 && j > 0) ? prev2[(i - 1) - rows2.lo]
                                               : inf;
      const double r_up = (i > 0 && in_band(i - 1, j, bw)) ? prev1[(i - 1) - rows1.lo] : inf;
      const double r_left = (j > 0 && in_band(i, j - 1, bw)) ? prev1[i - rows1.lo] : inf;
      const double cost = i == rows.lo + tid ? first_cost : cost_at(i, d);
      // softmin_gamma = m - gamma * log(sum_k exp(-(r_k - m) / gamma)), m = min; a +inf
      // predecessor contributes exactly 0 (tested, never computed: inf - inf is NaN).
      double r, w_diag = 0.0, w_up = 0.0, w_left = 0.0;
      if (is_nan(r_diag + r_up + r_left)) {
        // A NaN predecessor (or +inf beside -inf): R and all three weights NaN, as on the CPU
        // (fmin below would skip the NaN), so bad input stays visible in value and gradient.
        r = w_diag = w_up = w_left = nan_value();
      } else {
        const double m = fmin(fmin(r_diag, r_up), r_left);
        if (m == inf) {
          r = inf;  // no reachable predecessor (a valid cell never sees this): weights 0
        } else {
          const double e_diag = r_diag != inf ? exp((m - r_diag) / a.gamma) : 0.0;
          const double e_up = r_up != inf ? exp((m - r_up) / a.gamma) : 0.0;
          const double e_left = r_left != inf ? exp((m - r_left) / a.gamma) : 0.0;
          const double sum = e_diag + e_up + e_left;  // in [1, 3]: the minimum contributes 1
          r = cost + m - a.gamma * log(sum);
          w_diag = e_diag / sum;
          w_up = e_up / sum;
          w_left = e_left / sum;
        }
      }
      cur[i - rows.lo] = r;
      if (Wb != nullptr) {
        const int64_t p = off + (i - rows.lo);
        Wb[kDiag * plane + p] = static_cast<weight_t>(w_diag);
        Wb[kUp * plane + p] = static_cast<weight_t>(w_up);
        Wb[kLeft * plane + p] = static_cast<weight_t>(w_left);
      }
      if (i == L - 1 && j == S - 1) a.value[b] = static_cast<scalar_t>(r);
    }
    // Diagonal d must be complete before d+1 reads it; and d+1 overwrites the slots of
    // d-2, which must no longer be read. One barrier per diagonal covers both.
    sync();
    off += rows.count();
    rows2 = rows1;
    rows1 = rows;
    rows = next_rows;
  }
}

// Where a cell's three successors' weights are: packed index in a plane, or -1 when the
// successor is outside the sample or the band. [kDiag]: (i+1, j+1) on diagonal d+2;
// [kUp]: (i+1, j) and [kLeft]: (i, j+1) on diagonal d+1.
struct Successors {
  int64_t at[3];
};

// Rows and packed offsets of the two diagonals after d, which hold a cell's successors.
struct Following {
  RowRange rows1, rows2;  // diagonals d+1, d+2
  int64_t off1, off2;
};

__host__ __device__ inline Successors successors(int i, int j, int L, int S, int bw,
                                                 const Following& f) {
  Successors s;
  // (i+1, j+1) has the same |i - j|, so it is in the band when (i, j) is.
  s.at[kDiag] = (i + 1 < L && j + 1 < S) ? f.off2 + (i + 1 - f.rows2.lo) : -1;
  s.at[kUp] = (i + 1 < L && in_band(i + 1, j, bw)) ? f.off1 + (i + 1 - f.rows1.lo) : -1;
  s.at[kLeft] = (j + 1 < S && in_band(i, j + 1, bw)) ? f.off1 + (i - f.rows1.lo) : -1;
  return s;
}

// A hint to bring the line holding *p into L1 (no-op on the host). Only valid addresses.
__host__ __device__ inline void prefetch_l1(const void* p) {
#ifdef __CUDA_ARCH__
  asm volatile("prefetch.L1 [%0];" ::"l"(p));
#else
  (void)p;
#endif
}

// E[i,j] = sum over successors s of (weight of s towards (i, j)) / (sum of s's weights) * E[s]:
// next1 / next2 are E on diagonals d+1 / d+2 by slot (packed index minus the diagonal's offset).
// A sum of 0 (a successor none of whose predecessors is reachable: only +inf costs make one)
// keeps its weight 0; a NaN sum keeps it NaN.
template <typename weight_t>
__host__ __device__ inline double pull_e(const weight_t* Wb, int64_t plane, const Successors& s,
                                         const double* next1, const double* next2,
                                         const Following& f) {
  double e = 0.0;
  for (int k = 0; k < 3; ++k) {
    if (s.at[k] < 0) continue;
    const weight_t* w = Wb + s.at[k];
    const double w_diag = static_cast<double>(w[kDiag * plane]);
    const double w_up = static_cast<double>(w[kUp * plane]);
    const double w_left = static_cast<double>(w[kLeft * plane]);
    const double sum = w_diag + w_up + w_left;
    const double w_k = k == kDiag ? w_diag : k == kUp ? w_up : w_left;  // towards (i, j)
    const double e_next = k == kDiag ? next2[s.at[k] - f.off2] : next1[s.at[k] - f.off1];
    e += (sum > 0.0 ? w_k / sum : w_k) * e_next;
  }
  return e;
}

// The backward recursion (E) of sample b: same conventions as forward_sample.
template <typename scalar_t, typename weight_t, typename Sync>
__host__ __device__ void backward_sample(const SoftDtwArgs<scalar_t, weight_t>& a, int64_t b,
                                         int tid, int nthreads, double* diagonals, Sync sync) {
  int L, S;
  sample_lengths(a.x_len, a.y_len, b, a.Lmax, a.Smax, L, S);
  if (L == 0 || S == 0) return;
  const int bw = a.bandwidth;
  const int64_t plane = static_cast<int64_t>(a.Lmax) * a.Smax;
  const weight_t* Wb = a.weights + b * 3 * plane;
  scalar_t* dDb = a.dD + b * plane;
  const double g = static_cast<double>(a.grad[b]);

  const int last = L + S - 2;
  RowRange rows = diagonal_rows(last, L, S, bw);
  const int64_t total = valid_cells(L, S, bw);
  int64_t off = total - rows.count();  // packed index of diagonal d's first cell (d = last)
  // Diagonals d+1 and d+2 do not exist yet: no cell, offset past the last packed cell.
  Following f{RowRange{0, -1}, RowRange{0, -1}, total, total};
  for (int d = last; d >= 0; --d) {
    // The successors' weights of this thread's first cell of d - 1 (on diagonals d and d+1),
    // asked into L1 now, read after the barrier.
    const RowRange next_rows = d > 0 ? diagonal_rows(d - 1, L, S, bw) : RowRange{0, -1};
    const Following f_next{rows, f.rows1, off, f.off1};
    if (next_rows.lo + tid <= next_rows.hi) {
      const int i = next_rows.lo + tid;
      const Successors s = successors(i, d - 1 - i, L, S, bw, f_next);
      for (int k = 0; k < 3; ++k) {
        if (s.at[k] < 0) continue;
        for (int q = 0; q < 3; ++q) prefetch_l1(Wb + q * plane + s.at[k]);
      }
    }

    double* cur = diagonals + (d % 3) * a.slot;
    const double* next1 = diagonals + ((d + 1) % 3) * a.slot;  // diagonal d+1
    const double* next2 = diagonals + ((d + 2) % 3) * a.slot;  // diagonal d+2
    for (int i = rows.lo + tid; i <= rows.hi; i += nthreads) {
      const int j = d - i;
      const double e = (i == L - 1 && j == S - 1)  // E[L-1, S-1] = 1
                           ? 1.0
                           : pull_e(Wb, plane, successors(i, j, L, S, bw, f), next1, next2, f);
      cur[i - rows.lo] = e;
      dDb[static_cast<int64_t>(i) * a.Smax + j] = static_cast<scalar_t>(g * e);
    }
    sync();  // same reasoning as in the forward
    f = f_next;
    rows = next_rows;
    off -= rows.count();
  }
}

// The barrier of a CUDA thread block (the bodies above take it as an argument).
struct BlockBarrier {
  __device__ void operator()() const { __syncthreads(); }
};

template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(kMaxThreads)
    soft_dtw_forward_kernel(const SoftDtwArgs<scalar_t, weight_t> a) {
  extern __shared__ double smem_diagonals[];
  const int64_t b = blockIdx.x;
  double* diagonals = a.scratch != nullptr ? a.scratch + b * 3 * a.slot : smem_diagonals;
  forward_sample(a, b, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), diagonals,
                 BlockBarrier{});
}

template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(kMaxThreads)
    soft_dtw_backward_kernel(const SoftDtwArgs<scalar_t, weight_t> a) {
  extern __shared__ double smem_diagonals[];
  const int64_t b = blockIdx.x;
  double* diagonals = a.scratch != nullptr ? a.scratch + b * 3 * a.slot : smem_diagonals;
  backward_sample(a, b, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), diagonals,
                  BlockBarrier{});
}

// Zeroes the entries of dD (B, Lmax, Smax) whose cell is outside the sample or the band; the
// valid ones are left to the backward kernel. Block `block` of `blocks` takes rows (b, i)
// block, block + blocks, ...
template <typename T>
__host__ __device__ void zero_outside_rows(T* out, const int64_t* x_len, const int64_t* y_len,
                                           int64_t B, int Lmax, int Smax, int bandwidth,
                                           int64_t block, int64_t blocks, int tid, int nthreads) {
  for (int64_t row = block; row < B * Lmax; row += blocks) {
    const int64_t b = row / Lmax;
    const int i = static_cast<int>(row % Lmax);
    int L, S;
    sample_lengths(x_len, y_len, b, Lmax, Smax, L, S);
    int64_t jlo = 0, jhi = -1;  // valid columns of this row; none when i >= L
    if (i < L) {
      jhi = S - 1;
      if (bandwidth >= 0) {
        jlo = lmax(jlo, static_cast<int64_t>(i) - bandwidth);
        jhi = lmin(jhi, static_cast<int64_t>(i) + bandwidth);
      }
    }
    T* out_row = out + row * Smax;
    for (int j = tid; j < Smax; j += nthreads) {
      if (j < jlo || j > jhi) out_row[j] = T(0);
    }
  }
}

// Zeroes each weight plane past its sample's valid cells: [valid_cells, Lmax * Smax). The
// planes are cut into chunks of kZeroChunk entries; block `block` of `blocks` takes chunks
// block, block + blocks, ... (so one long plane keeps the whole grid busy).
template <typename T>
__host__ __device__ void zero_weight_tails(T* weights, const int64_t* x_len,
                                           const int64_t* y_len, int64_t B, int Lmax, int Smax,
                                           int bandwidth, int64_t block, int64_t blocks, int tid,
                                           int nthreads) {
  const int64_t plane = static_cast<int64_t>(Lmax) * Smax;
  const int64_t chunks = (plane + kZeroChunk - 1) / kZeroChunk;  // per plane
  for (int64_t c = block; c < B * 3 * chunks; c += blocks) {
    const int64_t plane_index = c / chunks;  // b * 3 + k
    const int64_t b = plane_index / 3;
    int L, S;
    sample_lengths(x_len, y_len, b, Lmax, Smax, L, S);
    const int64_t valid = L == 0 || S == 0 ? 0 : valid_cells(L, S, bandwidth);
    const int64_t from = lmax(valid, (c % chunks) * kZeroChunk);
    const int64_t to = lmin(plane, (c % chunks + 1) * kZeroChunk);
    T* p = weights + plane_index * plane;
    for (int64_t e = from + tid; e < to; e += nthreads) p[e] = T(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kZeroThreads)
    zero_outside_kernel(T* out, const int64_t* x_len, const int64_t* y_len, int64_t B, int Lmax,
                        int Smax, int bandwidth) {
  zero_outside_rows(out, x_len, y_len, B, Lmax, Smax, bandwidth, blockIdx.x, gridDim.x,
                    static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
}

template <typename T>
__global__ void __launch_bounds__(kZeroThreads)
    zero_weight_tails_kernel(T* weights, const int64_t* x_len, const int64_t* y_len, int64_t B,
                             int Lmax, int Smax, int bandwidth) {
  zero_weight_tails(weights, x_len, y_len, B, Lmax, Smax, bandwidth, blockIdx.x, gridDim.x,
                    static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
}

int zero_grid(int64_t items) { return static_cast<int>(items < 65536 ? (items > 0 ? items : 1) : 65536); }

// Threads per block: enough for one diagonal of the longest sample, 256 to 1024.
int block_threads(int slot) {
  if (slot <= 256) return 256;
  if (slot <= 512) return 512;
  return kMaxThreads;
}

// The kernels index rows, columns and diagonals with int (element offsets are int64).
bool sizes_ok(int64_t B, int64_t Lmax, int64_t Smax) {
  return B >= 0 && B <= INT_MAX && Lmax >= 0 && Smax >= 0 && Lmax + Smax < INT_MAX;
}

// A band at least Lmax + Smax wide excludes no cell: it is no band (as in the torch glue). That
// also keeps every band the kernels see below INT_MAX.
int normalized_band(int64_t bandwidth, int64_t Lmax, int64_t Smax) {
  return bandwidth < 0 || bandwidth >= Lmax + Smax ? -1 : static_cast<int>(bandwidth);
}

// Where the three live diagonals of each sample go: dynamic shared memory when 3 * slot
// doubles fit in a block's opt-in limit (and the testing switch is off), else the workspace.
template <typename Kernel>
cudaError_t place_diagonals(Kernel kernel, int slot, void* workspace, size_t* smem_bytes,
                            double** scratch) {
  const size_t bytes = size_t(3) * size_t(slot) * sizeof(double);
  int device = 0, optin = 0;
  LYRA_CUDA_TRY(cudaGetDevice(&device));
  LYRA_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const char* force = std::getenv("LYRA_SOFT_DTW_GLOBAL_SCRATCH");
  const bool force_global = force != nullptr && force[0] != '\0' && force[0] != '0';
  if (!force_global && bytes <= static_cast<size_t>(optin)) {
    if (bytes > static_cast<size_t>(kDefaultSmemBytes)) {
      LYRA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes)));
    }
    *smem_bytes = bytes;
    *scratch = nullptr;
    return cudaSuccess;
  }
  if (workspace == nullptr) return cudaErrorInvalidValue;
  *smem_bytes = 0;
  *scratch = static_cast<double*>(workspace);
  return cudaSuccess;
}

}  // namespace

int64_t soft_dtw_cuda_workspace(int64_t B, int64_t Lmax, int64_t Smax) {
  return 3 * B * (Lmax < Smax ? Lmax : Smax) * static_cast<int64_t>(sizeof(double));
}

template <typename scalar_t, typename weight_t>
int soft_dtw_forward_cuda(const scalar_t* D, const int64_t* x_len, const int64_t* y_len,
                          int64_t B, int64_t Lmax, int64_t Smax, double gamma,
                          int64_t bandwidth, scalar_t* value, weight_t* weights,
                          void* workspace, void* stream) {
  if (!sizes_ok(B, Lmax, Smax)) return cudaErrorInvalidValue;
  if (B == 0 || Lmax == 0 || Smax == 0) return cudaSuccess;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  SoftDtwArgs<scalar_t, weight_t> a{};
  a.D = D;
  a.x_len = x_len;
  a.y_len = y_len;
  a.Lmax = static_cast<int>(Lmax);
  a.Smax = static_cast<int>(Smax);
  a.bandwidth = normalized_band(bandwidth, Lmax, Smax);
  a.slot = static_cast<int>(Lmax < Smax ? Lmax : Smax);
  a.gamma = gamma;
  a.value = value;
  a.weights = weights;
  if (weights != nullptr) {
    const int64_t chunks = B * 3 * ((Lmax * Smax + kZeroChunk - 1) / kZeroChunk);
    zero_weight_tails_kernel<weight_t><<<zero_grid(chunks), kZeroThreads, 0, s>>>(
        weights, x_len, y_len, B, a.Lmax, a.Smax, a.bandwidth);
    LYRA_CUDA_TRY(cudaGetLastError());
  }
  auto kernel = soft_dtw_forward_kernel<scalar_t, weight_t>;
  size_t smem_bytes = 0;
  LYRA_CUDA_TRY(place_diagonals(kernel, a.slot, workspace, &smem_bytes, &a.scratch));
  kernel<<<static_cast<unsigned>(B), block_threads(a.slot), smem_bytes, s>>>(a);
  return cudaGetLastError();
}

template <typename scalar_t, typename weight_t>
int soft_dtw_backward_cuda(const scalar_t* grad, const weight_t* weights,
                           const int64_t* x_len, const int64_t* y_len, int64_t B,
                           int64_t Lmax, int64_t Smax, int64_t bandwidth, scalar_t* dD,
                           void* workspace, void* stream) {
  if (!sizes_ok(B, Lmax, Smax)) return cudaErrorInvalidValue;
  if (B == 0 || Lmax == 0 || Smax == 0) return cudaSuccess;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  SoftDtwArgs<scalar_t, weight_t> a{};
  a.grad = grad;
  a.x_len = x_len;
  a.y_len = y_len;
  a.Lmax = static_cast<int>(Lmax);
  a.Smax = static_cast<int>(Smax);
  a.bandwidth = normalized_band(bandwidth, Lmax, Smax);
  a.slot = static_cast<int>(Lmax < Smax ? Lmax : Smax);
  a.weights = const_cast<weight_t*>(weights);  // read only
  a.dD = dD;
  zero_outside_kernel<scalar_t><<<zero_grid(B * Lmax), kZeroThreads, 0, s>>>(
      dD, x_len, y_len, B, a.Lmax, a.Smax, a.bandwidth);
  LYRA_CUDA_TRY(cudaGetLastError());
  auto kernel = soft_dtw_backward_kernel<scalar_t, weight_t>;
  size_t smem_bytes = 0;
  LYRA_CUDA_TRY(place_diagonals(kernel, a.slot, workspace, &smem_bytes, &a.scratch));
  kernel<<<static_cast<unsigned>(B), block_threads(a.slot), smem_bytes, s>>>(a);
  return cudaGetLastError();
}

#define LYRA_INSTANTIATE_SOFT_DTW(scalar_t, weight_t)                                        \
  template int soft_dtw_forward_cuda<scalar_t, weight_t>(                                    \
      const scalar_t*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, double,    \
      int64_t, scalar_t*, weight_t*, void*, void*);                                          \
  template int soft_dtw_backward_cuda<scalar_t, weight_t>(                                   \
      const scalar_t*, const weight_t*, const int64_t*, const int64_t*, int64_t, int64_t,    \
      int64_t, int64_t, scalar_t*, void*, void*);

LYRA_INSTANTIATE_SOFT_DTW(float, float)
LYRA_INSTANTIATE_SOFT_DTW(double, double)

}  // namespace lyra

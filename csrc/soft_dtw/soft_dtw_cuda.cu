// Batched soft-DTW on CUDA: forward (value + soft-min weights) and backward (E recursion).
//
// One thread block per sample walks the anti-diagonals d = i + j of its (L, S) cost matrix
// (0-based D cells); the cells of one diagonal are independent, so the block's threads
// split its rows i and meet at a __syncthreads() before the next diagonal. Only three
// diagonals are live at a time (d, d-1, d-2 forward; d, d+1, d+2 backward), kept as double
// in dynamic shared memory when they fit, else in global scratch taken from the stream's
// memory pool. Any lengths work; cost is O(L * S) work and O(L + S) barriers per sample.
//
// A diagonal is stored compactly: cell (i, d - i) lives at slot i - lo(d), lo(d) being the
// first row of diagonal d inside the sample and the band. A diagonal holds at most
// min(L, S) cells, so a slot array of min(Lmax, Smax) doubles per diagonal always suffices.
//
// Cells outside the sample or the band are never computed; the entries of `weights` and
// `dD` there are zeroed by a separate, fully parallel kernel (the outputs come from
// torch.empty and must read exactly 0).
//
// Testing switch: LYRA_SOFT_DTW_GLOBAL_SCRATCH=1 forces the global-memory path even when
// the diagonals fit in shared memory, so tests can cover it on small inputs.
#include "soft_dtw.h"
#include "../cuda_try.h"

#include <cuda_runtime.h>
#include <math_constants.h>

#include <climits>
#include <cstdint>
#include <cstdlib>

namespace lyra {
namespace {

constexpr int kZeroThreads = 256;
constexpr int kDefaultSmemBytes = 48 * 1024;  // usable without opting in

__device__ __forceinline__ bool in_band(int i, int j, int bandwidth) {
  return bandwidth < 0 || (i - j <= bandwidth && j - i <= bandwidth);
}

// Rows [lo, hi] of anti-diagonal d that lie in [0, L) x [0, S) and in the band
// (empty when lo > hi). |i - (d - i)| <= bw  <=>  ceil((d - bw) / 2) <= i <= floor((d + bw) / 2).
struct RowRange {
  int lo, hi;
};
__device__ __forceinline__ RowRange diagonal_rows(int d, int L, int S, int bandwidth) {
  RowRange r{max(0, d - (S - 1)), min(d, L - 1)};
  if (bandwidth >= 0) {
    if (d - bandwidth > 0) r.lo = max(r.lo, (d - bandwidth + 1) / 2);
    r.hi = min(r.hi, (d + bandwidth) / 2);  // d + bandwidth >= 0, so / is floor
  }
  return r;
}

// Sample lengths, clamped so that out-of-contract values cannot index out of bounds.
__device__ __forceinline__ void sample_lengths(const int64_t* x_len, const int64_t* y_len,
                                               int64_t b, int Lmax, int Smax, int& L, int& S) {
  L = static_cast<int>(min(max(x_len[b], int64_t(0)), int64_t(Lmax)));
  S = static_cast<int>(min(max(y_len[b], int64_t(0)), int64_t(Smax)));
}

// Zeroes the entries of out (B, Lmax, Smax, C) whose cell is outside the sample or band.
// One block per row (b, i) in a grid-stride loop; valid entries are left to the DP kernels.
template <typename T, int C>
__global__ void __launch_bounds__(kZeroThreads)
    zero_outside_kernel(T* out, const int64_t* x_len, const int64_t* y_len, int64_t B, int Lmax,
                        int Smax, int bandwidth) {
  for (int64_t row = blockIdx.x; row < B * Lmax; row += gridDim.x) {
    const int64_t b = row / Lmax;
    const int i = static_cast<int>(row % Lmax);
    int L, S;
    sample_lengths(x_len, y_len, b, Lmax, Smax, L, S);
    int jlo = 0, jhi = -1;  // valid columns of this row; none when i >= L
    if (i < L) {
      jhi = S - 1;
      if (bandwidth >= 0) {
        jlo = max(jlo, i - bandwidth);
        jhi = min(jhi, i + bandwidth);
      }
    }
    T* out_row = out + row * Smax * C;
    for (int e = threadIdx.x; e < Smax * C; e += blockDim.x) {
      const int j = e / C;
      if (j < jlo || j > jhi) out_row[e] = T(0);
    }
  }
}

template <typename T, int C>
cudaError_t zero_outside(T* out, const int64_t* x_len, const int64_t* y_len, int64_t B, int Lmax,
                         int Smax, int bandwidth, cudaStream_t stream) {
  const int64_t rows = B * Lmax;
  const int grid = static_cast<int>(rows < 65536 ? rows : 65536);
  zero_outside_kernel<T, C><<<grid, kZeroThreads, 0, stream>>>(out, x_len, y_len, B, Lmax, Smax,
                                                              bandwidth);
  return cudaGetLastError();
}

template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(1024)
    soft_dtw_forward_kernel(const scalar_t* D, const int64_t* x_len, const int64_t* y_len,
                            int Lmax, int Smax, double gamma, int bandwidth, scalar_t* value,
                            weight_t* weights, double* scratch, int slot) {
  extern __shared__ double smem_diagonals[];
  const int64_t b = blockIdx.x;
  int L, S;
  sample_lengths(x_len, y_len, b, Lmax, Smax, L, S);
  const double inf = CUDART_INF;
  if (L == 0 || S == 0) {  // out of contract: no cell, no value
    if (threadIdx.x == 0) value[b] = scalar_t(CUDART_NAN);
    return;
  }
  // The end cell outside the band is out of contract too: it is never reached, R is +inf.
  if (threadIdx.x == 0 && !in_band(L - 1, S - 1, bandwidth)) value[b] = scalar_t(inf);

  double* diagonals = scratch != nullptr ? scratch + b * 3 * slot : smem_diagonals;
  const scalar_t* Db = D + b * Lmax * Smax;
  weight_t* Wb = weights != nullptr ? weights + b * Lmax * Smax * 3 : nullptr;

  RowRange rows1{0, -1}, rows2{0, -1};  // rows of diagonals d-1 and d-2
  for (int d = 0; d <= L + S - 2; ++d) {
    const RowRange rows = diagonal_rows(d, L, S, bandwidth);
    double* cur = diagonals + (d % 3) * slot;
    const double* prev1 = diagonals + ((d + 2) % 3) * slot;  // diagonal d-1
    const double* prev2 = diagonals + ((d + 1) % 3) * slot;  // diagonal d-2
    for (int i = rows.lo + threadIdx.x; i <= rows.hi; i += blockDim.x) {
      const int j = d - i;
      // Predecessors R[i-1,j-1], R[i-1,j], R[i,j-1] of cell (i, j); +inf on the R border
      // (except R[0,0] = 0) and outside the band. (i-1, j-1) is in the band when (i, j) is.
      const double r_diag = (i == 0 && j == 0) ? 0.0
                            : (i > 0 && j > 0) ? prev2[(i - 1) - rows2.lo]
                                               : inf;
      const double r_up = (i > 0 && in_band(i - 1, j, bandwidth)) ? prev1[(i - 1) - rows1.lo] : inf;
      const double r_left = (j > 0 && in_band(i, j - 1, bandwidth)) ? prev1[i - rows1.lo] : inf;
      // softmin_gamma = m - gamma * log(sum_k exp(-(r_k - m) / gamma)), m = min; a +inf
      // predecessor contributes exactly 0 (tested, never computed: inf - inf is NaN).
      const double m = fmin(fmin(r_diag, r_up), r_left);  // fmin skips NaN; see below
      double r, w_diag = 0.0, w_up = 0.0, w_left = 0.0;
      if (m == inf) {
        // All three +inf (a valid cell never sees this), or +inf mixed with NaN:
        // the sum is +inf, or NaN so that bad input stays visible.
        r = r_diag + r_up + r_left;
      } else {
        // A NaN predecessor makes its exp, the sum and r NaN.
        const double e_diag = r_diag != inf ? exp((m - r_diag) / gamma) : 0.0;
        const double e_up = r_up != inf ? exp((m - r_up) / gamma) : 0.0;
        const double e_left = r_left != inf ? exp((m - r_left) / gamma) : 0.0;
        const double sum = e_diag + e_up + e_left;  // in [1, 3]: the minimum contributes 1
        r = static_cast<double>(Db[static_cast<int64_t>(i) * Smax + j]) + m - gamma * log(sum);
        w_diag = e_diag / sum;
        w_up = e_up / sum;
        w_left = e_left / sum;
      }
      cur[i - rows.lo] = r;
      if (Wb != nullptr) {
        weight_t* w = Wb + (static_cast<int64_t>(i) * Smax + j) * 3;
        w[kDiag] = static_cast<weight_t>(w_diag);
        w[kUp] = static_cast<weight_t>(w_up);
        w[kLeft] = static_cast<weight_t>(w_left);
      }
      if (i == L - 1 && j == S - 1) value[b] = static_cast<scalar_t>(r);
    }
    // Diagonal d must be complete before d+1 reads it; and d+1 overwrites the slots of
    // d-2, which must no longer be read. One barrier per diagonal covers both.
    __syncthreads();
    rows2 = rows1;
    rows1 = rows;
  }
}

template <typename scalar_t, typename weight_t>
__global__ void __launch_bounds__(1024)
    soft_dtw_backward_kernel(const scalar_t* grad, const weight_t* weights,
                             const int64_t* x_len, const int64_t* y_len, int Lmax, int Smax,
                             int bandwidth, scalar_t* dD, double* scratch, int slot) {
  extern __shared__ double smem_diagonals[];
  const int64_t b = blockIdx.x;
  int L, S;
  sample_lengths(x_len, y_len, b, Lmax, Smax, L, S);
  if (L == 0 || S == 0) return;

  double* diagonals = scratch != nullptr ? scratch + b * 3 * slot : smem_diagonals;
  const weight_t* Wb = weights + b * Lmax * Smax * 3;
  scalar_t* dDb = dD + b * Lmax * Smax;
  const double g = static_cast<double>(grad[b]);
  auto weight = [&](int i, int j, int k) {
    return static_cast<double>(Wb[(static_cast<int64_t>(i) * Smax + j) * 3 + k]);
  };

  RowRange rows1{0, -1}, rows2{0, -1};  // rows of diagonals d+1 and d+2
  for (int d = L + S - 2; d >= 0; --d) {
    const RowRange rows = diagonal_rows(d, L, S, bandwidth);
    double* cur = diagonals + (d % 3) * slot;
    const double* next1 = diagonals + ((d + 1) % 3) * slot;  // diagonal d+1
    const double* next2 = diagonals + ((d + 2) % 3) * slot;  // diagonal d+2
    for (int i = rows.lo + threadIdx.x; i <= rows.hi; i += blockDim.x) {
      const int j = d - i;
      // E[i,j] = w_diag(i+1,j+1) E[i+1,j+1] + w_up(i+1,j) E[i+1,j] + w_left(i,j+1) E[i,j+1]
      // over the successors inside the sample and the band; E[L-1,S-1] = 1.
      double e = 0.0;
      if (i == L - 1 && j == S - 1) {
        e = 1.0;
      } else {
        if (i + 1 < L && j + 1 < S)  // same |i - j|, so in the band
          e += weight(i + 1, j + 1, kDiag) * next2[(i + 1) - rows2.lo];
        if (i + 1 < L && in_band(i + 1, j, bandwidth))
          e += weight(i + 1, j, kUp) * next1[(i + 1) - rows1.lo];
        if (j + 1 < S && in_band(i, j + 1, bandwidth))
          e += weight(i, j + 1, kLeft) * next1[i - rows1.lo];
      }
      cur[i - rows.lo] = e;
      dDb[static_cast<int64_t>(i) * Smax + j] = static_cast<scalar_t>(g * e);
    }
    __syncthreads();  // same reasoning as in the forward kernel
    rows2 = rows1;
    rows1 = rows;
  }
}

// Where the three live diagonals of each sample go: dynamic shared memory when
// 3 * slot doubles fit in a block's opt-in limit, else a global buffer from the stream's pool.
struct DiagonalStorage {
  size_t smem_bytes = 0;
  double* scratch = nullptr;
  cudaStream_t stream = nullptr;

  template <typename Kernel>
  cudaError_t acquire(Kernel kernel, int64_t B, int slot, cudaStream_t s) {
    stream = s;
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
      smem_bytes = bytes;
      return cudaSuccess;
    }
    void* p = nullptr;
    LYRA_CUDA_TRY(cudaMallocAsync(&p, bytes * size_t(B), stream));
    scratch = static_cast<double*>(p);
    return cudaSuccess;
  }

  // Stream-ordered free: safe right after the launch that uses the buffer.
  cudaError_t release() {
    if (scratch == nullptr) return cudaSuccess;
    const cudaError_t err = cudaFreeAsync(scratch, stream);
    scratch = nullptr;
    return err;
  }
};

// Threads per block: enough for one diagonal of the longest sample, 256 to 1024.
int block_threads(int slot) {
  if (slot <= 256) return 256;
  if (slot <= 512) return 512;
  return 1024;
}

// The kernels index rows, columns and diagonals with int (element offsets are int64).
bool sizes_ok(int64_t B, int64_t Lmax, int64_t Smax, int64_t bandwidth) {
  return B >= 0 && B <= INT_MAX && Lmax >= 0 && Smax >= 0 && Lmax + Smax < INT_MAX &&
         Smax * 3 < INT_MAX && bandwidth < INT_MAX;
}

}  // namespace

template <typename scalar_t, typename weight_t>
int soft_dtw_forward_cuda(const scalar_t* D, const int64_t* x_len, const int64_t* y_len,
                          int64_t B, int64_t Lmax, int64_t Smax, double gamma,
                          int64_t bandwidth, scalar_t* value, weight_t* weights,
                          void* stream) {
  if (!sizes_ok(B, Lmax, Smax, bandwidth)) return cudaErrorInvalidValue;
  if (B == 0 || Lmax == 0 || Smax == 0) return cudaSuccess;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int bw = bandwidth < 0 ? -1 : static_cast<int>(bandwidth);
  if (weights != nullptr) {
    LYRA_CUDA_TRY((zero_outside<weight_t, 3>(weights, x_len, y_len, B, static_cast<int>(Lmax),
                                             static_cast<int>(Smax), bw, s)));
  }
  const int slot = static_cast<int>(Lmax < Smax ? Lmax : Smax);
  auto kernel = soft_dtw_forward_kernel<scalar_t, weight_t>;
  DiagonalStorage storage;
  LYRA_CUDA_TRY(storage.acquire(kernel, B, slot, s));
  kernel<<<static_cast<unsigned>(B), block_threads(slot), storage.smem_bytes, s>>>(
      D, x_len, y_len, static_cast<int>(Lmax), static_cast<int>(Smax), gamma, bw, value, weights,
      storage.scratch, slot);
  const cudaError_t launch_err = cudaGetLastError();
  const cudaError_t free_err = storage.release();
  return launch_err != cudaSuccess ? launch_err : free_err;
}

template <typename scalar_t, typename weight_t>
int soft_dtw_backward_cuda(const scalar_t* grad, const weight_t* weights,
                           const int64_t* x_len, const int64_t* y_len, int64_t B,
                           int64_t Lmax, int64_t Smax, int64_t bandwidth, scalar_t* dD,
                           void* stream) {
  if (!sizes_ok(B, Lmax, Smax, bandwidth)) return cudaErrorInvalidValue;
  if (B == 0 || Lmax == 0 || Smax == 0) return cudaSuccess;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int bw = bandwidth < 0 ? -1 : static_cast<int>(bandwidth);
  LYRA_CUDA_TRY((zero_outside<scalar_t, 1>(dD, x_len, y_len, B, static_cast<int>(Lmax),
                                           static_cast<int>(Smax), bw, s)));
  const int slot = static_cast<int>(Lmax < Smax ? Lmax : Smax);
  auto kernel = soft_dtw_backward_kernel<scalar_t, weight_t>;
  DiagonalStorage storage;
  LYRA_CUDA_TRY(storage.acquire(kernel, B, slot, s));
  kernel<<<static_cast<unsigned>(B), block_threads(slot), storage.smem_bytes, s>>>(
      grad, weights, x_len, y_len, static_cast<int>(Lmax), static_cast<int>(Smax), bw, dD,
      storage.scratch, slot);
  const cudaError_t launch_err = cudaGetLastError();
  const cudaError_t free_err = storage.release();
  return launch_err != cudaSuccess ? launch_err : free_err;
}

#define LYRA_INSTANTIATE_SOFT_DTW(scalar_t, weight_t)                                        \
  template int soft_dtw_forward_cuda<scalar_t, weight_t>(                                    \
      const scalar_t*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, double,    \
      int64_t, scalar_t*, weight_t*, void*);                                                 \
  template int soft_dtw_backward_cuda<scalar_t, weight_t>(                                   \
      const scalar_t*, const weight_t*, const int64_t*, const int64_t*, int64_t, int64_t,    \
      int64_t, int64_t, scalar_t*, void*);

LYRA_INSTANTIATE_SOFT_DTW(float, float)
LYRA_INSTANTIATE_SOFT_DTW(double, double)

}  // namespace lyra

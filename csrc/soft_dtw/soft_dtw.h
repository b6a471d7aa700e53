// Batched soft-DTW kernels: the torch-free API shared by the CPU and CUDA backends.
//
// Recursion (SPEC.md), with cells 1-based in R and 0-based in D:
//   R[0,0] = 0, R[0,j>0] = R[i>0,0] = +inf,
//   R[i,j] = D[i-1,j-1] + softmin_gamma(R[i-1,j-1], R[i-1,j], R[i,j-1]).
// Sample b uses D[b, :x_len[b], :y_len[b]]; its value is R[x_len[b], y_len[b]].
//
// Instead of R, the forward stores for every valid cell the soft-min probabilities of its
// three predecessors (they lie in [0,1], so float32 keeps them to 6e-8 relative even when R
// itself has grown to 1e4 and more). The backward is then the E-matrix recursion
//   E[i,j] = w_diag(i+1,j+1) E[i+1,j+1] + w_up(i+1,j) E[i+1,j] + w_left(i,j+1) E[i,j+1],
// E[L-1,S-1] = 1 (0-based cells), with dR/dD = E, and needs no exp at all.
//
// Callers validate shapes and lengths: 1 <= x_len[b] <= Lmax, 1 <= y_len[b] <= Smax, and with a
// band, |x_len[b] - y_len[b]| <= bandwidth (else the end cell is unreachable).
#pragma once
#include <cstdint>

namespace lyra {

// Indices of a cell's three soft-min weights in the last dimension of `weights`.
enum SoftDtwPred : int { kDiag = 0, kUp = 1, kLeft = 2 };

// D:        (B, Lmax, Smax), contiguous.
// bandwidth: < 0 for no band; else cells with |i - j| > bandwidth (0-based) are excluded. A band
//           of Lmax + Smax or more excludes nothing and is taken as no band.
// value:    (B) output.
// weights:  (B, Lmax, Smax, 3) elements of output, or nullptr when no backward will follow.
//           Only the backend's own backward reads them, but both backends write the same
//           layout, every element of it, so the output is deterministic: per sample, three
//           planes of Lmax*Smax (diag, up, left), each holding the valid cells (inside the
//           sample and the band) packed diagonal by diagonal (d = i + j ascending, rows
//           ascending within a diagonal), then zeros.
//           A cell with a NaN predecessor has R and all three weights NaN.
// The recursion state is double whatever scalar_t is.
template <typename scalar_t, typename weight_t>
void soft_dtw_forward_cpu(const scalar_t* D, const int64_t* x_len, const int64_t* y_len,
                          int64_t B, int64_t Lmax, int64_t Smax, double gamma,
                          int64_t bandwidth, scalar_t* value, weight_t* weights,
                          int num_threads);

// grad: (B); dD: (B, Lmax, Smax) output, grad[b] * E on valid cells and exactly zero elsewhere.
template <typename scalar_t, typename weight_t>
void soft_dtw_backward_cpu(const scalar_t* grad, const weight_t* weights,
                           const int64_t* x_len, const int64_t* y_len, int64_t B,
                           int64_t Lmax, int64_t Smax, int64_t bandwidth, scalar_t* dD,
                           int num_threads);

// The forward and the backward of grad = 1 in one call: value (B) and E (B, Lmax, Smax), the
// gradient of each value with respect to D (the expected alignment matrix: E[i, j] is the
// probability that the soft alignment passes through cell (i, j)), exactly zero outside the
// valid cells. Autograd's backward is then grad[b] * E. Whole samples run both passes back to
// back through weights of their own that stay in cache, so no batch of weights (three values a
// cell) goes out to memory and back; samples cut into stripes run the two calls above.
template <typename scalar_t, typename weight_t>
void soft_dtw_alignment_cpu(const scalar_t* D, const int64_t* x_len, const int64_t* y_len,
                            int64_t B, int64_t Lmax, int64_t Smax, double gamma,
                            int64_t bandwidth, scalar_t* value, scalar_t* E, int num_threads);

// out[b, :] = grad[b] * E[b, :] over B slabs of `slab` elements: soft_dtw_alignment's backward.
template <typename scalar_t>
void soft_dtw_scale_cpu(const scalar_t* grad, const scalar_t* E, int64_t B, int64_t slab,
                        scalar_t* out, int num_threads);

// CUDA launchers: same contracts, device pointers, `stream` is a cudaStream_t, `workspace` a
// device buffer of soft_dtw_cuda_workspace(B, Lmax, Smax) bytes (the live diagonals of each
// sample when they do not fit in shared memory; the torch glue takes it from PyTorch's caching
// allocator). scalar_t/weight_t: (float, float) or (double, double). Return a cudaError_t
// value (0 = ok); nothing is written when the sizes are out of range (cudaErrorInvalidValue).
// The backward divides each cell's three weights by their sum before use, so float32 weights
// cost ~1e-8 of dD whatever L + S (soft_dtw_cuda.cu).
template <typename scalar_t, typename weight_t>
int soft_dtw_forward_cuda(const scalar_t* D, const int64_t* x_len, const int64_t* y_len,
                          int64_t B, int64_t Lmax, int64_t Smax, double gamma,
                          int64_t bandwidth, scalar_t* value, weight_t* weights,
                          void* workspace, void* stream);

template <typename scalar_t, typename weight_t>
int soft_dtw_backward_cuda(const scalar_t* grad, const weight_t* weights,
                           const int64_t* x_len, const int64_t* y_len, int64_t B,
                           int64_t Lmax, int64_t Smax, int64_t bandwidth, scalar_t* dD,
                           void* workspace, void* stream);

int64_t soft_dtw_cuda_workspace(int64_t B, int64_t Lmax, int64_t Smax);

}  // namespace lyra

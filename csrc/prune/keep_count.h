// How many context tokens a pruning step keeps: the one rule of the CPU kernel, the CUDA
// kernel and the standalone tests (lyra_pl/keep_count.py is its Python twin).
//
// k = n if n < min_keep, else max(min_keep, floor(keep_ratio * n)) with floor taken as in exact
// decimal arithmetic: 0.7 * 90 is 62.99999999999999 in double, but 70% of 90 is 63. A product
// less than kKeepCountEps below an integer counts as that integer. Why 1e-6: for n < 2^31 the
// double product is within n * 2^-52 < 4.8e-7 of the exact one, and for a ratio of at most 5
// decimal places the exact product is either an integer or at least 1e-5 below the next one, so
// the result is the exact floor. The product is formed alone and only compared, never added to,
// so no backend fuses it into an FMA and every backend gets the same count.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define LYRA_HOST_DEVICE __host__ __device__
#else
#define LYRA_HOST_DEVICE
#endif

namespace lyra {

constexpr double kKeepCountEps = 1e-6;

LYRA_HOST_DEVICE inline int64_t keep_count(int64_t n, double keep_ratio, int64_t min_keep) {
  if (n < min_keep) return n;
  const double product = keep_ratio * static_cast<double>(n);
  double k = floor(product);
  if (product >= k + (1.0 - kKeepCountEps)) k += 1.0;
  const int64_t kept = static_cast<int64_t>(k);
  return kept < min_keep ? min_keep : kept;
}

}  // namespace lyra

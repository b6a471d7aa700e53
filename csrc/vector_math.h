// exp and log written as plain arithmetic so that `#pragma omp simd` loops calling them
// vectorize (libm calls do not without -ffast-math, which would break our use of +inf).
// Accuracy: a few ulp in double, ~1 ulp in float, over the ranges documented below.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

// Compiles a hot loop's function for AVX-512, AVX2+FMA and baseline x86-64, picked at load
// time, so one build is fast on every x86 machine.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define LYRA_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LYRA_SIMD_CLONES
#endif

namespace lyra {

template <typename T> struct ExpConst;
template <> struct ExpConst<double> {
  using Bits = int64_t;
  using UBits = uint64_t;
  static constexpr double kLog2e = 1.4426950408889634;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01;
  static constexpr double kLn2Lo = 1.90821492927058770002e-10;
  static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52: rounds to an integer
  static constexpr double kMin = -708.0;                   // exp(kMin) is still a normal number
  static constexpr int kMantissa = 52;
};
template <> struct ExpConst<float> {
  using Bits = int32_t;
  using UBits = uint32_t;
  static constexpr float kLog2e = 1.44269504f;
  static constexpr float kLn2Hi = 0.693145752f;
  static constexpr float kLn2Lo = 1.42860677e-06f;
  static constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23
  static constexpr float kMin = -87.0f;
  static constexpr int kMantissa = 23;
};

// exp(x) for x <= 0; arguments below kMin (including -inf) give exp(kMin), a value that is
// negligible next to the 1 every soft-min sum contains. Callers mask true zeros themselves.
template <typename T>
inline T exp_nonpositive(T x) {
  using C = ExpConst<T>;
  using Bits = typename C::Bits;
  using UBits = typename C::UBits;
  constexpr int kShift = sizeof(T) * 8 - C::kMantissa;
  x = x < C::kMin ? C::kMin : x;
  const T shifted = x * C::kLog2e + C::kShifter;  // round(x / ln2) in the low mantissa bits
  const T n = shifted - C::kShifter;
  const T r = (x - n * C::kLn2Hi) - n * C::kLn2Lo;  // |r| <= ln2 / 2
  // Taylor series of exp(r): 13 terms for double (error < 1e-16), 8 for float.
  T p;
  if constexpr (sizeof(T) == 8) {
    p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
  } else {
    p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
  }
  // Multiply by 2^n by adding n to the exponent field.
  Bits nb, pb;
  std::memcpy(&nb, &shifted, sizeof(T));
  std::memcpy(&pb, &p, sizeof(T));
  // The low bits of `shifted` hold n in two's complement; sign-extend them.
  const Bits n_int = static_cast<Bits>(static_cast<UBits>(nb) << kShift) >> kShift;
  pb = static_cast<Bits>(static_cast<UBits>(pb) + (static_cast<UBits>(n_int) << C::kMantissa));
  std::memcpy(&p, &pb, sizeof(T));
  return p;
}

// log(s) for 1 <= s <= 4 (a soft-min sum of three terms, one of which is exactly 1):
// s = 2^e * t with t in [0.75, 1.5), log t = 2 atanh(z), z = (t - 1) / (t + 1), |z| <= 1/5.
template <typename T>
inline T log_1_to_4(T s) {
  const bool big = s >= T(1.5);
  const bool huge = s >= T(3);
  const T t = huge ? s * T(0.25) : (big ? s * T(0.5) : s);
  const T e = huge ? T(2) : (big ? T(1) : T(0));
  const T z = (t - T(1)) / (t + T(1));
  const T z2 = z * z;
  T p;
  if constexpr (sizeof(T) == 8) {  // terms up to z^25: (1/5)^26 < 1e-18
    p = 1.0 / 25;
    p = p * z2 + 1.0 / 23;
    p = p * z2 + 1.0 / 21;
    p = p * z2 + 1.0 / 19;
    p = p * z2 + 1.0 / 17;
    p = p * z2 + 1.0 / 15;
    p = p * z2 + 1.0 / 13;
    p = p * z2 + 1.0 / 11;
    p = p * z2 + 1.0 / 9;
    p = p * z2 + 1.0 / 7;
    p = p * z2 + 1.0 / 5;
    p = p * z2 + 1.0 / 3;
    p = p * z2 + 1.0;
  } else {
    p = 1.0f / 11;
    p = p * z2 + 1.0f / 9;
    p = p * z2 + 1.0f / 7;
    p = p * z2 + 1.0f / 5;
    p = p * z2 + 1.0f / 3;
    p = p * z2 + 1.0f;
  }
  return T(2) * z * p + e * T(0.6931471805599453);
}

// Flushes denormal results to zero and reads denormal operands as zero on the calling thread
// while it lives (x86's FTZ and DAZ bits), restoring the thread's mode after. x86 runs every
// operation with a denormal operand or result through microcode, about 100x slower: the
// soft-DTW backward's E shrinks geometrically away from the optimal path and the soft-min
// weights reach 1e-38, so on Lyra's LCMR shapes (300 x 60) most of the backward ran there and
// took 2.5x as long. What is flushed is below 1e-38 (float) or 1e-308 (double) next to terms of
// order 1. Other architectures: a no-op (ARM's cores handle denormals without that penalty).
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtz | kDaz); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtz = 0x8000, kDaz = 0x0040;
  unsigned saved_;
#else
  FlushDenormals() {}
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

}  // namespace lyra

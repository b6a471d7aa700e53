// Error propagation for the CUDA launchers, which return a cudaError_t instead of throwing
// (the kernels know nothing of torch; the glue turns the code into an exception).
#pragma once
#include <cuda_runtime.h>

#define LYRA_CUDA_TRY(expr)                         \
  do {                                              \
    const cudaError_t lyra_err_ = (expr);           \
    if (lyra_err_ != cudaSuccess) return lyra_err_; \
  } while (0)

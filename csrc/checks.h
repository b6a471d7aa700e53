// Argument checks shared by the ops' torch glue. Failures raise ValueError / TypeError in
// Python with a message that names the argument, so a bad call never reaches a kernel.
#pragma once
#include <torch/types.h>

#include <string>

namespace lyra {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t d, int64_t expected, const char* name,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(d) == expected, name, ".shape[", d, "] (", what, ") must be ",
                    expected, ", got ", t.size(d));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device(), "; move them to one device");
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                       t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                   name, " must be float32, float64, float16 or bfloat16, got ",
                   t.scalar_type());
}

inline void check_bool(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kBool, name, " must be a bool tensor, got ",
                   t.scalar_type());
}

// Lengths: an integer (B) tensor on `ref`'s device with 1 <= length <= max_len. Returns them
// as int64 on `ref`'s device, and a CPU copy for host-side checks.
inline std::pair<at::Tensor, at::Tensor> check_lengths(const at::Tensor& lengths,
                                                       const char* name, int64_t B,
                                                       int64_t max_len, const char* max_name,
                                                       const at::Tensor& ref) {
  TORCH_CHECK_TYPE(!at::isFloatingType(lengths.scalar_type()) &&
                       lengths.scalar_type() != at::kBool,
                   name, " must be an integer tensor, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == B, name,
                    " must have shape (B,) = (", B, ",), got ", lengths.sizes());
  check_same_device(lengths, ref, name, "D");
  at::Tensor dev = lengths.to(at::kLong).contiguous();
  at::Tensor host = dev.cpu();
  const int64_t* p = host.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(p[b] >= 1 && p[b] <= max_len, name, "[", b, "] = ", p[b],
                      " is out of range: lengths must be in [1, ", max_name, " = ", max_len,
                      "]");
  }
  return {dev, host};
}

}  // namespace lyra

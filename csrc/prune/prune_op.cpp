// Torch glue of lyra::context_scores, lyra::select_tokens and lyra::prune_tokens (schemas in
// registration.cpp). Compiled into the CPU extension, and with LYRA_CUDA_BUILD into the CUDA
// extension, where it registers the CUDA implementations instead.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "prune.h"

#ifdef LYRA_CUDA_BUILD
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace lyra {
namespace {

void check_mask(const at::Tensor& mask, const char* name, int64_t B, int64_t N,
                const at::Tensor& ref, const char* ref_name) {
  check_bool(mask, name);
  check_dim(mask, 2, name, "(B, N)");
  check_size(mask, 0, B, name, "batch");
  check_size(mask, 1, N, name, "tokens");
  check_same_device(mask, ref, name, ref_name);
}

void check_keep(double keep_ratio, int64_t min_keep) {
  TORCH_CHECK_VALUE(keep_ratio > 0 && keep_ratio <= 1, "keep_ratio must be in (0, 1], got ",
                    keep_ratio);
  TORCH_CHECK_VALUE(min_keep >= 0, "min_keep must be >= 0, got ", min_keep);
}

// Each sample's query rows, left-aligned: their row indices into q (B, Tmax), their key
// positions (B, Tmax) and their counts (B). Tmax is the row capacity the kernels size their
// work by: at least every sample's count, which they read from `counts` on the device.
struct QueryRows {
  at::Tensor index, pos, counts;
};

// The one-line error of the first sample whose query positions break the contract. pos and
// index: (B, Nq), query rows first; outside: (B, Nq) query rows out of range; not_after:
// (B, Nq - 1) query rows t + 1 not after row t. Only called on failure, so its host reads
// cost nothing on the good path.
[[noreturn]] void bad_positions(const at::Tensor& pos, const at::Tensor& index,
                                const at::Tensor& outside, const at::Tensor& not_after,
                                int64_t N) {
  const at::Tensor bad = outside.any(1).logical_or(not_after.any(1));
  const int64_t b = bad.to(at::kByte).argmax().item<int64_t>();
  if (outside[b].any().item<bool>()) {
    const int64_t t = outside[b].to(at::kByte).argmax().item<int64_t>();
    TORCH_CHECK_VALUE(false, "query_positions: sample ", b, " has position ",
                      pos[b][t].item<int64_t>(), " (query row ", index[b][t].item<int64_t>(),
                      ") outside [0, ", N, ")");
  }
  const int64_t t = not_after[b].to(at::kByte).argmax().item<int64_t>() + 1;
  TORCH_CHECK_VALUE(false, "query_positions: sample ", b,
                    " is not strictly ascending over its query rows (query row ",
                    index[b][t].item<int64_t>(), " at position ", pos[b][t].item<int64_t>(),
                    " follows position ", pos[b][t - 1].item<int64_t>(), ")");
}

// Without positions, row i of q is at key position i: index and pos are one tensor, valid by
// construction. Then, unless `exact` asks for the most rows of any sample as Tmax (one host
// read), Tmax is Nq, the bound known without reading anything back: the CUDA FMA kernels run
// with it and the op holds no host sync. With positions, pos gathers each query row's position
// and checks it, in the one host read that also sizes Tmax exactly: the check must raise a
// ValueError naming the sample, so it needs the host.
QueryRows query_rows(const at::Tensor& query_mask, const std::optional<at::Tensor>& positions,
                     int64_t N, bool exact) {
  const int64_t Nq = query_mask.size(1);
  const at::Tensor counts = query_mask.sum(1).to(at::kLong).contiguous();
  // A stable sort of "not a query" puts the query rows first, in order.
  const at::Tensor order = std::get<1>(at::sort(query_mask.logical_not().to(at::kByte),
                                                std::optional<bool>(true), /*dim=*/1,
                                                /*descending=*/false));
  if (!positions.has_value()) {
    const int64_t Tmax = !exact ? Nq : Nq == 0 ? 0 : counts.max().item<int64_t>();
    const at::Tensor index = order.narrow(1, 0, Tmax).contiguous();
    return {index, index, counts};
  }
  const at::Tensor pos = positions->gather(1, order);  // query rows first
  if (Nq == 0) return {order, pos, counts};
  const at::Tensor valid = at::arange(Nq, counts.options()).unsqueeze(0) < counts.unsqueeze(1);
  const at::Tensor outside = valid.logical_and(pos.lt(0).logical_or(pos.ge(N)));
  const at::Tensor not_after =
      valid.narrow(1, 1, Nq - 1).logical_and(pos.narrow(1, 1, Nq - 1).le(pos.narrow(1, 0, Nq - 1)));
  const at::Tensor any_bad = outside.any().logical_or(not_after.any());
  const at::Tensor summary = at::stack({counts.max(), any_bad.to(at::kLong)}).cpu();
  if (summary[1].item<int64_t>() != 0) bad_positions(pos, order, outside, not_after, N);
  const int64_t Tmax = summary[0].item<int64_t>();
  return {order.narrow(1, 0, Tmax).contiguous(), pos.narrow(1, 0, Tmax).contiguous(), counts};
}

#ifdef LYRA_CUDA_BUILD
// The one rule for which CUDA kernel scores q . k: the tensor-core kernel (prune_tc_cuda.cu) for
// bfloat16 / float16 inputs whose head_dim is a multiple of 16 up to 256 (its mma.sync k16
// steps and shared-memory tiles) on a device of compute capability 8.0 or newer (mma.sync
// m16n8k16 with bf16 operands); the FMA kernel (prune_cuda.cu) for everything else: float32 and
// float64 inputs, other head dims, older GPUs. Strides and alignment do not matter to either.
bool use_tensor_cores(const at::Tensor& q, int64_t dh) {
  const bool half = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  if (!half || dh % 16 != 0 || dh < 16 || dh > 256) return false;
  int major = 0;
  const cudaError_t err =
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device());
  TORCH_CHECK(err == cudaSuccess, "context_scores: cannot read the compute capability of ",
              q.device(), ": ", cudaGetErrorString(err));
  return major >= 8;
}
#endif

at::Tensor context_scores(const at::Tensor& q_in, const at::Tensor& k_in,
                          const at::Tensor& query_mask_in, const at::Tensor& key_mask_in,
                          bool causal, std::optional<double> scale_opt,
                          const std::optional<at::Tensor>& query_positions) {
  check_dim(q_in, 4, "q", "(B, Hq, Nq, head_dim)");
  check_dim(k_in, 4, "k", "(B, Hkv, N, head_dim)");
  check_floating(q_in, "q");
  TORCH_CHECK_TYPE(k_in.scalar_type() == q_in.scalar_type(), "k has dtype ", k_in.scalar_type(),
                   " but q has ", q_in.scalar_type(), "; they must match");
  check_same_device(k_in, q_in, "k", "q");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), dh = q_in.size(3);
  const int64_t Hkv = k_in.size(1), N = k_in.size(2);
  check_size(k_in, 0, B, "k", "batch");
  // Without positions row i of q is key i, so q and k have the same tokens.
  if (!query_positions.has_value()) check_size(k_in, 2, Nq, "k", "tokens");
  check_size(k_in, 3, dh, "k", "head_dim");
  TORCH_CHECK_VALUE(Hq >= 1, "q needs at least one head, got Hq = 0");
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "the number of query heads (", Hq,
                    ") must be a multiple of the number of kv heads (", Hkv, ")");
  TORCH_CHECK_VALUE(dh >= 1, "head_dim must be >= 1");
  check_mask(query_mask_in, "query_mask", B, Nq, q_in, "q");
  check_mask(key_mask_in, "key_mask", B, N, q_in, "q");
  if (query_positions.has_value()) {
    const at::Tensor& p = *query_positions;
    TORCH_CHECK_TYPE(p.scalar_type() == at::kLong, "query_positions must be an int64 tensor, got ",
                     p.scalar_type());
    check_dim(p, 2, "query_positions", "(B, Nq)");
    check_size(p, 0, B, "query_positions", "batch");
    check_size(p, 1, Nq, "query_positions", "query rows");
    check_same_device(p, q_in, "query_positions", "q");
  }
  const double scale = scale_opt.has_value() ? *scale_opt : 1.0 / std::sqrt(double(dh));
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale must be a positive number, got ",
                    scale);

  // The head dim must be contiguous; other strides are passed through (no copy of q or k).
  at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor key_mask = key_mask_in.contiguous();
  const auto out_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor scores = at::empty({B, N}, q.options().dtype(out_type));
  if (B == 0) return scores;
#ifdef LYRA_CUDA_BUILD
  const bool tensor_cores = use_tensor_cores(q, dh);
  // Which kernels may run with Tmax = Nq, the row capacity known without a host read:
  // - the FMA kernels: their workspace is one log-sum-exp per (b, h, row), 4 bytes (8 in fp64)
  //   x B Hq Nq (15 MB at B = 1, Hq 28, Nq 2^17), and their first pass loops over the real
  //   rows only, so no count is read back;
  // - not the tensor-core kernel: it keeps 8-byte partial row statistics per 4096-key split
  //   (B Hq Tmax N / 4096 of them: 0.94 GB at that shape with Tmax = Nq, 1.8 MB with the real
  //   T = 256) and launches a pass-1 CTA per (split, head, 128-row tile), so it reads the most
  //   rows of any sample back (one host sync).
  const bool exact_rows = tensor_cores;
#else
  const bool exact_rows = true;  // host reads cost nothing on the CPU
#endif
  // Before the N == 0 return, so that positions are checked even when there is no key.
  const QueryRows rows = query_rows(query_mask_in, query_positions, N, exact_rows);
  if (N == 0) return scores;
  const int64_t Tmax = rows.index.size(1);

#ifdef LYRA_CUDA_BUILD
  const c10::cuda::CUDAGuard guard(q.device());
  const KernelDtype dtype = q.scalar_type() == at::kFloat    ? KernelDtype::kFloat32
                            : q.scalar_type() == at::kDouble ? KernelDtype::kFloat64
                            : q.scalar_type() == at::kHalf   ? KernelDtype::kFloat16
                                                             : KernelDtype::kBFloat16;
  const int64_t workspace_bytes = tensor_cores
                                      ? context_scores_tc_cuda_workspace(B, Hq, Tmax, N)
                                      : context_scores_cuda_workspace(dtype, B, Hq, Tmax);
  at::Tensor workspace = at::empty({workspace_bytes}, q.options().dtype(at::kByte));
  const auto launcher = tensor_cores ? &context_scores_tc_cuda : &context_scores_cuda;
  const int err = launcher(
      dtype, q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), k.data_ptr(), k.stride(0),
      k.stride(1), k.stride(2), rows.index.data_ptr<int64_t>(), rows.pos.data_ptr<int64_t>(),
      rows.counts.data_ptr<int64_t>(), Tmax, key_mask.data_ptr<bool>(), B, Hq, Hkv, N, dh, causal,
      scale, scores.data_ptr(), workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "context_scores CUDA kernel (", tensor_cores ? "tensor-core" : "FMA",
              ") failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#else
  // Half-precision inputs are upcast here; the CUDA kernel reads them directly.
  if (out_type != q.scalar_type()) {
    q = q.to(out_type);
    k = k.to(out_type);
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "context_scores", [&] {
    context_scores_cpu<scalar_t, scalar_t>(
        q.data_ptr<scalar_t>(), q.stride(0), q.stride(1), q.stride(2), k.data_ptr<scalar_t>(),
        k.stride(0), k.stride(1), k.stride(2), rows.index.data_ptr<int64_t>(),
        rows.pos.data_ptr<int64_t>(), rows.counts.data_ptr<int64_t>(), Tmax,
        key_mask.data_ptr<bool>(), B, Hq, Hkv, N, dh, causal, scale, scores.data_ptr<scalar_t>(),
        at::get_num_threads());
  });
#endif
  return scores;
}

at::Tensor select_tokens(const at::Tensor& scores_in, const at::Tensor& context_mask_in,
                         const at::Tensor& key_mask_in, double keep_ratio, int64_t min_keep) {
  check_dim(scores_in, 2, "scores", "(B, N)");
  TORCH_CHECK_TYPE(scores_in.scalar_type() == at::kFloat || scores_in.scalar_type() == at::kDouble,
                   "scores must be float32 or float64, got ", scores_in.scalar_type());
  const int64_t B = scores_in.size(0), N = scores_in.size(1);
  check_mask(context_mask_in, "context_mask", B, N, scores_in, "scores");
  check_mask(key_mask_in, "key_mask", B, N, scores_in, "scores");
  check_keep(keep_ratio, min_keep);
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor context_mask = context_mask_in.contiguous();
  const at::Tensor key_mask = key_mask_in.contiguous();
  at::Tensor keep = at::empty({B, N}, key_mask.options());
  if (B * N == 0) return keep;
#ifdef LYRA_CUDA_BUILD
  const c10::cuda::CUDAGuard guard(scores.device());
  const int err = select_tokens_cuda(scores.data_ptr(), scores.scalar_type() == at::kDouble,
                                     context_mask.data_ptr<bool>(), key_mask.data_ptr<bool>(), B,
                                     N, keep_ratio, min_keep, keep.data_ptr<bool>(),
                                     c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "select_tokens CUDA kernel failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
#else
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "select_tokens", [&] {
    select_tokens_cpu<scalar_t>(scores.data_ptr<scalar_t>(), context_mask.data_ptr<bool>(),
                                key_mask.data_ptr<bool>(), B, N, keep_ratio, min_keep,
                                keep.data_ptr<bool>(), at::get_num_threads());
  });
#endif
  return keep;
}

at::Tensor prune_tokens(const at::Tensor& q, const at::Tensor& k, const at::Tensor& query_mask,
                        const at::Tensor& context_mask, const at::Tensor& key_mask,
                        double keep_ratio, int64_t min_keep, bool causal,
                        std::optional<double> scale) {
  // Check the selection arguments first so a bad keep_ratio fails before the heavy pass.
  check_keep(keep_ratio, min_keep);
  const at::Tensor scores =
      context_scores(q, k, query_mask, key_mask, causal, scale, /*query_positions=*/std::nullopt);
  return select_tokens(scores, context_mask, key_mask, keep_ratio, min_keep);
}

}  // namespace

#ifdef LYRA_CUDA_BUILD
TORCH_LIBRARY_IMPL(lyra, CUDA, m) {
#else
TORCH_LIBRARY_IMPL(lyra, CPU, m) {
#endif
  m.impl("context_scores", &context_scores);
  m.impl("select_tokens", &select_tokens);
  m.impl("prune_tokens", &prune_tokens);
}

}  // namespace lyra

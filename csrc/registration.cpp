// The op schemas of the `lyra` namespace, defined once in the CPU extension. Backends register
// implementations in their *_op.cpp files; fake (meta) and autograd rules live in lyra_pl/ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(lyra, m) {
  m.def(
      "soft_dtw_forward(Tensor D, Tensor x_lengths, Tensor y_lengths, float gamma, "
      "int bandwidth, bool store_weights) -> (Tensor value, Tensor weights)");
  m.def(
      "soft_dtw_backward(Tensor grad, Tensor weights, Tensor x_lengths, Tensor y_lengths, "
      "int bandwidth) -> Tensor");
  m.def(
      "soft_dtw_alignment(Tensor D, Tensor x_lengths, Tensor y_lengths, float gamma, "
      "int bandwidth) -> (Tensor value, Tensor alignment)");
  m.def("soft_dtw_alignment_backward(Tensor grad, Tensor alignment) -> Tensor");
  m.def(
      "context_scores(Tensor q, Tensor k, Tensor query_mask, Tensor key_mask, bool causal, "
      "float? scale, Tensor? query_positions=None) -> Tensor");
  m.def(
      "select_tokens(Tensor scores, Tensor context_mask, Tensor key_mask, float keep_ratio, "
      "int min_keep) -> Tensor");
  m.def(
      "prune_tokens(Tensor q, Tensor k, Tensor query_mask, Tensor context_mask, "
      "Tensor key_mask, float keep_ratio, int min_keep, bool causal, float? scale) -> Tensor");
}

// An importable module whose only job is to run the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

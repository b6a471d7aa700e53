// The CUDA extension's module entry point: importing it runs the CUDA registrations in the
// *_op.cpp files compiled with LYRA_CUDA_BUILD. The schemas come from the CPU extension (_C),
// which must be imported first.
#include <Python.h>

extern "C" PyObject* PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

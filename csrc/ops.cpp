// Schema of the croc assignment ops and the Python module croc._C that carries them.
//
// The ops live in the `croc` namespace; a FRAGMENT is used so that custom ops defined from Python
// in the same namespace (torch.library.custom_op("croc::...")) never clash with this library.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(croc, m) {
  // cost: float32/float64 [B, n, m], n <= m. Returns int64 [B, n], the column of every row.
  // num_rows: optional int64 [B] (ragged batch): problem b uses its first num_rows[b] rows
  // (0 <= num_rows[b] <= min(n, m); n may then exceed m); the other rows get -1.
  m.def("linear_sum_assignment(Tensor cost, bool maximize, Tensor? num_rows=None) -> Tensor");
  // Host harness of the CUDA kernel's block algorithm: the same core functions, with loops over
  // `num_threads` simulated threads (CPU tensors only; for tests).
  m.def(
      "lsap_block_harness(Tensor cost, bool maximize, int num_threads, Tensor? num_rows=None) -> Tensor");
}

// Reports whether the CUDA implementation was compiled into this build.
static PyObject* croc_has_cuda(PyObject*, PyObject*) {
#ifdef CROC_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

#ifndef CROC_TORCH_VERSION
#define CROC_TORCH_VERSION "unknown"
#endif

// The torch.__version__ this extension was compiled against (set by setup.py).
static PyObject* croc_torch_version(PyObject*, PyObject*) { return PyUnicode_FromString(CROC_TORCH_VERSION); }

static PyMethodDef kMethods[] = {
    {"has_cuda", croc_has_cuda, METH_NOARGS, "True if the CUDA kernels were built."},
    {"torch_version", croc_torch_version, METH_NOARGS, "The torch version this extension was built against."},
    {nullptr, nullptr, 0, nullptr},
};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "croc C++/CUDA ops (registered with torch.library).",
                              -1, kMethods};

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&kModule); }

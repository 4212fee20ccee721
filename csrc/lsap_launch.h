// Host interface of the CUDA solver, for the torch glue (lsap_cuda_ops.cpp, compiled by the host
// compiler): the launch is defined in lsap_kernel.cuh and instantiated in lsap_cuda.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lsap_core.h"

namespace croc_lsap {
namespace cuda {

// Bytes of global workspace one problem needs, a multiple of 16.
CROC_HD int64_t workspace_bytes(int n, int m) {
  const int64_t doubles = static_cast<int64_t>(n) + 5 * static_cast<int64_t>(m);
  const int64_t candidates = n;
  const int64_t ints = 3 * static_cast<int64_t>(m) + n;
  const int64_t bytes = doubles * 8 + candidates * static_cast<int64_t>(sizeof(Candidate)) + ints * 4;
  return (bytes + 15) / 16 * 16;
}

// Launches the solver for `batch` problems of shape [n, m] stored contiguously in `cost` (float
// or double) on `stream`, without synchronising. num_rows: int64 [batch] on the device (problem b
// uses its first num_rows[b] rows; out of range: status kBadRowCount) or nullptr (all n rows).
// out: int64 [batch, n], -1 past num_rows[b]; status: int32 [batch] (a croc_lsap::Status per
// problem); workspace: batch * workspace_bytes(n, m) bytes. Returns the launch error, if any.
template <typename T>
cudaError_t launch(const T* cost, const int64_t* num_rows, int64_t batch, int n, int m, bool maximize,
                   int64_t* out, int32_t* status, unsigned char* workspace, cudaStream_t stream);

extern template cudaError_t launch<float>(const float*, const int64_t*, int64_t, int, int, bool, int64_t*,
                                          int32_t*, unsigned char*, cudaStream_t);
extern template cudaError_t launch<double>(const double*, const int64_t*, int64_t, int, int, bool, int64_t*,
                                           int32_t*, unsigned char*, cudaStream_t);

}  // namespace cuda
}  // namespace croc_lsap

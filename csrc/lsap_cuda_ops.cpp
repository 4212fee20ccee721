// Torch glue of the CUDA solver (lsap_kernel.cuh, instantiated in lsap_cuda.cu): argument checks,
// allocation, the launch on the current stream, and the error report. Compiled by the host
// compiler; empty unless the extension is built with CUDA (CROC_WITH_CUDA).
//
// No host synchronisation happens inside the launch. NaN/-inf entries and infeasibility are
// found in the kernel and written to a per-problem status tensor; the host reads it once after
// the launch (one device-to-host copy of B int32) to raise the ValueError, which is the one
// synchronisation an error that names the batch element cannot avoid.
//
// Only device-generic torch headers are used (no c10/cuda, no ATen/cuda), so that this file also
// compiles against a CPU build of torch (tests/test_cuda_compile.py checks it there).
#ifdef CROC_WITH_CUDA
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "lsap_checks.h"
#include "lsap_launch.h"

namespace croc_lsap {
namespace {

at::Tensor linear_sum_assignment_cuda(const at::Tensor& cost_in, bool maximize,
                                      const std::optional<at::Tensor>& num_rows_in) {
  check_cost(cost_in, num_rows_in);
  const c10::DeviceGuard guard(cost_in.device());
  const at::Tensor cost = cost_in.contiguous();
  const std::optional<at::Tensor> num_rows = contiguous_rows(num_rows_in);
  const int64_t* rows = num_rows ? num_rows->data_ptr<int64_t>() : nullptr;
  const int64_t batch = cost.size(0);
  const int n = static_cast<int>(cost.size(1));
  const int m = static_cast<int>(cost.size(2));
  at::Tensor out = at::empty({batch, n}, cost.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  at::Tensor status = at::empty({batch}, cost.options().dtype(at::kInt));
  at::Tensor workspace = at::empty({batch * cuda::workspace_bytes(n, m)}, cost.options().dtype(at::kByte));
  const c10::Stream current = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(cost.device());
  const cudaStream_t stream = static_cast<cudaStream_t>(current.native_handle());
  const cudaError_t launched =
      cost.scalar_type() == at::kFloat
          ? cuda::launch(cost.data_ptr<float>(), rows, batch, n, m, maximize, out.data_ptr<int64_t>(),
                         status.data_ptr<int32_t>(), workspace.data_ptr<uint8_t>(), stream)
          : cuda::launch(cost.data_ptr<double>(), rows, batch, n, m, maximize, out.data_ptr<int64_t>(),
                         status.data_ptr<int32_t>(), workspace.data_ptr<uint8_t>(), stream);
  TORCH_CHECK(launched == cudaSuccess, "croc::linear_sum_assignment: kernel launch failed: ",
              cudaGetErrorString(launched));
  raise_on_status(status.cpu(), maximize, num_rows, n, m);
  return out;
}

}  // namespace
}  // namespace croc_lsap

TORCH_LIBRARY_IMPL(croc, CUDA, m) { m.impl("linear_sum_assignment", &croc_lsap::linear_sum_assignment_cuda); }

#endif  // CROC_WITH_CUDA

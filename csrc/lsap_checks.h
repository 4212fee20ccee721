// Argument checks and status reporting shared by the CPU and CUDA implementations of
// croc::linear_sum_assignment. Errors surface in Python as ValueError and name `cost`.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "lsap_core.h"

namespace croc_lsap {

// cost must be a float32/float64 tensor of shape [B, n, m] with n <= m.
inline void check_cost(const at::Tensor& cost) {
  TORCH_CHECK_VALUE(cost.dim() == 3, "cost must have shape [batch, n, m], got ", cost.sizes());
  TORCH_CHECK_VALUE(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
                    "cost must be float32 or float64, got ", cost.scalar_type());
  TORCH_CHECK_VALUE(cost.size(1) <= cost.size(2), "cost must have no more rows than columns (n <= m), got n = ",
                    cost.size(1), " rows and m = ", cost.size(2), " columns");
  TORCH_CHECK_VALUE(cost.size(2) < INT32_MAX, "cost has too many columns: ", cost.size(2));
}

// Raises the error of the first problem whose status is not kOk. `status` is int32 [B] on the CPU.
inline void raise_on_status(const at::Tensor& status, bool maximize) {
  const int32_t* s = status.data_ptr<int32_t>();
  for (int64_t b = 0; b < status.numel(); ++b) {
    TORCH_CHECK_VALUE(s[b] != kInvalidEntry, "cost (batch element ", b, ") contains NaN or ",
                      maximize ? "+inf; with maximize=True use -inf to forbid a pair"
                               : "-inf; use +inf to forbid a pair");
    TORCH_CHECK_VALUE(s[b] != kInfeasible, "cost (batch element ", b,
                      ") is infeasible: its forbidden (", maximize ? "-inf" : "+inf",
                      ") entries leave no assignment of every row to its own column");
  }
}

}  // namespace croc_lsap

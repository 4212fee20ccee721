// Argument checks and status reporting shared by the CPU and CUDA implementations of
// croc::linear_sum_assignment. Errors surface in Python as ValueError and name `cost` or `num_rows`.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "lsap_core.h"

namespace croc_lsap {

// cost must be a float32/float64 tensor of shape [B, n, m] with n <= m, or, with num_rows (int64
// [B] on cost's device), any n: each problem then needs only num_rows[b] <= m, checked per problem.
inline void check_cost(const at::Tensor& cost, const std::optional<at::Tensor>& num_rows = std::nullopt) {
  TORCH_CHECK_VALUE(cost.dim() == 3, "cost must have shape [batch, n, m], got ", cost.sizes());
  TORCH_CHECK_VALUE(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
                    "cost must be float32 or float64, got ", cost.scalar_type());
  TORCH_CHECK_VALUE(num_rows.has_value() || cost.size(1) <= cost.size(2),
                    "cost must have no more rows than columns (n <= m), got n = ", cost.size(1),
                    " rows and m = ", cost.size(2), " columns");
  TORCH_CHECK_VALUE(cost.size(1) < INT32_MAX && cost.size(2) < INT32_MAX, "cost is too large: ", cost.sizes());
  if (!num_rows.has_value()) return;
  TORCH_CHECK_VALUE(num_rows->scalar_type() == at::kLong, "num_rows must be int64, got ", num_rows->scalar_type());
  TORCH_CHECK_VALUE(num_rows->dim() == 1 && num_rows->size(0) == cost.size(0), "num_rows must have shape [",
                    cost.size(0), "] (one count per problem), got ", num_rows->sizes());
  TORCH_CHECK_VALUE(num_rows->device() == cost.device(), "num_rows is on ", num_rows->device(),
                    " but cost is on ", cost.device());
}

inline std::optional<at::Tensor> contiguous_rows(const std::optional<at::Tensor>& num_rows) {
  if (!num_rows.has_value()) return std::nullopt;
  return num_rows->contiguous();
}

// Raises the error of the first problem whose status is not kOk. `status` is int32 [B] on the CPU;
// num_rows (any device, read only on a kBadRowCount) the counts of a ragged batch.
inline void raise_on_status(const at::Tensor& status, bool maximize,
                            const std::optional<at::Tensor>& num_rows = std::nullopt, int64_t n = 0,
                            int64_t m = 0) {
  const int32_t* s = status.data_ptr<int32_t>();
  for (int64_t b = 0; b < status.numel(); ++b) {
    if (s[b] == kBadRowCount) {
      const int64_t rows = num_rows->select(0, b).item<int64_t>();
      TORCH_CHECK_VALUE(false, "num_rows[", b, "] = ", rows, " is out of range: expected 0 <= num_rows[b] <= ",
                        "min(n, m) = ", n < m ? n : m, " (cost has n = ", n, " rows and m = ", m, " columns)");
    }
    TORCH_CHECK_VALUE(s[b] != kInvalidEntry, "cost (batch element ", b, ") contains NaN or ",
                      maximize ? "+inf; with maximize=True use -inf to forbid a pair"
                               : "-inf; use +inf to forbid a pair");
    TORCH_CHECK_VALUE(s[b] != kInfeasible, "cost (batch element ", b,
                      ") is infeasible: its forbidden (", maximize ? "-inf" : "+inf",
                      ") entries leave no assignment of every row to its own column");
  }
}

}  // namespace croc_lsap

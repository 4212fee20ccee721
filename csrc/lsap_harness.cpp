// Host harness of the CUDA kernel's per-problem algorithm (lsap_kernel.cuh): the same driver
// (lsap_driver.h), so the same phases in the same order, with a loop over `num_threads` simulated
// threads wherever the kernel spreads work over its block, and over 32 simulated lanes for the
// warp-per-row greedy start. Between two phases the kernel has a barrier; here a phase simply
// finishes before the next begins. What stays unproven without a GPU is the launch and the
// warp/block reduction primitives, not the algorithm. No pruning: the kernel works on the whole
// matrix. CPU tensors only; used by the tests.
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "lsap_checks.h"
#include "lsap_driver.h"

namespace croc_lsap {
namespace {

constexpr int kWarp = 32;

// The driver's executor that stands in for a block of `nthreads` CUDA threads: every strided
// phase loops over the thread ids, the warp-per-row minima over 32 lanes, reductions over the
// threads' shares; a barrier is the end of a phase.
struct SimulatedBlock {
  int nthreads;

  template <typename F>
  void strided(F&& f) {
    for (int tid = 0; tid < nthreads; ++tid) f(tid, nthreads);
  }
  void sync() {}
  template <typename F>
  void serial(F&& f) {
    f();
  }
  template <typename F>
  bool all(F&& f) {
    bool ok = true;
    for (int tid = 0; tid < nthreads; ++tid) ok = f(tid, nthreads) && ok;
    return ok;
  }
  template <typename T, typename Store>
  void row_minima(const CostView<T>& cost, const Workspace& w, bool /*warm*/, Store&& store) {
    for (int i = 0; i < w.n; ++i) {
      RowMin r{no_candidate(), false};
      for (int lane = 0; lane < kWarp; ++lane) r = combine_row_min(r, row_min_share(cost, w.v, i, w.m, lane, kWarp));
      store(i, r);
    }
  }
  template <typename T>
  Candidate relax_best(const CostView<T>& cost, const Workspace& w, int row, double min_val, bool first) {
    Candidate best = no_candidate();
    for (int tid = 0; tid < nthreads; ++tid) best = best_of(best, relax_share(cost, w, row, min_val, first, tid, nthreads));
    return best;
  }
  template <typename T>
  void column_minima(const CostView<T>& cost, const Workspace& w, double* col_min) {
    for (int tid = 0; tid < nthreads; ++tid) column_min_share(cost, w.n, w.m, col_min, tid, nthreads);
  }
  void threshold(const double* col_min, int m, int rank, double* theta) {
    for (int tid = 0; tid < nthreads; ++tid) column_threshold_share(col_min, m, rank, theta, tid, nthreads);
  }
};

template <typename T>
void harness_batch(const at::Tensor& cost, const int64_t* num_rows, bool maximize, int nthreads, at::Tensor& out,
                   at::Tensor& status) {
  const int n = static_cast<int>(cost.size(1));
  const int m = static_cast<int>(cost.size(2));
  std::vector<double> u(n), v(m), dist(m), visited_dist(m), visited_v(m), col_min(m);
  std::vector<int32_t> path(m), row4col(m), col4row(n), visited(m);
  std::vector<Candidate> row_min(n);
  for (int64_t b = 0; b < cost.size(0); ++b) {
    int result;
    const int rows = problem_rows(num_rows, b, n, m, &result);
    const Workspace w{rows,           m,           u.data(),       v.data(),       dist.data(),         path.data(),
                      row4col.data(), col4row.data(), visited.data(), visited_dist.data(), visited_v.data()};
    if (result == kOk) {
      const CostView<T> view{cost.data_ptr<T>() + b * static_cast<int64_t>(n) * m, m, maximize ? -1.0 : 1.0};
      SimulatedBlock block{nthreads};
      Shared shared{};
      result = solve_problem_with(block, view, w, col_min.data(), row_min.data(), shared);
    }
    status.data_ptr<int32_t>()[b] = result;
    for (int i = 0; i < n; ++i) out.data_ptr<int64_t>()[b * n + i] = result == kOk && i < rows ? col4row[i] : -1;
  }
}

at::Tensor lsap_block_harness(const at::Tensor& cost_in, bool maximize, int64_t num_threads,
                              const std::optional<at::Tensor>& num_rows_in) {
  check_cost(cost_in, num_rows_in);
  TORCH_CHECK_VALUE(num_threads >= 1, "num_threads must be >= 1, got ", num_threads);
  const at::Tensor cost = cost_in.contiguous();
  const std::optional<at::Tensor> num_rows = contiguous_rows(num_rows_in);
  const int64_t* rows = num_rows ? num_rows->data_ptr<int64_t>() : nullptr;
  at::Tensor out = at::empty({cost.size(0), cost.size(1)}, cost.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  at::Tensor status = at::zeros({cost.size(0)}, cost.options().dtype(at::kInt));
  if (cost.scalar_type() == at::kFloat) {
    harness_batch<float>(cost, rows, maximize, static_cast<int>(num_threads), out, status);
  } else {
    harness_batch<double>(cost, rows, maximize, static_cast<int>(num_threads), out, status);
  }
  raise_on_status(status, maximize, num_rows, cost.size(1), cost.size(2));
  return out;
}

}  // namespace
}  // namespace croc_lsap

TORCH_LIBRARY_IMPL(croc, CPU, m) { m.impl("lsap_block_harness", &croc_lsap::lsap_block_harness); }

// Host harness of the CUDA kernel's per-problem algorithm (lsap_cuda.cu): the same phases, in the
// same order, calling the same lsap_core.h functions, with a loop over `num_threads` simulated
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

namespace croc_lsap {
namespace {

constexpr int kWarp = 32;

// Greedy start (kernel: init strided over the block, one warp per row for the row minima, then
// thread 0 claims in row order). Returns the number of rows assigned; sets *invalid on NaN/-inf.
template <typename T>
int greedy_phase(const CostView<T>& cost, const Workspace& w, const double* col_min, double theta, int nthreads,
                 bool* invalid) {
  for (int tid = 0; tid < nthreads; ++tid) init_workspace(w, col_min, theta, tid, nthreads);
  std::vector<Candidate> row_min(w.n);
  for (int i = 0; i < w.n; ++i) {
    RowMin r{no_candidate(), false};
    for (int lane = 0; lane < kWarp; ++lane) r = combine_row_min(r, row_min_share(cost, w.v, i, w.m, lane, kWarp));
    row_min[i] = r.best;
    *invalid = *invalid || r.invalid;
  }
  int claimed = 0;
  for (int i = 0; i < w.n; ++i) claimed += greedy_claim(w, i, row_min[i]);
  return claimed;
}

// Shortest augmenting paths (kernel: relax strided over the block, block argmin, thread 0
// settles; dual update strided; thread 0 augments).
template <typename T>
Status search_phase(const CostView<T>& cost, const Workspace& w, int nthreads) {
  for (int root = 0; root < w.n; ++root) {
    if (w.col4row[root] != -1) continue;
    Search s = start_search(root);
    bool first = true;
    while (s.sink < 0 && s.status == kOk) {
      Candidate best = no_candidate();
      for (int tid = 0; tid < nthreads; ++tid)
        best = best_of(best, relax_share(cost, w, s.row, s.min_val, first, tid, nthreads));
      first = false;
      settle(w, s, best);
    }
    if (s.status != kOk) return kInfeasible;
    for (int tid = 0; tid < nthreads; ++tid) update_duals(w, s, root, tid, nthreads);
    augment(w, root, s.sink);
  }
  return kOk;
}

template <typename T>
Status run_block(const CostView<T>& cost, const Workspace& w, double* col_min, int nthreads) {
  bool invalid = false;
  const int claimed = greedy_phase(cost, w, nullptr, 0.0, nthreads, &invalid);
  if (invalid) return kInvalidEntry;
  if (2 * claimed >= w.n) return search_phase(cost, w, nthreads);
  double theta = 0.0;
  for (int tid = 0; tid < nthreads; ++tid) column_min_share(cost, w.n, w.m, col_min, tid, nthreads);
  for (int tid = 0; tid < nthreads; ++tid)
    column_threshold_share(col_min, w.m, warm_start_rank(w.n, w.m), &theta, tid, nthreads);
  greedy_phase(cost, w, col_min, theta, nthreads, &invalid);
  const Status status = search_phase(cost, w, nthreads);
  bool certified = true;
  for (int tid = 0; tid < nthreads; ++tid) certified = free_columns_certified_share(w, tid, nthreads) && certified;
  if (status != kOk || certified) return status;
  greedy_phase(cost, w, nullptr, 0.0, nthreads, &invalid);
  return search_phase(cost, w, nthreads);
}

template <typename T>
void harness_batch(const at::Tensor& cost, bool maximize, int nthreads, at::Tensor& out, at::Tensor& status) {
  const int n = static_cast<int>(cost.size(1));
  const int m = static_cast<int>(cost.size(2));
  std::vector<double> u(n), v(m), dist(m), visited_dist(m), visited_v(m), col_min(m);
  std::vector<int32_t> path(m), row4col(m), col4row(n), visited(m);
  const Workspace w{n,           m,           u.data(),       v.data(),       dist.data(),         path.data(),
                    row4col.data(), col4row.data(), visited.data(), visited_dist.data(), visited_v.data()};
  for (int64_t b = 0; b < cost.size(0); ++b) {
    const CostView<T> view{cost.data_ptr<T>() + b * static_cast<int64_t>(n) * m, m, maximize ? -1.0 : 1.0};
    status.data_ptr<int32_t>()[b] = run_block(view, w, col_min.data(), nthreads);
    for (int i = 0; i < n; ++i) out.data_ptr<int64_t>()[b * n + i] = col4row[i];
  }
}

at::Tensor lsap_block_harness(const at::Tensor& cost_in, bool maximize, int64_t num_threads) {
  check_cost(cost_in);
  TORCH_CHECK_VALUE(num_threads >= 1, "num_threads must be >= 1, got ", num_threads);
  const at::Tensor cost = cost_in.contiguous();
  at::Tensor out = at::empty({cost.size(0), cost.size(1)}, cost.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  at::Tensor status = at::zeros({cost.size(0)}, cost.options().dtype(at::kInt));
  if (cost.scalar_type() == at::kFloat) {
    harness_batch<float>(cost, maximize, static_cast<int>(num_threads), out, status);
  } else {
    harness_batch<double>(cost, maximize, static_cast<int>(num_threads), out, status);
  }
  raise_on_status(status, maximize);
  return out;
}

}  // namespace
}  // namespace croc_lsap

TORCH_LIBRARY_IMPL(croc, CPU, m) { m.impl("lsap_block_harness", &croc_lsap::lsap_block_harness); }

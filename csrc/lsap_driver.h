// The one driver of the per-problem solver: the phases of lsap_core.h in their order, with every
// barrier, written once and parametrised over how a block's threads run (the executor `Ex`).
//
//   greedy start from v = 0; if it assigned at least half of the rows, the searches, done.
//   Otherwise the warm start (column minima, threshold, greedy from the discounted v), the
//   searches, and, when the warm start's duals do not certify the result, a plain re-solve.
//
// Three executors run it: the CUDA kernel's block of threads (lsap_kernel.cuh: threadIdx.x /
// blockDim.x, __syncthreads, warp and block reductions), the host harness that stands in for
// those threads with loops (lsap_harness.cpp, so the tests run the kernel's real control flow),
// and the CPU solver's single thread (lsap_cpu.cpp, with its vectorised Dijkstra step). An
// executor provides:
//
//   strided(f)            every thread t of the block calls f(t, nthreads)
//   sync()                a barrier (a no-op where the threads run one after another)
//   serial(f)             one thread calls f()
//   all(f) -> bool        whether f(t, nthreads) holds for every thread (a barrier)
//   row_minima(cost, w, warm, store)   calls store(i, RowMin) for every row i of w: row i's
//                                      minimum reduced cost c[i][j] - w.v[j]
//   relax_best(cost, w, row, min_val, first) -> Candidate   one Dijkstra step (relax_share over
//                                      the block, then the block's best; valid in the serial thread)
//   column_minima(cost, w, col_min)    col_min[j] = min_i c[i][j]
//   threshold(col_min, m, rank, theta) *theta = the value of rank `rank` among col_min
//
// State the threads share (`Shared`) lives in shared memory on the GPU, on the stack elsewhere.
#pragma once

#include "lsap_core.h"

namespace croc_lsap {

// What a block's threads share while solving one problem.
struct Shared {
  Search search;
  int32_t invalid;  // a NaN or forbidden infinity was seen
  int32_t claimed;  // rows the last greedy start assigned
  double theta;     // the warm start's threshold
};

// Greedy start from v = 0 (col_min == nullptr) or from the warm start with threshold theta.
// Returns the number of rows assigned (the same in every thread); sets sh.invalid.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Ex, typename T>
CROC_HD int greedy_phase(Ex& ex, const CostView<T>& cost, const Workspace& w, const double* col_min, double theta,
                         Candidate* row_min, Shared& sh) {
  ex.strided([&](int tid, int nthreads) { init_workspace(w, col_min, theta, tid, nthreads); });
  ex.sync();
  ex.row_minima(cost, w, col_min != nullptr, [&](int i, const RowMin& r) {
    row_min[i] = r.best;
    if (r.invalid) sh.invalid = 1;
  });
  ex.sync();
  ex.serial([&] {
    int count = 0;
    for (int i = 0; i < w.n; ++i) count += greedy_claim(w, i, row_min[i]);
    sh.claimed = count;
  });
  ex.sync();
  return sh.claimed;
}

// Shortest augmenting paths for the rows the greedy start left unassigned. Returns kOk or
// kInfeasible (the same in every thread).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Ex, typename T>
CROC_HD int search_phase(Ex& ex, const CostView<T>& cost, const Workspace& w, Shared& sh) {
  Search& s = sh.search;
  for (int root = 0; root < w.n; ++root) {
    if (w.col4row[root] != -1) continue;
    ex.serial([&] { s = start_search(root); });
    ex.sync();
    bool first = true;
    while (true) {
      const Candidate best = ex.relax_best(cost, w, s.row, s.min_val, first);
      first = false;
      ex.serial([&] { settle(w, s, best); });
      ex.sync();
      if (s.status != kOk || s.sink >= 0) break;
    }
    if (s.status != kOk) return kInfeasible;
    ex.strided([&](int tid, int nthreads) { update_duals(w, s, root, tid, nthreads); });
    ex.sync();
    ex.serial([&] { augment(w, root, s.sink); });
    ex.sync();
  }
  return kOk;
}

// Solves the problem of w.n rows and w.m columns: a Status (the same in every thread), with the
// assignment in w.col4row when kOk. col_min: [m] scratch; row_min: [n] scratch (shared memory or
// global memory visible to the whole block).
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Ex, typename T>
CROC_HD int solve_problem_with(Ex& ex, const CostView<T>& cost, const Workspace& w, double* col_min,
                               Candidate* row_min, Shared& sh) {
  ex.serial([&] { sh.invalid = 0; });
  ex.sync();
  if (2 * greedy_phase(ex, cost, w, nullptr, 0.0, row_min, sh) >= w.n) {
    return sh.invalid ? kInvalidEntry : search_phase(ex, cost, w, sh);
  }
  if (sh.invalid) return kInvalidEntry;
  ex.column_minima(cost, w, col_min);
  ex.sync();
  ex.threshold(col_min, w.m, warm_start_rank(w.n, w.m), &sh.theta);
  ex.sync();
  greedy_phase(ex, cost, w, col_min, sh.theta, row_min, sh);
  const int status = search_phase(ex, cost, w, sh);
  const bool certified =
      ex.all([&](int tid, int nthreads) { return free_columns_certified_share(w, tid, nthreads); });
  if (status != kOk || certified) return status;
  greedy_phase(ex, cost, w, nullptr, 0.0, row_min, sh);
  return search_phase(ex, cost, w, sh);
}

// Rows of problem b: num_rows[b] when given (ragged batches), else n; kBadRowCount when that is
// outside [0, min(n, m)].
CROC_HD int problem_rows(const int64_t* num_rows, int64_t b, int n, int m, int* status) {
  const int64_t rows = num_rows == nullptr ? n : num_rows[b];
  const bool ok = rows >= 0 && rows <= n && rows <= m;
  *status = ok ? kOk : kBadRowCount;
  return ok ? static_cast<int>(rows) : 0;
}

}  // namespace croc_lsap

// Per-problem core of the exact rectangular linear assignment solver (n rows <= m columns).
//
// Shortest augmenting paths (Dijkstra on reduced costs, the LAPJV-style primal-dual method that
// scipy also uses) after a greedy start: every row whose minimum reduced cost sits in a column no
// earlier row claimed is assigned there at once, with u[row] = that minimum, which is dual
// feasible and tight. The remaining rows are added one at a time by a shortest path from the row
// to a free column. Invariants between augmentations (the dual of the rectangular problem):
//   u[i] + v[j] <= c[i][j] for all i, j;  equality on assigned pairs;  v[j] <= 0.
// At the end every free column must have v[j] == 0 (complementary slackness); then the duals
// prove the assignment optimal. Starting from v = 0 this holds by construction (a search never
// changes the potential of a free column). When rows compete for the same cheap columns, a warm
// start v[j] = min(0, col_min[j] - theta) makes those columns less attractive, so the greedy start
// spreads the rows and the searches stay short; if a discounted column ends up free, the problem
// is solved again from v = 0. Costs, potentials and path lengths are all double, so a float32
// matrix is solved exactly as its float64 widening (as scipy does).
//
// Every function here is __host__ __device__ over plain pointers. Work that a CUDA thread block
// spreads over its threads takes (tid, nthreads) and touches only its strided share; functions
// marked "serial" run on one thread between barriers. The order of the phases is written once,
// in lsap_driver.h, over an executor that says how the threads run: the CUDA kernel's block
// (lsap_kernel.cuh), the host harness's loop over simulated threads (lsap_harness.cpp) and the
// CPU solver's single thread (lsap_cpu.cpp).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CROC_HD __host__ __device__ __forceinline__
#else
#define CROC_HD inline
#endif

namespace croc_lsap {

// Outcome of one problem, written to the status output.
enum Status : int32_t { kOk = 0, kInfeasible = 1, kInvalidEntry = 2, kBadRowCount = 3 };

CROC_HD double infinity() { return __builtin_huge_val(); }

// The cost matrix of one problem seen as doubles; maximisation negates (exact in double).
template <typename T>
struct CostView {
  const T* data;    // [n, stride] row-major
  int64_t stride;   // elements between consecutive rows
  double sign;      // +1 to minimise, -1 to maximise

  CROC_HD double at(int i, int j) const { return sign * static_cast<double>(data[i * stride + j]); }
};

// A column candidate for the argmin of one Dijkstra step. The order is total and independent of
// how the columns were split over threads: smaller distance, then free before assigned, then
// smaller column index.
struct Candidate {
  double dist;
  int32_t assigned;  // 0 for a free column, 1 for an assigned one
  int32_t col;       // INT32_MAX for "no candidate"
};

CROC_HD Candidate no_candidate() { return Candidate{infinity(), 1, INT32_MAX}; }

CROC_HD bool better(const Candidate& a, const Candidate& b) {
  if (a.dist != b.dist) return a.dist < b.dist;
  if (a.assigned != b.assigned) return a.assigned < b.assigned;
  return a.col < b.col;
}

CROC_HD Candidate best_of(const Candidate& a, const Candidate& b) { return better(b, a) ? b : a; }

// Working memory of one problem (all arrays owned by the caller).
struct Workspace {
  int n, m;
  double* u;              // [n] row potentials
  double* v;              // [m] column potentials (<= 0); -inf marks a column settled in the search
  double* dist;           // [m] shortest path length from the current root row; +inf once settled
  int32_t* path;          // [m] row preceding each column on its shortest path
  int32_t* row4col;       // [m] row assigned to each column, -1 if free
  int32_t* col4row;       // [n] column assigned to each row, -1 if unassigned
  int32_t* visited;       // [m] settled columns of the current search, in order
  double* visited_dist;   // [m] their distances when settled
  double* visited_v;      // [m] their potentials before the search
};

// Resets the assignment and the row potentials; v[j] = min(0, col_min[j] - theta) when col_min is
// given and theta is finite (a warm start that makes the columns every row wants less
// attractive; see warm_start_rank), else 0. Strided over tid.
CROC_HD void init_workspace(const Workspace& w, const double* col_min, double theta, int tid, int nthreads) {
  for (int j = tid; j < w.m; j += nthreads) {
    const bool discounted = col_min != nullptr && theta < infinity() && col_min[j] < theta;
    w.v[j] = discounted ? col_min[j] - theta : 0.0;
    w.row4col[j] = -1;
  }
  for (int i = tid; i < w.n; i += nthreads) {
    w.u[i] = 0.0;
    w.col4row[i] = -1;
  }
}

// This thread's share of row i's minimum reduced cost c[i][j] - v[j] (ties to the smaller column),
// and whether its share of the row holds an entry that is not allowed: NaN, or -inf after the
// sign is applied.
struct RowMin {
  Candidate best;
  bool invalid;
};

CROC_HD RowMin combine_row_min(const RowMin& a, const RowMin& b) {
  return RowMin{best_of(a.best, b.best), a.invalid || b.invalid};
}

template <typename T>
CROC_HD RowMin row_min_share(const CostView<T>& cost, const double* v, int i, int m, int tid, int nthreads) {
  RowMin r{no_candidate(), false};
  for (int j = tid; j < m; j += nthreads) {
    const double c = cost.at(i, j);
    r.invalid = r.invalid || c != c || c == -infinity();
    const Candidate cand{c - v[j], 0, j};
    if (better(cand, r.best)) r.best = cand;
  }
  return r;
}

// This thread's share of the column minima col_min[j] = min_i c[i][j].
template <typename T>
CROC_HD void column_min_share(const CostView<T>& cost, int n, int m, double* col_min, int tid, int nthreads) {
  for (int j = tid; j < m; j += nthreads) {
    double best = infinity();
    for (int i = 0; i < n; ++i) {
      const double c = cost.at(i, j);
      best = c < best ? c : best;
    }
    col_min[j] = best;
  }
}

// Number of columns the warm start discounts: the (rank + 1)-th smallest column minimum is the
// threshold theta, so `rank` columns get v < 0. Chosen below n so that, when rows compete for the
// same cheap columns, all of them are used by the optimum and the warm start proves optimal.
CROC_HD int warm_start_rank(int n, int m) { return n - n / 8 < m ? n - n / 8 : m - 1; }

// The value of rank `rank` (0-based) among col_min[0..m) ordered by (value, index): the thread
// whose column has that rank writes it to *theta. Strided over tid; O(m^2 / nthreads).
CROC_HD void column_threshold_share(const double* col_min, int m, int rank, double* theta, int tid, int nthreads) {
  for (int j = tid; j < m; j += nthreads) {
    int below = 0;
    for (int k = 0; k < m; ++k) below += col_min[k] < col_min[j] || (col_min[k] == col_min[j] && k < j);
    if (below == rank) *theta = col_min[j];
  }
}

// Serial. Greedy start for row i given its minimum reduced cost: take the column if it is still
// free. u[i] = min_j (c[i][j] - v[j]) keeps every invariant. Returns whether the row was assigned.
CROC_HD bool greedy_claim(const Workspace& w, int i, const Candidate& row_min) {
  if (row_min.dist == infinity() || w.row4col[row_min.col] != -1) return false;
  w.row4col[row_min.col] = i;
  w.col4row[i] = row_min.col;
  w.u[i] = row_min.dist;
  return true;
}

// One Dijkstra step: relax every unsettled column from row i, whose settled distance is min_val,
// and return this thread's best unsettled column. `first` marks the root step, which overwrites
// the distances left by the previous search instead of comparing with them. Settled columns
// have v = -inf, so r = +inf and they are neither relaxed nor chosen.
template <typename T>
CROC_HD Candidate relax_share(const CostView<T>& cost, const Workspace& w, int i, double min_val,
                              bool first, int tid, int nthreads) {
  Candidate best = no_candidate();
  const double base = min_val - w.u[i];
  for (int j = tid; j < w.m; j += nthreads) {
    const double r = base + cost.at(i, j) - w.v[j];
    if (first || r < w.dist[j]) {
      w.dist[j] = r;
      w.path[j] = i;
    }
    const Candidate cand{w.dist[j], w.row4col[j] == -1 ? 0 : 1, j};
    if (better(cand, best)) best = cand;
  }
  return best;
}

// Progress of one Dijkstra, shared by all threads (lives in shared memory on the GPU).
struct Search {
  int32_t row;        // row to relax next
  int32_t sink;       // free column reached, -1 while searching
  int32_t n_visited;  // settled columns so far
  int32_t status;     // kOk or kInfeasible
  double min_val;     // distance of the last settled column
};

CROC_HD Search start_search(int root) { return Search{root, -1, 0, kOk, 0.0}; }

// Serial. Settles the block's best column: ends the search at a free column, continues from the
// row assigned to it otherwise, or reports infeasibility when no column is reachable.
CROC_HD void settle(const Workspace& w, Search& s, const Candidate& best) {
  if (best.dist == infinity()) {
    s.status = kInfeasible;
    return;
  }
  const int j = best.col;
  s.min_val = best.dist;
  w.visited[s.n_visited] = j;
  w.visited_dist[s.n_visited] = best.dist;
  w.visited_v[s.n_visited] = w.v[j];
  ++s.n_visited;
  w.v[j] = -infinity();
  w.dist[j] = infinity();
  if (w.row4col[j] == -1) {
    s.sink = j;
  } else {
    s.row = w.row4col[j];
  }
}

// Dual update after a successful search from `root`, strided over the settled columns (each
// settled assigned column has its own row, so no two threads touch one entry). Restores the
// potentials of the settled columns, lowered by how much shorter their paths were than the sink's.
CROC_HD void update_duals(const Workspace& w, const Search& s, int root, int tid, int nthreads) {
  if (tid == 0) w.u[root] += s.min_val;
  for (int k = tid; k < s.n_visited; k += nthreads) {
    const int j = w.visited[k];
    const double delta = s.min_val - w.visited_dist[k];
    w.v[j] = w.visited_v[k] - delta;
    if (j != s.sink) w.u[w.row4col[j]] += delta;
  }
}

// Serial. Flips the assignment along the shortest path from the sink back to `root`.
CROC_HD void augment(const Workspace& w, int root, int sink) {
  int j = sink;
  while (true) {
    const int i = w.path[j];
    w.row4col[j] = i;
    const int previous = w.col4row[i];
    w.col4row[i] = j;
    if (i == root) break;
    j = previous;
  }
}

// Whether the final duals certify optimality: every free column must have v == 0 (only the warm
// start can leave a free column with v < 0). Strided over tid; true unless this share fails.
CROC_HD bool free_columns_certified_share(const Workspace& w, int tid, int nthreads) {
  bool ok = true;
  for (int j = tid; j < w.m; j += nthreads) ok = ok && (w.row4col[j] != -1 || w.v[j] == 0.0);
  return ok;
}

}  // namespace croc_lsap

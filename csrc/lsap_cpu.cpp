// CPU implementation of croc::linear_sum_assignment: the problems of a (possibly ragged) batch are
// solved in parallel on torch's threads (see WorkQueue), each one on one thread by the driver of
// lsap_driver.h with the CpuThread executor (the Dijkstra step has a vectorised equivalent here,
// relax_row).
//
// One vectorised pass over a problem (survey) finds every row's minimum and any NaN/-inf entry. If the greedy start would assign at least half of the rows, the
// searches are short and the whole matrix is solved directly. Otherwise the rows compete for the
// same cheap columns (the raw-pool case of the Croc stage); a second pass takes the column minima
// (for the warm start of lsap_core.h) and column pruning pays off, exactly:
// the solver works on a candidate set S (the rows' cheapest columns, topped up with the columns of
// smallest column minimum until S holds n + n/2 columns), copied into a dense double matrix. The
// duals found on S, extended with v = 0 outside S, satisfy every invariant of lsap_core.h on the
// whole matrix iff u[i] <= c[i][j] for every j outside S; then the assignment is optimal for the
// whole matrix. Columns that break this join S and the problem is solved again; an infeasible S
// falls back to the whole matrix.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "lsap_checks.h"
#include "lsap_driver.h"

namespace croc_lsap {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#define CROC_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CROC_SIMD_CLONES
#endif

// Four lanes in vector registers (AVX2 in the avx2 clones, pairs of SSE2 registers otherwise).
typedef double Double4 __attribute__((vector_size(32)));
typedef int64_t Mask4 __attribute__((vector_size(32)));
typedef float Float4 __attribute__((vector_size(16)));
typedef int32_t Int4 __attribute__((vector_size(16)));

// Loads four costs starting at p, widened to double and multiplied by the sign.
template <typename T>
__attribute__((always_inline)) inline void load_costs(const T* p, const Double4& sign4, Double4& out) {
  if constexpr (std::is_same_v<T, float>) {
    Float4 f;
    std::memcpy(&f, p, sizeof(f));
    out = sign4 * __builtin_convertvector(f, Double4);
  } else {
    std::memcpy(&out, p, sizeof(out));
    out = sign4 * out;
  }
}

// Scratch arrays of one thread, reused across problems and calls.
struct Scratch {
  std::vector<double> u, v, dist, visited_dist, visited_v, col_min_view;
  std::vector<int32_t> path, row4col, col4row, visited;
  std::vector<double> sub;  // [n, |S|] the candidate columns of the cost, signed

  Workspace bind(int n, int m) {
    u.resize(n);
    col4row.resize(n);
    for (auto* a : {&v, &dist, &visited_dist, &visited_v}) a->resize(m);
    for (auto* a : {&path, &row4col, &visited}) a->resize(m);
    return Workspace{n,          m,           u.data(),       v.data(),       dist.data(),         path.data(),
                     row4col.data(), col4row.data(), visited.data(), visited_dist.data(), visited_v.data()};
  }
};

// What one pass over a problem learns.
struct Survey {
  std::vector<Candidate> row_min;  // [n] each row's cheapest column (ties to the smaller index)
  std::vector<double> col_min;     // [m] each column's minimum (filled for hard problems only)
  bool invalid = false;            // NaN, or -inf after the sign
};

// Returns the cheapest column of one row (sign applied, ties to the smaller index); sets *invalid
// on NaN or -inf. Works in the input precision (8 float or 4 double lanes): negation and the
// comparisons are exact, and widening to double keeps the order.
template <typename T>
__attribute__((always_inline)) inline Candidate survey_row_body(const T* __restrict row, T sign, int m,
                                                                bool* invalid) {
  typedef T Vec __attribute__((vector_size(32)));
  using Mask = decltype(Vec{} < Vec{});
  constexpr int kLanes = 32 / sizeof(T);
  const T inf = static_cast<T>(infinity());
  Vec best, minus_inf;
  Mask best_col, col, step, bad = Mask{} == 1;
  for (int k = 0; k < kLanes; ++k) {
    best[k] = inf;
    minus_inf[k] = -inf;
    best_col[k] = -1;
    col[k] = k;
    step[k] = kLanes;
  }
  int j = 0;
  for (; j + kLanes <= m; j += kLanes, col += step) {
    Vec c;
    std::memcpy(&c, row + j, sizeof(c));
    c = c * sign;
    bad |= (c != c) | (c == minus_inf);
    const Mask take = c < best;
    best = take ? c : best;
    best_col = take ? col : best_col;
  }
  Candidate result = no_candidate();
  bool any_bad = false;
  for (int k = 0; k < kLanes; ++k) {
    any_bad = any_bad || bad[k] != 0;
    if (best_col[k] >= 0)
      result = best_of(result, Candidate{static_cast<double>(best[k]), 0, static_cast<int32_t>(best_col[k])});
  }
  for (; j < m; ++j) {
    const T c = row[j] * sign;
    any_bad = any_bad || c != c || c == -inf;
    result = best_of(result, Candidate{static_cast<double>(c), 0, j});
  }
  *invalid = *invalid || any_bad;
  if (result.col == INT32_MAX) result.col = 0;  // a row of +inf: any column, the search reports it
  return result;
}

CROC_SIMD_CLONES Candidate survey_row(const float* row, double sign, int m, bool* invalid) {
  return survey_row_body(row, static_cast<float>(sign), m, invalid);
}

CROC_SIMD_CLONES Candidate survey_row(const double* row, double sign, int m, bool* invalid) {
  return survey_row_body(row, sign, m, invalid);
}

template <typename T>
void survey(const CostView<T>& cost, int n, int m, Survey& s) {
  s.row_min.resize(n);
  s.col_min.clear();
  s.invalid = false;
  for (int i = 0; i < n; ++i) s.row_min[i] = survey_row(cost.data + i * cost.stride, cost.sign, m, &s.invalid);
}

// Fills s.col_min (only the hard problems need it).
template <typename T>
void column_minima(const CostView<T>& cost, int n, int m, Survey& s) {
  s.col_min.assign(m, infinity());
  double* __restrict col_min = s.col_min.data();
  for (int i = 0; i < n; ++i) {
    const T* __restrict row = cost.data + i * cost.stride;
    for (int j = 0; j < m; ++j) {
      const double c = cost.sign * static_cast<double>(row[j]);
      col_min[j] = c < col_min[j] ? c : col_min[j];
    }
  }
}

// Rows the greedy start from v = 0 assigns: each row's cheapest column, first come first served.
int greedy_count(const Survey& s, int m) {
  std::vector<uint8_t> taken(m, 0);
  int claimed = 0;
  for (const Candidate& c : s.row_min) {
    if (c.dist == infinity() || taken[c.col]) continue;
    taken[c.col] = 1;
    ++claimed;
  }
  return claimed;
}

// One Dijkstra step on one thread over a dense row of costs: the same result as
// relax_share(cost, w, i, min_val, first, 0, 1), in two passes: relax and take the minimum
// distance (vectorised), then find the first column at that distance, preferring a free one (the
// order `better` defines).
template <typename T>
__attribute__((always_inline)) inline Candidate relax_row_body(const T* __restrict cost_row, double sign,
                                                               const Workspace& w, int i, double min_val,
                                                               bool first) {
  const int m = w.m;
  const double base = min_val - w.u[i];
  double* __restrict dist = w.dist;
  int32_t* __restrict path = w.path;
  const double* __restrict v = w.v;
  const Double4 sign4 = {sign, sign, sign, sign};
  const Double4 base4 = {base, base, base, base};
  const Int4 row4 = {i, i, i, i};
  const Mask4 all = {-1, -1, -1, -1};
  Double4 lowest4 = {infinity(), infinity(), infinity(), infinity()};
  int j = 0;
  for (; j + 4 <= m; j += 4) {
    Double4 c, vj, d;
    load_costs(cost_row + j, sign4, c);
    std::memcpy(&vj, v + j, sizeof(vj));
    std::memcpy(&d, dist + j, sizeof(d));
    const Double4 r = base4 + c - vj;
    const Mask4 take = first ? all : (r < d);
    d = take ? r : d;
    std::memcpy(dist + j, &d, sizeof(d));
    Int4 p;
    std::memcpy(&p, path + j, sizeof(p));
    p = __builtin_convertvector(take, Int4) ? row4 : p;
    std::memcpy(path + j, &p, sizeof(p));
    lowest4 = d < lowest4 ? d : lowest4;
  }
  double lowest = std::min(std::min(lowest4[0], lowest4[1]), std::min(lowest4[2], lowest4[3]));
  for (; j < m; ++j) {
    const double r = base + sign * static_cast<double>(cost_row[j]) - v[j];
    if (first || r < dist[j]) {
      dist[j] = r;
      path[j] = i;
    }
    lowest = std::min(lowest, dist[j]);
  }
  Candidate best = no_candidate();
  for (j = 0; j < m; ++j) {
    if (dist[j] != lowest) continue;
    const Candidate cand{lowest, w.row4col[j] == -1 ? 0 : 1, j};
    if (better(cand, best)) best = cand;
    if (cand.assigned == 0) break;
  }
  return best;
}

CROC_SIMD_CLONES Candidate relax_row(const float* cost_row, double sign, const Workspace& w, int i, double min_val,
                                     bool first) {
  return relax_row_body(cost_row, sign, w, i, min_val, first);
}

CROC_SIMD_CLONES Candidate relax_row(const double* cost_row, double sign, const Workspace& w, int i,
                                     double min_val, bool first) {
  return relax_row_body(cost_row, sign, w, i, min_val, first);
}

// The driver's executor for one CPU thread (lsap_driver.h), with what the survey already knows:
// the row minima from v = 0 (`cached`) and the column minima (filled before the warm start runs,
// by column_minima() below, in the problem's numbering). The Dijkstra step is relax_row.
struct CpuThread {
  const Candidate* cached;  // [n] each row's cheapest column in the view's numbering

  template <typename F>
  void strided(F&& f) {
    f(0, 1);
  }
  void sync() {}
  template <typename F>
  void serial(F&& f) {
    f();
  }
  template <typename F>
  bool all(F&& f) {
    return f(0, 1);
  }
  template <typename T, typename Store>
  void row_minima(const CostView<T>& cost, const Workspace& w, bool warm, Store&& store) {
    for (int i = 0; i < w.n; ++i) store(i, warm ? row_min_share(cost, w.v, i, w.m, 0, 1) : RowMin{cached[i], false});
  }
  template <typename T>
  Candidate relax_best(const CostView<T>& cost, const Workspace& w, int row, double min_val, bool first) {
    return relax_row(cost.data + row * cost.stride, cost.sign, w, row, min_val, first);
  }
  template <typename T>
  void column_minima(const CostView<T>&, const Workspace&, double*) {}  // the survey's, passed in
  void threshold(const double* col_min, int m, int rank, double* theta) {
    std::vector<double> sorted(col_min, col_min + m);
    std::nth_element(sorted.begin(), sorted.begin() + rank, sorted.end());
    *theta = sorted[rank];
  }
};

// Solves one view (the whole matrix or the candidate columns) with the driver. row_min: each
// row's cheapest column in the view's numbering; col_min: [m] the view's column minima (read
// only when the warm start runs).
template <typename T>
Status solve_view(const CostView<T>& cost, const Workspace& w, const std::vector<Candidate>& row_min,
                  double* col_min) {
  CpuThread thread{row_min.data()};
  thread_local std::vector<Candidate> row_min_scratch;
  row_min_scratch.resize(w.n);
  Shared shared{};
  return static_cast<Status>(
      solve_problem_with(thread, cost, w, col_min, row_min_scratch.data(), shared));
}

// Candidate columns: the rows' cheapest columns plus the smallest column minima, up to `target`.
std::vector<uint8_t> candidate_columns(const Survey& s, int m, int target) {
  std::vector<uint8_t> in_set(m, 0);
  for (const Candidate& c : s.row_min) in_set[c.col] = 1;
  std::vector<int32_t> others;
  for (int j = 0; j < m; ++j)
    if (!in_set[j]) others.push_back(j);
  const int have = m - static_cast<int>(others.size());
  const int extra = std::min(static_cast<int>(others.size()), std::max(0, target - have));
  auto by_col_min = [&](int32_t a, int32_t b) {
    return s.col_min[a] < s.col_min[b] || (s.col_min[a] == s.col_min[b] && a < b);
  };
  std::nth_element(others.begin(), others.begin() + extra, others.end(), by_col_min);
  for (int k = 0; k < extra; ++k) in_set[others[k]] = 1;
  return in_set;
}

// Adds to in_set every column j outside it with c[i][j] < u[i]; returns whether there was one.
template <typename T>
bool add_violators(const CostView<T>& cost, int n, int m, const double* u, std::vector<uint8_t>& in_set) {
  bool added = false;
  for (int i = 0; i < n; ++i) {
    const T* row = cost.data + i * cost.stride;
    for (int j = 0; j < m; ++j) {
      if (in_set[j] || !(cost.sign * static_cast<double>(row[j]) < u[i])) continue;
      in_set[j] = 1;
      added = true;
    }
  }
  return added;
}

// Solves on the columns flagged in `in_set`, growing it until the duals prove optimality for the
// whole matrix. Returns kInfeasible if the candidate columns admit no complete assignment.
template <typename T>
Status solve_pruned(const CostView<T>& cost, const Survey& s, int n, int m, std::vector<uint8_t>& in_set,
                    Scratch& scratch, int64_t* out) {
  while (true) {
    std::vector<int32_t> local2global;
    std::vector<int32_t> global2local(m, -1);
    for (int j = 0; j < m; ++j) {
      if (!in_set[j]) continue;
      global2local[j] = static_cast<int32_t>(local2global.size());
      local2global.push_back(j);
    }
    const int ms = static_cast<int>(local2global.size());
    scratch.sub.resize(static_cast<size_t>(n) * ms);
    scratch.col_min_view.resize(ms);
    std::vector<Candidate> row_min(n);
    for (int k = 0; k < ms; ++k) scratch.col_min_view[k] = s.col_min[local2global[k]];
    for (int i = 0; i < n; ++i) {
      double* dst = scratch.sub.data() + static_cast<size_t>(i) * ms;
      for (int k = 0; k < ms; ++k) dst[k] = cost.at(i, local2global[k]);
      row_min[i] = Candidate{s.row_min[i].dist, 0, global2local[s.row_min[i].col]};
    }
    const Workspace w = scratch.bind(n, ms);
    const CostView<double> view{scratch.sub.data(), ms, 1.0};
    if (solve_view(view, w, row_min, scratch.col_min_view.data()) != kOk) return kInfeasible;
    if (!add_violators(cost, n, m, w.u, in_set)) {
      for (int i = 0; i < n; ++i) out[i] = local2global[w.col4row[i]];
      return kOk;
    }
  }
}

template <typename T>
Status solve_full(const CostView<T>& cost, Survey& s, int n, int m, Scratch& scratch, int64_t* out) {
  const Workspace w = scratch.bind(n, m);
  if (solve_view(cost, w, s.row_min, s.col_min.data()) != kOk) return kInfeasible;
  for (int i = 0; i < n; ++i) out[i] = w.col4row[i];
  return kOk;
}

template <typename T>
Status solve_problem(const CostView<T>& cost, int n, int m, int64_t* out) {
  thread_local Survey s;
  thread_local Scratch scratch;
  survey(cost, n, m, s);
  if (s.invalid) return kInvalidEntry;
  if (2 * greedy_count(s, m) < n) {
    column_minima(cost, n, m, s);
    std::vector<uint8_t> in_set = candidate_columns(s, m, std::min(m, n + n / 2));
    const int size = static_cast<int>(std::count(in_set.begin(), in_set.end(), 1));
    if (4 * size < 3 * m && solve_pruned(cost, s, n, m, in_set, scratch, out) == kOk) return kOk;
  }
  return solve_full(cost, s, n, m, scratch, out);
}

// Problems handed out one at a time from a shared counter. The calling thread takes part, and
// waits only for problems that another thread has claimed: a helper that is slow to wake up
// (a busy machine) finds the counter exhausted and leaves, instead of the whole batch waiting at
// a join barrier for it, which made two threads slower than one on our loaded 2-core machines
// with at::parallel_for. The state lives in a shared_ptr so a late helper never touches freed memory.
struct WorkQueue {
  explicit WorkQueue(int64_t size, std::function<void(int64_t)> solve) : size(size), solve(std::move(solve)) {}

  // Solves problems until none is left; returns after notifying if it finished the last one.
  void drain() {
    for (int64_t b = next.fetch_add(1); b < size; b = next.fetch_add(1)) {
      solve(b);
      if (finished.fetch_add(1) + 1 == size) {
        const std::lock_guard<std::mutex> lock(mutex);
        all_done.notify_all();
      }
    }
  }

  void wait() {
    std::unique_lock<std::mutex> lock(mutex);
    all_done.wait(lock, [this] { return finished.load() == size; });
  }

  const int64_t size;
  const std::function<void(int64_t)> solve;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mutex;
  std::condition_variable all_done;
};

// Solves every problem of the batch, on up to at::get_num_threads() threads (helpers come from
// torch's inter-op thread pool). Batches of under ~2^20 cost entries run on the calling thread.
// num_rows: the ragged counts (int64 [B]) or nullptr; rows past a problem's count get -1.
template <typename T>
void solve_batch(const at::Tensor& cost, const int64_t* num_rows, bool maximize, at::Tensor& out,
                 at::Tensor& status) {
  const int64_t batch = cost.size(0);
  const int n = static_cast<int>(cost.size(1));
  const int m = static_cast<int>(cost.size(2));
  const T* data = cost.data_ptr<T>();
  int64_t* cols = out.data_ptr<int64_t>();
  int32_t* st = status.data_ptr<int32_t>();
  const double sign = maximize ? -1.0 : 1.0;
  auto queue = std::make_shared<WorkQueue>(batch, [=](int64_t b) {
    const CostView<T> view{data + b * static_cast<int64_t>(n) * m, m, sign};
    int result;
    const int rows = problem_rows(num_rows, b, n, m, &result);
    if (result == kOk) result = solve_problem(view, rows, m, cols + b * n);
    std::fill(cols + b * n + (result == kOk ? rows : 0), cols + (b + 1) * n, int64_t{-1});
    st[b] = result;
  });
  const int64_t entries = batch * static_cast<int64_t>(n) * m;
  const int64_t helpers = entries < (int64_t{1} << 20) ? 0 : std::min<int64_t>(at::get_num_threads(), batch) - 1;
  for (int64_t h = 0; h < helpers; ++h) at::launch([queue] { queue->drain(); });
  queue->drain();
  queue->wait();
}

at::Tensor linear_sum_assignment_cpu(const at::Tensor& cost_in, bool maximize,
                                     const std::optional<at::Tensor>& num_rows_in) {
  check_cost(cost_in, num_rows_in);
  const at::Tensor cost = cost_in.contiguous();
  const std::optional<at::Tensor> num_rows = contiguous_rows(num_rows_in);
  const int64_t* rows = num_rows ? num_rows->data_ptr<int64_t>() : nullptr;
  at::Tensor out = at::empty({cost.size(0), cost.size(1)}, cost.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  at::Tensor status = at::zeros({cost.size(0)}, cost.options().dtype(at::kInt));
  if (cost.scalar_type() == at::kFloat) {
    solve_batch<float>(cost, rows, maximize, out, status);
  } else {
    solve_batch<double>(cost, rows, maximize, out, status);
  }
  raise_on_status(status, maximize, num_rows, cost.size(1), cost.size(2));
  return out;
}

}  // namespace
}  // namespace croc_lsap

TORCH_LIBRARY_IMPL(croc, CPU, m) { m.impl("linear_sum_assignment", &croc_lsap::linear_sum_assignment_cpu); }

// CUDA kernel of croc::linear_sum_assignment: the whole batch in one launch, one thread block
// per problem. Every phase calls the lsap_core.h functions: column scans (the Dijkstra relax step,
// column minima, the warm-start threshold, the dual update) are strided over the block's threads,
// row minima of the greedy start take one warp per row, argmin reductions use warp shuffles and
// shared memory, and thread 0 runs the serial parts (settle, claim, augment). lsap_harness.cpp runs
// the same phases in the same order on the host.
//
// Needs only the CUDA runtime (no torch headers): lsap_cuda.cu instantiates it, and
// tests/test_cuda_compile.py compiles that for sm_80 and sm_90 on machines without a GPU.
#pragma once

#include <cuda_runtime.h>

#include "lsap_core.h"
#include "lsap_launch.h"

namespace croc_lsap {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ Candidate shuffle_down(const Candidate& c, int offset) {
  return Candidate{__shfl_down_sync(kFullMask, c.dist, offset), __shfl_down_sync(kFullMask, c.assigned, offset),
                   __shfl_down_sync(kFullMask, c.col, offset)};
}

// The best candidate of a warp, valid in lane 0.
__device__ __forceinline__ Candidate warp_best(Candidate c) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) c = best_of(c, shuffle_down(c, offset));
  return c;
}

// The best candidate of the block, valid in thread 0. Contains one barrier.
__device__ __forceinline__ Candidate block_best(Candidate c, Candidate* partial) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  c = warp_best(c);
  if (lane == 0) partial[warp] = c;
  __syncthreads();
  if (warp == 0) c = warp_best(lane < kWarps ? partial[lane] : no_candidate());
  return c;
}

// Carves one problem's arrays out of its workspace: the Workspace, col_min [m], row_min [n].
__device__ inline Workspace carve(unsigned char* base, int n, int m, double** col_min, Candidate** row_min) {
  double* d = reinterpret_cast<double*>(base);
  double* u = d;
  double* v = u + n;
  double* dist = v + m;
  double* visited_dist = dist + m;
  double* visited_v = visited_dist + m;
  *col_min = visited_v + m;
  *row_min = reinterpret_cast<Candidate*>(*col_min + m);
  int32_t* path = reinterpret_cast<int32_t*>(*row_min + n);
  int32_t* row4col = path + m;
  int32_t* col4row = row4col + m;
  int32_t* visited = col4row + n;
  return Workspace{n, m, u, v, dist, path, row4col, col4row, visited, visited_dist, visited_v};
}

// Greedy start: returns the number of rows assigned (same value in every thread); sets *invalid.
template <typename T>
__device__ int greedy_phase(const CostView<T>& cost, const Workspace& w, const double* col_min, double theta,
                            Candidate* row_min, int* invalid, int* claimed) {
  const int lane = threadIdx.x % kWarpSize;
  init_workspace(w, col_min, theta, threadIdx.x, blockDim.x);
  __syncthreads();
  for (int i = threadIdx.x / kWarpSize; i < w.n; i += kWarps) {
    const RowMin r = row_min_share(cost, w.v, i, w.m, lane, kWarpSize);
    const Candidate best = warp_best(r.best);
    const bool bad = __any_sync(kFullMask, r.invalid);
    if (lane == 0) {
      row_min[i] = best;
      if (bad) *invalid = 1;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int count = 0;
    for (int i = 0; i < w.n; ++i) count += greedy_claim(w, i, row_min[i]);
    *claimed = count;
  }
  __syncthreads();
  return *claimed;
}

// Shortest augmenting paths for the rows left unassigned. Returns kOk or kInfeasible.
template <typename T>
__device__ int search_phase(const CostView<T>& cost, const Workspace& w, Search& s, Candidate* partial) {
  for (int root = 0; root < w.n; ++root) {
    if (w.col4row[root] != -1) continue;
    if (threadIdx.x == 0) s = start_search(root);
    __syncthreads();
    bool first = true;
    while (true) {
      Candidate best = relax_share(cost, w, s.row, s.min_val, first, threadIdx.x, blockDim.x);
      first = false;
      best = block_best(best, partial);
      if (threadIdx.x == 0) settle(w, s, best);
      __syncthreads();
      if (s.status != kOk || s.sink >= 0) break;
    }
    if (s.status != kOk) return kInfeasible;
    update_duals(w, s, root, threadIdx.x, blockDim.x);
    __syncthreads();
    if (threadIdx.x == 0) augment(w, root, s.sink);
    __syncthreads();
  }
  return kOk;
}

template <typename T>
__device__ int solve_block(const CostView<T>& cost, const Workspace& w, double* col_min, Candidate* row_min) {
  __shared__ Candidate partial[kWarps];
  __shared__ Search search;
  __shared__ int invalid;
  __shared__ int claimed;
  __shared__ double theta;
  if (threadIdx.x == 0) invalid = 0;
  __syncthreads();
  if (2 * greedy_phase(cost, w, nullptr, 0.0, row_min, &invalid, &claimed) >= w.n) {
    return invalid ? kInvalidEntry : search_phase(cost, w, search, partial);
  }
  if (invalid) return kInvalidEntry;
  column_min_share(cost, w.n, w.m, col_min, threadIdx.x, blockDim.x);
  __syncthreads();
  column_threshold_share(col_min, w.m, warm_start_rank(w.n, w.m), &theta, threadIdx.x, blockDim.x);
  __syncthreads();
  greedy_phase(cost, w, col_min, theta, row_min, &invalid, &claimed);
  const int status = search_phase(cost, w, search, partial);
  const bool certified = __syncthreads_and(free_columns_certified_share(w, threadIdx.x, blockDim.x));
  if (status != kOk || certified) return status;
  greedy_phase(cost, w, nullptr, 0.0, row_min, &invalid, &claimed);
  return search_phase(cost, w, search, partial);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lsap_kernel(const T* cost, int n, int m, double sign, int64_t* out, int32_t* status, unsigned char* workspace) {
  const int64_t b = blockIdx.x;
  double* col_min;
  Candidate* row_min;
  const Workspace w = carve(workspace + b * workspace_bytes(n, m), n, m, &col_min, &row_min);
  const CostView<T> view{cost + b * static_cast<int64_t>(n) * m, m, sign};
  const int result = solve_block(view, w, col_min, row_min);
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[b * n + i] = result == kOk ? w.col4row[i] : -1;
  if (threadIdx.x == 0) status[b] = result;
}

template <typename T>
cudaError_t launch(const T* cost, int64_t batch, int n, int m, bool maximize, int64_t* out, int32_t* status,
                   unsigned char* workspace, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch));
  lsap_kernel<T><<<grid, kThreads, 0, stream>>>(cost, n, m, maximize ? -1.0 : 1.0, out, status, workspace);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace croc_lsap

// CUDA kernel of croc::linear_sum_assignment: the whole (possibly ragged) batch in one launch, one
// thread block per problem. The phases are lsap_driver.h's, run by the BlockThreads executor:
// column scans (the Dijkstra relax step, column minima, the warm-start threshold, the dual update)
// strided over the block's threads, row minima of the greedy start one warp per row, argmin
// reductions by warp shuffles and shared memory, and thread 0 runs the serial parts (settle,
// claim, augment). lsap_harness.cpp runs the same driver with loops standing in for the threads.
//
// Needs only the CUDA runtime (no torch headers): lsap_cuda.cu instantiates it, and
// tests/test_cuda_compile.py compiles that for sm_80 and sm_90 on machines without a GPU.
#pragma once

#include <cuda_runtime.h>

#include "lsap_core.h"
#include "lsap_driver.h"
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

// The driver's executor for one thread block (see lsap_driver.h): work strided over the block's
// threads, one warp per row for the row minima, block argmin by warp shuffles and shared memory.
struct BlockThreads {
  Candidate* partial;  // [kWarps] shared memory

  template <typename F>
  __device__ void strided(F&& f) {
    f(static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
  }
  __device__ void sync() { __syncthreads(); }
  template <typename F>
  __device__ void serial(F&& f) {
    if (threadIdx.x == 0) f();
  }
  template <typename F>
  __device__ bool all(F&& f) {
    return __syncthreads_and(f(static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x)));
  }
  template <typename T, typename Store>
  __device__ void row_minima(const CostView<T>& cost, const Workspace& w, bool /*warm*/, Store&& store) {
    const int lane = threadIdx.x % kWarpSize;
    for (int i = threadIdx.x / kWarpSize; i < w.n; i += kWarps) {
      const RowMin r = row_min_share(cost, w.v, i, w.m, lane, kWarpSize);
      const Candidate best = warp_best(r.best);
      const bool bad = __any_sync(kFullMask, r.invalid);
      if (lane == 0) store(i, RowMin{best, bad});
    }
  }
  template <typename T>
  __device__ Candidate relax_best(const CostView<T>& cost, const Workspace& w, int row, double min_val, bool first) {
    return block_best(relax_share(cost, w, row, min_val, first, threadIdx.x, blockDim.x), partial);
  }
  template <typename T>
  __device__ void column_minima(const CostView<T>& cost, const Workspace& w, double* col_min) {
    column_min_share(cost, w.n, w.m, col_min, threadIdx.x, blockDim.x);
  }
  __device__ void threshold(const double* col_min, int m, int rank, double* theta) {
    column_threshold_share(col_min, m, rank, theta, threadIdx.x, blockDim.x);
  }
};

// One block per problem; problem b uses its first num_rows[b] rows (all n when num_rows is null),
// the other rows of out get -1.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lsap_kernel(const T* cost, const int64_t* num_rows, int n, int m, double sign, int64_t* out, int32_t* status,
                unsigned char* workspace) {
  __shared__ Candidate partial[kWarps];
  __shared__ Shared shared;
  const int64_t b = blockIdx.x;
  double* col_min;
  Candidate* row_min;
  Workspace w = carve(workspace + b * workspace_bytes(n, m), n, m, &col_min, &row_min);
  int result;
  w.n = problem_rows(num_rows, b, n, m, &result);
  if (result == kOk) {
    const CostView<T> view{cost + b * static_cast<int64_t>(n) * m, m, sign};
    BlockThreads threads{partial};
    result = solve_problem_with(threads, view, w, col_min, row_min, shared);
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[b * n + i] = result == kOk && i < w.n ? w.col4row[i] : -1;
  if (threadIdx.x == 0) status[b] = result;
}

template <typename T>
cudaError_t launch(const T* cost, const int64_t* num_rows, int64_t batch, int n, int m, bool maximize,
                   int64_t* out, int32_t* status, unsigned char* workspace, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch));
  lsap_kernel<T><<<grid, kThreads, 0, stream>>>(cost, num_rows, n, m, maximize ? -1.0 : 1.0, out, status,
                                                 workspace);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace croc_lsap

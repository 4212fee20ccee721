// The CUDA translation unit of the extension: the kernel (lsap_kernel.cuh) instantiated for
// float32 and float64 costs. It includes no torch header, so nvcc compiles it quickly anywhere;
// the torch glue is lsap_cuda_ops.cpp.
#include "lsap_kernel.cuh"

namespace croc_lsap {
namespace cuda {

template cudaError_t launch<float>(const float*, const int64_t*, int64_t, int, int, bool, int64_t*, int32_t*,
                                   unsigned char*, cudaStream_t);
template cudaError_t launch<double>(const double*, const int64_t*, int64_t, int, int, bool, int64_t*, int32_t*,
                                    unsigned char*, cudaStream_t);

}  // namespace cuda
}  // namespace croc_lsap

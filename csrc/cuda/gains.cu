#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "sfgrpo/advantages.h"

namespace sfgrpo {
namespace {

template <typename T>
__global__ void row_gains_kernel(const T* __restrict__ rewards, int64_t n, int64_t steps,
                                 T* __restrict__ gains) {
  const int64_t total = n * steps;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / steps;
    const int64_t k = idx - row * steps;
    const T* r = rewards + row * (steps + 1);
    gains[idx] = r[k + 1] - r[k];
  }
}

}  // namespace

template <typename T>
void row_gains_cuda(const T* rewards, int64_t n, int64_t steps, T* gains, void* stream) {
  const int64_t total = n * steps;
  if (total == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const int grid = static_cast<int>(blocks < 65535 ? blocks : 65535);
  row_gains_kernel<T><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(rewards, n, steps,
                                                                                 gains);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sfgrpo row_gains_cuda launch failed: ") +
                             cudaGetErrorString(err));
  }
}

template void row_gains_cuda<float>(const float*, int64_t, int64_t, float*, void*);
template void row_gains_cuda<double>(const double*, int64_t, int64_t, double*, void*);

}  // namespace sfgrpo

// Advantage-engine building blocks. Plain C++ on raw pointers: no torch, no Python.
#pragma once
#include <cstdint>

namespace sfgrpo {

// Maps arbitrary int64 group ids to dense indices 0..G-1 in order of first appearance.
// Writes out[i] for i < n and returns G. O(n) expected (hash map).
int64_t dense_group_index_cpu(const int64_t* ids, int64_t n, int64_t* out);

// Per-step gains of stepwise credit assignment: rewards is row-major [n, steps + 1],
// gains is [n, steps] with gains[i, k] = rewards[i, k + 1] - rewards[i, k].
template <typename T>
void row_gains_cpu(const T* rewards, int64_t n, int64_t steps, T* gains);

#ifdef SFGRPO_WITH_CUDA
// Same as row_gains_cpu on device memory, enqueued on `stream` (a cudaStream_t); no host sync.
template <typename T>
void row_gains_cuda(const T* rewards, int64_t n, int64_t steps, T* gains, void* stream);
#endif

}  // namespace sfgrpo

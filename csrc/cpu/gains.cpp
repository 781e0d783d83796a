#include "group_index.h"
#include "sfgrpo/advantages.h"

namespace sfgrpo {

int64_t dense_group_index_cpu(const int64_t* ids, int64_t n, int64_t* out) {
  GroupIndex index;
  for (int64_t i = 0; i < n; ++i) out[i] = index.insert(ids[i]);
  return index.size();
}

template <typename T>
void row_gains_cpu(const T* rewards, int64_t n, int64_t steps, T* gains) {
  for (int64_t i = 0; i < n; ++i) {
    const T* r = rewards + i * (steps + 1);
    T* g = gains + i * steps;
    for (int64_t k = 0; k < steps; ++k) g[k] = r[k + 1] - r[k];
  }
}

template void row_gains_cpu<float>(const float*, int64_t, int64_t, float*);
template void row_gains_cpu<double>(const double*, int64_t, int64_t, double*);

}  // namespace sfgrpo

// Splits [0, n) among the calling thread's OpenMP threads: f(begin, end) once per thread.
//
// Not at::parallel_for: that one's lazy per-thread initialisation is inline, with its own thread_local
// flag in this library, so its first call in a thread re-initialises that thread's OpenMP count to the
// process default. The server sets that default to 1 and gives only its compute thread more threads
// (softserve/engine/compute_threads.py), so at::parallel_for here turned the engine single-threaded.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace softserve {

template <typename F>
inline void parallel_range(int64_t n, int64_t min_per_thread, const F& f) {
  if (n <= 0) return;
  const int64_t most = omp_in_parallel() ? 1 : omp_get_max_threads();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(most, n / std::max<int64_t>(min_per_thread, 1)));
  if (threads == 1) {
    f(int64_t{0}, n);
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t count = omp_get_num_threads(), chunk = (n + count - 1) / count;
    const int64_t begin = omp_get_thread_num() * chunk, end = std::min(n, begin + chunk);
    if (begin < end) f(begin, end);  // f must not throw: every check runs before the parallel region
  }
}

}  // namespace softserve

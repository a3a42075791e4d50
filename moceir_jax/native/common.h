// What the native kernels (depthwise.cc, layernorm.cc, gate.cc) share: the
// loop that hands fixed pieces of work to XLA's intra-op thread pool, and the
// vector types. Header-only (inline), so every kernel file stays its own
// translation unit.

#ifndef MOCEIR_NATIVE_COMMON_H_
#define MOCEIR_NATIVE_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace moceir {

// Calls fn(i) for every i in [0, n) on this thread and up to
// pool.num_threads() - 1 pool threads. The calling thread takes pieces
// itself and only waits for pieces other threads have already started, so it
// never waits on a queued task (which could deadlock a busy pool); helpers
// that start late find nothing left and return.
template <typename F>
inline void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const F* f = &fn;
  auto work = [state, n, f]() {
    for (int64_t i; (i = state->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      (*f)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    // A helper that starts after this call returned must not touch fn: it
    // only reads the shared counters, finds no work and exits.
    pool.Schedule([state, n, work]() {
      if (state->next.load(std::memory_order_relaxed) < n) work();
    });
  }
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

constexpr int64_t kV = 16;  // floats per vector (AVX-512; split in two on AVX2)
typedef float Vec __attribute__((vector_size(kV * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof(v)); }

typedef float Vec8 __attribute__((vector_size(8 * sizeof(float))));
inline Vec8 Load8(const float* p) {
  Vec8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store8(float* p, Vec8 v) { __builtin_memcpy(p, &v, sizeof(v)); }

}  // namespace moceir

#endif  // MOCEIR_NATIVE_COMMON_H_

#pragma once
// parallel_for for the tools' coarse tasks (layers, policies): threads started per call that take task
// indices from a shared counter. Not detail::ThreadPool: its tasks run nested loops inline, while a
// tool's task keeps its caches' own threads.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include <kvsparse/detail/thread_pool.hpp>

namespace kvsparse::tools {

/// Threads to use when the user does not say: the hardware's, at least 1 (as CpuBackend's).
inline int default_threads() { return kvsparse::detail::ThreadPool::default_threads(); }

/// Runs task(i) for every i in [0, n) on up to `threads` threads (the calling thread is one of them);
/// the tasks are independent. The first exception a task throws is rethrown here once all threads
/// have stopped; tasks not yet started are then skipped.
template <class Task>
void parallel_for(std::int64_t n, int threads, Task&& task) {
    const std::int64_t workers = std::clamp<std::int64_t>(threads, 1, std::max<std::int64_t>(n, 1));
    std::atomic<std::int64_t> next{0};
    std::atomic<bool> failed{false};
    std::exception_ptr first_error;
    std::mutex error_mutex;
    const auto work = [&] {
        while (!failed.load(std::memory_order_relaxed)) {
            const std::int64_t i = next.fetch_add(1, std::memory_order_relaxed);
            if (i >= n) return;
            try {
                task(i);
            } catch (...) {
                const std::lock_guard lock(error_mutex);
                if (!first_error) first_error = std::current_exception();
                failed = true;
            }
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(static_cast<std::size_t>(workers - 1));
    for (std::int64_t w = 1; w < workers; ++w) pool.emplace_back(work);
    work();
    for (std::thread& t : pool) t.join();
    if (first_error) std::rethrow_exception(first_error);
}

}  // namespace kvsparse::tools

#pragma once
// ThreadPool: worker threads that start once and then run index-parallel loops. parallel_for(n, task) runs
// task(i) for every i in [0, n), the calling thread taking part; the tasks must be independent, so the
// result cannot depend on which thread ran which index or on how many threads there are. Nothing is
// allocated per call (the task is passed by address, not as a std::function).
//
// Decode runs a loop per layer, back to back, and a loop of a sparse policy is a few hundred
// microseconds, while a thread asleep on a condition variable can take tens of microseconds to wake
// (more on a virtual machine). So a worker that finishes a loop, and a caller that waits for the
// workers, first spin for a short while (kSpin) on the state they wait for, and only then sleep.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace kvsparse::detail {

class ThreadPool {
public:
    /// Threads to use when the user does not say: the hardware's, at least 1 (asked once: the question
    /// costs a system call, and CpuBackend asks it on every parallel_for).
    static int default_threads() {
        static const int count = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
        return count;
    }

    /// `threads` counts the calling thread: 1 runs everything inline, 0 means default_threads().
    explicit ThreadPool(int threads = 0) {
        const int total = threads > 0 ? threads : default_threads();
        workers_.reserve(static_cast<std::size_t>(total - 1));
        for (int w = 1; w < total; ++w) workers_.emplace_back([this] { worker_loop(); });
    }

    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    ~ThreadPool() {
        {
            const std::lock_guard lock(mutex_);
            stop_ = true;
        }
        wake_.notify_all();
        for (std::thread& t : workers_) t.join();
    }

    /// Threads that run a loop, the caller included.
    int size() const { return static_cast<int>(workers_.size()) + 1; }

    /// Runs task(i) for i in [0, n). The first exception a task throws is rethrown here after every
    /// thread has stopped; tasks not yet started are then skipped. Called from inside a task (or while
    /// another thread's loop runs on this pool), the loop runs inline on the calling thread.
    template <class Task>
    void parallel_for(std::int64_t n, Task&& task) {
        if (n <= 0) return;
        std::unique_lock submit(submit_mutex_, std::try_to_lock);
        if (n == 1 || workers_.empty() || inside_task() || !submit.owns_lock()) {
            for (std::int64_t i = 0; i < n; ++i) task(i);
            return;
        }
        using Fn = std::remove_reference_t<Task>;
        Job job;
        job.invoke = [](void* context, std::int64_t i) { (*static_cast<Fn*>(context))(i); };
        job.context = const_cast<void*>(static_cast<const volatile void*>(std::addressof(task)));
        job.count = n;
        {
            const std::lock_guard lock(mutex_);
            job_ = &job;
            seats_ = static_cast<int>(std::min<std::int64_t>(static_cast<std::int64_t>(workers_.size()), n - 1));
            ++generation_;
        }
        wake_.notify_all();
        run(job);
        {
            // Close the loop (a worker that wakes only now stays out), then wait for those inside it.
            const std::lock_guard lock(mutex_);
            job_ = nullptr;
        }
        spin_until([&] { return busy_.load(std::memory_order_acquire) == 0; });
        {
            std::unique_lock lock(mutex_);
            done_.wait(lock, [&] { return busy_.load(std::memory_order_acquire) == 0; });
        }
        if (job.error) std::rethrow_exception(job.error);
    }

private:
    struct Job {
        void (*invoke)(void*, std::int64_t) = nullptr;
        void* context = nullptr;
        std::int64_t count = 0;
        std::atomic<std::int64_t> next{0};
        std::atomic<bool> failed{false};
        std::mutex error_mutex;
        std::exception_ptr error;
    };

    static bool& inside_task() {
        thread_local bool inside = false;
        return inside;
    }

    static void run(Job& job) {
        bool& inside = inside_task();
        inside = true;
        while (!job.failed.load(std::memory_order_relaxed)) {
            const std::int64_t i = job.next.fetch_add(1, std::memory_order_relaxed);
            if (i >= job.count) break;
            try {
                job.invoke(job.context, i);
            } catch (...) {
                const std::lock_guard lock(job.error_mutex);
                if (!job.error) job.error = std::current_exception();
                job.failed = true;
            }
        }
        inside = false;
    }

    /// Spins until `ready()` or kSpin has passed; true if ready.
    template <class Ready>
    static bool spin_until(Ready&& ready) {
        const auto until = std::chrono::steady_clock::now() + kSpin;
        for (int i = 0;; ++i) {
            if (ready()) return true;
            if (i % 64 == 63 && std::chrono::steady_clock::now() >= until) return false;
            pause();
        }
    }

    static void pause() {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        asm volatile("yield");
#endif
    }

    void worker_loop() {
        std::uint64_t seen = 0;
        for (;;) {
            Job* job = nullptr;
            spin_until([&] { return stop_.load(std::memory_order_acquire) || generation_.load(std::memory_order_acquire) != seen; });
            {
                std::unique_lock lock(mutex_);
                wake_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
                if (stop_) return;
                seen = generation_;
                // A loop of n tasks seats at most n - 1 workers; a closed loop seats none.
                if (job_ == nullptr || seats_ == 0) continue;
                --seats_;
                busy_.fetch_add(1, std::memory_order_relaxed);
                job = job_;
            }
            run(*job);
            {
                const std::lock_guard lock(mutex_);
                if (busy_.fetch_sub(1, std::memory_order_acq_rel) == 1) done_.notify_one();
            }
        }
    }

    static constexpr std::chrono::microseconds kSpin{100};

    std::vector<std::thread> workers_;
    std::mutex submit_mutex_;  // one loop at a time
    std::mutex mutex_;         // guards everything below
    std::condition_variable wake_;
    std::condition_variable done_;
    Job* job_ = nullptr;
    std::atomic<std::uint64_t> generation_{0};  // counts loops; a change wakes the workers (spinning reads it)
    int seats_ = 0;                              // workers the current loop may still take
    std::atomic<int> busy_{0};                   // workers inside the current loop (the caller spins on it)
    std::atomic<bool> stop_{false};
};

}  // namespace kvsparse::detail

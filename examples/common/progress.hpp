#pragma once
// A small progress bar on stderr for long runs. It appears only once a run has taken more than a
// second, and only when stderr is a terminal (logs and pipes stay clean); it is erased when done.
//
//   ProgressBar bar("replay", total);   // any thread may then call bar.advance(n)
//   ...
//   bar.finish();                       // or let the destructor do it

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

namespace kvsparse::tools {

inline bool stderr_is_terminal() {
#if __has_include(<unistd.h>)
    return ::isatty(STDERR_FILENO) != 0;
#else
    return false;
#endif
}

class ProgressBar {
public:
    using clock = std::chrono::steady_clock;

    ProgressBar(std::string label, std::int64_t total, bool enabled = stderr_is_terminal(),
                clock::duration delay = std::chrono::seconds(1))
        : label_(std::move(label)), total_(std::max<std::int64_t>(total, 1)), start_(clock::now()), delay_(delay) {
        if (enabled) ticker_ = std::thread([this] { run(); });
    }
    ProgressBar(const ProgressBar&) = delete;
    ProgressBar& operator=(const ProgressBar&) = delete;
    ~ProgressBar() { finish(); }

    /// Thread-safe.
    void advance(std::int64_t n = 1) { done_.fetch_add(n, std::memory_order_relaxed); }

    /// Stops updating and erases the bar if it was drawn.
    void finish() {
        if (!ticker_.joinable()) return;
        {
            const std::lock_guard lock(mutex_);
            stop_ = true;
        }
        wake_.notify_all();
        ticker_.join();
        if (drawn_) std::fprintf(stderr, "\r%*s\r", static_cast<int>(width_), "");
        std::fflush(stderr);
    }

private:
    void run() {
        std::unique_lock lock(mutex_);
        while (!wake_.wait_for(lock, std::chrono::milliseconds(100), [this] { return stop_; })) {
            const auto elapsed = clock::now() - start_;
            if (elapsed < delay_) continue;
            draw(std::chrono::duration<double>(elapsed).count());
        }
    }

    void draw(double seconds) {
        const std::int64_t done = std::min(done_.load(std::memory_order_relaxed), total_);
        const double fraction = static_cast<double>(done) / static_cast<double>(total_);
        constexpr int bar = 30;
        const int filled = static_cast<int>(fraction * bar);
        std::string line = "\r" + label_ + " [" + std::string(static_cast<std::size_t>(filled), '#') +
                           std::string(static_cast<std::size_t>(bar - filled), '.') + "] ";
        char tail[64];
        const double eta = fraction > 0 ? seconds * (1 - fraction) / fraction : 0;
        std::snprintf(tail, sizeof tail, "%3d%%  %.0fs elapsed, ~%.0fs left", static_cast<int>(fraction * 100), seconds,
                      eta);
        line += tail;
        width_ = std::max(width_, line.size());
        std::fputs(line.c_str(), stderr);
        std::fflush(stderr);
        drawn_ = true;
    }

    std::string label_;
    std::int64_t total_;
    clock::time_point start_;
    clock::duration delay_;
    std::atomic<std::int64_t> done_{0};
    std::mutex mutex_;
    std::condition_variable wake_;
    bool stop_ = false;
    bool drawn_ = false;
    std::size_t width_ = 0;
    std::thread ticker_;
};

}  // namespace kvsparse::tools

// A handle's count of calls in flight: closing waits for them, and a session refuses a second
// concurrent call (SLIM_ERR_BUSY) instead of letting two threads share its buffers.
#pragma once

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "error.hpp"

namespace slim {

// Counts the fork()s this process descends from (bumped in each child), so that a gate can tell that
// the calls it counts were made by threads of the parent, which the child does not have.
inline std::atomic<uint64_t>& fork_count() {
    static std::atomic<uint64_t> count{0};
    return count;
}
inline uint64_t forks_so_far() {
    static const bool registered = [] { return ::pthread_atfork(nullptr, nullptr, [] { fork_count().fetch_add(1); }) == 0; }();
    (void)registered;
    return fork_count().load(std::memory_order_acquire);
}

class CallGate {
  public:
    CallGate() : forks_(forks_so_far()) {}

    // Engines and banks: any number of calls at once. Throws once close() has begun.
    void enter_shared(const char* what) {
        check_process(what);
        calls_.fetch_add(1);  // counted before closing_ is read, so close() either sees this call or it sees closing_
        if (closing_.load()) {
            calls_.fetch_sub(1);
            throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string(what) + " is being closed");
        }
    }
    // Sessions: one call at a time; a call while another runs gets SLIM_ERR_BUSY.
    void enter_exclusive(const char* what) {
        check_process(what);
        int idle = 0;
        if (!calls_.compare_exchange_strong(idle, 1))
            throw Error(SLIM_ERR_BUSY, std::string(what) +
                                           " is in use by another thread (a session runs one call at a time: "
                                           "create one session per thread; a progress callback must not call into its own session)");
        if (closing_.load()) {
            calls_.fetch_sub(1);
            throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string(what) + " is being closed");
        }
        owner_.store(std::this_thread::get_id());
    }
    bool try_enter_exclusive() {
        if (!adopt() || inherited_busy_) return false;
        int idle = 0;
        if (!calls_.compare_exchange_strong(idle, 1)) return false;
        if (!closing_.load()) return true;
        calls_.fetch_sub(1);
        return false;
    }
    // The last call out frees the handle when close_later() was called from inside it.
    void leave() {
        owner_.store(std::thread::id());
        if (calls_.fetch_sub(1) == 1 && free_later_) {
            const std::function<void()> free_handle = std::move(free_later_);
            free_handle();  // deletes the handle that holds this gate: nothing of *this is touched after
        }
    }
    // close() from the thread whose exclusive call is running (a progress callback destroying its own session)
    // would wait for itself forever: instead the handle is refused to new calls and `free_handle` runs when that
    // call leaves. Returns false when the caller should use close() instead.
    bool close_later(std::function<void()> free_handle) {
        adopt();
        if (inherited_busy_ || calls_.load() == 0 || owner_.load() != std::this_thread::get_id()) return false;
        closing_.store(true);
        free_later_ = std::move(free_handle);
        return true;
    }
    // Refuses new calls, then waits for those in flight to return. Returns whether the handle may now be
    // freed: not in a forked child whose parent had a call running on it (the handle's locks and buffers
    // are that call's, mid-way): such a handle is left allocated.
    bool close() {
        adopt();
        closing_.store(true);
        if (inherited_busy_) return false;
        while (calls_.load() != 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
        return true;
    }

  private:
    // In a forked child, at the first use: the calls counted were the parent's threads'. The handle is
    // usable if none was running; otherwise every call is refused (inherited_busy_). Returns true.
    bool adopt() {
        const uint64_t now = forks_so_far();
        if (forks_.load(std::memory_order_acquire) == now) return true;
        std::lock_guard<std::mutex> lock(adopt_mutex_);
        if (forks_.load() != now) {
            inherited_busy_ = inherited_busy_ || calls_.load() != 0;
            calls_.store(0);
            forks_.store(now, std::memory_order_release);
        }
        return true;
    }
    void check_process(const char* what) {
        adopt();
        if (inherited_busy_)
            throw Error(SLIM_ERR_INVALID_ARGUMENT,
                        std::string(what) +
                            " was in use by another thread when this process was forked from the one that opened it: its state "
                            "belongs to that call, which this process does not have. Open it again in this process (closing this "
                            "handle here frees nothing)");
    }

    std::atomic<int> calls_{0};
    std::atomic<bool> closing_{false};
    std::atomic<std::thread::id> owner_{};  // the thread in the exclusive call, if one runs
    std::function<void()> free_later_;      // set by close_later, only from the owner thread
    std::atomic<uint64_t> forks_;
    std::mutex adopt_mutex_;
    bool inherited_busy_ = false;  // written once per fork under adopt_mutex_, before forks_ is published
};

// One call through a gate, left when the scope ends (also when the call throws).
class GateEntry {
  public:
    GateEntry(CallGate& gate, const char* what, bool exclusive) : gate_(gate) {
        if (exclusive)
            gate.enter_exclusive(what);
        else
            gate.enter_shared(what);
    }
    ~GateEntry() { gate_.leave(); }
    GateEntry(const GateEntry&) = delete;
    GateEntry& operator=(const GateEntry&) = delete;

  private:
    CallGate& gate_;
};

}  // namespace slim

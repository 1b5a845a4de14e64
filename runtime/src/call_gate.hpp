// A handle's count of calls in flight: closing waits for them, and a session refuses a second
// concurrent call (SLIM_ERR_BUSY) instead of letting two threads share its buffers.
#pragma once

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include "error.hpp"

namespace slim {

class CallGate {
  public:
    // Engines and banks: any number of calls at once. Throws once close() has begun.
    void enter_shared(const char* what) {
        calls_.fetch_add(1);  // counted before closing_ is read, so close() either sees this call or it sees closing_
        if (closing_.load()) {
            calls_.fetch_sub(1);
            throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string(what) + " is being closed");
        }
    }
    // Sessions: one call at a time; a call while another runs gets SLIM_ERR_BUSY.
    void enter_exclusive(const char* what) {
        int idle = 0;
        if (!calls_.compare_exchange_strong(idle, 1))
            throw Error(SLIM_ERR_BUSY, std::string(what) +
                                           " is in use by another thread (a session runs one call at a time: "
                                           "create one session per thread)");
        if (closing_.load()) {
            calls_.fetch_sub(1);
            throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string(what) + " is being closed");
        }
    }
    bool try_enter_exclusive() {
        int idle = 0;
        if (!calls_.compare_exchange_strong(idle, 1)) return false;
        if (!closing_.load()) return true;
        calls_.fetch_sub(1);
        return false;
    }
    void leave() { calls_.fetch_sub(1); }
    // Refuses new calls, then waits for those in flight to return; the handle may be freed after it.
    void close() {
        closing_.store(true);
        while (calls_.load() != 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }

  private:
    std::atomic<int> calls_{0};
    std::atomic<bool> closing_{false};
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

// The runtime's one error type: a status code and a message for slim_last_error().
#pragma once

#include <stdexcept>
#include <string>

#include "slimengine.h"

namespace slim {

class Error : public std::runtime_error {
  public:
    Error(slim_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    slim_status status() const { return status_; }

  private:
    slim_status status_;
};

}  // namespace slim

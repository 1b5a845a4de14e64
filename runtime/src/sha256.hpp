// SHA-256, for the bundle's digests.
#pragma once

#include <cstddef>
#include <functional>
#include <string>

namespace slim {

// Lower-case hex digest of `bytes`.
std::string sha256_bytes(const std::string& bytes);

// Lower-case hex digest of what is left to read from `fd`, read in 4 MiB chunks; `on_chunk(n)` after each.
// Throws slim::Error(SLIM_ERR_IO) naming `name` on a read error.
std::string sha256_fd(int fd, const std::string& name, const std::function<void(size_t)>& on_chunk = {});

}  // namespace slim

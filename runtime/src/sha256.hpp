// Reading an engine bundle's files: only regular files, and their SHA-256 for the bundle's checksums.
#pragma once

#include <string>

namespace slim {

// A descriptor of `path` open for reading, only if it is a regular file: a FIFO would block the open (or
// every read) and a device such as /dev/zero never ends, either of which would hang slim_engine_open.
// Throws slim::Error(SLIM_ERR_IO) naming the path when it cannot be opened or is not a regular file.
int open_regular_file(const std::string& path);

// The whole content of the regular file at `path` (as open_regular_file); throws slim::Error(SLIM_ERR_IO).
std::string read_regular_file(const std::string& path);

// Lower-case hex digest of the regular file at `path` (as open_regular_file); throws slim::Error(SLIM_ERR_IO).
std::string sha256_file(const std::string& path);

}  // namespace slim

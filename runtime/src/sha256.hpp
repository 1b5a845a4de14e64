// SHA-256 of a file, for the bundle's checksums.
#pragma once

#include <string>

namespace slim {

// Lower-case hex digest of the file at `path`; throws slim::Error(SLIM_ERR_IO) if it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace slim

#include "errors.h"

#include <cstring>

namespace fastpersist {

std::string errno_text(int err) { return std::strerror(err); }

void throw_io_error(int err, const std::string& path, const std::string& op,
                    uint64_t offset) {
  std::string what = op;
  if (offset != UINT64_MAX) what += " at offset " + std::to_string(offset);
  what += ": " + errno_text(err);
  throw IoError(err, path, what);
}

}  // namespace fastpersist

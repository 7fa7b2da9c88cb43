#pragma once

#define KVSPARSE_VERSION_MAJOR 0
#define KVSPARSE_VERSION_MINOR 1
#define KVSPARSE_VERSION_PATCH 0

namespace kvsparse {
inline constexpr const char* version = "0.1.0";
}

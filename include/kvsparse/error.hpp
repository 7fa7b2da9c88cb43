#pragma once
// Every failure kvsparse reports is a kvsparse::error. A failed call leaves the cache as it was.

#include <stdexcept>
#include <string>

namespace kvsparse {

/// Base of every exception thrown by kvsparse.
class error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// An argument is out of range or inconsistent; the message names the field and the value.
class invalid_argument : public error {
public:
    using error::error;
};

/// The page pool has no free page left for the request.
class pool_exhausted : public error {
public:
    using error::error;
};

/// A file (NumPy array, model checkpoint, gate values) is corrupt, truncated or of an unsupported kind.
class format_error : public error {
public:
    using error::error;
};

namespace detail {

/// Throws invalid_argument "<field> = <value>: <expectation>" unless `ok`.
template <class Value>
void require(bool ok, const char* field, const Value& value, const char* expectation) {
    if (!ok) {
        std::string message = field;
        message += " = ";
        if constexpr (std::is_convertible_v<Value, std::string>) {
            message += value;
        } else {
            message += std::to_string(value);
        }
        message += ": ";
        message += expectation;
        throw invalid_argument(message);
    }
}

}  // namespace detail
}  // namespace kvsparse

#pragma once
// The message of the exception of type E that `f` throws, or "" if it throws none, so tests can check
// that an error names its field and value.

#include <string>

template <class E, class F>
std::string error_message_of(F&& f) {
    try {
        f();
    } catch (const E& e) {
        return e.what();
    }
    return "";
}

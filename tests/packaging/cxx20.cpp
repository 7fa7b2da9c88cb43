// Compiled into every packaging consumer, none of which asks for a C++ standard itself: linking
// kvsparse::kvsparse must be enough to get C++20.
#if !defined(_MSVC_LANG)
static_assert(__cplusplus >= 202002L, "kvsparse::kvsparse must give its users C++20");
#else
static_assert(_MSVC_LANG >= 202002L, "kvsparse::kvsparse must give its users C++20");
#endif

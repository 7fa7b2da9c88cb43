# Shared by the packaging consumers: the README's quick start (extracted by the test driver into
# KVSPARSE_QUICK_START_SOURCE) as a program with strict warnings, and a ctest test that runs it.
# No C++ standard is set here: it must come from kvsparse::kvsparse.
set(KVSPARSE_QUICK_START_SOURCE "" CACHE FILEPATH
    "the README's first cpp block, extracted by tests/packaging/run.cmake")
if(NOT EXISTS "${KVSPARSE_QUICK_START_SOURCE}")
  message(FATAL_ERROR "KVSPARSE_QUICK_START_SOURCE='${KVSPARSE_QUICK_START_SOURCE}' does not exist; "
                      "run this consumer through the ctest tests packaging.*")
endif()

add_executable(quick_start "${KVSPARSE_QUICK_START_SOURCE}" "${CMAKE_CURRENT_LIST_DIR}/cxx20.cpp")
target_link_libraries(quick_start PRIVATE kvsparse::kvsparse)
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(quick_start PRIVATE -Wall -Wextra -Wpedantic -Werror)
endif()

enable_testing()
add_test(NAME quick_start COMMAND quick_start)
set_tests_properties(quick_start PROPERTIES PASS_REGULAR_EXPRESSION "holds [0-9]+ tokens in [0-9]+ pages")

# kvsparse_expect(<what> <actual> <expected>): stop the configure when they differ.
function(kvsparse_expect what actual expected)
  if(NOT "${actual}" STREQUAL "${expected}")
    message(FATAL_ERROR "${what}: '${actual}', expected '${expected}'")
  endif()
endfunction()

# Both targets exist, are INTERFACE libraries, and kvsparse::kvsparse brings C++20.
foreach(target IN ITEMS kvsparse::kvsparse kvsparse::cuda)
  if(NOT TARGET ${target})
    message(FATAL_ERROR "${target} is not defined")
  endif()
  get_target_property(type ${target} TYPE)
  kvsparse_expect("type of ${target}" "${type}" INTERFACE_LIBRARY)
endforeach()
get_target_property(features kvsparse::kvsparse INTERFACE_COMPILE_FEATURES)
if(NOT "cxx_std_20" IN_LIST features)
  message(FATAL_ERROR "kvsparse::kvsparse does not require cxx_std_20 (INTERFACE_COMPILE_FEATURES: ${features})")
endif()
get_target_property(cuda_links kvsparse::cuda INTERFACE_LINK_LIBRARIES)
if(NOT "kvsparse::kvsparse" IN_LIST cuda_links AND NOT "kvsparse" IN_LIST cuda_links)
  message(FATAL_ERROR "kvsparse::cuda does not link kvsparse::kvsparse (INTERFACE_LINK_LIBRARIES: ${cuda_links})")
endif()

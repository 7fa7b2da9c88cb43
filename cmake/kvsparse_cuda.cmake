# kvsparse::cuda: the CUDA kernels (kernels/) on top of kvsparse::kvsparse. Defined when a CUDA
# compiler is found. CMake 3.25 does not know nvcc 13's C++20 dialect, so -std=c++20 is passed by hand.

include(CheckLanguage)
set(KVSPARSE_HAS_CUDA OFF)
if(KVSPARSE_CUDA)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    set(KVSPARSE_HAS_CUDA ON)
  endif()
endif()

add_library(kvsparse_cuda INTERFACE)
add_library(kvsparse::cuda ALIAS kvsparse_cuda)
set_target_properties(kvsparse_cuda PROPERTIES EXPORT_NAME cuda)
target_link_libraries(kvsparse_cuda INTERFACE kvsparse)
target_include_directories(kvsparse_cuda INTERFACE
  $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/kernels>
  $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
target_compile_options(kvsparse_cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --expt-relaxed-constexpr>)

# install(): headers, kernels, kvsparseConfig.cmake, an ARCH_INDEPENDENT version file and the exported
# targets kvsparse::kvsparse and kvsparse::cuda; plus a build-tree export, so that a consumer can point
# kvsparse_DIR at the build directory instead of installing.
#
# kvsparse::cuda is an INTERFACE target (kernels/ on the include path), defined and exported whether or
# not a CUDA compiler was found here: its users compile it with their own nvcc.
include(CMakePackageConfigHelpers)

set(KVSPARSE_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/kvsparse" CACHE STRING
    "Where kvsparseConfig.cmake is installed, relative to the prefix (header-only: architecture independent)")
mark_as_advanced(KVSPARSE_INSTALL_CMAKEDIR)

install(TARGETS kvsparse kvsparse_cuda EXPORT kvsparseTargets)
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/kvsparse" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
# kernels/kvsparse/*.cuh go beside the headers (kvsparse::cuda adds no other include directory).
if(EXISTS "${PROJECT_SOURCE_DIR}/kernels/kvsparse")
  install(DIRECTORY "${PROJECT_SOURCE_DIR}/kernels/kvsparse" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
endif()
install(FILES "${PROJECT_SOURCE_DIR}/LICENSE" DESTINATION "${CMAKE_INSTALL_DOCDIR}")

install(EXPORT kvsparseTargets NAMESPACE kvsparse:: DESTINATION "${KVSPARSE_INSTALL_CMAKEDIR}")
export(EXPORT kvsparseTargets NAMESPACE kvsparse:: FILE "${PROJECT_BINARY_DIR}/kvsparseTargets.cmake")

configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/kvsparseConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/kvsparseConfig.cmake"
  INSTALL_DESTINATION "${KVSPARSE_INSTALL_CMAKEDIR}")
# Before 1.0 a minor release may break the API, so 0.x accepts only the same minor version.
if(PROJECT_VERSION_MAJOR EQUAL 0)
  set(kvsparse_compatibility SameMinorVersion)
else()
  set(kvsparse_compatibility SameMajorVersion)
endif()
write_basic_package_version_file("${PROJECT_BINARY_DIR}/kvsparseConfigVersion.cmake"
  COMPATIBILITY ${kvsparse_compatibility} ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/kvsparseConfig.cmake" "${PROJECT_BINARY_DIR}/kvsparseConfigVersion.cmake"
  DESTINATION "${KVSPARSE_INSTALL_CMAKEDIR}")

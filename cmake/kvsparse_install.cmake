# install(): headers, kernels, kvsparseConfig.cmake, an ARCH_INDEPENDENT version file, exported targets;
# plus a build-tree export so a consumer can use the build directory directly.
include(CMakePackageConfigHelpers)

set(KVSPARSE_CMAKE_DIR ${CMAKE_INSTALL_DATADIR}/cmake/kvsparse)

install(TARGETS kvsparse kvsparse_cuda EXPORT kvsparseTargets)
install(DIRECTORY include/kvsparse DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY kernels/kvsparse DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES LICENSE DESTINATION ${CMAKE_INSTALL_DATADIR}/doc/kvsparse)

install(EXPORT kvsparseTargets NAMESPACE kvsparse:: DESTINATION ${KVSPARSE_CMAKE_DIR})
export(EXPORT kvsparseTargets NAMESPACE kvsparse:: FILE ${PROJECT_BINARY_DIR}/kvsparseTargets.cmake)

configure_package_config_file(cmake/kvsparseConfig.cmake.in ${PROJECT_BINARY_DIR}/kvsparseConfig.cmake
  INSTALL_DESTINATION ${KVSPARSE_CMAKE_DIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/kvsparseConfigVersion.cmake
  COMPATIBILITY SameMajorVersion ARCH_INDEPENDENT)
install(FILES ${PROJECT_BINARY_DIR}/kvsparseConfig.cmake ${PROJECT_BINARY_DIR}/kvsparseConfigVersion.cmake
  DESTINATION ${KVSPARSE_CMAKE_DIR})

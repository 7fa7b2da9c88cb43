# Driver of the packaging tests (cmake -P), registered in tests/CMakeLists.txt. Each step configures and
# builds a separate CMake project under WORK_DIR with the generator, compiler and configuration of the
# build that runs the tests.
#
#   STEP=install           configure kvsparse alone (no tests, examples, benchmarks, no CUDA probing) in
#                          WORK_DIR/kvsparse-build, install it into the fresh prefix WORK_DIR/prefix and
#                          check what was installed; that build directory is also the build-tree export.
#   STEP=find_package      consumer find_package/ against WORK_DIR/prefix (CMAKE_PREFIX_PATH).
#   STEP=build_tree        consumer find_package/ with kvsparse_DIR=WORK_DIR/kvsparse-build.
#   STEP=add_subdirectory  consumer add_subdirectory/ on the source tree.
#
# The consumers compile the README's first ```cpp block, extracted here, and run it through their ctest.
#
# Inputs: STEP SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER, optional MAKE_PROGRAM GENERATOR_PLATFORM
# GENERATOR_TOOLSET CXX_COMPILER_LAUNCHER CONFIG MULTI_CONFIG KVSPARSE_CUDA, and CUDA_COMPILER (with
# CUDA_HOST_COMPILER) when that build found one: the find_package consumers then also compile every
# CUDA header through kvsparse::cuda.
cmake_minimum_required(VERSION 3.25)

foreach(required IN ITEMS STEP SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${required} OR "${${required}}" STREQUAL "")
    message(FATAL_ERROR "run.cmake: ${required} is not set")
  endif()
endforeach()

set(package_build "${WORK_DIR}/kvsparse-build")
set(prefix "${WORK_DIR}/prefix")
set(cmake_dir "${prefix}/share/cmake/kvsparse")

# Arguments every configure gets: the parent build's toolchain.
set(configure_args -G "${GENERATOR}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(GENERATOR_PLATFORM)
  list(APPEND configure_args -A "${GENERATOR_PLATFORM}")
endif()
if(GENERATOR_TOOLSET)
  list(APPEND configure_args -T "${GENERATOR_TOOLSET}")
endif()
if(CXX_COMPILER_LAUNCHER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER_LAUNCHER=${CXX_COMPILER_LAUNCHER}")
endif()
set(config_args "")
set(ctest_config_args "")
if(CONFIG)
  if(MULTI_CONFIG)
    list(APPEND configure_args "-DCMAKE_CONFIGURATION_TYPES=${CONFIG}")
  else()
    list(APPEND configure_args "-DCMAKE_BUILD_TYPE=${CONFIG}")
  endif()
  set(config_args --config "${CONFIG}")
  set(ctest_config_args -C "${CONFIG}")
endif()

function(run what)
  message(STATUS "[${STEP}] ${what}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " command "${ARGN}")
    message(FATAL_ERROR "[${STEP}] ${what} failed (${rc}):\n  ${command}")
  endif()
endfunction()

function(expect_file path)
  if(NOT EXISTS "${path}")
    message(FATAL_ERROR "[${STEP}] not installed: ${path}")
  endif()
endfunction()

# consumer(<project dir> <build name> <cache args>...): extract the quick start, configure, build, run.
function(consumer project name)
  set(dir "${WORK_DIR}/${name}")
  file(REMOVE_RECURSE "${dir}")
  include("${SOURCE_DIR}/cmake/kvsparse_readme_snippet.cmake")
  kvsparse_first_cpp_block("${SOURCE_DIR}/README.md" quick_start)
  file(WRITE "${dir}/quick_start.cpp" "${quick_start}")
  run("configure ${project}" "${CMAKE_COMMAND}" -S "${SOURCE_DIR}/tests/packaging/${project}" -B "${dir}/build"
      ${configure_args} "-DKVSPARSE_QUICK_START_SOURCE=${dir}/quick_start.cpp" ${ARGN})
  run("build ${project}" "${CMAKE_COMMAND}" --build "${dir}/build" ${config_args})
  run("run the quick start" "${CMAKE_CTEST_COMMAND}" --test-dir "${dir}/build" ${ctest_config_args}
      --output-on-failure --no-tests=error)
endfunction()

# find_package consumers look in no package registry: only where the test points them.
set(no_registries -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)

file(STRINGS "${SOURCE_DIR}/CMakeLists.txt" project_line REGEX "^project\\(kvsparse VERSION [0-9.]+")
string(REGEX MATCH "[0-9]+\\.[0-9]+\\.[0-9]+" version "${project_line}")

set(cuda_consumer_args "")
if(CUDA_COMPILER)
  set(cuda_consumer_args -DKVSPARSE_CONSUMER_CUDA=ON "-DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}")
  if(CUDA_HOST_COMPILER)
    list(APPEND cuda_consumer_args "-DCMAKE_CUDA_HOST_COMPILER=${CUDA_HOST_COMPILER}")
  endif()
endif()

if(STEP STREQUAL "install")
  file(REMOVE_RECURSE "${package_build}" "${prefix}")
  run("configure kvsparse" "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${package_build}" ${configure_args}
      -DKVSPARSE_BUILD_TESTS=OFF -DKVSPARSE_BUILD_EXAMPLES=OFF -DKVSPARSE_BUILD_BENCHMARKS=OFF
      -DKVSPARSE_INSTALL=ON -DKVSPARSE_CUDA=OFF "-DCMAKE_INSTALL_PREFIX=${prefix}")
  foreach(subdirectory IN ITEMS tests examples bench)
    if(EXISTS "${package_build}/${subdirectory}")
      message(FATAL_ERROR "[install] ${subdirectory}/ was configured although it was switched off")
    endif()
  endforeach()
  run("build kvsparse" "${CMAKE_COMMAND}" --build "${package_build}" ${config_args})
  run("install kvsparse" "${CMAKE_COMMAND}" --install "${package_build}" ${config_args})

  # Every header and kernel, the package files and the licence are there.
  file(GLOB_RECURSE headers RELATIVE "${SOURCE_DIR}/include" "${SOURCE_DIR}/include/kvsparse/*")
  file(GLOB_RECURSE kernels RELATIVE "${SOURCE_DIR}/kernels" "${SOURCE_DIR}/kernels/kvsparse/*")
  foreach(file IN LISTS headers kernels)
    expect_file("${prefix}/include/${file}")
  endforeach()
  foreach(file IN ITEMS kvsparseConfig.cmake kvsparseConfigVersion.cmake kvsparseTargets.cmake)
    expect_file("${cmake_dir}/${file}")
    expect_file("${package_build}/${file}")
  endforeach()
  expect_file("${prefix}/share/doc/kvsparse/LICENSE")

  # The version file: architecture independent (a consumer with 4-byte pointers may use it too); it
  # accepts its own version and rejects a later one.
  foreach(case IN ITEMS "${version};4;TRUE" "${version};8;TRUE" "99.0;8;FALSE")
    list(GET case 0 PACKAGE_FIND_VERSION)
    list(GET case 1 CMAKE_SIZEOF_VOID_P)
    list(GET case 2 expected)
    string(REPLACE "." ";" parts "${PACKAGE_FIND_VERSION}")
    list(GET parts 0 PACKAGE_FIND_VERSION_MAJOR)
    list(GET parts 1 PACKAGE_FIND_VERSION_MINOR)
    unset(PACKAGE_FIND_VERSION_RANGE)
    unset(PACKAGE_VERSION_COMPATIBLE)
    unset(PACKAGE_VERSION_UNSUITABLE)
    include("${cmake_dir}/kvsparseConfigVersion.cmake")
    if(PACKAGE_VERSION_UNSUITABLE OR NOT PACKAGE_VERSION_COMPATIBLE STREQUAL expected)
      message(FATAL_ERROR "[install] kvsparseConfigVersion.cmake (version ${PACKAGE_VERSION}) asked for "
                          "${PACKAGE_FIND_VERSION} with ${CMAKE_SIZEOF_VOID_P}-byte pointers: compatible "
                          "'${PACKAGE_VERSION_COMPATIBLE}', unsuitable '${PACKAGE_VERSION_UNSUITABLE}', "
                          "expected compatible ${expected}")
    endif()
  endforeach()
  message(STATUS "[install] kvsparse ${version} installed in ${prefix}")

elseif(STEP STREQUAL "find_package")
  consumer(find_package find_package ${no_registries} ${cuda_consumer_args} "-DCMAKE_PREFIX_PATH=${prefix}"
           "-DKVSPARSE_EXPECTED_DIR=${cmake_dir}" "-DKVSPARSE_EXPECTED_VERSION=${version}"
           "-DKVSPARSE_EXPECTED_INCLUDE_DIR=${prefix}/include"
           "-DKVSPARSE_EXPECTED_CUDA_INCLUDE_DIR=${prefix}/include")

elseif(STEP STREQUAL "build_tree")
  consumer(find_package build_tree ${no_registries} ${cuda_consumer_args} "-Dkvsparse_DIR=${package_build}"
           "-DKVSPARSE_EXPECTED_DIR=${package_build}" "-DKVSPARSE_EXPECTED_VERSION=${version}"
           "-DKVSPARSE_EXPECTED_INCLUDE_DIR=${SOURCE_DIR}/include"
           "-DKVSPARSE_EXPECTED_CUDA_INCLUDE_DIR=${SOURCE_DIR}/kernels")

elseif(STEP STREQUAL "add_subdirectory")
  set(cuda_args "")
  if(DEFINED KVSPARSE_CUDA AND NOT KVSPARSE_CUDA STREQUAL "")
    set(cuda_args "-DKVSPARSE_CUDA=${KVSPARSE_CUDA}")
  endif()
  consumer(add_subdirectory add_subdirectory "-DKVSPARSE_SOURCE_DIR=${SOURCE_DIR}" ${cuda_args})

else()
  message(FATAL_ERROR "run.cmake: unknown STEP '${STEP}'")
endif()

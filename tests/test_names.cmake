# Run as `cmake -DCTEST=<ctest> -DBUILD=<build dir> -P test_names.cmake`: fails if ctest lists an entry
# whose name holds ';', which is what a test name with ';' or an unbalanced '[' or ']' leaves behind (the
# binary's later tests merged into one entry that runs nothing; see kvsparse_add_test).
execute_process(COMMAND ${CTEST} -N WORKING_DIRECTORY ${BUILD} OUTPUT_VARIABLE listing RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "ctest -N failed: ${status}")
endif()
string(ASCII 59 semicolon)
string(FIND "${listing}" "${semicolon}" at)
if(NOT at EQUAL -1)
  message(FATAL_ERROR "a ctest entry merges several test cases (a name with ';' or an unbalanced bracket):\n${listing}")
endif()
message(STATUS "every test case is its own ctest entry")

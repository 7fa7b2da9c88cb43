# The README is the source of truth for the quick start: this script takes its first ```cpp block.
#
#   cmake -DREADME=README.md -DOUTPUT=examples/quick_start.cpp -P cmake/kvsparse_readme_snippet.cmake
#       writes the block to OUTPUT (this is how examples/quick_start.cpp is made);
#   cmake -DREADME=README.md -DCHECK=examples/quick_start.cpp -P cmake/kvsparse_readme_snippet.cmake
#       fails unless CHECK holds exactly the block.
#
# The block is every line between the line "```cpp" and the next line that starts with "```",
# each line ending in a newline.

cmake_minimum_required(VERSION 3.25)

function(kvsparse_first_cpp_block markdown out_var)
  file(READ "${markdown}" text)
  string(REPLACE "\r\n" "\n" text "${text}")
  set(text "\n${text}")
  string(FIND "${text}" "\n```cpp\n" open)
  if(open EQUAL -1)
    message(FATAL_ERROR "${markdown}: no ```cpp block")
  endif()
  math(EXPR begin "${open} + 8")
  string(SUBSTRING "${text}" ${begin} -1 rest)
  if(rest MATCHES "^```")
    message(FATAL_ERROR "${markdown}: the first ```cpp block is empty")
  endif()
  string(FIND "${rest}" "\n```" close)
  if(close EQUAL -1)
    message(FATAL_ERROR "${markdown}: the first ```cpp block is not closed")
  endif()
  math(EXPR length "${close} + 1")
  string(SUBSTRING "${rest}" 0 ${length} block)
  set(${out_var} "${block}" PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  if(NOT DEFINED README)
    message(FATAL_ERROR "usage: cmake -DREADME=<file.md> (-DOUTPUT=<file> | -DCHECK=<file>) "
                        "-P ${CMAKE_CURRENT_LIST_FILE}")
  endif()
  kvsparse_first_cpp_block("${README}" block)
  if(DEFINED OUTPUT)
    file(WRITE "${OUTPUT}" "${block}")
  endif()
  if(DEFINED CHECK)
    if(NOT EXISTS "${CHECK}")
      message(FATAL_ERROR "${CHECK} does not exist")
    endif()
    file(READ "${CHECK}" current)
    if(NOT current STREQUAL block)
      set(regenerate "cmake -DREADME=${README} -DOUTPUT=${CHECK} -P ${CMAKE_CURRENT_LIST_FILE}")
      find_program(KVSPARSE_DIFF diff)
      if(KVSPARSE_DIFF)
        string(RANDOM LENGTH 8 tag)
        set(expected "${CMAKE_CURRENT_BINARY_DIR}/readme-snippet-${tag}.cpp")
        file(WRITE "${expected}" "${block}")
        execute_process(COMMAND "${KVSPARSE_DIFF}" -u "${CHECK}" "${expected}")
        file(REMOVE "${expected}")
      endif()
      message(FATAL_ERROR "${CHECK} differs from the first ```cpp block of ${README}.\n"
                          "The README is the source of truth; regenerate the file with\n"
                          "  ${regenerate}")
    endif()
    message(STATUS "${CHECK} matches the first ```cpp block of ${README}")
  endif()
endif()

# CUDA compiler launcher: runs the nvcc command given after `--`, passes its
# output through (so the build log keeps the ptxas -v lines CI greps), and keeps
# that output as ${QPEFT_PTXAS_REPORT_DIR}/<source file name>.txt, rewritten
# whenever the source is recompiled. tests/test_cuda_build_report.py reads these
# files, so the register/spill report covers every kernel even after an
# incremental build that did not recompile some of them.
#
#   cmake -DQPEFT_PTXAS_REPORT_DIR=<dir> -P capture_ptxas.cmake -- <nvcc> <args...>
set(cmd "")
set(after_dashes OFF)
set(source "")
set(prev "")
math(EXPR last "${CMAKE_ARGC} - 1")
foreach(i RANGE 0 ${last})
  set(arg "${CMAKE_ARGV${i}}")
  if(after_dashes)
    list(APPEND cmd "${arg}")
    if(prev STREQUAL "-c")
      set(source "${arg}")
    endif()
    set(prev "${arg}")
  elseif(arg STREQUAL "--")
    set(after_dashes ON)
  endif()
endforeach()
if(NOT cmd)
  message(FATAL_ERROR "capture_ptxas.cmake: no command after --")
endif()

execute_process(COMMAND ${cmd} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT out STREQUAL "")
  message(NOTICE "${out}")
endif()
if(NOT err STREQUAL "")
  message(NOTICE "${err}")
endif()
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "CUDA compile failed (${rc})")
endif()
if(QPEFT_PTXAS_REPORT_DIR AND source)
  get_filename_component(name "${source}" NAME)
  file(MAKE_DIRECTORY "${QPEFT_PTXAS_REPORT_DIR}")
  file(WRITE "${QPEFT_PTXAS_REPORT_DIR}/${name}.txt" "${out}${err}")
endif()

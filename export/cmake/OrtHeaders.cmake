# ONNX Runtime C/C++ API headers, version 1.21, taken from Debian's libonnxruntime-dev package.
#
# Only the headers are used: the custom-op library resolves the API at run time through the
# OrtApiBase that ONNX Runtime hands to RegisterCustomOps, so it never links libonnxruntime and
# one build serves every onnxruntime >= 1.21.
#
# ARMQ_ORT_INCLUDE_DIR: use headers already on disk (a directory holding onnxruntime_c_api.h).
# ARMQ_ORT_DEB: use a local copy of the .deb instead of downloading it (checked all the same).
set(ARMQ_ORT_DEB_NAME "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb")
set(ARMQ_ORT_DEB_URL "https://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0%2Bdfsg-1_amd64.deb")
set(ARMQ_ORT_DEB_SHA256 "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")

set(ARMQ_ORT_INCLUDE_DIR "" CACHE PATH "ONNX Runtime 1.21 API headers (empty: fetch them)")
set(ARMQ_ORT_DEB "" CACHE FILEPATH "local ${ARMQ_ORT_DEB_NAME} (empty: download it)")

function(armq_fetch_ort_headers out_var)
  if(ARMQ_ORT_INCLUDE_DIR)
    if(NOT EXISTS "${ARMQ_ORT_INCLUDE_DIR}/onnxruntime_c_api.h")
      message(FATAL_ERROR "ARMQ_ORT_INCLUDE_DIR=${ARMQ_ORT_INCLUDE_DIR} holds no onnxruntime_c_api.h; "
                          "point it at the onnxruntime include directory or leave it empty to fetch the headers")
    endif()
    set(${out_var} "${ARMQ_ORT_INCLUDE_DIR}" PARENT_SCOPE)
    return()
  endif()

  if(DEFINED ENV{XDG_CACHE_HOME})
    set(cache "$ENV{XDG_CACHE_HOME}/armquant")
  else()
    set(cache "$ENV{HOME}/.cache/armquant")
  endif()
  set(root "${cache}/onnxruntime-headers-1.21.0")
  set(include_dir "${root}/usr/include/onnxruntime")
  if(EXISTS "${include_dir}/onnxruntime_c_api.h" AND EXISTS "${root}/.sha256-${ARMQ_ORT_DEB_SHA256}")
    set(${out_var} "${include_dir}" PARENT_SCOPE)
    return()
  endif()

  set(deb "${cache}/${ARMQ_ORT_DEB_NAME}")
  if(ARMQ_ORT_DEB)
    set(deb "${ARMQ_ORT_DEB}")
  elseif(NOT EXISTS "${deb}")
    message(STATUS "Downloading ${ARMQ_ORT_DEB_URL}")
    file(DOWNLOAD "${ARMQ_ORT_DEB_URL}" "${deb}.part" STATUS status TLS_VERIFY ON)
    list(GET status 0 code)
    if(NOT code EQUAL 0)
      file(REMOVE "${deb}.part")
      list(GET status 1 reason)
      message(FATAL_ERROR "could not download the ONNX Runtime 1.21 headers from ${ARMQ_ORT_DEB_URL}: ${reason}. "
                          "Download ${ARMQ_ORT_DEB_NAME} by hand and pass -DARMQ_ORT_DEB=<path>, "
                          "or pass -DARMQ_ORT_INCLUDE_DIR=<dir with onnxruntime_c_api.h>")
    endif()
    file(RENAME "${deb}.part" "${deb}")
  endif()
  file(SHA256 "${deb}" actual)
  if(NOT actual STREQUAL ARMQ_ORT_DEB_SHA256)
    message(FATAL_ERROR "${deb} has sha256 ${actual}, expected ${ARMQ_ORT_DEB_SHA256} "
                        "(${ARMQ_ORT_DEB_NAME}); delete it and build again")
  endif()

  # A .deb is an ar archive holding data.tar.xz; keep only the API headers.
  set(work "${root}.tmp")
  file(REMOVE_RECURSE "${work}" "${root}")
  file(MAKE_DIRECTORY "${work}/deb")
  file(ARCHIVE_EXTRACT INPUT "${deb}" DESTINATION "${work}/deb")
  file(GLOB data_tar "${work}/deb/data.tar.*")
  file(ARCHIVE_EXTRACT INPUT "${data_tar}" DESTINATION "${work}/data" PATTERNS "*usr/include/onnxruntime/*")
  if(NOT EXISTS "${work}/data/usr/include/onnxruntime/onnxruntime_c_api.h")
    message(FATAL_ERROR "${deb} holds no usr/include/onnxruntime/onnxruntime_c_api.h")
  endif()
  file(MAKE_DIRECTORY "${root}/usr/include")
  file(RENAME "${work}/data/usr/include/onnxruntime" "${include_dir}")
  file(REMOVE_RECURSE "${work}")
  file(TOUCH "${root}/.sha256-${ARMQ_ORT_DEB_SHA256}")
  set(${out_var} "${include_dir}" PARENT_SCOPE)
endfunction()

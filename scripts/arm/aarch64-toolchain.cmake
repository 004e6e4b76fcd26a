# CMake toolchain for cross-compiling llama.cpp (llama-cpp-python) to aarch64 Linux with
# Debian's gcc-aarch64-linux-gnu / g++-aarch64-linux-gnu; used by scripts/arm_check.sh --llm.
# No -march beyond the compiler's armv8-a default, so the library runs on every 64-bit Pi
# (Cortex-A53/A72/A76) and on Graviton; ggml picks faster kernels at run time where it can.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

#!/usr/bin/env bash
# Build llama.cpp's libraries again with other CPU options, to measure how far the LLM pack's
# hidden states, confidences and decisions move from one build to another (docs/arm.md, "The
# LLM pack on other builds"). The builds come from the source of the llama-cpp-python version
# installed in .venv, so its Python bindings load them unchanged:
#
#   LLAMA_CPP_LIB_PATH=$(scripts/llm_builds.sh generic) .venv/bin/edge-agent score --model smollm2-basicmotions ...
#
#   scripts/llm_builds.sh VARIANT...   build each variant (cached), print each library folder
#
# Variants:
#   generic   no CPU-specific kernels: on x86-64 the baseline (no SSE4.2, AVX, AVX2, FMA, F16C or
#             BMI2: any 64-bit x86 CPU); elsewhere the architecture's baseline (armv8-a)
#   avx       AVX + F16C, no AVX2 or FMA (Sandy/Ivy Bridge class)
#   avx2      AVX2 + FMA + F16C + BMI2, not tuned to this CPU (what a distribution ships)
# The aarch64 build is made by scripts/arm_check.sh --llm (cross-compiled, run under qemu).
#
# Everything else is as pip builds it (Release, OpenMP, shared libraries). Each build takes
# ~4-8 min on 2 cores; results are cached in $LLM_BUILDS (default ~/.cache/edge-agent-llm-builds).
set -euo pipefail
REPO=$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${LLM_BUILDS_PYTHON:-$REPO/.venv/bin/python}
CACHE=${LLM_BUILDS:-$HOME/.cache/edge-agent-llm-builds}

die() {
    printf 'llm_builds: %s\n' "$*" >&2
    exit 1
}
(($#)) || die "usage: $0 generic|avx|avx2 ..."
[[ -x $PY ]] || die "no $PY: run scripts/setup --llm first"
version=$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))') ||
    die "llama-cpp-python is not installed in $PY's environment"

off=(-DGGML_SSE42=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF)
src=$CACHE/$version/src
for variant in "$@"; do
    case $variant in
        generic) flags=("${off[@]}") ;;
        avx) flags=("${off[@]}" -DGGML_AVX=ON -DGGML_F16C=ON) ;;
        avx2) flags=(-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON) ;;
        *) die "unknown variant '$variant' (generic, avx, avx2)" ;;
    esac
    out=$CACHE/$version/$variant
    if [[ -f $out/lib/.done ]]; then
        echo "$out/lib"
        continue
    fi
    if [[ ! -d $src/vendor/llama.cpp ]]; then
        printf 'llm_builds: fetching the llama-cpp-python %s source (pip download)\n' "$version" >&2
        tmp=$(mktemp -d)
        "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$version" >&2
        mkdir -p "$src.new"
        tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$src.new" --strip-components=1
        rm -rf "$tmp" "$src"
        mv "$src.new" "$src"
    fi
    printf 'llm_builds: building %s (%s)\n' "$variant" "${flags[*]}" >&2
    t0=$(date +%s)
    rm -rf "$out"
    cmake -S "$src/vendor/llama.cpp" -B "$out/build" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF "${flags[@]}" \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
        -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' >"$out.cmake.log" 2>&1 ||
        die "cmake configure failed: $out.cmake.log"
    cmake --build "$out/build" --target llama -j "$(nproc)" >>"$out.cmake.log" 2>&1 ||
        die "build failed: $out.cmake.log"
    mkdir -p "$out/lib"
    find "$out/build" -name 'lib*.so*' -exec cp -a {} "$out/lib/" \;
    rm -rf "$out/build"
    touch "$out/lib/.done"
    printf 'llm_builds: %s built in %d s\n' "$variant" $(($(date +%s) - t0)) >&2
    echo "$out/lib"
done

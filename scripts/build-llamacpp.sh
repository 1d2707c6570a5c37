#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-server, llama-bench, llama-cli, llama-quantize, llama-perplexity)
# from the llama-cpp-python sdist's vendor/llama.cpp, the peer that benchmarks/llamacpp_peer.py runs.
#
#   bash scripts/build-llamacpp.sh        # ~25 minutes on 2 cores the first time; then prints the folder at once
#   CMAKE_ARGS="$(bash scripts/build-llamacpp.sh --cmake-args)" pip install llama-cpp-python   # the same ISA flags
#   pip install "$(bash scripts/build-llamacpp.sh --wheel)"   # that wheel, built once and cached beside the tools
#
# The binaries and the unpacked sdist (its convert_hf_to_gguf.py and gguf-py) are cached OUTSIDE the
# repository in ${ZENLM_LLAMACPP_DIR:-~/.cache/zenlm/llama.cpp}/<version>/{bin,src}; a second run only
# prints where they are. The last line of stdout is always that folder.
#
# Why not -DGGML_NATIVE=ON (llama.cpp's default): -march=native on an AMX CPU (Sapphire Rapids) compiles
# ggml's AMX path, and there every Q4_0/Q8_0 model dies on its first evaluation (SIGSEGV at `ldtilecfg`
# in ggml_backend_amx_mul_mat; llama.cpp PR #26954: the tile config on the stack is optimised away and
# worker threads never ask the kernel for AMX tile state). So the instruction sets are switched on one by
# one from what this CPU reports in /proc/cpuinfo (the flags zenlm.cpu.cpu_info() reads), AMX never:
# the same build is correct on Zen 3 (AVX2 only) and on AVX-512/VNNI/BF16 machines.
# Extra CMake arguments: LLAMACPP_CMAKE_ARGS="...".  Another version: LLAMACPP_VERSION=0.3.x.
set -euo pipefail

version="${LLAMACPP_VERSION:-0.3.36}"
root="${ZENLM_LLAMACPP_DIR:-$HOME/.cache/zenlm/llama.cpp}/$version"
targets=(llama-server llama-bench llama-cli llama-quantize llama-perplexity)
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"

# instruction sets from the CPU flags; GGML_NATIVE=OFF so that nothing else (AMX) is switched on
flags=" $(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { [[ "$flags" == *" $1 "* ]]; }
onoff() { if has "$1"; then echo ON; else echo OFF; fi; }
isa=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
if [ "$(uname -m)" = x86_64 ]; then
    avx512=OFF
    if has avx512f && has avx512bw && has avx512vl && has avx512dq && has avx512cd; then avx512=ON; fi
    isa+=(-DGGML_SSE42="$(onoff sse4_2)" -DGGML_AVX="$(onoff avx)" -DGGML_AVX2="$(onoff avx2)"
          -DGGML_FMA="$(onoff fma)" -DGGML_F16C="$(onoff f16c)" -DGGML_BMI2="$(onoff bmi2)"
          -DGGML_AVX_VNNI="$(onoff avx_vnni)" -DGGML_AVX512="$avx512")
    if [ "$avx512" = ON ]; then
        isa+=(-DGGML_AVX512_VBMI="$(onoff avx512vbmi)" -DGGML_AVX512_VNNI="$(onoff avx512_vnni)"
              -DGGML_AVX512_BF16="$(onoff avx512_bf16)")
    fi
else
    isa=(-DGGML_NATIVE=ON)  # arm64 and others: no AMX path to avoid
fi

if [ "${1:-}" = --cmake-args ]; then  # for pip: CMAKE_ARGS="$(bash scripts/build-llamacpp.sh --cmake-args)"
    echo "${isa[*]}"
    exit 0
fi
if [ "${1:-}" = --wheel ]; then
    # a llama-cpp-python wheel built with these flags, cached under a name made of them (pip's own wheel
    # cache ignores CMAKE_ARGS, so it would hand back a -march=native build made earlier)
    key="$(echo "${isa[*]} ${LLAMACPP_CMAKE_ARGS:-}" | sha256sum | cut -c1-12)"
    wheels="$root/wheels/$key"
    wheel="$(ls "$wheels"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -1 || true)"
    if [ -z "$wheel" ]; then
        mkdir -p "$wheels"
        CMAKE_ARGS="${isa[*]} ${LLAMACPP_CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-2}" \
            "$python" -m pip wheel --quiet --no-cache-dir --no-deps "llama-cpp-python==$version" -w "$wheels" >&2
        wheel="$(ls "$wheels"/llama_cpp_python-"$version"-*.whl | head -1)"
    fi
    echo "$wheel"
    exit 0
fi

# cmake-args.txt is written last, by a build that finished
if [ -f "$root/bin/cmake-args.txt" ] && [ -x "$root/bin/llama-bench" ] \
        && [ -f "$root/src/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    echo "llama.cpp $version already built: $root/bin" >&2
    echo "$root"
    exit 0
fi
for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install cmake g++)" >&2; exit 1; }
done

mkdir -p "$root"
if [ ! -f "$root/src/vendor/llama.cpp/CMakeLists.txt" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$python" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$tmp" >&2
    rm -rf "$root/src" && mkdir -p "$root/src"
    tar -xzf "$tmp"/llama_cpp_python-"$version".tar.gz -C "$root/src" --strip-components=1
fi

build="$root/build"
# shellcheck disable=SC2086
cmake -S "$root/src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF "${isa[@]}" ${LLAMACPP_CMAKE_ARGS:-} >&2
# the targets this version has (llama-cli and others moved between versions)
help="$(cmake --build "$build" --target help 2>/dev/null)"
available=()
for t in "${targets[@]}"; do
    if grep -q -E "(^|[ .:])$t(:|$| )" <<<"$help"; then available+=("$t"); fi
done
[ "${#available[@]}" -gt 0 ] || { echo "error: none of ${targets[*]} is a target of llama.cpp $version" >&2; exit 1; }
cmake --build "$build" --config Release --target "${available[@]}" -j "${JOBS:-2}" >&2
mkdir -p "$root/bin"
for t in "${available[@]}"; do cp "$build/bin/$t" "$root/bin/$t"; done
printf '%s\n' "${isa[@]}" ${LLAMACPP_CMAKE_ARGS:-} > "$root/bin/cmake-args.txt"
echo "llama.cpp $version built (${available[*]}): $root/bin" >&2
echo "$root"

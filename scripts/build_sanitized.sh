#!/usr/bin/env bash
# Build edgecad's C library (native/) with AddressSanitizer and UndefinedBehaviorSanitizer into
# build/sanitized/ (CMake option EDGECAD_SANITIZE), apart from the installed library, and print its path.
# Use it without reinstalling edgecad: EDGECAD_NATIVE_LIB=<that path>, with libasan preloaded
# (scripts/test_sanitized.sh does both). Needs gcc (or clang) with the sanitizer runtimes, CMake, make.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/build/sanitized"
mkdir -p "$out"
cmake -S "$root" -B "$out" -DEDGECAD_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >"$out.log" 2>&1 ||
    { cat "$out.log" >&2; exit 1; }
cmake --build "$out" -j "$(nproc)" >>"$out.log" 2>&1 || { cat "$out.log" >&2; exit 1; }
echo "$out/libedgecad.so"

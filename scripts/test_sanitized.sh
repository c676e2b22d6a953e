#!/usr/bin/env bash
# Run the tests of edgecad's C library with it built under AddressSanitizer and UndefinedBehaviorSanitizer
# (scripts/build_sanitized.sh): the pager and lazy load (tests/test_pager.py), interrupts and the native
# calls (tests/test_native.py), bad model files (tests/test_gguf_file.py and test_engine.py's bad-file tests).
# Nothing is installed: the tests import edgecad from this checkout (PYTHONPATH, so that the Python bindings
# and the C library come from the same sources, whatever is installed meanwhile) and EDGECAD_NATIVE_LIB points
# at the sanitized library. CPython is not built with ASan, so its runtime is preloaded; leak detection is off
# (CPython keeps memory until exit by design). Any sanitizer report, in pytest or in a child process a test starts, fails
# the run: reports go to files under build/sanitized/reports/ as well as to stderr.
# Extra arguments go to pytest (e.g. -x, or -k NAME).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
lib=$(bash "$root/scripts/build_sanitized.sh")
reports="$root/build/sanitized/reports"
rm -rf "$reports" && mkdir -p "$reports"
# libasan first; libstdc++ with it, else ASan's __cxa_throw interceptor finds no real one when libllama (C++,
# loaded later by ctypes) throws, as llama.cpp does on a bad model file: "CHECK failed ... real___cxa_throw".
asan=$(${CC:-gcc} -print-file-name=libasan.so)
stdcxx=$(${CC:-gcc} -print-file-name=libstdc++.so)
[ -e "$asan" ] || { echo "no libasan.so for ${CC:-gcc}: install its sanitizer runtime (Debian: libasan8)" >&2; exit 1; }
export LD_PRELOAD="$asan:$stdcxx${LD_PRELOAD:+:$LD_PRELOAD}"
export EDGECAD_NATIVE_LIB="$lib" PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# ggml's abort would attach gdb for a backtrace; gdb under the preloaded runtime hangs (the test's child times out)
export GGML_NO_BACKTRACE=1
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=99:log_path=$reports/asan:log_exe_name=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=99:log_path=$reports/ubsan:log_exe_name=1"
cd "$root"
nm -D "$lib" | grep __asan_init >/dev/null || { echo "$lib is not built with AddressSanitizer" >&2; exit 1; }
python -c 'from edgecad import native; native.check_version(); print("edgecad", native.__file__, "with", native.lib._name)'
set +e
python -m pytest -p no:cacheprovider -v -rfE tests/test_pager.py tests/test_native.py tests/test_gguf_file.py \
    tests/test_engine.py -k "not test_engine.py or missing_file or not_gguf or truncated_gguf or bad_model_files \
or unreadable_model or changed_on_disk" "$@"
rc=$?
set -e
if compgen -G "$reports/*" >/dev/null; then
    echo "sanitizer reports:" >&2
    for f in "$reports"/*; do echo "== $f" >&2; cat "$f" >&2; done
    exit 1
fi
exit $rc

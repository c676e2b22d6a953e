#!/usr/bin/env bash
# Build llama-cpp-python (the version edgecad pins) with llama.cpp's RPC backend (ggml-rpc) into the active
# virtual environment, for `edgecad rpc-server`, `--remote` and `EDGECAD_TEST_RPC=1 pytest tests/test_rpc.py`
# (docs/devices.md: several devices). The RPC build is the CPU build plus the RPC backend: everything else runs
# as before.
#
# The wheel is kept in ${EDGECAD_WHEELS:-~/.cache/edgecad/wheels} (never in pip's cache, where it would stand in
# for the CPU build): a second run installs it from there in seconds.
set -euo pipefail
version=$(python -c "import re,pathlib;print(re.search(r'llama-cpp-python==([\d.]+)',pathlib.Path('$(dirname "$0")/../pyproject.toml').read_text())[1])")
wheels="${EDGECAD_WHEELS:-$HOME/.cache/edgecad/wheels}/rpc"
mkdir -p "$wheels"
wheel=$(ls "$wheels"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
    echo "building llama-cpp-python $version with -DGGML_RPC=on (about 8 minutes on 2 cores)" >&2
    CMAKE_ARGS="-DGGML_RPC=on" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        pip wheel -q --no-cache-dir --no-deps -w "$work/out" "$work"/llama_cpp_python-"$version".tar.gz
    cp "$work"/out/llama_cpp_python-*.whl "$wheels"/
    wheel=$(ls "$wheels"/llama_cpp_python-"$version"-*.whl | head -n1)
fi
pip install -q --no-cache-dir --force-reinstall --no-deps "$wheel"
python -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_rpc() else 1)" ||
    { echo "the installed llama-cpp-python has no RPC backend: remove $wheel and run again" >&2; exit 1; }
echo "llama-cpp-python $version with llama.cpp's RPC backend: installed" >&2

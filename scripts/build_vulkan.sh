#!/usr/bin/env bash
# Build llama-cpp-python (the version edgecad pins) with llama.cpp's Vulkan backend into the active virtual
# environment, for `EDGECAD_TEST_VULKAN=1 pytest tests/test_devices.py` (docs/devices.md).
#
# Needs: a C/C++ compiler, CMake, the Vulkan headers and loader, glslc (Debian/Ubuntu: libvulkan-dev glslc;
# for a CPU-only machine add mesa-vulkan-drivers: the lavapipe software device). The pinned llama.cpp uses
# VK_EXT_layer_settings from Vulkan headers >= 1.3.261; older headers (Debian 12 ships 1.3.239) get a
# two-line patch that leaves out the validation-layer settings, which only a debug build uses.
# Built with --no-cache-dir so that this wheel never stands in for the CPU build in pip's cache.
set -euo pipefail
version=$(python -c "import re,pathlib;print(re.search(r'llama-cpp-python==([\d.]+)',pathlib.Path('$(dirname "$0")/../pyproject.toml').read_text())[1])")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version"
headers=$(grep -m1 -o 'VK_HEADER_VERSION [0-9]*' /usr/include/vulkan/vulkan_core.h | awk '{print $2}')
if [ "${headers:-0}" -lt 261 ]; then
    echo "Vulkan headers 1.3.$headers < 1.3.261: leaving out VK_EXT_layer_settings" >&2
    python - "$src/vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
start = s.index("    std::vector<vk::LayerSettingEXT> settings = {")
end = s.index("&layer_setting_info);", start) + len("&layer_setting_info);")
old = s[start:end]
new = ("    (void) enable_best_practice;\n"
       "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions);")
open(p, "w").write(s[:start] + new + s[end:])
PY
fi
CMAKE_ARGS="-DGGML_VULKAN=on" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    pip install --no-cache-dir --force-reinstall --no-deps "$src"

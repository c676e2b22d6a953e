"""The devices of this llama.cpp build and where each model runs (edgecad.devices)."""
import os

import pytest

from edgecad import Engine, devices
from edgecad.errors import EdgecadError
from helpers import PROMPTS


def test_this_build_lists_its_cpu():
    assert "CPU" in devices.backends()
    cpu = [d for d in devices.devices() if d.kind == "cpu"]
    assert cpu and cpu[0].memory_total > 0


def test_placement_rules():
    gpu = devices.gpu()
    if gpu is None:
        assert devices.placement("auto", None, 0, target_paged=True) == (None, 0, 0)
        with pytest.raises(EdgecadError, match="no GPU"):
            devices.placement("auto", -1, 0, target_paged=False)
    else:
        assert devices.placement("auto", None, 0, target_paged=True) == (gpu, -1, 0)
        if not gpu.pages_offloaded_layers:
            with pytest.raises(EdgecadError, match="cannot be paged"):
                devices.placement("auto", None, 4, target_paged=True)
    assert devices.placement("cpu", None, 0, target_paged=True) == (None, 0, 0)
    with pytest.raises(EdgecadError, match="backend='cpu'"):
        devices.placement("cpu", 2, 0, target_paged=False)
    with pytest.raises(EdgecadError, match="not known"):
        devices.placement("tpu", None, 0, target_paged=False)


@pytest.mark.skipif(os.environ.get("EDGECAD_TEST_VULKAN") != "1",
                    reason="set EDGECAD_TEST_VULKAN=1 with a Vulkan build of llama-cpp-python (docs/devices.md)")
def test_the_draft_on_vulkan_gives_the_cpu_tokens(tiny_pair):
    """Tree mode with the draft on the Vulkan device (lavapipe here) and the target on the CPU: the
    greedy tokens equal the all-CPU engine's (the draft only proposes; the target decides)."""
    assert "Vulkan" in devices.backends(), "this llama-cpp-python was built without Vulkan"
    gpu = devices.gpu()
    assert gpu is not None and gpu.name.startswith("Vulkan"), devices.devices()
    draft, target = tiny_pair
    prompts = PROMPTS[:3]
    out = {}
    for backend in ("cpu", "auto"):
        with Engine(target, draft, mode="tree", n_ctx=512, backend=backend, memory_budget=None) as e:
            assert (e.device is None) == (backend == "cpu")
            out[backend] = [e.create_completion(p, temperature=0.0, max_tokens=32)["edgecad"] for p in prompts]
    assert [s["token_ids"] for s in out["auto"]] == [s["token_ids"] for s in out["cpu"]]
    assert sum(s["accepted_tokens"] for s in out["auto"]) > 0  # the Vulkan draft's tokens were accepted

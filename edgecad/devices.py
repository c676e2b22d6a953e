"""The compute devices of this build of llama.cpp (ggml's device registry), and where each model runs.

llama-cpp-python builds llama.cpp with the CPU backend, and with Metal (Apple silicon, by default) or
Vulkan (`CMAKE_ARGS="-DGGML_VULKAN=on"`) when asked. What a GPU can hold of edgecad's two models:
- the draft, always: it is resident anyway, and small;
- the target, only resident on CUDA and Vulkan: they copy offloaded weights into device memory at load,
  so an offloaded layer is no longer read from the file mapping and cannot be paged. Metal wraps the
  mapping without a copy, so a paged target's offloaded layers might still page there: unproven, so
  edgecad allows it on Metal with a warning, and refuses it elsewhere.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional

import llama_cpp as C

from .errors import EdgecadError
from .native import ggml, ggml_base

KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}  # enum ggml_backend_dev_type


@dataclass(frozen=True)
class Device:
    name: str          # ggml's name: "CPU", "Vulkan0", "Metal", "CUDA0"
    description: str   # the hardware, as its backend names it
    kind: str          # cpu, gpu (own memory), igpu (shares host memory), accel, meta
    memory_free: int   # bytes, as the backend reports them
    memory_total: int

    @property
    def pages_offloaded_layers(self) -> bool:
        """Offloaded weights stay in the file mapping (Metal: no copy; unproven); CUDA, Vulkan copy them."""
        return self.name.startswith("Metal")


def backends() -> list[str]:
    """The backends compiled into this llama.cpp: "CPU", "Vulkan", "Metal", ..."""
    C.llama_backend_init()
    return [ggml_base.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)).decode()
            for i in range(ggml.ggml_backend_reg_count())]


def devices() -> list[Device]:
    C.llama_backend_init()
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        d = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        ggml_base.ggml_backend_dev_memory(d, ctypes.byref(free), ctypes.byref(total))
        out.append(Device(ggml_base.ggml_backend_dev_name(d).decode(),
                          ggml_base.ggml_backend_dev_description(d).decode(),
                          KINDS.get(ggml_base.ggml_backend_dev_type(d), "?"), free.value, total.value))
    return out


def cpu_device() -> int:
    """The CPU's ggml device (ggml_backend_dev_t)."""
    C.llama_backend_init()
    return ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU


def cpu_buffer_type() -> int:
    """The CPU device's buffer type: where tensors named by ModelParams.cpu_tensors stay."""
    return ggml_base.ggml_backend_dev_buffer_type(cpu_device())


def gpu() -> Optional[Device]:
    """The GPU llama.cpp would offload to: its first GPU or integrated GPU device."""
    return next((d for d in devices() if d.kind in ("gpu", "igpu")), None)


def placement(backend: str, draft_gpu_layers: Optional[int], target_gpu_layers: int,
              target_paged: bool) -> tuple[Optional[Device], int, int]:
    """(the GPU used or None, draft layers on it, target layers on it), or an EdgecadError naming the fix.
    backend "auto": the draft fully on a GPU when there is one, the target on the CPU; "cpu": no GPU.
    Layer counts follow llama.cpp: -1 = all layers."""
    if backend not in ("auto", "cpu"):
        raise EdgecadError(f"backend={backend!r} is not known: use 'auto' (a GPU when llama.cpp has one) or 'cpu'")
    dev = gpu() if backend == "auto" else None
    asked = (draft_gpu_layers or 0) != 0 or target_gpu_layers != 0
    if dev is None and asked:
        why = "backend='cpu'" if backend == "cpu" else f"this llama.cpp has no GPU (backends: {', '.join(backends())})"
        raise EdgecadError(f"GPU layers were asked for but {why}: leave draft_gpu_layers and target_gpu_layers "
                           "at their defaults, or install llama-cpp-python with Metal or Vulkan (docs/devices.md)")
    if dev is None:
        return None, 0, 0
    if target_gpu_layers != 0 and target_paged and not dev.pages_offloaded_layers:
        raise EdgecadError(f"target_gpu_layers={target_gpu_layers} with a paged target: {dev.name} copies offloaded "
                           "weights into its own memory, where they cannot be paged; keep target_gpu_layers=0 (the "
                           "target pages on the CPU) or give a memory_budget that holds the whole target")
    return dev, (-1 if draft_gpu_layers is None else draft_gpu_layers), target_gpu_layers


def placement_line(device: Device, d_gpu: int, t_gpu: int, paged: bool) -> str:
    """The verbose line saying where each model computes."""
    return (f"  device        {device.name} ({device.description}): draft layers {'all' if d_gpu < 0 else d_gpu}, "
            f"target layers {'all' if t_gpu < 0 else t_gpu}"
            + (" (paging offloaded layers on Metal is unproven)" if t_gpu and paged else ""))

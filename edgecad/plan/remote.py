"""The remote split: which of the target's layers live on other devices (edgecad.rpc), from what each announces."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..gguf_file import GGUFInfo
from .sizes import activation_bytes, cells, kv_bytes
from .units import MB, mb


@dataclass(frozen=True)
class RemoteDevice:
    endpoint: str        # host:port of its rpc-server
    name: str            # ggml's name: "RPC0", "RPC1", ...
    handle: int          # its ggml_backend_dev_t
    memory_free: int     # bytes, as the server announces them
    memory_total: int


@dataclass(frozen=True)
class RemotePlan:
    """Which of the target's layers live on remote devices (edgecad.rpc): the last ones, in device order."""
    devices: tuple               # RemoteDevice, in the order llama.cpp gets them
    counts: tuple                # layers on each device (consecutive: the first device the earliest)
    first: int                   # the first remote layer; layers first.. n_layer-1 are remote
    weight_bytes: tuple          # each device's bytes of weights (sent at load)
    kv_bytes: tuple              # each device's KV cache
    reserve: int                 # compute buffer reserved on each device
    n_embd: int                  # activations that cross to each device and back: n_embd floats per token
    local: GGUFInfo              # the target as this device holds it: layers 0..first-1 and the rest of the file

    @property
    def n_layers(self) -> int:
        return sum(self.counts)

    def model_params(self) -> dict:
        """ModelParams fields: llama.cpp offloads the last n_gpu_layers "layers", the output layer among them,
        to the devices in proportion to tensor_split. The output stays on the CPU (cpu_tensors: its logits
        would cross the network) and each device's boundary lies half a layer inside its share."""
        k, split = self.n_layers, [float(c) for c in self.counts]
        if len(split) > 1:
            split[0] -= 0.5
            split[-1] += 1.5
        return dict(n_gpu_layers=k + 1, devices=tuple(d.handle for d in self.devices), tensor_split=tuple(split),
                    cpu_tensors=r"^(output|output_norm|token_embd)\.")

    def net_bytes(self, tokens: int, kv_len: int = 0) -> int:
        """Bytes passes over `tokens` tokens in all move over the network (estimated): to each device and back,
        the activations (fp32), and to it the attention mask over the cached cells (fp32, kv_len of them)."""
        return tokens * (2 * self.n_embd * 4 + (cells(kv_len) if kv_len else 0) * 4) * len(self.devices)

    def describe(self) -> str:
        out, start = [], self.first
        for d, c, w, kv in zip(self.devices, self.counts, self.weight_bytes, self.kv_bytes):
            out.append(f"remote          {d.name} at {d.endpoint}: layers "
                       + (f"{start}-{start + c - 1}" if c > 1 else f"{start}" if c else "none")
                       + f" ({mb(w)} of weights + KV {mb(kv)} + compute {mb(self.reserve)}; it announces "
                       f"{mb(d.memory_free)} free)")
            start += c
        out.append(f"network         ~{self.net_bytes(1) / 1e3:,.0f} KB per token of a pass (activations in and "
                   "out), + 4 bytes per cached token (the attention mask)")
        return "\n".join(out)


def plan_remote(target: GGUFInfo, devices: list, *, n_ctx: int, n_batch: int) -> Optional[RemotePlan]:
    """As many of the target's last layers as each remote device's announced memory holds (with their KV cache
    and a compute buffer), the first layer kept local; None when no device holds a layer. The last device
    takes the last layers (llama.cpp gives devices consecutive layers in order)."""
    layers = target.layers()
    per_kv = kv_bytes(target, n_ctx) // max(target.n_layer, 1)
    reserve = activation_bytes(target, n_batch, n_ctx) + 24 * MB
    counts, weights, kvs, i = [], [], [], len(layers)
    for d in reversed(devices):
        room, c, w = d.memory_free - reserve, 0, 0
        while i - c > 1 and w + layers[i - c - 1].n_bytes + (c + 1) * per_kv <= room:
            w += layers[i - c - 1].n_bytes
            c += 1
        counts.insert(0, c), weights.insert(0, w), kvs.insert(0, c * per_kv)
        i -= c
    used = [k for k, c in enumerate(counts) if c]  # (a device that holds no layer is left out)
    if not used:
        return None
    pick = lambda xs: tuple(xs[k] for k in used)  # noqa: E731
    return RemotePlan(pick(devices), pick(counts), i, pick(weights), pick(kvs), reserve,
                      int(target.arch_value("embedding_length", 0)), target.local_part(i))

"""What a model costs in memory besides its weights: KV caches, activations, compute buffers (estimated from the
GGUF header's sizes, as llama.cpp allocates them)."""
from __future__ import annotations

from ..gguf_file import GGUFInfo
from .units import MB


def cells(n_ctx: int) -> int:
    """KV cells llama.cpp allocates for a context of n_ctx tokens (padded to 256)."""
    return -(-max(n_ctx, 1) // 256) * 256


def kv_bytes(info: GGUFInfo, n_ctx: int) -> int:
    """llama.cpp's F16 KV cache of one context (n_ctx padded to 256 cells); llama.cpp clears it at
    creation, so all of it is resident from the start."""
    n_head = int(info.arch_value("attention.head_count", 1))
    n_head_kv = int(info.arch_value("attention.head_count_kv", n_head))
    n_embd = int(info.arch_value("embedding_length", 0))
    k = int(info.arch_value("attention.key_length", n_embd // max(n_head, 1)))
    v = int(info.arch_value("attention.value_length", k))
    return cells(n_ctx) * info.n_layer * n_head_kv * (k + v) * 2 + state_bytes(info)


def state_bytes(info: GGUFInfo) -> int:
    """A Mamba-like model's recurrent state of one sequence (F32: the convolution's last inputs and the SSM's
    state, every layer: llama.cpp's n_embd_r and n_embd_s); 0 for other models (RWKV's is not counted)."""
    d_inner, d_state = int(info.arch_value("ssm.inner_size", 0)), int(info.arch_value("ssm.state_size", 0))
    d_conv, groups = int(info.arch_value("ssm.conv_kernel", 1)), int(info.arch_value("ssm.group_count", 0))
    return info.n_layer * ((d_conv - 1) * (d_inner + 2 * groups * d_state) + d_state * d_inner) * 4


def activation_bytes(info: GGUFInfo, n_batch: int, n_ctx: int = 512) -> int:
    """A layer's fp32 activations and attention scores for a batch of n_batch tokens."""
    n_embd = int(info.arch_value("embedding_length", 0))
    n_ff = int(info.arch_value("feed_forward_length", 4 * n_embd))
    n_head = int(info.arch_value("attention.head_count", 1))
    return n_batch * (4 * n_embd + 3 * n_ff) * 4 + n_batch * cells(n_ctx) * n_head * 4


def compute_bytes(info: GGUFInfo, n_batch: int, n_outputs: int, n_ctx: int = 512) -> int:
    """Resident part of llama.cpp's compute buffer and logits for our batches: a batch of n_batch
    tokens (prompt chunks, one output) and tree passes of n_outputs tokens with logits for each.
    Estimated from the model's sizes (fp32 activations), not llama.cpp's worst-case reservation."""
    logits = 2 * n_outputs * info.vocab_size * 4  # graph output and llama.cpp's copy
    return activation_bytes(info, n_batch, n_ctx) + logits + 24 * MB

"""What a model costs besides its weights (edgecad.plan.sizes)."""
from edgecad.gguf_file import read_gguf
from edgecad.plan.sizes import kv_bytes


def test_kv_bytes_follow_the_context(tiny_target):
    info = read_gguf(tiny_target)
    assert kv_bytes(info, 512) == 2 * kv_bytes(info, 256) > 0
    assert kv_bytes(info, 300) == kv_bytes(info, 512)  # llama.cpp pads the cells to 256

"""A thin wrapper over llama-cpp-python's low-level ctypes API (`llama_cpp.llama_*`).

Model, Context and Batch own one C object each, free it in `close()` (they are
context managers), and turn every failed C call into an edgecad exception
carrying the return code and llama.cpp's last logged error. Logits come back
as numpy views of llama.cpp's buffer (no copy): valid until the next decode.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import llama_cpp as C
import numpy as np

from . import native
from .devices import cpu_buffer_type
from .errors import LlamaError, ModelFileError
from .gguf_file import read_gguf
from .progress import Progress

# ---------------------------------------------------------------------------- logging

_LOG = C.llama_log_callback(native.log_callback_address)  # in C: no Python runs inside llama.cpp's calls


def set_verbose(verbose: bool) -> None:
    """Print llama.cpp's own log to stderr (quiet by default)."""
    native.lib.ec_log_set_verbose(int(bool(verbose)))


def recent_errors() -> str:
    said = native.take_log_errors()
    return f"; llama.cpp said: {said}" if said else ""


_backend_ready = False


def init_backend() -> None:
    """Once per process, before llama.cpp is used: the library's version checked, llama.cpp's log captured."""
    global _backend_ready
    if not _backend_ready:
        native.check_version()  # the library and these bindings come from the same native/edgecad.h
        C.llama_log_set(_LOG, ctypes.c_void_p(0))
        C.llama_backend_init()
        _backend_ready = True


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------- lifetime

class Closing:
    """The lifetime of an object that holds C memory: close() frees it (idempotent); `with` and the garbage
    collector close too."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


# ---------------------------------------------------------------------------- model

@dataclass(frozen=True)
class ModelParams:
    use_mmap: bool = True          # map the GGUF file (needed for paging); False: read it into memory llama.cpp
                                   # owns, with direct IO where the OS has it (no file pages left in the
                                   # process or the page cache: a repacked tensor is not held twice)
    use_extra_bufts: bool = False  # weight repacking: copies Q4_K weights into anonymous memory, defeats paging
    n_gpu_layers: int = 0          # layers offloaded to a GPU backend (Metal, Vulkan); 0 = CPU only
    devices: Optional[tuple] = None  # ggml devices (ggml_backend_dev_t) offloaded layers go to, in order; None =
                                     # llama.cpp's choice (every registered device)
    tensor_split: Optional[tuple] = None  # share of the offloaded layers per device (llama.cpp normalizes it)
    cpu_tensors: Optional[str] = None     # regex of tensor names kept on the CPU in offloaded layers
    guard: Optional["Guard"] = None  # runs the calls that may wait on another device (a remote residency's)
    vocab_only: bool = False         # the vocabulary alone, no weights (an engine that freed its models: tokenizing)


class Guard:
    """How llama.cpp's calls that may wait on another device run (the remote residency's watched threads)."""

    def call(self, what: str, fn, *args):
        """fn(*args), `what` naming the call for errors."""
        raise NotImplementedError

    def release(self, fn, ptr) -> None:
        """fn(ptr), a free: never raises (a free that would wait for good is left to the process's exit)."""
        raise NotImplementedError


class _BuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override (llama.h): tensors whose name matches `pattern` go to `buft`."""
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _call(guard: Optional[Guard], what: str, fn, *args):
    return fn(*args) if guard is None else guard.call(what, fn, *args)


def _free(guard: Optional[Guard], fn, ptr) -> None:
    fn(ptr) if guard is None else guard.release(fn, ptr)


def _identity(path: Path):
    """What changes when a file is replaced, truncated or rewritten: (device, inode, size, mtime)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _model_params(params: ModelParams):
    """(llama.cpp's llama_model_params for `params`, the arrays they point to: keep them alive during the load)."""
    mp = C.llama_model_default_params()
    mp.load_mode = C.LLAMA_LOAD_MODE_MMAP if params.use_mmap else C.LLAMA_LOAD_MODE_DIRECT_IO
    mp.lazy_mode = C.LLAMA_LAZY_MODE_OFF
    mp.use_extra_bufts = params.use_extra_bufts
    mp.vocab_only = params.vocab_only
    mp.n_gpu_layers = params.n_gpu_layers
    keep = []
    if params.devices is not None:
        keep.append((ctypes.c_void_p * (len(params.devices) + 1))(*params.devices, None))
        mp.devices = ctypes.cast(keep[-1], ctypes.c_void_p)
    if params.tensor_split is not None:
        keep.append((ctypes.c_float * C.LLAMA_MAX_DEVICES)(*params.tensor_split))
        mp.tensor_split = keep[-1]
    if params.cpu_tensors is not None:
        keep.append((_BuftOverride * 2)((params.cpu_tensors.encode(), cpu_buffer_type())))
        mp.tensor_buft_overrides = ctypes.cast(keep[-1], ctypes.c_void_p)
    return mp, keep


class Model(Closing):
    """A loaded GGUF model and its vocabulary."""

    def __init__(self, path: str | os.PathLike, params: ModelParams = ModelParams(), info=None,
                 progress: Optional[str] = None):
        """info: the file's GGUFInfo when already read (else it is read here: clear errors for
        missing, non-GGUF and truncated files before llama.cpp sees the file). progress: a label
        for a load progress bar on stderr. Ctrl-C during the load stops it (KeyboardInterrupt)."""
        self._ptr = None
        self._dependents = []  # objects using this model's mapping: closed before it is freed
        init_backend()
        self.path = Path(path)
        self.info = info if info is not None else read_gguf(self.path)
        self._identity = _identity(self.path)
        self._load(params, progress)

    def reload(self, params: ModelParams, progress: Optional[str] = None) -> None:
        """Load the same file again with other params (the engine moving between residencies: edgecad.follow):
        the weights held now are freed first (the room shrank), and this object stays the one its holders have
        (a completion's text, the chat window)."""
        self.check_file()
        self.close()
        self._load(params, progress)

    def _load(self, params: ModelParams, progress: Optional[str]) -> None:
        self.params = params
        mp, keep = _model_params(params)  # (keep: the arrays mp points to, alive until the load returns)
        # llama.cpp calls this during the load. A Ctrl-C raised inside a ctypes callback is printed and lost,
        # so the load stops on the C library's Ctrl-C flag (native/common.c, section 6) or on a
        # KeyboardInterrupt caught here, and the interrupt is raised once llama.cpp has returned.
        bar, stop = (Progress(100, progress, "%") if progress else None), []
        native.lib.ec_interrupt_clear()

        def on_progress(fraction: float, _user_data) -> bool:
            try:
                if native.lib.ec_interrupt_pending():
                    stop.append(True)
                    return False
                if bar is not None:
                    bar.update(fraction * 100 - bar.done)
                return True
            except KeyboardInterrupt:
                stop.append(True)
                return False

        callback = C.llama_progress_callback(on_progress)
        mp.progress_callback = callback
        native.take_log_errors()  # forget older errors
        self._ptr = _call(params.guard, f"loading {self.path.name}", C.llama_model_load_from_file,
                          os.fsencode(self.path), mp)
        if bar is not None:
            bar.close()
        if stop or native.lib.ec_interrupt_pending():
            if self._ptr:
                _free(params.guard, C.llama_model_free, self._ptr)
                self._ptr = None
            raise KeyboardInterrupt
        if not self._ptr:
            raise ModelFileError(f"llama.cpp could not load {self.path}{recent_errors()}")
        self._vocab = C.llama_model_get_vocab(self._ptr)
        self.n_vocab: int = C.llama_vocab_n_tokens(self._vocab)

    @property
    def ptr(self):
        if not self._ptr:
            raise LlamaError(f"model {self.path} is closed")
        return self._ptr

    @property
    def vocab(self):
        """llama.cpp's vocabulary of this model (the model's own: freed with it)."""
        self.ptr  # (raises once closed)
        return self._vocab

    def check_file(self) -> None:
        """Raise before using a model whose file changed or vanished since the load: llama.cpp maps it, and
        touching a page past a truncated end would kill the process (SIGBUS)."""
        if _identity(self.path) != self._identity:
            raise ModelFileError(f"{self.path} changed or vanished while loaded: load it again once the file "
                                 "is complete")

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, with BOS when the vocabulary asks for it (as llama-cpp-python's completion)."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        n_max = len(data) + 8
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            buf = (C.llama_token * n_max)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
            if n < 0:
                raise LlamaError(f"llama_tokenize failed for {len(data)} bytes", n)
        return list(buf[:n])

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Iterable[int], *, special: bool = False) -> bytes:
        return b"".join(self.token_to_piece(t, special=special) for t in tokens)

    def token_text(self, token: int) -> bytes:
        """The vocabulary's stored text of a token (used to compare vocabularies)."""
        return C.llama_vocab_get_text(self.vocab, token) or b""

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))

    def special_tokens(self) -> tuple[int, int, int]:
        """The vocabulary's (BOS, EOS, newline) token ids, -1 where it has none."""
        return C.llama_vocab_bos(self.vocab), C.llama_vocab_eos(self.vocab), C.llama_vocab_nl(self.vocab)

    def n_embd(self) -> int:
        return C.llama_model_n_embd(self.ptr)

    def metadata(self) -> dict[str, str]:
        """The GGUF's metadata as llama.cpp gives it (values as text, arrays summarized), as `Llama.metadata`."""
        def text(fn, i: int) -> str:
            n = 256
            while True:
                buf = ctypes.create_string_buffer(n)
                k = fn(self.ptr, i, buf, n)  # (the length the whole text needs, as snprintf)
                if k < n:
                    return buf.value.decode("utf-8", "replace")
                n = k + 1

        return {text(C.llama_model_meta_key_by_index, i): text(C.llama_model_meta_val_str_by_index, i)
                for i in range(C.llama_model_meta_count(self.ptr))}

    def chat_template(self) -> Optional[str]:
        """The GGUF's own chat template (tokenizer.chat_template), None when it has none."""
        # const char * llama_model_chat_template(const struct llama_model * model, const char * name);
        template = C.llama_model_chat_template(self.ptr, None)
        return template.decode("utf-8", "replace") if template else None

    def chat_formatter(self, template: str, end_of_turn: Optional[str] = None):
        """llama-cpp-python's Jinja2 chat formatter (a sandboxed environment) over `template`, as `Llama` builds it
        from the GGUF's tokenizer.chat_template. end_of_turn: the stop string, when not the EOS token's text."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        bos, eos, _ = self.special_tokens()
        text = lambda t: self.token_text(t).decode("utf-8", "replace") if t >= 0 else ""
        return Jinja2ChatFormatter(template, eos_token=end_of_turn or text(eos), bos_token=text(bos),
                                   stop_token_ids=[eos] if eos >= 0 else None)

    def close_first(self, dependent) -> None:
        """Close `dependent` (anything with close()) before this model is freed, whatever order a garbage
        collector finalizes them in: the pager's IO thread advises addresses of this model's mapping."""
        self._dependents.append(dependent)

    def close(self) -> None:
        while self._dependents:
            self._dependents.pop().close()
        if self._ptr:
            _free(self.params.guard, C.llama_model_free, self._ptr)
        self._ptr = None


# ---------------------------------------------------------------------------- batch

class Batch(Closing):
    """A llama_batch of up to `capacity` tokens, each in up to `n_seq_max` sequences."""

    def __init__(self, capacity: int, n_seq_max: int = 1):
        self.capacity, self.n_seq_max = capacity, n_seq_max
        self._b = None
        self._b = C.llama_batch_init(capacity, 0, n_seq_max)
        if not self._b.token:
            raise LlamaError(f"llama_batch_init({capacity}, 0, {n_seq_max}) failed to allocate")
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0
        self._b.n_tokens = 0

    def add(self, token: int, pos: int, seq_ids: Sequence[int] = (0,), logits: bool = False) -> None:
        i = self.n_tokens
        if i >= self.capacity:
            raise LlamaError(f"batch is full ({self.capacity} tokens)")
        if not 1 <= len(seq_ids) <= self.n_seq_max:
            raise LlamaError(f"a token needs 1..{self.n_seq_max} sequence ids, got {len(seq_ids)}")
        b = self._b
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = len(seq_ids)
        row = b.seq_id[i]
        for j, s in enumerate(seq_ids):
            row[j] = s
        b.logits[i] = logits
        self.n_tokens = i + 1
        b.n_tokens = self.n_tokens

    def __len__(self) -> int:
        return self.n_tokens

    def close(self) -> None:
        if self._b is not None and self._b.token:
            C.llama_batch_free(self._b)
        self._b = None


# ---------------------------------------------------------------------------- context

_DECODE_ERRORS = {
    1: "no room in the KV cache (the context is full): use a larger n_ctx or a shorter prompt",
    2: "aborted",
    -1: "invalid batch",
    -2: "memory allocation failed",
    -3: "compute failed",
}


native.install_interrupt()  # at import, in the main thread: Ctrl-C then also reaches waiting C code
_ABORT = C.ggml_abort_callback(native.abort_callback_address)  # edgecad's C: stop a graph on Ctrl-C


@dataclass(frozen=True)
class ContextParams:
    n_ctx: int = 4096           # tokens of KV cache, shared by all sequences (kv_unified)
    n_batch: int = 512          # largest batch one llama_decode accepts
    n_seq_max: int = 1          # distinct sequence ids a token may carry (tree branches); <= 256
    n_threads: int = 0          # compute threads; 0 = all cores this process may use
    kv_unified: bool = True     # one KV buffer for all sequences: needed for multi-sequence tree tokens
    op_offload: bool = False    # let llama.cpp run this context's big batches on a GPU (copying CPU weights
                                # there per batch); off: a model kept on the CPU computes on the CPU
    flash_attn: bool = False    # llama.cpp's flash attention (its default, AUTO, turns it on for CPU; off
                                # here as in llama-cpp-python's Llama, so greedy outputs match it exactly)


class Context(Closing):
    """A llama_context: KV cache, decode, logits, and sequence memory ops."""

    def __init__(self, model: Model, params: ContextParams = ContextParams(), *, cb_eval=None, cb_eval_user_data=None,
                 after_decode=None):
        """cb_eval/cb_eval_user_data: llama.cpp's graph callback; after_decode(): called after every
        successful decode (the pager raises there if it aborted the graph)."""
        self._ptr = None
        self._after_decode = after_decode
        self.model = model
        cp = C.llama_context_default_params()
        cp.n_ctx = params.n_ctx
        cp.n_batch = params.n_batch
        cp.n_ubatch = params.n_batch
        cp.n_seq_max = params.n_seq_max
        cp.n_threads = cp.n_threads_batch = params.n_threads or default_threads()
        cp.kv_unified = params.kv_unified
        cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED if params.flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        cp.op_offload = params.op_offload
        if cb_eval is not None:
            cp.cb_eval = cb_eval
            cp.cb_eval_user_data = cb_eval_user_data
        self._cb_eval = cb_eval  # keep the callback alive as long as the context
        self.params = params
        self._guard = model.params.guard
        self._ptr = _call(self._guard, "creating a context", C.llama_init_from_model, model.ptr, cp)
        if not self._ptr:
            raise LlamaError(f"llama_init_from_model failed (n_ctx={params.n_ctx}){recent_errors()}")
        C.llama_set_abort_callback(self._ptr, _ABORT, None)  # Ctrl-C stops a graph between nodes
        self.n_ctx: int = C.llama_n_ctx(self._ptr)
        self._mem = C.llama_get_memory(self._ptr)
        self.n_vocab = model.n_vocab
        # The one record of what sequence 0 holds: tokens[i] at position i. Whoever changes sequence 0
        # (sync, or a decoder committing accepted tokens) keeps it true; other sequences are scratch.
        self.tokens: list[int] = []
        self.reused = 0  # tokens the last sync kept

    @property
    def ptr(self):
        if not self._ptr:
            raise LlamaError("context is closed")
        return self._ptr

    def decode(self, batch: Batch) -> None:
        """One llama_decode. Raises KeyboardInterrupt after a Ctrl-C (the flag is cleared when a completion
        starts): the graph may have stopped part-way with rc 0 (ggml ends an aborted graph quietly), so its
        logits and this batch's KV cells are garbage; callers commit tokens only after decode returns, and
        the next sync drops the cells."""
        try:
            rc = _call(self._guard, "during a pass", C.llama_decode, self.ptr, batch._b)
        finally:  # also when a KeyboardInterrupt lands right after the call: the pager's pass must end
            if self._after_decode is not None:
                self._after_decode()
        if native.lib.ec_interrupt_pending():
            raise KeyboardInterrupt
        if rc != 0:
            why = _DECODE_ERRORS.get(rc, "error")
            raise LlamaError(f"llama_decode of {batch.n_tokens} tokens failed ({rc}): {why}{recent_errors()}", rc)

    def common_prefix(self, tokens: Sequence[int]) -> int:
        """Tokens at the start of `tokens` that sequence 0 holds (what `sync` keeps)."""
        n = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            n += 1
        if self.seq_pos_min(0) != 0:  # the record can only claim what the cache holds (after an interrupt)
            n = 0
        return min(n, self.seq_pos_max(0) + 1)

    def sync(self, batch: Batch, tokens: Sequence[int], *, logits: bool = False) -> Optional[np.ndarray]:
        """Make sequence 0 hold exactly `tokens`: keep the longest common prefix with what it holds,
        drop the rest (and every other sequence), decode only the new suffix, in chunks of the batch's
        capacity. With logits=True the last token is decoded even if held (its logits are needed) and
        they are returned (a copy). `reused` is then the number of tokens kept."""
        n = self.common_prefix(tokens)
        if logits and n == len(tokens):
            n -= 1
        n = max(0, n)
        del self.tokens[n:]
        if n:
            self.seq_keep(0)
            if not C.llama_memory_seq_rm(self._mem, 0, n, -1):  # a cache that cannot be cut part-way
                n = 0
        if n == 0:
            self.clear()
        self.reused = n
        total = len(tokens)
        for start in range(n, total, batch.capacity):
            chunk = list(tokens[start:start + batch.capacity])
            batch.clear()
            for j, t in enumerate(chunk):
                batch.add(t, start + j, (0,), logits and start + j == total - 1)
            self.decode(batch)
            self.tokens += chunk
        return self.logits(batch.n_tokens - 1).copy() if logits and total else None

    def prefill(self, batch: Batch, tokens: Sequence[int], *, logits: bool = False) -> Optional[np.ndarray]:
        """Clear the KV cache, then `sync` to `tokens` (all decoded)."""
        self.clear()
        return self.sync(batch, tokens, logits=logits)

    def logits(self, i: int) -> np.ndarray:
        """Logits of batch token i (which was added with logits=True): a view, shape (n_vocab,)."""
        p = C.llama_get_logits_ith(self.ptr, i)
        if not p:
            raise LlamaError(f"no logits for batch index {i}: add the token with logits=True")
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,))

    def logits_all(self, n_outputs: int) -> np.ndarray:
        """Logits of every output token of the last batch, in batch order: a view, shape (n_outputs, n_vocab)."""
        p = C.llama_get_logits(self.ptr)
        return np.ctypeslib.as_array(p, shape=(n_outputs, self.n_vocab))

    # KV memory, per sequence. p0/p1 are positions; -1 means "from start" / "to end".
    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        if not C.llama_memory_seq_rm(self._mem, seq, p0, p1):
            raise LlamaError(f"llama_memory_seq_rm(seq={seq}, {p0}, {p1}) failed")

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        C.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        C.llama_memory_seq_keep(self._mem, seq)

    def seq_pos_max(self, seq: int) -> int:
        """Largest position stored for `seq`, -1 when it is empty."""
        return C.llama_memory_seq_pos_max(self._mem, seq)

    def seq_pos_min(self, seq: int) -> int:
        return C.llama_memory_seq_pos_min(self._mem, seq)

    def clear(self) -> None:
        _call(self._guard, "clearing the KV cache", C.llama_memory_clear, self._mem, True)
        self.tokens = []

    def close(self) -> None:
        if self._ptr:
            _free(getattr(self, "_guard", None), C.llama_free, self._ptr)
        self._ptr = None

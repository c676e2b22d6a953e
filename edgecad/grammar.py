"""llama.cpp's grammar sampler (GBNF), as llama-cpp-python's `LlamaGrammar` uses it: a completion's grammar state,
what it allows next, advancing it. Every grammar passes edgecad.gbnf's check before llama.cpp parses it, on a
thread with a stack of known size.
"""
from __future__ import annotations

import ctypes
import threading

import llama_cpp as C
import numpy as np

from . import gbnf as gbnf_check
from .errors import RequestError
from .llama import Closing, Model, init_backend, recent_errors

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)  # llama_token_data
assert _TOKEN_DATA.itemsize == ctypes.sizeof(C.llama_token_data)


PARSE_STACK = 8 << 20  # bytes of stack llama.cpp gets to parse a grammar, whatever the caller's thread has
_stack_size_lock = threading.Lock()


def _on_parse_stack(fn, *args):
    """fn(*args) on a new thread with a PARSE_STACK stack: llama.cpp's grammar parser recurses (gbnf.py's bounds
    are measured against this stack), and the caller's thread may have musl's 128 KiB."""
    out = []
    with _stack_size_lock:  # threading.stack_size is the process's setting for threads started next
        before = threading.stack_size(PARSE_STACK)
        try:
            thread = threading.Thread(target=lambda: out.append(fn(*args)), name="edgecad-grammar", daemon=True)
            thread.start()
        finally:
            threading.stack_size(before)
    thread.join()
    return out[0]


class Grammar(Closing):
    """llama.cpp's grammar sampler (GBNF, as llama-cpp-python's `LlamaGrammar` uses it): the grammar's state
    after the tokens accepted so far. `mask` says what it allows next; `accept` advances it by one such token.
    llama.cpp aborts the process when a grammar accepts a token it forbids (or an end of generation before it is
    complete): `accept` checks first, and takes no end-of-generation token (the completion ends there)."""

    def __init__(self, model: Model, gbnf: str, root: str = "root"):
        init_backend()
        gbnf_check.check(gbnf)  # what llama.cpp's parser cannot take safely never reaches it (gbnf.py)
        # struct llama_sampler * llama_sampler_init_grammar(const struct llama_vocab *, const char * grammar_str,
        #                                                   const char * grammar_root);  NULL when it does not parse
        self._ptr = _on_parse_stack(C.llama_sampler_init_grammar, model.vocab, gbnf.encode("utf-8"),
                                    root.encode("utf-8"))
        if not self._ptr:
            raise RequestError(f"the grammar does not parse{recent_errors()}: give GBNF with a `{root}` rule "
                               "(llama.cpp's grammars/README.md)", "grammar")
        self.n_vocab, self._is_eog = model.n_vocab, model.is_eog

    def clone(self) -> "Grammar":
        """An independent copy of this state."""
        g = Grammar.__new__(Grammar)
        g._ptr, g.n_vocab, g._is_eog = C.llama_sampler_clone(self._ptr), self.n_vocab, self._is_eog
        return g

    def accept(self, token: int) -> None:
        """Advance by a token the grammar allows (checked first: llama.cpp would abort the process); an end of
        generation leaves the state as it is."""
        if self._is_eog(token):
            return
        if not self.allowed(np.array([token], dtype=np.int32))[0]:
            raise RequestError(f"token {token} is not allowed by the grammar here (every token it allows was banned "
                               "by logit_bias or the penalties): loosen the grammar or the bias", "grammar")
        C.llama_sampler_accept(self._ptr, int(token))

    def allowed(self, ids: np.ndarray) -> np.ndarray:
        """Which of these token ids the grammar allows next (a bool per id)."""
        data = np.zeros(len(ids), dtype=_TOKEN_DATA)
        data["id"] = ids
        arr = C.llama_token_data_array(data=data.ctypes.data_as(ctypes.POINTER(C.llama_token_data)),
                                       size=len(ids), selected=-1, sorted=False)
        C.llama_sampler_apply(self._ptr, ctypes.byref(arr))  # forbidden tokens' logits become -inf
        return np.isfinite(data["logit"])

    def mask(self, logits: np.ndarray, keep: int) -> np.ndarray:
        """`logits` with -inf where the grammar forbids the token. Only the most likely tokens are checked, best
        first, until `keep` allowed ones are found (they are then the `keep` best allowed tokens: all a greedy
        pick or a top-k needs); keep <= 0 checks every token."""
        n = len(logits)
        checked, ok = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        m = n if keep <= 0 else min(n, max(64, 4 * keep))
        while True:
            top = np.argpartition(-logits, m - 1)[:m] if m < n else np.arange(n)
            new = top[~checked[top]]
            ok[new], checked[new] = self.allowed(new), True
            if m == n or ok[top].sum() >= keep:
                break
            m = min(n, 16 * m)
        out = np.where(ok & ~np.isnan(logits), logits, -np.inf).astype(np.float32)
        if not np.isfinite(out).any():  # nothing allowed, or all of it banned (logit_bias, penalties) or NaN
            raise RequestError("the grammar allows no token here that logit_bias and the penalties leave possible: "
                               "loosen the grammar or the bias", "grammar")
        return out

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            C.llama_sampler_free(self._ptr)
            self._ptr = None

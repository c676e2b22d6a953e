"""edgecad.Engine: the public API, shaped like llama-cpp-python's `Llama`.

An Engine owns the target model (and optionally a draft model), each with one
llama.cpp context. `create_completion` turns a prompt into tokens, runs the
decoder of the engine's mode (a generator of token ids), and assembles text,
stop strings, streaming chunks and statistics in one place for every mode.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from . import registry
from .errors import EdgecadError, PromptTooLongError, VocabularyMismatchError
from .gguf_file import read_gguf
from .llama import Batch, Context, ContextParams, Model, ModelParams, default_threads, set_verbose
from .sampling import SamplingParams, pick

MODES = ("target",)


@dataclass
class Stats:
    """Counters of one completion; `as_dict` is the completion's `edgecad` entry."""
    mode: str
    prompt_tokens: int = 0
    token_ids: list = field(default_factory=list)
    target_passes: int = 0      # target llama_decode calls after the prompt
    prompt_seconds: float = 0.0  # prompt processing (prefill) time
    seconds: float = 0.0        # generation time after the prompt

    def as_dict(self) -> dict:
        n = len(self.token_ids)
        return {
            "mode": self.mode,
            "n_tokens": n,
            "token_ids": list(self.token_ids),
            "prompt_tokens": self.prompt_tokens,
            "prompt_seconds": self.prompt_seconds,
            "seconds": self.seconds,
            "tokens_per_second": n / self.seconds if self.seconds > 0 else 0.0,
            "target_passes": self.target_passes,
        }


def check_same_vocabulary(draft: Path, target: Path, draft_model: Model, target_model: Model) -> None:
    """Speculative decoding compares token ids: the draft must use the target's vocabulary exactly."""
    dv, tv = read_gguf(draft).vocab_digest, read_gguf(target).vocab_digest
    if draft_model.n_vocab != target_model.n_vocab or dv != tv:
        raise VocabularyMismatchError(
            f"draft {draft} ({draft_model.n_vocab} tokens) does not share the vocabulary of target {target} "
            f"({target_model.n_vocab} tokens): pick a draft model of the same family (same tokenizer)"
        )


class Engine:
    """Run a target model, optionally sped up by a resident draft model.

    Args (keyword-only after `draft`):
        target, draft: a GGUF path or a registry name (see `edgecad models list`).
        mode: "target" (no draft). None picks the default for the models given.
        memory_budget: bytes of the target's weights that may be resident (pager; not yet available).
        n_ctx: context length in tokens (prompt + completion).
        n_threads: compute threads; None = all cores this process may use.
        seed: default random seed of sampled completions.
        verbose: print llama.cpp's log.
    """

    def __init__(
        self,
        target: Union[str, os.PathLike],
        draft: Union[str, os.PathLike, None] = None,
        *,
        # decoding
        mode: Optional[str] = None,
        # memory
        memory_budget: Union[int, str, None] = None,
        n_ctx: int = 4096,
        # compute
        n_threads: Optional[int] = None,
        seed: Optional[int] = None,
        verbose: bool = False,
    ):
        self._target_model = self._draft_model = None
        self._target = self._draft = None
        set_verbose(verbose)
        self.verbose = verbose
        self.mode = mode or ("tree" if draft is not None else "target")
        if self.mode not in MODES:
            raise EdgecadError(f"mode {self.mode!r} is not available: choose one of {', '.join(MODES)}")
        if memory_budget is not None:
            raise EdgecadError("memory_budget is not available yet in this version: leave it None")
        if n_ctx < 8:
            raise EdgecadError(f"n_ctx={n_ctx} is too small: use at least 8 tokens")
        self.n_threads = n_threads or default_threads()
        self.target_path = registry.resolve(target)
        self.draft_path = registry.resolve(draft) if draft is not None else None
        self._target_model = Model(self.target_path, ModelParams(use_mmap=True, use_extra_bufts=True))
        if self.draft_path is not None:
            self._draft_model = Model(self.draft_path, ModelParams(use_mmap=True, use_extra_bufts=True))
            check_same_vocabulary(self.draft_path, self.target_path, self._draft_model, self._target_model)
        cp = ContextParams(n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=self.n_threads)
        self._target = Context(self._target_model, cp)
        self.n_ctx = self._target.n_ctx
        self._batch = Batch(cp.n_batch)
        self._rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: Union[str, bytes], add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self._target_model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        return self._target_model.detokenize(tokens, special=special)

    # ------------------------------------------------------------------ decoders

    def _prefill(self, ctx: Context, tokens: Sequence[int]) -> np.ndarray:
        """Clear the KV cache, decode the prompt in n_batch chunks; logits of its last token (a copy)."""
        ctx.clear()
        b, n = self._batch, len(tokens)
        for start in range(0, n, b.capacity):
            b.clear()
            chunk = tokens[start:start + b.capacity]
            for j, t in enumerate(chunk):
                b.add(t, start + j, (0,), start + j == n - 1)
            ctx.decode(b)
        return ctx.logits(b.n_tokens - 1).copy()

    def _decode_target(self, prompt: Sequence[int], max_tokens: int, sp: SamplingParams,
                       rng: np.random.Generator, stats: Stats) -> Iterator[int]:
        """Plain decoding: one target pass per token."""
        ctx, b = self._target, self._batch
        t0 = time.perf_counter()
        logits = self._prefill(ctx, prompt)
        stats.prompt_seconds = time.perf_counter() - t0
        pos = len(prompt)
        for i in range(max_tokens):
            tok = pick(logits, sp, rng)
            yield tok
            if self._target_model.is_eog(tok) or i + 1 == max_tokens or pos >= self.n_ctx:
                return
            b.clear()
            b.add(tok, pos, (0,), True)
            ctx.decode(b)
            stats.target_passes += 1
            pos += 1
            logits = ctx.logits(0)

    # ------------------------------------------------------------------ completion

    def create_completion(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 0.95,
        top_k: int = 40,
        stop: Union[str, Sequence[str], None] = None,
        stream: bool = False,
        seed: Optional[int] = None,
    ):
        """Complete `prompt`; a dict shaped like llama-cpp-python's completion, or an iterator of chunks if stream."""
        chunks = self._completion_chunks(prompt, max_tokens, temperature, top_p, top_k, stop, seed)
        if stream:
            return chunks
        text, last = [], None
        for chunk in chunks:
            text.append(chunk["choices"][0]["text"])
            last = chunk
        last["choices"][0]["text"] = "".join(text)
        return last

    __call__ = create_completion

    def _completion_chunks(self, prompt, max_tokens, temperature, top_p, top_k, stop, seed) -> Iterator[dict]:
        tokens = self.tokenize(prompt)
        if not tokens:
            raise EdgecadError("the prompt is empty: give at least one character of text")
        if len(tokens) >= self.n_ctx:
            raise PromptTooLongError(
                f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}: "
                f"shorten the prompt or create the Engine with n_ctx > {len(tokens)}"
            )
        if max_tokens is None or max_tokens <= 0:
            max_tokens = self.n_ctx - len(tokens)
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        sp = SamplingParams(temperature=max(0.0, float(temperature)), top_k=int(top_k), top_p=float(top_p))
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        stats = Stats(mode=self.mode, prompt_tokens=len(tokens))
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())

        def chunk(text: str, finish: Optional[str]) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": str(self.target_path),
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        raw, emitted, finish = b"", 0, "length"
        t0 = time.perf_counter()
        decoder = self._decode_target(tokens, max_tokens, sp, rng, stats)
        try:
            for tok in decoder:
                stats.token_ids.append(tok)
                if self._target_model.is_eog(tok):
                    finish = "stop"
                    break
                raw += self._target_model.token_to_piece(tok)
                text = raw.decode("utf-8", errors="ignore")
                hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    finish, raw = "stop", text[:hit].encode()
                    break
                safe = len(text) - _held_back(text, stops, raw)
                if safe > emitted:
                    yield chunk(text[emitted:safe], None)
                    emitted = safe
        finally:
            decoder.close()
        stats.seconds = time.perf_counter() - t0 - stats.prompt_seconds
        text = raw.decode("utf-8", errors="ignore")
        last = chunk(text[emitted:], finish)
        n = len(stats.token_ids)
        last["usage"] = {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n}
        last["edgecad"] = stats.as_dict()
        yield last

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        for name in ("_batch", "_target", "_draft", "_target_model", "_draft_model"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
                setattr(self, name, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def _held_back(text: str, stops: Sequence[str], raw: bytes) -> int:
    """Characters at the end of `text` not to stream yet: a possible start of a stop string
    (or, when the bytes end mid-character, nothing more is known to be final)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n

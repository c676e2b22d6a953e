"""Turning logits into a token: greedy, or sampled with temperature, top-k and top-p.

`processed` and `distribution` are the one definition of "the model's sampling
distribution" that both plain and speculative decoding use (per tree node, with
that node's own history), so speculative decoding can preserve exactly it.
Order, as llama-cpp-python's sampler chain: logit_bias; the penalties (repeat,
frequency, presence) over the last tokens generated; the grammar's mask; then
top-k on the logits; top-p (the smallest most-likely set whose mass reaches
top_p) and min-p (tokens at least min_p times as likely as the most likely one)
on the survivors' softmax at temperature 1; then softmax of logits/temperature
over what is left.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples from softmax(logits / temperature)
    top_k: int = 40           # keep only the k largest logits; <= 0 keeps all
    top_p: float = 0.95       # keep the smallest set of tokens with this much probability; 1.0 keeps all
    min_p: float = 0.0        # keep tokens with probability >= min_p x the largest; 0 keeps all
    repeat_penalty: float = 1.0  # llama.cpp's repeat penalty over the last PENALTY_LAST_N generated tokens
    frequency_penalty: float = 0.0  # subtracted from a logit once per occurrence in that window
    presence_penalty: float = 0.0   # subtracted from a logit once if the token occurs in that window
    logit_bias: tuple = ()       # ((token id, bias), ...): added to those logits first
    grammar: Optional[str] = None  # GBNF text: tokens the grammar forbids after the history are masked

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @cached_property
    def bias(self) -> tuple[np.ndarray, np.ndarray]:
        """logit_bias as arrays (token ids, biases), made once per completion: applied per tree node."""
        ids = np.fromiter((t for t, _ in self.logit_bias), dtype=np.int64, count=len(self.logit_bias))
        return ids, np.fromiter((b for _, b in self.logit_bias), dtype=np.float32, count=len(self.logit_bias))


RAW = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # the model's own probabilities: a plain softmax


PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size: the penalty's window


def processed(logits: np.ndarray, recent, sp: SamplingParams, grammar=None) -> np.ndarray:
    """The logits the sampler sees, after llama-cpp-python's chain up to top-k: logit_bias added; then llama.cpp's
    penalties: each distinct token among the last PENALTY_LAST_N generated ones (`recent`: the tokens generated
    so far in this completion) has its logit divided by repeat_penalty when positive, multiplied when negative,
    then minus frequency_penalty x its count and presence_penalty; then the grammar's mask (an
    edgecad.grammar.Grammar in the state after `recent`), checking as many tokens as the pick needs."""
    x = logits
    if sp.logit_bias:
        ids, b = sp.bias
        x = np.array(x, dtype=np.float32)
        x[ids] += b  # (ids are distinct: the last bias given for a token won)
    if len(recent) and (sp.repeat_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty):
        x = np.array(x, dtype=np.float32)
        idx, count = np.unique(np.asarray(recent[-PENALTY_LAST_N:], dtype=np.int64), return_counts=True)
        v = x[idx]
        v = np.where(v > 0, v / sp.repeat_penalty, v * sp.repeat_penalty)
        x[idx] = v - (count.astype(np.float32) * np.float32(sp.frequency_penalty) + np.float32(sp.presence_penalty))
    if grammar is not None:
        x = grammar.mask(x, 1 if sp.greedy else sp.top_k)
    return x


def distribution(logits: np.ndarray, sp: SamplingParams) -> np.ndarray:
    """Full-vocabulary probabilities (float64) after temperature, top-k and top-p."""
    x = np.asarray(logits, dtype=np.float64)
    n = x.shape[-1]
    if not 0 < sp.top_k < n and sp.top_p >= 1.0 and sp.min_p <= 0.0:  # nothing cut: a plain softmax
        p = np.exp((x - x.max()) / sp.temperature)
        return p / p.sum()
    if 0 < sp.top_k < n:
        idx = np.argpartition(-x, sp.top_k - 1)[: sp.top_k]
    else:
        idx = np.arange(n)
    z = x[idx]
    p = np.exp(z - z.max())
    p /= p.sum()
    if sp.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, sp.top_p)) + 1]
        idx, z, p = idx[keep], z[keep], p[keep] / p[keep].sum()
    if sp.min_p > 0.0:
        keep = p >= sp.min_p * p.max()
        idx, z = idx[keep], z[keep]
    z = z / sp.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    out = np.zeros(n)
    out[idx] = p
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of raw logits, in float32 as llama-cpp-python's `Llama.logits_to_logprobs` (its
    completion's logprobs are the model's own, before any processing)."""
    x = np.asarray(logits, dtype=np.float32)
    z = x - x.max()
    return z - np.log(np.exp(z).sum())


def sample_from(p: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from a probability vector."""
    c = np.cumsum(p, dtype=np.float64)
    i = int(np.searchsorted(c, rng.random() * c[-1], side="right"))
    if i >= len(p) or p[i] <= 0:  # (u * total rounded up to the total: the last token that can be drawn)
        i = int(np.flatnonzero(p > 0)[-1])
    return i


def pick(logits: np.ndarray, sp: SamplingParams, rng: np.random.Generator) -> int:
    """The next token: argmax when greedy, else a draw from `distribution`."""
    if sp.greedy:
        return int(np.argmax(logits))
    return sample_from(distribution(logits, sp), rng)

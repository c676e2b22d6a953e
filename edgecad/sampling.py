"""Turning logits into a token: greedy, or sampled with temperature, top-k and top-p.

`distribution` is the one definition of "the model's sampling distribution"
that both plain and speculative decoding use, so speculative sampling can
preserve exactly it. Order, as llama-cpp-python's sampler chain: top-k on the
logits; top-p (the smallest most-likely set whose mass reaches top_p) and
min-p (tokens at least min_p times as likely as the most likely one) on the
survivors' softmax at temperature 1; then softmax of logits/temperature over
what is left.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples from softmax(logits / temperature)
    top_k: int = 40           # keep only the k largest logits; <= 0 keeps all
    top_p: float = 0.95       # keep the smallest set of tokens with this much probability; 1.0 keeps all
    min_p: float = 0.0        # keep tokens with probability >= min_p x the largest; 0 keeps all
    repeat_penalty: float = 1.0  # llama.cpp's repeat penalty over the last PENALTY_LAST_N generated tokens

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


RAW = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # the model's own probabilities: a plain softmax


PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size: the penalty's window


def penalize(logits: np.ndarray, recent, penalty: float) -> np.ndarray:
    """llama.cpp's repeat penalty, applied before everything else (as llama-cpp-python's sampler chain):
    each distinct token among the last PENALTY_LAST_N generated ones has its logit divided by the penalty
    when positive, multiplied when negative. `recent`: tokens generated so far in this completion."""
    if penalty == 1.0 or not len(recent):
        return logits
    x = np.array(logits, dtype=np.float32)
    idx = np.unique(np.asarray(recent[-PENALTY_LAST_N:], dtype=np.int64))
    v = x[idx]
    x[idx] = np.where(v > 0, v / penalty, v * penalty)
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


def sample_from(p: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from a probability vector."""
    c = np.cumsum(p, dtype=np.float64)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


def pick(logits: np.ndarray, sp: SamplingParams, rng: np.random.Generator) -> int:
    """The next token: argmax when greedy, else a draw from `distribution`."""
    if sp.greedy:
        return int(np.argmax(logits))
    return sample_from(distribution(logits, sp), rng)

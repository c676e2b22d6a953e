"""The sampling distribution and draws from it."""
import numpy as np

from edgecad.sampling import SamplingParams, distribution, pick, sample_from
from helpers import chi_square


def test_distribution_filters():
    logits = np.array([5.0, 4.0, 3.0, 0.0, -1.0, 2.0])
    p = distribution(logits, SamplingParams(temperature=1.0, top_k=3, top_p=1.0))
    assert np.isclose(p.sum(), 1) and set(np.nonzero(p)[0]) == {0, 1, 2}
    full = np.exp(logits[:3] - 5) / np.exp(logits[:3] - 5).sum()
    assert np.allclose(p[:3], full)
    q = distribution(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.7))
    assert set(np.nonzero(q)[0]) == {0, 1}  # the smallest set with mass >= 0.7
    hot = distribution(logits, SamplingParams(temperature=10.0, top_k=0, top_p=1.0))
    cold = distribution(logits, SamplingParams(temperature=0.1, top_k=0, top_p=1.0))
    assert hot.max() < p.max() < cold.max()


def test_greedy_pick_is_argmax():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert pick(logits, SamplingParams(), np.random.default_rng(0)) == int(np.argmax(logits))


def test_draws_follow_the_distribution():
    p = np.array([0.5, 0.25, 0.125, 0.125, 0.0])
    rng = np.random.default_rng(1)
    counts = np.bincount([sample_from(p, rng) for _ in range(8000)], minlength=5)
    assert counts[4] == 0
    chi_square(counts, p * 8000, tv=0.03)

"""kimi_jax.evaluation.unigram: add-alpha counts, and a scorer whose perplexity is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kimi_jax.evaluation.perplexity import ScoredDocument, evaluate_perplexity
from kimi_jax.evaluation.unigram import UnigramError, fit_unigram, unigram_scorer


def test_add_one_counts():
    logp = fit_unigram([np.array([0, 0, 1]), np.array([[0, 3]])], vocab_size=5)
    # counts 3, 1, 0, 1, 0 over N = 5 tokens; add-one over 5 ids: (c + 1) / 10
    np.testing.assert_allclose(np.exp(logp), [0.4, 0.2, 0.1, 0.2, 0.1], rtol=1e-12)
    unsmoothed = fit_unigram([np.array([2, 2, 4])], vocab_size=5, alpha=0.0)
    assert np.exp(unsmoothed[2]) == pytest.approx(2 / 3) and unsmoothed[0] == -np.inf


def test_perplexity_of_the_unigram_model_in_closed_form():
    """Scored on documents, the per-token NLL is the cross-entropy of their tokens under p; the hits are the most
    frequent token's occurrences."""
    logp = fit_unigram([np.array([5, 5, 5, 6, 7, 7])], vocab_size=10)
    rng = np.random.default_rng(0)
    docs = [ScoredDocument(ids=rng.integers(3, 10, n + 1), scored=np.ones(n, bool), num_bytes=2 * n)
            for n in (40, 17, 90)]
    out = evaluate_perplexity(docs, unigram_scorer(logp), seq_len=16, stride=8, batch_size=4)
    targets = np.concatenate([d.ids[1:] for d in docs])
    expected = -logp[targets].mean()
    assert out["nll_per_token"] == pytest.approx(expected, rel=1e-12)
    assert out["perplexity"] == pytest.approx(math.exp(expected), rel=1e-12)
    assert out["token_accuracy"] == pytest.approx(np.mean(targets == 5))
    assert out["perplexity_stderr"] > 0  # windows are its units, like any stage's


def test_bad_counts_are_one_named_error():
    with pytest.raises(UnigramError, match="outside the vocabulary of 4"):
        fit_unigram([np.array([1, 4])], vocab_size=4)
    with pytest.raises(UnigramError, match="smoothing"):
        fit_unigram([np.array([1])], vocab_size=4, alpha=-1)
    with pytest.raises(UnigramError, match="no tokens"):
        fit_unigram([], vocab_size=4, alpha=0.0)

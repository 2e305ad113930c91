"""kimi_jax.evaluation.generation_quality on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from kimi_jax.evaluation.generation_quality import (distinct_n, generation_stats, length_stats, ngrams,
                                                    prompt_snippets, repetition_rate)


def test_distinct_n_pools_all_samples():
    samples = [[1, 2, 3, 1, 2], [1, 2, 4]]
    assert distinct_n(samples, 1) == 4 / 8  # {1, 2, 3, 4} over 8 tokens
    assert distinct_n(samples, 2) == 4 / 6  # (1,2) x3, (2,3), (3,1), (2,4)
    assert distinct_n(samples, 3) == 4 / 4
    assert distinct_n([[1], [2]], 2) is None  # no bigram at all
    assert distinct_n([], 1) is None


def test_repetition_rate_per_sample_then_averaged():
    looping = [5, 6, 7, 8] * 3  # 9 four-grams, 4 unique -> 5/9 repeated
    fresh = [1, 2, 3, 4, 5]  # 2 four-grams, both unique
    assert repetition_rate([looping]) == pytest.approx(5 / 9)
    assert repetition_rate([looping, fresh, [1, 2]]) == pytest.approx((5 / 9 + 0) / 2)  # [1, 2] has no 4-gram
    assert repetition_rate([[1, 2, 3]]) is None
    assert ngrams([1, 2, 3], 2) == [(1, 2), (2, 3)]


def test_length_stats():
    s = length_stats([4, 10, 10], [True, False, True], max_new_tokens=10)
    assert s == {"mean_tokens": 8.0, "min_tokens": 4, "max_tokens": 10, "fraction_hit_max_new_tokens": 1 / 3,
                 # sample std of (4, 10, 10) is sqrt(12), of (0, 1, 0) sqrt(1/3); / sqrt(3)
                 "mean_tokens_stderr": pytest.approx(2.0), "fraction_hit_max_new_tokens_stderr": pytest.approx(1 / 3)}
    assert length_stats([7], [True], 10)["mean_tokens_stderr"] is None
    assert length_stats([], [], 10)["mean_tokens"] is None
    stats = generation_stats([[1, 2, 3, 4, 1, 2, 3, 4]], [8], [False], 8)
    assert stats["distinct_1"] == 0.5 and stats["repetition_rate_4gram"] == pytest.approx(1 / 5)


def test_prompt_snippets_cut_at_whitespace():
    long = "word " * 100
    short = "  A short document.  "
    out = prompt_snippets([long, short, "   ", "x" * 300], 3)
    assert out[0] == ("word " * 40).rstrip() and len(out[0]) <= 200 and not out[0].endswith(" ")
    assert out[1] == "A short document."
    assert out[2] == "x" * 200  # no whitespace to cut at
    assert prompt_snippets([long, short], 1) == out[:1]


def test_distinct_n_stderr_is_a_bootstrap_over_samples():
    """Two samples, [1, 1] and [2, 3]: a resample is {A, A} (distinct-1 1/4), {B, B} (2/4) or {A, B} (3/4) with
    probabilities 1/4, 1/4, 1/2, so the bootstrap's standard deviation is sqrt(0.04296875) = 0.2073."""
    from kimi_jax.evaluation.generation_quality import distinct_n_stderr

    assert distinct_n_stderr([[1, 1], [2, 3]], 1) == pytest.approx(math.sqrt(0.04296875), abs=0.01)
    assert distinct_n_stderr([[1, 2], [1, 2]], 1) == 0.0  # every resample pools the same n-grams
    assert distinct_n_stderr([[1, 2, 3]], 1) is None and distinct_n_stderr([[1], [2]], 2) is None
    stats = generation_stats([[1, 1], [2, 3]], [2, 2], [False, False], 8)
    assert stats["distinct_1_stderr"] == distinct_n_stderr([[1, 1], [2, 3]], 1)

"""kimi_jax.evaluation.uncertainty on constructed data whose standard errors are known analytically."""

from __future__ import annotations

import math

import chex
import numpy as np
import pytest

from kimi_jax.evaluation import uncertainty as u


def test_mean_stderr_of_bernoulli_items_is_the_analytic_formula():
    n, hits = 200, 50  # p = 0.25
    values = np.zeros(n)
    values[:hits] = 1.0
    p = hits / n
    # sample variance (ddof=1) of 0/1 values is n p (1-p) / (n-1)
    expected = math.sqrt(p * (1 - p) / (n - 1))
    assert u.mean_stderr(values) == pytest.approx(expected, rel=1e-12)
    assert u.mean_stderr([3.0, 3.0, 3.0]) == 0.0
    assert u.mean_stderr([1.0]) is None and u.mean_stderr([]) is None


def test_bootstrap_stderr_of_a_mean_is_close_to_the_analytic_one():
    rng = np.random.default_rng(1)
    values = rng.normal(10.0, 2.0, size=400)
    analytic = values.std(ddof=0) / math.sqrt(values.size)  # the bootstrap's plug-in target
    got = u.bootstrap_ratio(values, np.ones_like(values))
    assert got.value == pytest.approx(values.mean(), rel=1e-12) and got.n == 400
    # 2000 resamples: the relative Monte-Carlo error of the SE is about 1/sqrt(2 * 2000) = 1.6%; 8% is 5 sigma
    assert got.stderr == pytest.approx(analytic, rel=0.08)
    # the 95% percentile interval of a near-normal statistic is about mean +- 1.96 SE
    assert got.low == pytest.approx(values.mean() - 1.96 * analytic, abs=0.3 * analytic)
    assert got.high == pytest.approx(values.mean() + 1.96 * analytic, abs=0.3 * analytic)
    again = u.bootstrap_ratio(values, np.ones_like(values))
    assert again == got  # seeded
    assert u.bootstrap_ratio([1.0], [1.0]) is None


def test_perplexity_interval_brackets_the_point_and_follows_the_delta_method():
    rng = np.random.default_rng(2)
    tokens = rng.integers(50, 150, size=300).astype(float)
    nll = tokens * rng.normal(3.0, 0.3, size=300)  # per-document mean NLL around 3 nats
    got = u.bootstrap_ratio(nll, tokens, u.perplexity_transform)
    point = math.exp(nll.sum() / tokens.sum())
    assert got.value == pytest.approx(point, rel=1e-12)
    assert got.low < point < got.high
    # delta method for a ratio of sums: var(R) ~ sum((x_i - R t_i)^2) / T^2, and d exp(R) = exp(R) dR
    r = nll.sum() / tokens.sum()
    se_ratio = math.sqrt(np.sum((nll - r * tokens) ** 2)) / tokens.sum()
    assert got.stderr == pytest.approx(point * se_ratio, rel=0.1)
    bpb = u.bootstrap_ratio(nll, tokens * 4, u.bits_per_byte_transform)
    assert bpb.value == pytest.approx(nll.sum() / (math.log(2) * tokens.sum() * 4), rel=1e-12)


def test_paired_bootstrap_of_identical_stages_is_exactly_zero_and_never_yes():
    rng = np.random.default_rng(3)
    tokens = rng.integers(10, 100, size=50).astype(float)
    nll = tokens * 2.5 + rng.normal(0, 5, size=50)
    d = u.paired_bootstrap(nll, tokens, nll, tokens, u.perplexity_transform)
    assert (d.difference, d.low, d.high, d.n) == (0.0, 0.0, 0.0, 50)
    for better in u.BETTER:
        assert u.verdict(d.low, d.high, better, n=d.n) != u.YES
        assert u.verdict(d.low, d.high, better, margin=0.01, n=d.n) == u.NO


def test_a_clear_paired_improvement_is_yes_and_its_reverse_is_no():
    rng = np.random.default_rng(4)
    tokens = rng.integers(10, 100, size=60).astype(float)
    nll_a = tokens * rng.normal(3.0, 0.5, size=60)
    nll_b = nll_a - 0.2 * tokens  # every document 0.2 nats/token better
    d = u.paired_bootstrap(nll_a, tokens, nll_b, tokens, u.perplexity_transform)
    expected = math.exp(nll_b.sum() / tokens.sum()) - math.exp(nll_a.sum() / tokens.sum())
    assert d.difference == pytest.approx(expected, rel=1e-12) and d.low <= d.difference <= d.high < 0
    assert u.verdict(d.low, d.high, "lower", n=d.n) == u.YES
    assert u.verdict(d.low, d.high, "higher", n=d.n) == u.NO
    assert u.verdict(d.low, d.high, "lower", n=u.MIN_PAIRED_UNITS - 1) == u.INCONCLUSIVE


def test_paired_bootstrap_is_narrower_than_the_unpaired_spread():
    """Pairing removes the between-document variation common to both stages."""
    rng = np.random.default_rng(5)
    a = rng.normal(0.5, 0.3, size=100)
    b = a + rng.normal(0.01, 0.01, size=100)
    ones = np.ones(100)
    d = u.paired_bootstrap(a, ones, b, ones)
    unpaired = math.hypot(u.mean_stderr(a), u.mean_stderr(b))
    assert d.high - d.low < 2 * 1.96 * unpaired / 5
    chex.assert_trees_all_close(d.difference, float(b.mean() - a.mean()), rtol=1e-12)


def test_verdict_rules():
    assert u.verdict(0.1, 0.3, "higher") == u.YES
    assert u.verdict(-0.3, -0.1, "lower") == u.YES
    assert u.verdict(-0.3, -0.1, "higher") == u.NO
    assert u.verdict(-0.1, 0.2, "higher") == u.INCONCLUSIVE
    assert u.verdict(-0.1, 0.2, "higher", margin=0.25) == u.NO  # equivalent within the margin
    assert u.verdict(0.0, 0.0, "higher") == u.NO
    with pytest.raises(u.UncertaintyError, match="better must be one of"):
        u.verdict(0.0, 1.0, "up")
    with pytest.raises(u.UncertaintyError, match="not an interval"):
        u.verdict(1.0, 0.0, "higher")


def test_mcnemar_exact_p_values():
    a = np.array([True] * 10 + [False] * 10)
    assert u.mcnemar_exact(a, a) == u.McNemar(only_a=0, only_b=0, p_value=1.0, n=20)
    b = np.array([True] * 10 + [True] * 8 + [False] * 2)  # b right on 8 more, never worse
    got = u.mcnemar_exact(a, b)
    assert (got.only_a, got.only_b) == (0, 8)
    assert got.p_value == pytest.approx(2 / 2 ** 8)
    assert u.mcnemar_exact([True, False, True, False], [False, True, True, False]).p_value == 1.0  # 1 vs 1
    one_sided = u.mcnemar_exact([False] * 3 + [True], [True] * 4)  # 3 vs 0 discordant: 2 * (1/8)
    assert one_sided.p_value == pytest.approx(0.25)
    with pytest.raises(u.UncertaintyError, match="same units"):
        u.mcnemar_exact([True], [True, False])


def test_bad_inputs_are_uncertainty_errors():
    with pytest.raises(u.UncertaintyError, match="3 numerators but 2 denominators"):
        u.bootstrap_ratio([1, 2, 3], [1, 1])
    with pytest.raises(u.UncertaintyError, match="paired units differ"):
        u.paired_bootstrap([1, 2], [1, 1], [1, 2, 3], [1, 1, 1])
    with pytest.raises(u.UncertaintyError, match="non-finite"):
        u.mean_stderr([1.0, float("nan")])
    with pytest.raises(u.UncertaintyError, match="positive sum"):
        u.bootstrap_ratio([1, 2], [0, 0])

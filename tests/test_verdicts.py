"""kimi_jax.evaluation.verdicts and experiments.compare's answers on constructed stage results: the same model never
gets "yes", a clear improvement does, results without per-unit data still compare ("no uncertainty")."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from experiments import compare
from kimi_jax.evaluation import uncertainty as u
from kimi_jax.evaluation.verdicts import (INCONCLUSIVE_NO_UNCERTAINTY, compare_chunk_accuracy, compare_gsm8k,
                                          compare_perplexity)

NUM_DOCS = 40
NUM_PROBLEMS = 60
NUM_CHUNKS = 30
W = 16


def core_section(nll, tokens) -> dict:
    nll, tokens = [float(v) for v in nll], [int(v) for v in tokens]
    mean = sum(nll) / sum(tokens)
    return {"status": "ok", "perplexity": math.exp(mean), "nll_per_token": mean, "tokens_fingerprint": "a" * 64,
            "per_document": {"nll_sum": nll, "num_tokens": tokens, "num_correct": [0] * len(nll),
                             "num_bytes": [4 * t for t in tokens]}}


def reasoning_section(correct) -> dict:
    items = [{"id": i, "strict_correct": bool(c), "flexible_correct": bool(c)} for i, c in enumerate(correct)]
    acc = float(np.mean(correct))
    return {"status": "ok", "strict_match": acc, "flexible_extract": acc, "items": items}


def stage(nll, tokens, correct) -> dict:
    return {"metadata": {}, "core": core_section(nll, tokens), "reasoning": reasoning_section(correct)}


@pytest.fixture(scope="module")
def base():
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 200, size=NUM_DOCS)
    nll = tokens * rng.normal(3.0, 0.4, size=NUM_DOCS)
    correct = rng.random(NUM_PROBLEMS) < 0.3
    return stage(nll, tokens, correct)


def improved(base: dict) -> dict:
    """Every document 0.3 nats/token better; 20 more problems solved, none lost."""
    per = base["core"]["per_document"]
    nll = [v - 0.3 * t for v, t in zip(per["nll_sum"], per["num_tokens"])]
    correct = [i["strict_correct"] for i in base["reasoning"]["items"]]
    flipped = [i for i, c in enumerate(correct) if not c][:20]
    correct = [c or i in flipped for i, c in enumerate(correct)]
    return stage(nll, per["num_tokens"], correct)


def test_the_same_model_is_never_yes(base):
    same = copy.deepcopy(base)
    for cmp in (compare_perplexity(base, same), compare_gsm8k(base, same)):
        assert cmp.difference == 0.0 and (cmp.low, cmp.high) == (0.0, 0.0) and cmp.verdict == u.NO, cmp
    answers = dict(compare.verdicts({"baseline": base, "finetuned_vanilla": same}, 1e-4))
    assert not answers["2. Does fine-tuning help?"].startswith("yes")


def test_a_clear_improvement_is_yes(base):
    better = improved(base)
    ppl = compare_perplexity(base, better)
    assert ppl.verdict == u.YES and ppl.n == NUM_DOCS and ppl.low <= ppl.difference <= ppl.high < 0
    assert ppl.difference == pytest.approx(better["core"]["perplexity"] - base["core"]["perplexity"])
    gsm = compare_gsm8k(base, better)
    assert gsm.verdict == u.YES and gsm.difference == pytest.approx(20 / NUM_PROBLEMS) and "McNemar" in gsm.method
    assert compare_perplexity(better, base).verdict == u.NO  # the reverse direction got worse
    answer = dict(compare.verdicts({"baseline": base, "finetuned_vanilla": better}, 1e-4))["2. Does fine-tuning help?"]
    assert answer.startswith("yes: perplexity") and "95% CI [" in answer and f"{NUM_DOCS} documents" in answer


def test_results_without_per_unit_data_compare_without_uncertainty(base):
    old, new = copy.deepcopy(base), improved(base)
    del old["core"]["per_document"]
    for item in old["reasoning"]["items"]:
        del item["strict_correct"]
    ppl = compare_perplexity(old, new)
    assert ppl.verdict == INCONCLUSIVE_NO_UNCERTAINTY and ppl.low is None and ppl.difference < 0
    assert "no uncertainty: no per-document sums" in ppl.describe()
    assert compare_gsm8k(old, new).verdict == INCONCLUSIVE_NO_UNCERTAINTY
    answer = dict(compare.verdicts({"baseline": old, "finetuned_vanilla": new}, 1e-4))["2. Does fine-tuning help?"]
    assert answer.startswith("inconclusive (no uncertainty): perplexity")


def test_a_point_estimate_that_the_per_document_sums_do_not_reproduce_has_no_uncertainty(base):
    edited = copy.deepcopy(base)
    edited["core"]["perplexity"] *= 0.5  # edited by hand: the per-document sums are not its units any more
    assert compare_perplexity(base, edited).verdict == INCONCLUSIVE_NO_UNCERTAINTY


def test_different_tokens_or_problems_do_not_pair(base):
    other = improved(base)
    other["core"]["tokens_fingerprint"] = "b" * 64
    assert "different tokens" in compare_perplexity(base, other).method
    other["reasoning"]["items"] = other["reasoning"]["items"][1:]
    assert "different problems" in compare_gsm8k(base, other).method


def test_few_units_are_inconclusive_however_clear():
    tokens = [100] * (u.MIN_PAIRED_UNITS - 1)
    a = stage([300.0] * len(tokens), tokens, [False] * len(tokens))
    b = stage([100.0] * len(tokens), tokens, [True] * len(tokens))
    cmp = compare_perplexity(a, b)
    assert cmp.high < 0 and cmp.verdict == u.INCONCLUSIVE and f"fewer than {u.MIN_PAIRED_UNITS}" in cmp.method


def test_chunk_accuracy_pairs_chunks():
    rng = np.random.default_rng(1)
    greedy = rng.integers(0, W // 2, size=NUM_CHUNKS).tolist()
    refined = [c + 4 for c in greedy]
    acc = lambda c: sum(c) / (len(c) * W)  # noqa: E731
    cmp = compare_chunk_accuracy("chunk accuracy", acc(greedy), greedy, acc(refined), refined, W)
    assert cmp.verdict == u.YES and cmp.difference == pytest.approx(4 / W) and cmp.n == NUM_CHUNKS
    same = compare_chunk_accuracy("chunk accuracy", acc(greedy), greedy, acc(greedy), greedy, W)
    assert same.verdict == u.NO
    assert compare_chunk_accuracy("chunk accuracy", 0.1, None, 0.2, refined, W).verdict == INCONCLUSIVE_NO_UNCERTAINTY


def test_question_one_keeps_its_exactness_check_and_reports_the_interval(base):
    answers = dict(compare.verdicts({"baseline": base, "after_surgery": copy.deepcopy(base)}, 1e-4))
    answer = answers["1. Does surgery preserve the baseline?"]
    assert answer.startswith("yes: max |delta ppl| = 0.0") and "95% CI [0, 0]" in answer

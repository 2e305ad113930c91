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
    assert "no uncertainty: no per-window or per-document sums" in ppl.describe()
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


def with_windows(result: dict, nll, tokens, seq_len: int = 256, stride: int = 256) -> dict:
    """`result` with per-window sums (every document split into two windows) that reproduce `nll`/`tokens`."""
    out = copy.deepcopy(result)
    win_nll, win_tokens, doc = [], [], []
    for d, (v, t) in enumerate(zip(nll, tokens)):
        first = t // 2
        win_nll += [v * first / t, v - v * first / t]
        win_tokens += [first, t - first]
        doc += [d, d]
    out["core"].update(per_window={"nll_sum": win_nll, "num_tokens": win_tokens, "num_correct": [0] * len(doc),
                                   "document": doc}, seq_len=seq_len, stride=stride)
    return out


def test_perplexity_pairs_windows_when_both_stages_have_them_else_documents(base):
    """Per-window sums are the units when both stages scored the same windows: a few long documents (fewer than a
    verdict needs) still give a verdict from their windows."""
    few = 3  # documents
    tokens = [600] * few
    a = stage([3.0 * t for t in tokens], tokens, [False] * 10)
    b = stage([2.5 * t for t in tokens], tokens, [False] * 10)
    assert compare_perplexity(a, b).verdict == u.INCONCLUSIVE  # 3 documents: too few
    rng = np.random.default_rng(3)
    wa = with_windows(a, [3.0 * t for t in tokens], tokens)
    wa["core"]["per_window"] = {"nll_sum": [], "num_tokens": [], "num_correct": [], "document": []}
    for d, t in enumerate(tokens):  # 12 windows per document, noisy per window
        for w_tokens in [t // 12] * 12:
            wa["core"]["per_window"]["nll_sum"].append(float(w_tokens * rng.normal(3.0, 0.3)))
            wa["core"]["per_window"]["num_tokens"].append(w_tokens)
            wa["core"]["per_window"]["num_correct"].append(0)
            wa["core"]["per_window"]["document"].append(d)
    per_w = wa["core"]["per_window"]
    wa["core"]["perplexity"] = math.exp(sum(per_w["nll_sum"]) / sum(per_w["num_tokens"]))
    wb = copy.deepcopy(wa)
    wb["core"]["per_window"]["nll_sum"] = [v - 0.5 * t for v, t in zip(per_w["nll_sum"], per_w["num_tokens"])]
    wb["core"]["perplexity"] = math.exp(sum(wb["core"]["per_window"]["nll_sum"]) / sum(per_w["num_tokens"]))
    for r in (wa, wb):  # documents that no longer reproduce the perplexity: only the windows can pair
        del r["core"]["per_document"]
    cmp = compare_perplexity(wa, wb)
    assert cmp.verdict == u.YES and cmp.n == few * 12 and "windows" in cmp.method
    # windows of another seq_len do not pair, and without per-document sums nothing does
    other = copy.deepcopy(wb)
    other["core"]["seq_len"] = 128
    assert compare_perplexity(wa, other).verdict == INCONCLUSIVE_NO_UNCERTAINTY
    # both kinds present: the windows win; different windows: the documents
    both_a, both_b = with_windows(base, *_doc_sums(base)), with_windows(improved(base), *_doc_sums(improved(base)))
    assert compare_perplexity(both_a, both_b).n == 2 * NUM_DOCS
    both_b["core"]["stride"] = 128
    assert compare_perplexity(both_a, both_b).n == NUM_DOCS and "documents" in compare_perplexity(both_a, both_b).method


def _doc_sums(result: dict):
    per = result["core"]["per_document"]
    return per["nll_sum"], per["num_tokens"]

"""Paired comparisons of two evaluation stages with their uncertainty (`python -m experiments.compare` prints them).

Each comparison pairs the units both stages measured (`kimi_jax.evaluation.uncertainty`):
* perplexity: the NLL and token sums per window of ``core.per_window`` (per document, ``core.per_document``, for
  results written before the windows were kept), a paired bootstrap over windows of ``ppl(b) - ppl(a)``; only when
  both stages scored the same tokens (``core.tokens_fingerprint``) in the same windows (``seq_len``, ``stride``);
* GSM8K exact match: the per-problem correctness of ``reasoning.items`` paired by problem id, a paired bootstrap of
  the accuracy difference and McNemar's exact test;
* chunk accuracy: the correct positions per chunk (``per_chunk_correct`` / ``per_chunk_correct_at_k``), a paired
  bootstrap over chunks (the chunks are the same for the same data, seq_len and chunk width).

The difference comes with its `uncertainty.CONFIDENCE` interval and a verdict (`uncertainty.verdict`): "yes" when the
interval lies entirely on the improving side, "no" when entirely on the other side or within the equivalence margin,
else "inconclusive". Results without the per-unit data (written before they existed), or whose units do not pair,
still compare on the point estimates, marked "no uncertainty": such a comparison is never "yes", its verdict is
"inconclusive (no uncertainty)".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from kimi_jax.evaluation import uncertainty as u
from kimi_jax.evaluation.perplexity import MAX_EXP_ARGUMENT

NO_UNCERTAINTY = "no uncertainty"
INCONCLUSIVE_NO_UNCERTAINTY = f"{u.INCONCLUSIVE} ({NO_UNCERTAINTY})"
# per-document sums that do not reproduce the reported perplexity to this relative tolerance are not its units
CONSISTENCY_RTOL = 1e-6

__all__ = ["CONSISTENCY_RTOL", "INCONCLUSIVE_NO_UNCERTAINTY", "NO_UNCERTAINTY", "PairedComparison",
           "compare_chunk_accuracy", "compare_gsm8k", "compare_perplexity"]


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """One metric of stage a against stage b: the point values, ``b - a`` and its interval (None without
    uncertainty), the number of paired units, the verdict and how it was obtained (or why there is no interval)."""

    metric: str
    a: float | None
    b: float | None
    better: str
    difference: float | None
    low: float | None
    high: float | None
    n: int | None
    verdict: str
    method: str

    @property
    def has_uncertainty(self) -> bool:
        return self.low is not None

    def describe(self, with_verdict: bool = True) -> str:
        """e.g. ``perplexity 153.7 -> 153.1 (difference -0.68, 95% CI [-1.2, -0.11], paired bootstrap over 40
        documents: yes)``; without the verdict where the question is not "did b improve?"."""
        head = f"{self.metric} {_fmt(self.a)} -> {_fmt(self.b)}"
        if not self.has_uncertainty:
            return f"{head} (difference {_fmt(self.difference)}; {self.method})"
        level = f"{u.CONFIDENCE:.0%}"
        tail = f": {self.verdict}" if with_verdict else ""
        return (f"{head} (difference {_fmt(self.difference)}, {level} CI [{_fmt(self.low)}, {_fmt(self.high)}], "
                f"{self.method}{tail})")


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}"


def _point_only(metric: str, a, b, better: str, why: str) -> PairedComparison:
    diff = b - a if a is not None and b is not None else None
    return PairedComparison(metric, a, b, better, diff, None, None, None, INCONCLUSIVE_NO_UNCERTAINTY,
                            f"{NO_UNCERTAINTY}: {why}")


def _from_difference(metric: str, a, b, better: str, d: u.Difference | None, unit: str, margin: float,
                     extra: str = "") -> PairedComparison:
    if d is None:
        return _point_only(metric, a, b, better, f"fewer than two paired {unit}")
    v = u.verdict(d.low, d.high, better, margin=margin, n=d.n)
    method = f"paired bootstrap over {d.n} {unit}{extra}"
    if d.n < u.MIN_PAIRED_UNITS:
        method += f", fewer than {u.MIN_PAIRED_UNITS} for a verdict"
    return PairedComparison(metric, a, b, better, d.difference, d.low, d.high, d.n, v, method)


def _units(core: dict | None, field: str):
    """(nll sums, token counts) of ``core[field]`` (per_window or per_document) when the core section is ok and the
    sums reproduce its perplexity, else None."""
    if not core or core.get("status") != "ok" or not isinstance(core.get(field), dict):
        return None
    per = core[field]
    nll, tokens = per.get("nll_sum"), per.get("num_tokens")
    if not nll or not tokens or len(nll) != len(tokens) or sum(tokens) <= 0:
        return None
    ppl = core.get("perplexity")
    mean = sum(nll) / sum(tokens)
    if ppl is None or mean > MAX_EXP_ARGUMENT or not math.isclose(math.exp(mean), ppl, rel_tol=CONSISTENCY_RTOL):
        return None
    return nll, tokens


def compare_perplexity(a: dict, b: dict, *, margin: float = 0.0) -> PairedComparison:
    """Perplexity of results `a` against `b` (whole results dicts), paired by window (by document for results
    without per-window sums); lower is better. `margin` is the equivalence margin in perplexity units."""
    core_a, core_b = a.get("core") or {}, b.get("core") or {}
    pa, pb = core_a.get("perplexity"), core_b.get("perplexity")
    same_windows = all(core_a.get(k) == core_b.get(k) for k in ("seq_len", "stride"))
    for field, unit in (("per_window", "windows"), ("per_document", "documents")):
        if field == "per_window" and not same_windows:
            continue
        units_a, units_b = _units(core_a, field), _units(core_b, field)
        if units_a is not None and units_b is not None:
            break
    else:
        return _point_only("perplexity", pa, pb, "lower", "no per-window or per-document sums")
    if core_a.get("tokens_fingerprint") != core_b.get("tokens_fingerprint") or len(units_a[0]) != len(units_b[0]):
        return _point_only("perplexity", pa, pb, "lower", "the stages scored different tokens")
    d = u.paired_bootstrap(units_a[0], units_a[1], units_b[0], units_b[1], u.perplexity_transform)
    return _from_difference("perplexity", pa, pb, "lower", d, unit, margin)


def _gsm8k_flags(reasoning: dict | None, key: str) -> dict | None:
    if not reasoning or reasoning.get("status") != "ok" or not reasoning.get("items"):
        return None
    return {item["id"]: bool(item[key]) for item in reasoning["items"] if "id" in item and key in item}


def compare_gsm8k(a: dict, b: dict, *, key: str = "strict_correct", margin: float = 0.0) -> PairedComparison:
    """GSM8K exact-match accuracy (`key`: strict_correct or flexible_correct) of `a` against `b`, paired by problem
    id: a paired bootstrap of the accuracy difference, McNemar's exact p-value in the method; higher is better."""
    metric = "GSM8K strict" if key == "strict_correct" else "GSM8K flexible"
    field = "strict_match" if key == "strict_correct" else "flexible_extract"
    ra, rb = a.get("reasoning") or {}, b.get("reasoning") or {}
    va, vb = ra.get(field), rb.get(field)
    fa, fb = _gsm8k_flags(ra, key), _gsm8k_flags(rb, key)
    if fa is None or fb is None:
        return _point_only(metric, va, vb, "higher", "no per-problem results")
    if set(fa) != set(fb):
        return _point_only(metric, va, vb, "higher", "the stages scored different problems")
    ids = sorted(fa)
    xa, xb = [float(fa[i]) for i in ids], [float(fb[i]) for i in ids]
    ones = [1.0] * len(ids)
    d = u.paired_bootstrap(xa, ones, xb, ones)
    test = u.mcnemar_exact([fa[i] for i in ids], [fb[i] for i in ids])
    extra = f", McNemar exact p = {test.p_value:.3g} ({test.only_a} vs {test.only_b} discordant)"
    return _from_difference(metric, va, vb, "higher", d, "problems", margin, extra)


def compare_chunk_accuracy(metric: str, value_a, correct_a: Sequence[int] | None, value_b,
                           correct_b: Sequence[int] | None, chunk_width: int | None, *,
                           margin: float = 0.0) -> PairedComparison:
    """Token accuracy over chunks of `chunk_width` positions, paired chunk by chunk from the correct positions of
    each chunk; higher is better."""
    if not correct_a or not correct_b or not chunk_width:
        return _point_only(metric, value_a, value_b, "higher", "no per-chunk results")
    if len(correct_a) != len(correct_b):
        return _point_only(metric, value_a, value_b, "higher", "the stages scored different chunks")
    widths = [float(chunk_width)] * len(correct_a)
    d = u.paired_bootstrap([float(c) for c in correct_a], widths, [float(c) for c in correct_b], widths)
    return _from_difference(metric, value_a, value_b, "higher", d, "chunks", margin)

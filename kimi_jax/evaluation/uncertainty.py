"""Uncertainty of the evaluation metrics: standard errors, bootstrap intervals, paired tests and verdicts (pure numpy,
seeded, so the same inputs always give the same figures).

* `mean_stderr`: the standard error of a mean over items, sample std (ddof=1) / sqrt(n), as lm-evaluation-harness's
  ``mean_stderr`` (GSM8K exact match, generation means, per-chunk accuracies);
* `bootstrap_ratio`: a bootstrap standard error and percentile interval of a ratio of sums over units, e.g.
  perplexity = exp(sum nll / sum tokens) or bits per byte = sum nll / (ln 2 * sum bytes), resampling the units
  (documents) with replacement: tokens of one document are not independent, documents are;
* `paired_bootstrap`: the difference ``stat(b) - stat(a)`` of a ratio-of-sums statistic of two stages measured on the
  same units, with its percentile interval, resampling the units jointly (the same draw for both stages);
* `mcnemar_exact`: McNemar's exact (binomial) test for paired binary outcomes (GSM8K problems solved by one stage
  and not the other);
* `verdict`: "yes" when a difference's interval lies entirely on the improving side, "no" when it lies entirely on
  the other side or entirely within an equivalence margin, else "inconclusive".

Too few units for any of these is not an error: the functions return None (no uncertainty), and a verdict on fewer
than `MIN_PAIRED_UNITS` units is "inconclusive".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from kimi_jax.errors import KimiJaxError

CONFIDENCE = 0.95  # the level of every interval
BOOTSTRAP_SAMPLES = 2000  # resamples per bootstrap
BOOTSTRAP_SEED = 0  # numpy Generator seed of every bootstrap
BOOTSTRAP_BLOCK = 256  # resamples drawn at once (bounds the memory to BLOCK x units indices)
MIN_STDERR_UNITS = 2  # a sample standard deviation needs two values
# With n paired units all pointing the same way, the exact two-sided sign test has p = 2 / 2**n: below 1 - CONFIDENCE
# only from n = 6 on. Fewer units cannot support a verdict, however one-sided the bootstrap looks.
MIN_PAIRED_UNITS = 6

YES, NO, INCONCLUSIVE = "yes", "no", "inconclusive"
BETTER = ("lower", "higher")

__all__ = ["BETTER", "BOOTSTRAP_SAMPLES", "BOOTSTRAP_SEED", "CONFIDENCE", "Difference", "INCONCLUSIVE", "Interval",
           "MIN_PAIRED_UNITS", "McNemar", "NO", "UncertaintyError", "YES", "bits_per_byte_transform",
           "bootstrap_ratio", "mcnemar_exact", "mean_stderr", "paired_bootstrap", "perplexity_transform", "verdict"]


class UncertaintyError(KimiJaxError, ValueError):
    """Per-unit values that cannot be combined (different lengths, negative or zero denominators, bad settings)."""


@dataclasses.dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap standard error and percentile interval over ``n`` units."""

    value: float
    stderr: float
    low: float
    high: float
    n: int


@dataclasses.dataclass(frozen=True)
class Difference:
    """``stat(b) - stat(a)`` on ``n`` paired units, with its percentile interval."""

    difference: float
    low: float
    high: float
    n: int


@dataclasses.dataclass(frozen=True)
class McNemar:
    """Paired binary outcomes: ``only_a`` units right in a only, ``only_b`` in b only; exact two-sided p-value."""

    only_a: int
    only_b: int
    p_value: float
    n: int


def perplexity_transform(nll_per_token):
    """exp of the mean NLL (nats per token)."""
    return np.exp(nll_per_token)


def bits_per_byte_transform(nll_per_byte):
    """nats per byte -> bits per byte."""
    return np.asarray(nll_per_byte) / math.log(2.0)


def _vector(values, name: str) -> np.ndarray:
    arr = np.asarray(values, np.float64)
    if arr.ndim != 1:
        raise UncertaintyError(f"{name} must be one value per unit (1-D), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise UncertaintyError(f"{name} holds a non-finite value")
    return arr


def _check_settings(samples: int, confidence: float) -> None:
    if samples < 2:
        raise UncertaintyError(f"the bootstrap needs >= 2 resamples, got {samples}")
    if not 0.0 < confidence < 1.0:
        raise UncertaintyError(f"the confidence level must be in (0, 1), got {confidence}")


def _ratio_parts(numerators, denominators, name: str) -> tuple[np.ndarray, np.ndarray]:
    num, den = _vector(numerators, f"{name} numerators"), _vector(denominators, f"{name} denominators")
    if num.shape != den.shape:
        raise UncertaintyError(f"{name}: {num.size} numerators but {den.size} denominators")
    if np.any(den < 0) or (den.size and den.sum() <= 0):
        raise UncertaintyError(f"{name}: the denominators must be >= 0 with a positive sum")
    return num, den


def mean_stderr(values: Sequence[float]) -> float | None:
    """sample std (ddof=1) / sqrt(n) of per-item values; None for fewer than two items."""
    arr = _vector(values, "values")
    if arr.size < MIN_STDERR_UNITS:
        return None
    return float(arr.std(ddof=1) / math.sqrt(arr.size))


def _resampled_sums(parts: Sequence[np.ndarray], samples: int, seed: int):
    """Yield, block by block, the sums of each array in `parts` over the same bootstrap resamples of the units."""
    rng = np.random.default_rng(seed)
    n = parts[0].size
    done = 0
    while done < samples:
        size = min(BOOTSTRAP_BLOCK, samples - done)
        idx = rng.integers(0, n, size=(size, n))
        yield [p[idx].sum(axis=1) for p in parts]
        done += size


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(stats, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float],
                    transform: Callable[[np.ndarray], np.ndarray] | None = None, *,
                    samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                    confidence: float = CONFIDENCE) -> Interval | None:
    """``transform(sum numerators / sum denominators)`` over units, with a bootstrap standard error (the std, ddof=1,
    of the resampled statistics) and percentile interval, resampling units with replacement; None for fewer than two
    units. A resample whose denominators sum to 0 is left out."""
    _check_settings(samples, confidence)
    num, den = _ratio_parts(numerators, denominators, "bootstrap_ratio")
    if num.size < MIN_STDERR_UNITS:
        return None
    f = transform if transform is not None else (lambda x: x)
    stats = []
    for s_num, s_den in _resampled_sums([num, den], samples, seed):
        keep = s_den > 0
        stats.append(np.asarray(f(s_num[keep] / s_den[keep]), np.float64))
    stats = np.concatenate(stats)
    low, high = _percentiles(stats, confidence)
    return Interval(value=float(f(num.sum() / den.sum())), stderr=float(stats.std(ddof=1)), low=low, high=high,
                    n=int(num.size))


def paired_bootstrap(num_a: Sequence[float], den_a: Sequence[float], num_b: Sequence[float], den_b: Sequence[float],
                     transform: Callable[[np.ndarray], np.ndarray] | None = None, *,
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                     confidence: float = CONFIDENCE) -> Difference | None:
    """``stat(b) - stat(a)`` with ``stat = transform(sum num / sum den)`` over the same units in both stages (unit i of
    a is unit i of b), and its percentile interval from resampling the units jointly; None for fewer than two units.
    Identical stages give exactly 0 and the interval [0, 0]."""
    _check_settings(samples, confidence)
    na, da = _ratio_parts(num_a, den_a, "stage a")
    nb, db = _ratio_parts(num_b, den_b, "stage b")
    if na.size != nb.size:
        raise UncertaintyError(f"paired units differ in number: {na.size} in stage a, {nb.size} in stage b")
    if na.size < MIN_STDERR_UNITS:
        return None
    f = transform if transform is not None else (lambda x: x)
    diffs = []
    for sa, ta, sb, tb in _resampled_sums([na, da, nb, db], samples, seed):
        keep = (ta > 0) & (tb > 0)
        diffs.append(np.asarray(f(sb[keep] / tb[keep]), np.float64) - np.asarray(f(sa[keep] / ta[keep]), np.float64))
    low, high = _percentiles(np.concatenate(diffs), confidence)
    point = float(f(nb.sum() / db.sum()) - f(na.sum() / da.sum()))
    return Difference(difference=point, low=low, high=high, n=int(na.size))


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> McNemar:
    """McNemar's exact test: under "a and b are equally good" the discordant units split Binomial(d, 1/2); the
    two-sided p-value is min(1, 2 * P(X <= min(only_a, only_b))) (1 when no unit is discordant)."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.ndim != 1 or a.shape != b.shape:
        raise UncertaintyError(f"paired outcomes need the same units in both stages, got {a.shape} and {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    d = only_a + only_b
    tail = sum(math.comb(d, k) for k in range(min(only_a, only_b) + 1)) / 2.0 ** d
    return McNemar(only_a=only_a, only_b=only_b, p_value=min(1.0, 2.0 * tail), n=int(a.size))


def verdict(low: float, high: float, better: str, *, margin: float = 0.0, n: int | None = None) -> str:
    """The answer to "did b improve on a?" from the interval [low, high] of ``b - a``: "yes" when it lies entirely
    on the improving side (below 0 for ``better="lower"``, above 0 for ``"higher"``), "no" when it lies entirely on
    the other side (0 included) or entirely within [-margin, margin], else "inconclusive"; "inconclusive" too for
    fewer than `MIN_PAIRED_UNITS` units when `n` is given."""
    if better not in BETTER:
        raise UncertaintyError(f"better must be one of {BETTER}, got {better!r}")
    if margin < 0:
        raise UncertaintyError(f"the equivalence margin must be >= 0, got {margin}")
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise UncertaintyError(f"not an interval: [{low}, {high}]")
    if n is not None and n < MIN_PAIRED_UNITS:
        return INCONCLUSIVE
    sign = 1.0 if better == "higher" else -1.0
    lo, hi = sorted((sign * low, sign * high))  # the interval with "higher is better"
    if lo > 0:
        return YES
    if hi <= 0 or (-margin <= lo and hi <= margin):
        return NO
    return INCONCLUSIVE

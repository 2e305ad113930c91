"""Generation-quality statistics of free-running continuations, over model token ids (pure Python).

* prompts (`prompt_snippets`): the first ~200 characters of held-out documents, cut back to the last whitespace
  so that no word is split, trailing whitespace removed;
* lengths (`length_stats`): mean / min / max new tokens (EOS included when generated) and the fraction of samples
  that hit ``max_new_tokens`` without producing EOS;
* ``distinct_n`` (Li et al., 2016): unique n-grams / total n-grams, pooled over all samples (n = 1, 2, 3), on the
  continuation tokens (a final EOS excluded);
* ``repetition_rate`` (n = 4): per sample, the fraction of its 4-gram occurrences that repeat a 4-gram seen
  earlier in the same sample, ``1 - unique/total``; averaged over the samples that have at least one 4-gram.

The means over samples (mean length, fraction hitting the limit, 4-gram repetition) carry ``*_stderr``
(`kimi_jax.evaluation.uncertainty.mean_stderr`, None for fewer than two samples); distinct-n pools the n-grams of all
samples (not a mean over samples), so its ``distinct_{n}_stderr`` is a seeded bootstrap over samples
(`distinct_n_stderr`). An undefined value (no n-grams at all) is None, never NaN.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kimi_jax.evaluation.uncertainty import BOOTSTRAP_SAMPLES, BOOTSTRAP_SEED, MIN_STDERR_UNITS, mean_stderr

PROMPT_CHARS = 200

__all__ = ["PROMPT_CHARS", "distinct_n", "distinct_n_stderr", "generation_stats", "length_stats", "ngrams",
           "prompt_snippets", "repetition_rate", "sample_repetition_rates"]


def prompt_snippets(texts: Sequence[str], count: int, max_chars: int = PROMPT_CHARS) -> list[str]:
    """Up to ``count`` prompts: each text's first ``max_chars`` characters, cut at the last whitespace (when there
    is one in the second half) and right-stripped; texts that leave nothing are skipped."""
    out = []
    for text in texts:
        if len(out) >= count:
            break
        head = text.lstrip()[:max_chars]
        if len(text.lstrip()) > max_chars:
            cut = max((head.rfind(c) for c in (" ", "\n", "\t")), default=-1)
            if cut >= max_chars // 2:
                head = head[:cut]
        head = head.rstrip()
        if head:
            out.append(head)
    return out


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float | None:
    grams = [g for s in samples for g in ngrams(list(s), n)]
    return len(set(grams)) / len(grams) if grams else None


def distinct_n_stderr(samples: Sequence[Sequence[int]], n: int, *, resamples: int = BOOTSTRAP_SAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> float | None:
    """The bootstrap standard error (std, ddof=1) of `distinct_n` over resamples of the samples drawn with
    replacement (a sample drawn twice adds its n-grams twice and no new unique one); None for fewer than two samples
    or without n-grams."""
    grams = [ngrams(list(s), n) for s in samples]
    if len(grams) < MIN_STDERR_UNITS or not any(grams):
        return None
    ids: dict = {}
    unique = [np.unique(np.asarray([ids.setdefault(g, len(ids)) for g in gs], np.int64)) for gs in grams]
    totals = np.asarray([len(gs) for gs in grams], np.int64)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(resamples):
        pick = rng.integers(0, len(grams), len(grams))
        total = int(totals[pick].sum())
        if total:
            stats.append(np.unique(np.concatenate([unique[i] for i in np.unique(pick)])).size / total)
    return float(np.std(stats, ddof=1)) if len(stats) >= MIN_STDERR_UNITS else None


def sample_repetition_rates(samples: Sequence[Sequence[int]], n: int = 4) -> list[float]:
    """1 - unique/total n-grams of each sample that has at least one n-gram."""
    rates = []
    for s in samples:
        grams = ngrams(list(s), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return rates


def repetition_rate(samples: Sequence[Sequence[int]], n: int = 4) -> float | None:
    rates = sample_repetition_rates(samples, n)
    return sum(rates) / len(rates) if rates else None


def length_stats(num_tokens: Sequence[int], ended_with_eos: Sequence[bool], max_new_tokens: int) -> dict:
    n = len(num_tokens)
    if n == 0:
        return {"mean_tokens": None, "min_tokens": None, "max_tokens": None, "fraction_hit_max_new_tokens": None,
                "mean_tokens_stderr": None, "fraction_hit_max_new_tokens_stderr": None}
    hits = [float(k >= max_new_tokens and not eos) for k, eos in zip(num_tokens, ended_with_eos)]
    return {"mean_tokens": sum(num_tokens) / n, "min_tokens": int(min(num_tokens)), "max_tokens": int(max(num_tokens)),
            "fraction_hit_max_new_tokens": sum(hits) / n,
            "mean_tokens_stderr": mean_stderr([float(k) for k in num_tokens]),
            "fraction_hit_max_new_tokens_stderr": mean_stderr(hits)}


def generation_stats(continuations: Sequence[Sequence[int]], num_tokens: Sequence[int],
                     ended_with_eos: Sequence[bool], max_new_tokens: int) -> dict:
    """Everything above for one set of samples; ``continuations`` are the new tokens without a final EOS."""
    return {
        "length": length_stats(num_tokens, ended_with_eos, max_new_tokens),
        "distinct_1": distinct_n(continuations, 1),
        "distinct_2": distinct_n(continuations, 2),
        "distinct_3": distinct_n(continuations, 3),
        **{f"distinct_{n}_stderr": distinct_n_stderr(continuations, n) for n in (1, 2, 3)},
        "repetition_rate_4gram": repetition_rate(continuations, 4),
        "repetition_rate_4gram_stderr": mean_stderr(sample_repetition_rates(continuations, 4)),
    }

"""Unigram statistics as a reference model: the perplexity a language model must clearly beat to have learned more
than token frequencies.

`fit_unigram` counts the training tokens and smooths them (add-``alpha``, Laplace for alpha = 1, so that every id of
the vocabulary has a probability); `unigram_scorer` is a `kimi_jax.evaluation.perplexity.Scorer` that gives every
position ``-log p(target)`` and counts a hit where the target is the most frequent token. Scored with
`evaluate_perplexity` on the same documents, windows and prefix token as a stage, its per-window sums pair with
that stage's (`kimi_jax.evaluation.verdicts.compare_perplexity`).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from kimi_jax.errors import KimiJaxError

__all__ = ["UnigramError", "fit_unigram", "unigram_scorer"]


class UnigramError(KimiJaxError, ValueError):
    """Counts that cannot make a distribution (no vocabulary, ids outside it, a negative smoothing)."""


def fit_unigram(token_ids: Iterable[np.ndarray], vocab_size: int, *, alpha: float = 1.0) -> np.ndarray:
    """log p[v] = log((count[v] + alpha) / (N + alpha * vocab_size)) over the ids of every array in `token_ids`
    (float64, [vocab_size])."""
    if vocab_size < 1:
        raise UnigramError(f"the vocabulary size must be >= 1, got {vocab_size}")
    if alpha < 0:
        raise UnigramError(f"the smoothing must be >= 0, got {alpha}")
    counts = np.zeros(vocab_size, np.float64)
    for ids in token_ids:
        ids = np.asarray(ids, np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise UnigramError(f"token id {int(ids.max() if ids.max() >= vocab_size else ids.min())} is outside the "
                               f"vocabulary of {vocab_size}")
        counts += np.bincount(ids, minlength=vocab_size)
    total = counts.sum() + alpha * vocab_size
    if total <= 0:
        raise UnigramError("no tokens to count and no smoothing")
    with np.errstate(divide="ignore"):
        return np.log(counts + alpha) - np.log(total)


def unigram_scorer(log_probs: np.ndarray):
    """A perplexity scorer that ignores the context: NLL ``-log_probs[target]`` and a hit where the target is the
    argmax of `log_probs`."""
    log_probs = np.asarray(log_probs, np.float64)
    best = int(np.argmax(log_probs))

    def score(ids: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        targets = np.asarray(targets, np.int64)
        return -log_probs[targets], targets == best

    return score

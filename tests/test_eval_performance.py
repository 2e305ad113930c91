"""kimi_jax.evaluation.performance.measure_path with scripted timings: the decode rate resolves on a loaded machine
by more timing rounds, else falls back to the end-to-end rate without the prefill; never n/a while tokens came out,
and never a rate from a difference lost in the noise."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kimi_jax.evaluation import performance as perf
from kimi_jax.evaluation.schema import load_schema, validate

N = 8
BATCH = 2
PREFILL = {"prefill_tokens": 64, "prefill_seconds": 0.5, "prefill_tokens_per_sec": 128.0}


class ScriptedGenerator:
    """run_batch returns N (or n) tokens per row, and the next scripted seconds for that length (warm-ups first)."""

    batch_size, prompt_length, max_new_tokens = BATCH, 32, N

    def __init__(self, seconds: dict[int, list[float]], tokens_at_half: int = N // 2):
        self.seconds = {n: list(v) for n, v in seconds.items()}
        self.tokens_at_half = tokens_at_half
        self.calls = []

    def run_batch(self, sidecar, rcfg, rows, max_new_tokens):
        self.calls.append(max_new_tokens)
        k = N if max_new_tokens == N else self.tokens_at_half
        res = SimpleNamespace(num_tokens=np.full(BATCH, k), tokens=np.ones((BATCH, N), np.int64), num_chunks=0)
        return res, self.seconds[max_new_tokens].pop(0)


RCFG = SimpleNamespace(recursive_enabled=False)
PATH_SCHEMA = {"$defs": load_schema()["$defs"], **load_schema()["$defs"]["perf_path"]}


def measure(gen):
    metrics, tokens = perf.measure_path(gen, None, RCFG, [[1, 2]] * BATCH, PREFILL)
    assert validate(metrics, PATH_SCHEMA) == []
    assert tokens == [[1] * N] * BATCH
    return metrics


def test_an_unloaded_machine_measures_the_marginal_rate_in_the_usual_rounds():
    gen = ScriptedGenerator({N: [9.0, 2.0, 2.1], N // 2: [9.0, 1.5, 1.4]})  # warm-ups, then two rounds
    m = measure(gen)
    assert m["decode_method"] == perf.DECODE_MARGINAL and m["timing_repeats"] == perf.TIMING_REPEATS
    # per-round differences 0.5 and 0.7: mean 0.6, standard error 0.1
    assert m["decode_tokens"] == BATCH * (N - N // 2) and m["decode_seconds"] == pytest.approx(0.6)
    assert m["decode_tokens_per_sec"] == pytest.approx(8 / 0.6)
    assert m["decode_tokens_per_sec_runs"] == pytest.approx([8 / 0.5, 8 / 0.7])


def test_a_loaded_machine_times_more_rounds_until_the_difference_resolves():
    # round 1: the half-length run came out slower than the full one (a busy machine); the mean difference of the
    # rounds exceeds two standard errors from round 5 on
    diffs = [-0.3, 0.7, 0.6, 0.6, 0.6]
    gen = ScriptedGenerator({N: [9.0] + [2.0] * 5, N // 2: [9.0] + [2.0 - d for d in diffs]})
    m = measure(gen)
    for k in (2, 3, 4):
        assert np.mean(diffs[:k]) <= perf.RESOLVED_STDERRS * np.std(diffs[:k], ddof=1) / np.sqrt(k)
    assert m["timing_repeats"] == 5 and m["decode_method"] == perf.DECODE_MARGINAL
    assert m["decode_seconds"] == pytest.approx(np.mean(diffs))
    assert m["decode_tokens_per_sec_runs"] == pytest.approx([8 / d for d in diffs if d > 0])


def test_a_difference_that_never_resolves_falls_back_to_end_to_end_without_prefill():
    rounds = perf.MAX_TIMING_ROUNDS
    gen = ScriptedGenerator({N: [9.0] + [2.0] * rounds, N // 2: [9.0] + [3.0] * rounds})
    m = measure(gen)
    assert m["timing_repeats"] == rounds and gen.calls.count(N) == rounds + 1
    assert m["decode_method"] == perf.DECODE_FALLBACK and m["decode_tokens"] == BATCH * N
    assert m["decode_tokens_per_sec"] == pytest.approx(BATCH * N / (2.0 - PREFILL["prefill_seconds"]))
    assert m["decode_tokens_per_sec_runs"] == []


def test_a_difference_lost_in_the_noise_is_not_a_rate():
    """A recursive chunk wider than both lengths generates them in the same time: the rounds' differences scatter
    around 0 and one tiny positive difference must not become a huge rate (the old min(full) - min(half) rule gave
    1.6 M tokens/s from a 10 k tokens/s path)."""
    rounds = perf.MAX_TIMING_ROUNDS
    noise = [0.002, -0.003, 0.001, -0.001, 0.003, -0.002, 0.0005, -0.0015]
    gen = ScriptedGenerator({N: [9.0] + [1.0] * rounds, N // 2: [9.0] + [1.0 - d for d in noise]})
    m = measure(gen)
    assert m["timing_repeats"] == rounds and m["decode_method"] == perf.DECODE_FALLBACK
    assert m["decode_tokens_per_sec"] == pytest.approx(BATCH * N / (1.0 - PREFILL["prefill_seconds"]))


def test_eos_before_half_length_cannot_resolve_and_falls_back_at_once():
    gen = ScriptedGenerator({N: [9.0, 2.0, 2.0], N // 2: [9.0, 1.0, 1.0]}, tokens_at_half=N)  # same tokens
    m = measure(gen)
    assert m["timing_repeats"] == perf.TIMING_REPEATS and m["decode_method"] == perf.DECODE_FALLBACK
    assert m["decode_tokens_per_sec"] == pytest.approx(BATCH * N / 1.5)


def test_a_prefill_no_shorter_than_the_run_gives_the_end_to_end_rate():
    """The prefill is timed on its own: on a tiny model it can come out as long as a whole unresolved run; the rate
    is then new tokens over the full run (a lower bound), never null."""
    rounds = perf.MAX_TIMING_ROUNDS
    gen = ScriptedGenerator({N: [9.0] + [0.4] * rounds, N // 2: [9.0] + [0.5] * rounds})
    m = measure(gen)
    assert m["decode_method"] == perf.DECODE_END_TO_END
    assert m["decode_tokens_per_sec"] == pytest.approx(BATCH * N / 0.4)

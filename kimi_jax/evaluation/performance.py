"""The `performance` section of a stage's results: prefill and decode throughput with compilation excluded, for the
baseline path and, with recursion, the recursive path; the process's peak memory.

Measured on the first generation batch. Every program runs once untimed (it compiles), then TIMING_REPEATS times;
the fastest prefill counts. Prefill is the model over the whole left-padded prompt up to the next-token logits,
measured once: both generators prefill with the same baseline model. Decode throughput is the marginal rate between
generating max_new_tokens and max_new_tokens // 2 tokens, so the prefill and the per-call overheads cancel: each
timing round times both lengths back to back, and the rate is the extra tokens over the mean of the rounds'
differences once that mean is clearly positive (more than RESOLVED_STDERRS standard errors above 0; rounds are added
on a loaded machine). A difference lost in the noise (a busy machine, or a recursive chunk wider than both lengths,
which generates them in the same time) falls back to the end-to-end rate with the prefill subtracted
(`measure_path`), so the rate is never null while any token was generated, and never the ratio of two noise terms.
"""

from __future__ import annotations

import functools

import numpy as np

from kimi_jax.evaluation.batched_generation import BatchedGenerator
from kimi_jax.evaluation.inputs import NO_GENERATION_PROMPTS
from kimi_jax.evaluation.uncertainty import mean_stderr

TIMING_REPEATS = 2  # timed runs after the warm-up; the fastest counts
MAX_TIMING_ROUNDS = 8  # timing rounds at most while the marginal decode time is not resolved
RESOLVED_STDERRS = 2.0  # the mean per-round difference must exceed this many standard errors
DECODE_MARGINAL = "marginal"  # (tokens of N - tokens of N // 2) / (seconds of N - seconds of N // 2)
DECODE_FALLBACK = "end_to_end_minus_prefill"  # new tokens / (seconds of N - prefill seconds)
DECODE_END_TO_END = "end_to_end"  # new tokens / seconds of N, when the separately timed prefill is not shorter
NOTE = ("compilation excluded: every program ran once untimed before its timed runs on the first generation batch "
        f"(the fastest of {TIMING_REPEATS} counts). prefill = the model over the whole left-padded prompt up to the "
        "next-token logits (padding counted), measured once: both generators prefill with the same baseline model. "
        "decode_tokens_per_sec = the marginal rate between generating max_new_tokens and max_new_tokens // 2 tokens "
        "(prefill and call overheads cancel): the extra tokens over the mean of the timing rounds' differences, "
        f"rounds repeated (up to {MAX_TIMING_ROUNDS}) until that mean exceeds {RESOLVED_STDERRS:g} standard errors; "
        "if it never does, new tokens / (generate_seconds - prefill_seconds), or / generate_seconds when the "
        "separately timed prefill is not shorter (decode_method says which). "
        "decode_tokens_per_sec_runs: the marginal rate of each timing round with a positive difference (the spread)")
PEAK_MEMORY_NOTE = "process-wide peak over the whole evaluation (every section and path)"


@functools.lru_cache(maxsize=None)
def _prefill_fn():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "opts"))
    def prefill(graphdef, state, ids_BT, mask_BT, *, cache_len: int, opts):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(ids_BT.shape[0], cache_len)
        h_BTD, cache = model.hidden_states(ids_BT, cache=cache, attention_mask=mask_BT, opts=opts)
        return jnp.argmax(model.logits(h_BTD[:, -1:]), axis=-1), cache  # the cache too: nothing is skipped

    return prefill


def measure_prefill(generator: BatchedGenerator, rows) -> dict:
    """Prefill throughput on the first batch of `rows`: the model over the whole (left-padded) prompt with a decode
    cache, up to the next-token logits."""
    import jax.numpy as jnp
    from flax import nnx

    from kimi_jax.evaluation.system import timed

    ids_BT, mask_BT = generator.batch_inputs(rows[:generator.batch_size])
    graphdef, state = nnx.split(generator.model)
    prefill = functools.partial(_prefill_fn(), graphdef, state, jnp.asarray(ids_BT, jnp.int32), jnp.asarray(mask_BT),
                                cache_len=ids_BT.shape[1] + generator.max_new_tokens, opts=generator.opts)
    timed(prefill)  # warm-up (compiles)
    seconds = min(timed(prefill)[1] for _ in range(TIMING_REPEATS))
    tokens = int(ids_BT.size)
    return {"prefill_tokens": tokens, "prefill_seconds": seconds,
            "prefill_tokens_per_sec": tokens / seconds if seconds > 0 else None}


def measure_path(generator: BatchedGenerator, sidecar, rcfg, rows, prefill: dict) -> tuple[dict, list[list[int]]]:
    """Decode throughput of one generation path on the first batch of `rows` -> (metrics, the timed full-length
    run's new tokens per row); `prefill` is `measure_prefill`'s, recorded with the path.

    Each timing round runs the full length and the half length once, back to back; after TIMING_REPEATS rounds,
    rounds are added (up to MAX_TIMING_ROUNDS) until the mean of the rounds' differences is resolved
    (`_resolved`). If it never is, or the half-length run produced as many tokens (EOS), the decode rate falls back
    to the new tokens over the fastest full run minus the prefill time (`decode_method` says which); every round
    with a positive difference gives its own marginal rate (`decode_tokens_per_sec_runs`, the spread)."""
    rows = rows[:generator.batch_size]
    N = generator.max_new_tokens
    half = N // 2

    def once(n):
        return generator.run_batch(sidecar, rcfg, rows, max_new_tokens=n)

    once(N)  # warm-up (compiles)
    res_half = once(half)[0] if half >= 1 else None  # warm-up of the half length; its tokens
    decode_tokens = None
    full_s, half_s = [], []
    while True:
        res, seconds = once(N)
        full_s.append(seconds)
        new_tokens = int(np.sum(res.num_tokens))
        if res_half is not None:
            half_s.append(once(half)[1])
            decode_tokens = new_tokens - int(np.sum(res_half.num_tokens))
        rounds = len(full_s)
        resolvable = res_half is not None and decode_tokens > 0  # else no number of rounds helps
        diffs = [f - h for f, h in zip(full_s, half_s)]
        if rounds >= MAX_TIMING_ROUNDS:
            break
        if rounds >= TIMING_REPEATS and (not resolvable or _resolved(diffs)):
            break
    gen_s = min(full_s)
    marginal = decode_tokens is not None and decode_tokens > 0 and _resolved(diffs)
    round_rates = ([decode_tokens / d for d in diffs if d > 0]
                   if decode_tokens is not None and decode_tokens > 0 else [])
    if marginal:
        method, d_tokens, d_seconds = DECODE_MARGINAL, decode_tokens, float(np.mean(diffs))
    elif new_tokens > 0 and gen_s - prefill["prefill_seconds"] > 0:
        method, d_tokens, d_seconds = DECODE_FALLBACK, new_tokens, gen_s - prefill["prefill_seconds"]
    elif new_tokens > 0 and gen_s > 0:  # a lower bound: the prefill stays in
        method, d_tokens, d_seconds = DECODE_END_TO_END, new_tokens, gen_s
    else:
        method = d_tokens = d_seconds = None
    metrics = {
        "batch_size": generator.batch_size, "prompt_length": generator.prompt_length, "max_new_tokens": N,
        "timing_repeats": len(full_s), **prefill,
        "generate_seconds": gen_s, "new_tokens": new_tokens,
        "decode_tokens": d_tokens,
        "decode_seconds": d_seconds,
        "decode_tokens_per_sec": d_tokens / d_seconds if method is not None else None,
        "decode_method": method,
        "decode_tokens_per_sec_runs": round_rates,
        "end_to_end_tokens_per_sec": new_tokens / gen_s if gen_s > 0 else None,
        "num_chunks": int(res.num_chunks) if rcfg.recursive_enabled else None,
    }
    tokens = [[int(t) for t in np.asarray(res.tokens[j, :int(res.num_tokens[j])])] for j in range(len(rows))]
    return metrics, tokens


def _resolved(diffs: list[float]) -> bool:
    """The mean of the per-round time differences lies more than RESOLVED_STDERRS standard errors above 0."""
    se = mean_stderr(diffs)  # None for fewer than two rounds
    return se is not None and float(np.mean(diffs)) > RESOLVED_STDERRS * se


def performance(generator: BatchedGenerator, loaded, rows) -> tuple[dict, list[list[int]] | None]:
    """(the `performance` section, the stage generator's timed tokens per row of the first batch: the diagnostic
    generation runs must reproduce them) for the stage (`kimi_jax.evaluation.stage.LoadedStage`) on the prompt
    `rows`; skipped without rows. The peak memory is added at the end of the run (`add_peak_memory`)."""
    if not rows:
        return {"status": "skipped", "reason": NO_GENERATION_PROMPTS}, None
    prefill = measure_prefill(generator, rows)
    base_perf, base_tokens = measure_path(generator, None, loaded.rcfg.replace(recursive_enabled=False), rows, prefill)
    rec_perf, rec_tokens = (measure_path(generator, loaded.sidecar, loaded.rcfg, rows, prefill)
                            if loaded.use_recursive else (None, None))
    section = {"status": "ok", "compile_excluded": True, "note": NOTE, "baseline": base_perf, "recursive": rec_perf}
    return section, rec_tokens if loaded.use_recursive else base_tokens


def add_peak_memory(section: dict) -> None:
    """Record the process's peak memory so far in a measured `performance` section (the last step of a run)."""
    from kimi_jax.evaluation.system import peak_memory

    if section["status"] != "ok":
        return
    memory = peak_memory()
    section["peak_memory_bytes"] = memory["peak_bytes"]
    section["peak_memory_source"] = memory["source"]
    section["peak_memory_note"] = PEAK_MEMORY_NOTE


__all__ = ["DECODE_END_TO_END", "DECODE_FALLBACK", "DECODE_MARGINAL", "MAX_TIMING_ROUNDS", "NOTE", "RESOLVED_STDERRS",
           "TIMING_REPEATS", "add_peak_memory", "measure_path", "measure_prefill", "performance"]

"""The `generation` section of a stage's results: the stage's generator continues the first ~200 characters of
held-out documents; the samples (text and tokens), their lengths, distinct-1/2/3 and 4-gram repetition
(`kimi_jax.evaluation.generation_quality`).

With recursion the samples run in diagnostic mode (always K inner steps: the same tokens, plus what stability@K
needs); their chunk traces feed the `recursive` section.
"""

from __future__ import annotations

from typing import NamedTuple

from kimi_jax.evaluation import generation_quality as gq
from kimi_jax.evaluation.batched_generation import BatchedGenerator, strip_eos
from kimi_jax.evaluation.inputs import NO_GENERATION_PROMPTS
from kimi_jax.evaluation.settings import EvalSettings


class GenerationRun(NamedTuple):
    section: dict  # the `generation` section
    tokens: list[list[int]]  # the new tokens of every sample (a final EOS included)
    traces: list  # every sample's ChunkTrace, in order (empty without recursion)


def generation(generator: BatchedGenerator, loaded, prompts: list[str], rows: list[list[int]],
               settings: EvalSettings) -> GenerationRun:
    """The samples of the stage's generator (`kimi_jax.evaluation.stage.LoadedStage`) on the prompt `rows` (the
    token ids of `prompts`); skipped without prompts."""
    if not rows:
        return GenerationRun({"status": "skipped", "reason": NO_GENERATION_PROMPTS}, [], [])
    outs = generator.run_all(loaded.generation_sidecar, loaded.rcfg, rows, diagnostic=loaded.use_recursive,
                             desc="generation samples", progress=settings.progress)
    samples, continuations, lengths, ended, traces = [], [], [], [], []
    for prompt, row, out in zip(prompts, rows, outs):
        shown, eos_end = strip_eos(out.tokens, loaded.eos_ids)
        samples.append({"prompt": prompt, "prompt_tokens": len(row), "text": loaded.tokenizer.decode(shown),
                        "tokens": out.tokens, "num_tokens": out.num_tokens, "ended_with_eos": eos_end})
        continuations.append(shown)
        lengths.append(out.num_tokens)
        ended.append(eos_end)
        traces.extend(out.traces)
    section = {"status": "ok", "path": "recursive" if loaded.use_recursive else "baseline",
               "max_new_tokens": generator.max_new_tokens, "num_samples": len(samples), "samples": samples}
    section.update(gq.generation_stats(continuations, lengths, ended, generator.max_new_tokens))
    return GenerationRun(section, [out.tokens for out in outs], traces)


__all__ = ["GenerationRun", "generation"]

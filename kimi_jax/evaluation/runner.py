"""One stage's evaluation, start to finish (`evaluate_stage`): the inputs, then the model, then each section of the
results, then the validated results dict. `python -m experiments.evaluate` is this plus its flags and files.

The sections, one module each:
  core                   `kimi_jax.evaluation.core_metrics`: perplexity, bits per byte, token accuracy (clean path)
  performance            `kimi_jax.evaluation.performance`: prefill / decode tokens per second, peak memory
  generation             `kimi_jax.evaluation.generation`: continuations of held-out snippets, distinct-n, repetition
  reasoning              `kimi_jax.evaluation.reasoning`: GSM8K, lm-eval conventions
  greedy_chunk_accuracy  `kimi_jax.evaluation.recursive_metrics`: the greedy continuation on aligned chunks, and
  recursive              (recursive stages) the generator's metrics and the chunk accuracy@k
and `kimi_jax.evaluation.results` assembles them, writes the files and the TensorBoard scalars.

The order is the old command's, and it matters: performance is measured before the generation samples, whose
diagnostic runs must reproduce the timed run's tokens; the peak memory is read last.
"""

from __future__ import annotations

import time
from typing import Callable

from kimi_jax.evaluation.batched_generation import BatchedGenerator
from kimi_jax.evaluation.core_metrics import core_metrics
from kimi_jax.evaluation.generation import generation
from kimi_jax.evaluation.inputs import load_inputs
from kimi_jax.evaluation.performance import add_peak_memory, performance
from kimi_jax.evaluation.reasoning import reasoning
from kimi_jax.evaluation.recursive_metrics import chunk_accuracy, recursive_section
from kimi_jax.evaluation.results import assemble_results
from kimi_jax.evaluation.settings import EvalSettings
from kimi_jax.evaluation.stage import StagePlan, load_stage_model, print_notice

Notice = Callable[[str], None]


class _SectionClock:
    """Seconds per section, for metadata.section_seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, name: str, ran: bool = True) -> None:
        """Record the time since `start` under `name` when the section ran (a skipped one is not recorded)."""
        if ran:
            self.seconds[name] = time.perf_counter() - self._t0


def evaluate_stage(settings: EvalSettings, plan: StagePlan, notice: Notice = print_notice) -> dict:
    """Every section of the stage's results, validated against the schema: data, then the model, then the runs."""
    from kimi_jax import tokenizer as tokenizer_mod

    inputs = load_inputs(tokenizer_mod.load(plan.folder), settings, notice)  # before the (possibly huge) model
    loaded = load_stage_model(settings, plan, notice)
    inputs.check_vocabulary(loaded.model.config.vocab_size)
    generator = BatchedGenerator.for_stage(loaded, settings.batch_size, inputs.prompt_length, settings.max_new_tokens)
    clock = _SectionClock()

    clock.start()
    core = core_metrics(loaded, inputs.held_out, settings)
    clock.stop("core", core["status"] == "ok")

    clock.start()
    perf, timed_tokens = performance(generator, loaded, inputs.generation_rows)
    clock.stop("performance", perf["status"] == "ok")
    clock.start()
    gen = generation(generator, loaded, inputs.generation_prompts, inputs.generation_rows, settings)
    clock.stop("generation", gen.section["status"] == "ok")
    traces_by_source = {"generation": gen.traces} if gen.section["status"] == "ok" else {}
    diagnostic_matches = None if timed_tokens is None else gen.tokens[:len(timed_tokens)] == timed_tokens

    clock.start()
    reasoning_section, reasoning_traces = reasoning(generator, loaded, inputs.gsm8k, settings)
    clock.stop("reasoning", reasoning_section["status"] == "ok")
    if reasoning_section["status"] == "ok" and inputs.gsm8k.rows:
        traces_by_source["gsm8k"] = reasoning_traces

    clock.start()
    acc, greedy_chunks = chunk_accuracy(loaded, inputs.held_out, plan.chunk_rcfg, settings)
    clock.stop("chunk_accuracy")

    recursive = recursive_section(loaded, traces_by_source, diagnostic_matches, acc)
    add_peak_memory(perf)
    sections = {"core": core, "reasoning": reasoning_section, "generation": gen.section, "performance": perf,
                "greedy_chunk_accuracy": greedy_chunks, "recursive": recursive}
    return assemble_results(settings, plan, loaded, inputs, sections, clock.seconds)


__all__ = ["evaluate_stage"]

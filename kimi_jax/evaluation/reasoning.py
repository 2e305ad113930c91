"""The `reasoning` section of a stage's results: GSM8K with lm-evaluation-harness's conventions
(`kimi_jax.evaluation.gsm8k`: k-shot "Question: ...\\nAnswer: ..." prompts, greedy, stop strings, strict-match and
flexible-extract exact match), generated with the stage's generator (recursive for the recursive stages, in
diagnostic mode: its chunk traces feed the `recursive` section).
"""

from __future__ import annotations

from kimi_jax.evaluation import gsm8k
from kimi_jax.evaluation.batched_generation import BatchedGenerator, strip_eos
from kimi_jax.evaluation.inputs import GSM8KTask
from kimi_jax.evaluation.settings import EvalSettings


def reasoning(generator: BatchedGenerator, loaded, task: GSM8KTask, settings: EvalSettings) -> tuple[dict, list]:
    """(the `reasoning` section, the chunk traces of every problem) for the stage
    (`kimi_jax.evaluation.stage.LoadedStage`) on `task`; skipped when the task is."""
    if task.skip_reason is not None:
        return {"status": "skipped", "reason": task.skip_reason}, []
    outs = generator.run_all(loaded.generation_sidecar, loaded.rcfg, task.rows, diagnostic=loaded.use_recursive,
                             desc="gsm8k", progress=settings.progress)
    items, traces = [], []
    for problem, out in zip(task.problems, outs):
        shown, eos_end = strip_eos(out.tokens, loaded.eos_ids)
        completion = gsm8k.truncate_at_stops(loaded.tokenizer.decode(shown))
        item = {"id": problem["id"], "question": problem["question"], "gold": problem["gold"],
                "completion": completion, "num_tokens": out.num_tokens,
                "hit_max_new_tokens": out.num_tokens >= generator.max_new_tokens and not eos_end}
        item.update(gsm8k.score_completion(problem, completion))
        items.append(item)
        traces.extend(out.traces)
    section = {"status": "ok", "task": "gsm8k", "data": task.source, "num_fewshot": settings.num_fewshot,
               "fewshot_ids": [e["id"] for e in task.exemplars], "fewshot_seed": settings.seed,
               "stop_sequences": list(gsm8k.STOP_SEQUENCES), "max_new_tokens": generator.max_new_tokens,
               "strict_regex": gsm8k.STRICT_REGEX, "flexible_regex": gsm8k.FLEXIBLE_REGEX,
               "regexes_to_ignore": list(gsm8k.REGEXES_TO_IGNORE),
               "path": "recursive" if loaded.use_recursive else "baseline"}
    section.update(gsm8k.summarize(items))
    section["items"] = items
    return section, traces


__all__ = ["reasoning"]

"""Evaluation of the surgery / fine-tuning stages (`python -m experiments.evaluate` is its command line).

Running a stage (`runner.evaluate_stage` composes them, in this order):
* :mod:`kimi_jax.evaluation.settings`: `EvalSettings`, the flags of a run (stage, data, sizes);
* :mod:`kimi_jax.evaluation.stage`: the checks before anything loads (`plan_stage`), the stage's model and sidecar;
* :mod:`kimi_jax.evaluation.inputs`: the held-out documents, generation prompts and GSM8K prompts, tokenized;
* :mod:`kimi_jax.evaluation.batched_generation`: prompt rows generated in batches of one compiled shape;
* the metrics, one module per section of the results file:
  :mod:`~kimi_jax.evaluation.core_metrics` (perplexity, bits per byte, token accuracy),
  :mod:`~kimi_jax.evaluation.reasoning` (GSM8K), :mod:`~kimi_jax.evaluation.generation` (generation samples),
  :mod:`~kimi_jax.evaluation.performance` (throughput, memory),
  :mod:`~kimi_jax.evaluation.recursive_metrics` (greedy chunk accuracy, chunk accuracy@k, refine steps, ...);
* :mod:`kimi_jax.evaluation.results`: the results dict, its JSON files, TensorBoard scalars and summary.

The measures they use:
* :mod:`kimi_jax.evaluation.perplexity`: rolling-window perplexity, bits per byte, token accuracy (clean path);
* :mod:`kimi_jax.evaluation.gsm8k`: real GSM8K test problems and lm-evaluation-harness prompt / filter / metric;
* :mod:`kimi_jax.evaluation.generation_quality`: prompts, lengths, distinct-n, repetition;
* :mod:`kimi_jax.evaluation.chunk_accuracy`: leak-free chunk accuracy@k of the recursive model;
* :mod:`kimi_jax.evaluation.system`: code version, hardware, peak memory;
* :mod:`kimi_jax.evaluation.uncertainty`: standard errors, bootstrap intervals, paired tests and verdicts;
* :mod:`kimi_jax.evaluation.verdicts`: paired comparisons of two stages' results (`experiments.compare`);
* :mod:`kimi_jax.evaluation.schema` + ``schema.json``: the results file layout and its validator;
* :mod:`kimi_jax.evaluation.lm_eval_adapter`: the `kimi_jax` model for lm-evaluation-harness.
"""

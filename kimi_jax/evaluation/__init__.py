"""Evaluation of the surgery / fine-tuning stages (`python -m experiments.evaluate`).

* :mod:`kimi_jax.evaluation.perplexity`: rolling-window perplexity, bits per byte, token accuracy (clean path);
* :mod:`kimi_jax.evaluation.gsm8k`: real GSM8K test problems and lm-evaluation-harness prompt / filter / metric;
* :mod:`kimi_jax.evaluation.generation_quality`: prompts, lengths, distinct-n, repetition;
* :mod:`kimi_jax.evaluation.chunk_accuracy`: leak-free chunk accuracy@k of the recursive model;
* :mod:`kimi_jax.evaluation.system`: code version, hardware, peak memory;
* :mod:`kimi_jax.evaluation.schema` + ``schema.json``: the results file layout and its validator.
"""

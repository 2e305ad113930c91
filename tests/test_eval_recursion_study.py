"""kimi_jax.evaluation.recursion_study: the equal-compute budget, the unigram reference scored like a stage, the
training trajectory and the chunk accuracy@k comparisons, on constructed inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kimi_jax.config import tiny
from kimi_jax.evaluation import recursion_study as rs
from kimi_jax.evaluation import uncertainty as u
from kimi_jax.flops import analytic_flops_per_token, recursive_flops_per_token
from kimi_jax.recursive.config import load_preset
from kimi_jax.recursive.objective import num_windows


def test_equal_compute_gives_the_vanilla_run_the_recursive_runs_flops():
    cfg = tiny()
    rcfg = load_preset("phase_a").replace(recursive_enabled=True, phase="a", chunk_width=64, max_inner_steps=3)
    out = rs.equal_compute_steps(cfg, rcfg, batch_size=4, seq_len=256, recursive_steps=50, remat=True)
    flops = analytic_flops_per_token(cfg, 256)
    rec = recursive_flops_per_token(flops, rcfg, num_windows(256, 64, cfg.kda_chunk_size), 256, True)
    assert out["vanilla_flops_per_step"] == pytest.approx(flops["train"] * 4 * 256)
    assert out["recursive_flops_per_step"] == pytest.approx(rec["train"] * 4 * 256)
    assert abs(out["vanilla_flops"] - out["recursive_flops"]) <= out["vanilla_flops_per_step"] / 2
    assert out["vanilla_steps"] > out["recursive_steps"]  # a recursive step costs more than a vanilla one


def _write_metrics(path, steps: int, K: int = 2):
    rows = [{"type": "eval", "step": 0, "step_accuracy": [0.1, 0.1], "final_ce": 5.0}]
    for step in range(1, steps + 1):
        t = step / steps
        rows.append({"type": "train", "step": step, "commit_rate": 0.1 + 0.8 * t + 0.01 * (step % 2),
                     "expected_steps": 2.0 - t, "avg_chunk_length": 10 + 20 * t,
                     "halt_prob": [0.2 + 0.6 * t, 0.5], "step_accuracy": [0.1, 0.1 + 0.2 * t]})
    rows.append({"type": "eval", "step": steps, "step_accuracy": [0.1, 0.3], "final_ce": 4.0})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_training_trajectory_summarises_the_first_and_last_tenth(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, 40)
    out = rs.training_trajectory(str(path))
    assert out["train_steps"] == 40 and out["steps_per_part"] == 4
    assert out["start_steps"] == [1, 4] and out["end_steps"] == [37, 40]
    commit = [0.1 + 0.8 * s / 40 + 0.01 * (s % 2) for s in range(1, 5)]
    assert out["start"]["commit_rate"]["mean"] == pytest.approx(np.mean(commit))
    assert out["start"]["commit_rate"]["stderr"] == pytest.approx(np.std(commit, ddof=1) / 2)
    assert out["end"]["expected_steps"]["mean"] < out["start"]["expected_steps"]["mean"]
    assert [p["mean"] for p in out["end"]["halt_prob"]] == pytest.approx([0.2 + 0.6 * np.mean([37, 38, 39, 40]) / 40,
                                                                         0.5])
    assert out["end"]["halt_prob"][1]["stderr"] == 0.0
    assert [e["step"] for e in out["evaluations"]] == [0, 40] and out["evaluations"][1]["step_accuracy"] == [0.1, 0.3]


def _chunk_results(per_chunk_at_k, greedy, width: int) -> dict:
    acc = lambda c: sum(c) / (len(c) * width)  # noqa: E731
    section = {"status": "ok", "chunk_width": width, "num_chunks": len(greedy), "token_accuracy": acc(greedy),
               "per_chunk_correct": greedy}
    return {"greedy_chunk_accuracy": section,
            "recursive": {"chunk_accuracy_at_k": {"token_accuracy_at_k": [acc(c) for c in per_chunk_at_k],
                                                  "per_chunk_correct_at_k": per_chunk_at_k}}}


def test_chunk_accuracy_at_every_k_pairs_with_both_greedy_references():
    rng = np.random.default_rng(0)
    W, C = 16, 40
    own_greedy = rng.integers(0, 6, C).tolist()
    at_k = [own_greedy, [c + 5 for c in own_greedy]]  # step 1 = greedy, step 2 clearly better
    rec = _chunk_results(at_k, own_greedy, W)
    vanilla = _chunk_results([], [c + 1 for c in own_greedy], W)
    out = rs.chunk_accuracy_by_step(rec, vanilla)
    own, van = out["vs own greedy"], out["vs vanilla greedy"]
    assert [c.metric for c in own] == ["chunk accuracy@1", "chunk accuracy@2"]
    assert own[0].verdict == u.NO and own[0].difference == 0.0  # the same chunks: never "yes"
    assert own[1].verdict == u.YES and own[1].difference == pytest.approx(5 / W) and own[1].n == C
    assert van[0].verdict == u.NO and van[1].verdict == u.YES and van[1].difference == pytest.approx(4 / W)
    no_chunks = rs.chunk_accuracy_by_step({"recursive": None, "greedy_chunk_accuracy": None}, vanilla)
    assert no_chunks == {"vs vanilla greedy": [], "vs own greedy": []}


def test_the_report_states_every_verdict_with_its_interval(tmp_path):
    from kimi_jax.evaluation.verdicts import compare_perplexity

    rng = np.random.default_rng(1)
    tokens = [100] * 30
    nll = [t * rng.normal(4.0, 0.2) for t in tokens]

    def result(shift):
        sums = [v - shift * t for v, t in zip(nll, tokens)]
        return {"core": {"status": "ok", "perplexity": math.exp(sum(sums) / sum(tokens)), "seq_len": 64,
                         "stride": 32, "tokens_fingerprint": "f" * 64, "token_accuracy": 0.1,
                         "perplexity_ci95": [1.0, 2.0],
                         "per_window": {"nll_sum": sums, "num_tokens": tokens, "num_correct": [0] * 30,
                                        "document": [0] * 30}}}

    unigram, base = result(0.0), result(1.0)
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, 20)
    chunks = rs.chunk_accuracy_by_step(_chunk_results([[1] * 10, [3] * 10], [1] * 10, 8),
                                       _chunk_results([], [1] * 10, 8))
    sizes = dict(params_m=1.5, layers=4, hidden=128, vocab_size=2304, pretrain_steps=10, batch=8, seq_len=256,
                 chunk_width=64, inner_steps=2)
    compute = dict(recursive_steps=10, vanilla_steps=18, recursive_flops=2e12, vanilla_flops=2e12,
                   recursive_flops_per_step=2e11, vanilla_flops_per_step=1.1e11)
    md, data = rs.study_report(sizes=sizes, compute=compute, timings={"pretrain": 10.0}, baseline=base,
                               unigram=compare_perplexity(unigram, base), unigram_result=unigram,
                               vanilla_vs_baseline=compare_perplexity(base, base), chunks=chunks,
                               trajectory=rs.training_trajectory(str(path)),
                               command="python -m experiments.demo --study")
    assert "## 1. Is the pretrained model clearly better than unigram statistics?\n\n**yes**" in md
    assert "paired bootstrap over 30 windows" in md and "| halt probability at step 1 |" in md
    assert "- vs own greedy: **yes**: chunk accuracy@2" in md
    assert "## 4. Did the vanilla fine-tune help?\n\n**no**" in md
    json.dumps(data, allow_nan=False)
    assert data["unigram"]["comparison"]["verdict"] == "yes" and data["compute"]["vanilla_steps"] == 18


def test_the_unigram_reference_is_scored_like_a_stage(tmp_path):
    """Counted over the train split with the model's tokenizer and scored on the held-out split's windows: its NLL
    per token is the cross-entropy of the held-out targets under the add-one counts, and its tokens are the ones
    experiments.evaluate scores (same fingerprint)."""
    from flax import nnx

    from kimi_jax import orbax_model, tokenizer as tokenizer_mod
    from kimi_jax.data import load_documents
    from kimi_jax.data.pipeline import tokenize_record
    from kimi_jax.evaluation.inputs import load_held_out
    from kimi_jax.evaluation.perplexity import tokens_fingerprint
    from kimi_jax.model import KimiLinearForCausalLM
    from kimi_jax.tokenizer_fixtures import build_kimi_format_tokenizer, local_corpus

    text = " ".join(local_corpus())[:60_000]
    data = tmp_path / "corpus.txt"
    data.write_text(text)
    model = tmp_path / "model"
    build_kimi_format_tokenizer([text], model, vocab_size=300)
    tok = tokenizer_mod.load(str(model))
    cfg = tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0, vocab_size=tok.vocab_size + 7)
    orbax_model.save_model(str(model), KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(0)), source="test")
    out = rs.unigram_reference(str(model), str(data), seq_len=64, stride=32, max_eval_tokens=None)
    core = out["core"]
    counts = np.zeros(cfg.vocab_size)
    for record in load_documents(str(data), split="train"):
        ids, mask = tokenize_record(tok, record, chat=False)
        np.add.at(counts, np.asarray(ids)[np.asarray(mask, bool)], 1)
    logp = np.log((counts + 1) / (counts.sum() + cfg.vocab_size))  # over the model's vocabulary, not the tokenizer's
    held = load_held_out(tok, str(data), None)
    targets = np.concatenate([d.ids[1:][d.scored] for d in held.docs])
    assert core["nll_per_token"] == pytest.approx(-logp[targets].mean(), rel=1e-9)
    assert core["tokens_fingerprint"] == tokens_fingerprint(held.docs) and core["status"] == "ok"
    assert (core["seq_len"], core["stride"]) == (64, 32) and len(core["per_window"]["nll_sum"]) == core["num_windows"]

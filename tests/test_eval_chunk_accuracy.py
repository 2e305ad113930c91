"""kimi_jax.evaluation.chunk_accuracy: the scores, the rows, and leak-freedom on a tiny model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimi_jax.evaluation.chunk_accuracy import chunk_rows, evaluate_chunk_accuracy, score_chunks
from kimi_jax.recursive.config import load_preset
from kimi_jax.recursive.sidecar import build_sidecar

W = 64
SMALL = dict(chunk_width=W, max_inner_steps=2, d_state=32, refine_rank=8, gate_hidden=16, mixer_heads=2)


def test_score_chunks_hand_case():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    greedy = np.array([[1, 2, 0, 4], [0, 6, 7, 8]])
    draft = greedy.copy()
    proposals = np.stack([greedy, truth])  # step 1 = greedy, step 2 = perfect
    s = score_chunks(truth, greedy, draft, proposals)
    assert s["token_accuracy_at_k"] == [6 / 8, 1.0]
    assert s["exact_chunk_rate_at_k"] == [0.0, 1.0]
    assert s["mean_correct_prefix_at_k"] == [(2 + 0) / 2, 4.0]
    assert s["agreement_with_baseline_greedy_at_k"] == [1.0, 6 / 8]
    greedy_scores = {k: v for k, v in s["baseline_greedy"].items() if not k.endswith("_stderr")}
    assert greedy_scores == {"token_accuracy": 6 / 8, "exact_chunk_rate": 0.0, "mean_correct_prefix": 1.0,
                             "per_chunk_correct": [3, 3]}
    # per-chunk values: accuracy (3/4, 3/4) -> stderr 0; correct prefix (2, 0) -> std sqrt(2) / sqrt(2) = 1
    assert s["baseline_greedy"]["token_accuracy_stderr"] == 0.0
    assert s["baseline_greedy"]["mean_correct_prefix_stderr"] == pytest.approx(1.0)
    assert s["per_chunk_correct_at_k"] == [[3, 3], [4, 4]] and s["token_accuracy_at_k_stderr"] == [0.0, 0.0]
    assert s["exact_chunk_rate_at_k_stderr"] == [0.0, 0.0] and "per_chunk_correct" not in s["draft"]
    assert s["draft"]["agreement_with_baseline_greedy"] == 1.0
    assert (s["num_chunks"], s["chunk_width"], s["max_inner_steps"]) == (2, 4, 2)


def test_chunk_rows_layout():
    streams = [np.arange(300), np.arange(1000, 1300)]
    rows, starts = chunk_rows(streams, chunk_width=64, seq_len=256, max_chunks=5)
    # n = 256 // 64 - 1 = 3 windows per row at 64, 128, 192; rows of 4 * 64 + 1 = 257 tokens; 2 rows for 5 chunks
    assert list(starts) == [64, 128, 192] and rows.shape == (2, 257)
    assert list(rows[1, :3]) == [257, 258, 259] and rows[1, 300 - 257] == 1000  # the streams are concatenated
    rows, _ = chunk_rows(streams, 64, 256, max_chunks=100)
    assert rows.shape[0] == 600 // 257 == 2
    rows, starts = chunk_rows(streams, 64, 100, max_chunks=3)  # seq_len < 2W still gives one window per row
    assert list(starts) == [64] and rows.shape == (3, 129)
    assert chunk_rows([np.arange(100)], 64, 256, 5)[0].shape == (0, 257)


@pytest.fixture(scope="module")
def model():
    from kimi_jax.config import tiny
    from kimi_jax.model import KimiLinearForCausalLM

    return KimiLinearForCausalLM(tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0, vocab_size=97),
                                 rngs=nnx.Rngs(5))


def _randomized(sidecar, seed):
    rng = np.random.default_rng(seed)
    sidecar = nnx.clone(sidecar)
    sidecar.cells.b[...] = jnp.asarray(rng.normal(size=sidecar.cells.b.shape) * 0.5, jnp.float32)
    return sidecar


def _run(model, sidecar, rcfg, row):
    """(greedy, draft, proposals) of one row with one window at W: the jitted function evaluate_chunk_accuracy runs."""
    from kimi_jax.evaluation import chunk_accuracy as ca
    from kimi_jax.model import RunOptions

    gd, st = nnx.split(model)
    sgd, sst = nnx.split(sidecar)
    return jax.device_get(ca._eval_fn()(gd, st, sgd, sst, jnp.asarray(row[None], jnp.int32),
                                        jnp.asarray([[W]], jnp.int32), rcfg=rcfg, opts=RunOptions()))


@pytest.mark.slow
def test_zero_init_proposals_are_the_baseline_greedy(model):
    from kimi_jax.decoding import generate_greedy

    rcfg = load_preset("after_surgery").replace(**SMALL)
    zero = build_sidecar(model.config, rcfg)
    rng = np.random.default_rng(0)
    rows = rng.integers(3, 97, (2, 2 * W + 1))
    out = evaluate_chunk_accuracy(model, zero, rcfg, rows, np.array([W]), max_chunks=2)
    assert out["num_chunks"] == 2 and out["seed"] == "ar" and out["windows_per_row"] == 1
    assert out["agreement_with_baseline_greedy_at_k"] == [1.0, 1.0]  # the zero-init fixed point
    assert out["token_accuracy_at_k"] == [out["baseline_greedy"]["token_accuracy"]] * 2
    assert out["draft"]["token_accuracy"] == out["baseline_greedy"]["token_accuracy"]
    # The "baseline greedy continuation" is greedy decoding from the true prefix ids[:W + 1].
    greedy = np.concatenate([_run(model, zero, rcfg, row)[0] for row in rows])
    np.testing.assert_array_equal(greedy, generate_greedy(model, rows[:, :W + 1], W, eos_token_id=[]))
    truth = rows[:, W + 1:]
    assert out["baseline_greedy"]["token_accuracy"] == float(np.mean(greedy == truth))


@pytest.mark.parametrize("seed_mode", ["ar", "leftover"])
def test_changing_the_true_chunk_changes_nothing_the_model_sees(model, seed_mode):
    """Leak-free: drafts and proposals depend on the prefix only. A trained (non-zero) sidecar, one window per row:
    replacing the chunk's tokens changes only the scores."""
    rcfg = load_preset("after_surgery").replace(**SMALL, seed=seed_mode)
    sidecar = _randomized(build_sidecar(model.config, rcfg), 1)
    rng = np.random.default_rng(2)
    row = rng.integers(3, 97, 2 * W + 1)
    other = row.copy()
    other[W + 1:] = rng.integers(3, 97, W)  # the true chunk ids[W + 1 : 2W + 1]
    for a, b in zip(_run(model, sidecar, rcfg, row), _run(model, sidecar, rcfg, other)):
        np.testing.assert_array_equal(a, b)
    # ... and the refined proposals do differ from the baseline's greedy tokens (the sidecar is really wired in).
    greedy, draft, proposals = _run(model, sidecar, rcfg, row)
    assert np.any(proposals != greedy[None])
    if seed_mode == "leftover":
        assert np.all(draft == row[W])  # x_last repeated, as the generator's first chunk
    scores = evaluate_chunk_accuracy(model, sidecar, rcfg, row[None], np.array([W]), max_chunks=1)
    truth = row[W + 1:]
    assert scores["token_accuracy_at_k"] == [float(np.mean(p[0] == truth)) for p in proposals]
    assert scores["agreement_with_baseline_greedy_at_k"] == [float(np.mean(p[0] == greedy[0])) for p in proposals]

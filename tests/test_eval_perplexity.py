"""kimi_jax.evaluation.perplexity: rolling windows, the metric formulas on known probabilities, a real model."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimi_jax.data import Record
from kimi_jax.scoring import make_scorer
from kimi_jax.evaluation.perplexity import (ScoredDocument, bits_per_byte, document_from_record,
                                            evaluate_perplexity, prefix_token_id, rolling_windows,
                                            tokens_fingerprint, truncate_documents)


class CharTokenizer:
    """One token per character (ids = code points): a tokenizer whose token <-> byte mapping is obvious."""

    bos_token_id, eos_token_id = 1, 2

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i in (1, 2)))


def doc(ids, scored=None, num_bytes=None):
    ids = np.asarray(ids)
    scored = np.ones(ids.size - 1, bool) if scored is None else np.asarray(scored)
    return ScoredDocument(ids, scored, int(scored.sum()) if num_bytes is None else num_bytes)


# ------------------------------------------------------------------------------------------------ windows
@pytest.mark.parametrize("n", [1, 5, 16, 17, 40, 100])
@pytest.mark.parametrize("seq_len,stride", [(16, 16), (16, 8), (16, 1), (16, 5), (1, 1)])
def test_rolling_windows_score_every_target_once_with_the_most_context(n, seq_len, stride):
    windows = rolling_windows(n, seq_len, stride)
    seen = np.zeros(n, int)
    for start, first, end in windows:
        assert 0 <= start <= first < end <= n and end - start <= seq_len
        seen[first:end] += 1
        for j in range(first, end):
            context = j - start + 1  # ids[start .. j] predict target j
            assert context == j + 1 if j < seq_len else seq_len - stride + 1 <= context <= seq_len
    assert np.all(seen == 1)
    if stride == seq_len:  # lm-eval's disjoint windows
        assert all(first == start or start == end - seq_len for start, first, end in windows)
        assert len(windows) == math.ceil(n / seq_len)


def test_rolling_windows_reject_bad_sizes():
    for seq_len, stride in [(0, 1), (8, 0), (8, 9)]:
        with pytest.raises(ValueError, match="stride"):
            rolling_windows(10, seq_len, stride)


def _recording_scorer(log):
    """NLL = context length of the position (1-based), correct iff the target is even; logs (target, context)."""

    def score(ids, targets):
        B, T = ids.shape
        nll = np.tile(np.arange(1, T + 1, dtype=np.float64), (B, 1))
        for b in range(B):
            for t in range(T):
                log.append((int(targets[b, t]), t + 1))
        return nll, targets % 2 == 0

    return score


def test_every_scored_token_counted_once_with_its_window_context():
    # Unique ids per target, so the log says exactly which targets were scored and with how much context.
    docs = [doc(np.arange(1000, 1041)), doc(np.arange(2000, 2010)),
            doc(np.arange(3000, 3030), scored=[False] * 12 + [True] * 17)]
    log = []
    out = evaluate_perplexity(docs, _recording_scorer(log), seq_len=16, stride=6, batch_size=3, pad_id=0)
    expected_nll, expected_targets = 0.0, []
    for d in docs:
        for start, first, end in rolling_windows(d.num_targets, 16, 6):
            for j in range(first, end):
                if d.scored[j]:
                    expected_nll += j - start + 1
                    expected_targets.append(int(d.ids[j + 1]))
    assert out["num_tokens"] == len(expected_targets) == 40 + 9 + 17
    assert out["nll_sum"] == expected_nll
    assert out["nll_per_token"] == pytest.approx(expected_nll / out["num_tokens"])
    assert out["perplexity"] == pytest.approx(math.exp(out["nll_per_token"]))
    assert out["token_accuracy"] == pytest.approx(np.mean([t % 2 == 0 for t in expected_targets]))
    assert len(log) == math.ceil(out["num_windows"] / 3) * 3 * 16  # one scorer call per 3 windows, padded rows
    # the third document's 12 unscored prompt tokens get no window of their own
    assert out["num_windows"] == len(rolling_windows(40, 16, 6)) + 1 + len(
        [w for w in rolling_windows(29, 16, 6) if w[2] > 12])


def test_per_document_and_per_window_sums_and_their_bootstrap_intervals():
    """The per-document and per-window sums add up to the totals; the windows feed a seeded bootstrap (bits per
    byte: NLL per token's interval times tokens per byte); a single window has no uncertainty."""
    from kimi_jax.evaluation import uncertainty

    docs = [doc(np.arange(1000, 1000 + n), num_bytes=3 * n) for n in (12, 30, 7, 19, 25, 16, 9, 40)]
    out = evaluate_perplexity(docs, _recording_scorer([]), seq_len=16, stride=6, batch_size=3, pad_id=0)
    per = out["per_document"]
    assert per["num_tokens"] == [d.num_scored for d in docs] and per["num_bytes"] == [d.num_bytes for d in docs]
    assert sum(per["nll_sum"]) == pytest.approx(out["nll_sum"]) and sum(per["num_correct"]) == out["num_correct"]
    for d, (n_doc, nll_doc) in enumerate(zip(per["num_tokens"], per["nll_sum"])):
        expected = sum(j - start + 1 for start, first, end in rolling_windows(n_doc, 16, 6) for j in range(first, end))
        assert nll_doc == expected, d
    win = out["per_window"]
    expected_windows = [(d, w) for d, n in enumerate(per["num_tokens"]) for w in rolling_windows(n, 16, 6)]
    assert out["uncertainty_unit"] == "window" and len(win["nll_sum"]) == out["num_windows"] == len(expected_windows)
    assert win["document"] == [d for d, _ in expected_windows]
    assert win["num_tokens"] == [end - first for _, (start, first, end) in expected_windows]
    assert win["nll_sum"] == [sum(j - start + 1 for j in range(first, end))
                              for _, (start, first, end) in expected_windows]
    for d in range(len(docs)):
        assert sum(v for v, dd in zip(win["nll_sum"], win["document"]) if dd == d) == per["nll_sum"][d]
    assert sum(win["num_correct"]) == out["num_correct"]
    ppl = uncertainty.bootstrap_ratio(win["nll_sum"], win["num_tokens"], uncertainty.perplexity_transform)
    assert out["perplexity_stderr"] == ppl.stderr > 0 and out["perplexity_ci95"] == [ppl.low, ppl.high]
    assert out["perplexity_ci95"][0] < out["perplexity"] < out["perplexity_ci95"][1]
    for name in ("nll_per_token", "bits_per_byte", "token_accuracy"):
        low, high = out[f"{name}_ci95"]
        assert low <= out[name] <= high and out[f"{name}_stderr"] > 0, name
    scale = out["num_tokens"] / (math.log(2.0) * out["num_bytes"])
    assert out["bits_per_byte_stderr"] == pytest.approx(out["nll_per_token_stderr"] * scale, rel=1e-12)
    assert out["bits_per_byte_ci95"] == pytest.approx([v * scale for v in out["nll_per_token_ci95"]], rel=1e-12)
    one = evaluate_perplexity(docs[2:3], _recording_scorer([]), seq_len=16, stride=6, batch_size=3, pad_id=0)
    assert one["num_windows"] == 1 and one["perplexity_stderr"] is None and one["bits_per_byte_ci95"] is None
    # one long document still has an interval: its windows are the units
    long = evaluate_perplexity(docs[-1:], _recording_scorer([]), seq_len=16, stride=6, batch_size=3, pad_id=0)
    assert long["num_windows"] > 2 and long["perplexity_stderr"] > 0


def test_uniform_distribution_gives_perplexity_vocab_size():
    V = 97

    def uniform(ids, targets):
        return np.full(ids.shape, math.log(V)), np.zeros(ids.shape, bool)

    docs = [doc(np.arange(50) % V), doc(np.arange(7))]
    out = evaluate_perplexity(docs, uniform, seq_len=8, stride=3, batch_size=4)
    assert out["perplexity"] == pytest.approx(V, rel=1e-12)
    assert out["token_accuracy"] == 0.0 and out["num_tokens"] == 49 + 6


def test_bits_per_byte_hand_case():
    # 3 tokens of NLL ln(2), ln(4), ln(8) nats = 1 + 2 + 3 bits over 4 bytes -> 1.5 bits per byte.
    values = np.log([2.0, 4.0, 8.0])

    def scorer(ids, targets):
        nll = np.zeros(ids.shape)
        nll[0, :3] = values
        return nll, np.zeros(ids.shape, bool)

    out = evaluate_perplexity([doc([0, 5, 6, 7], num_bytes=4)], scorer, seq_len=4, stride=4, batch_size=1)
    assert out["bits_per_byte"] == pytest.approx(1.5)
    assert bits_per_byte(6 * math.log(2), 4) == pytest.approx(1.5)
    assert bits_per_byte(1.0, 0) is None


def test_scorer_shape_and_finiteness_are_checked():
    with pytest.raises(ValueError, match="shapes"):
        evaluate_perplexity([doc([0, 1, 2])], lambda i, t: (np.zeros((1, 2)), np.zeros((1, 2), bool)),
                            seq_len=4, stride=4, batch_size=1)
    with pytest.raises(FloatingPointError):
        evaluate_perplexity([doc([0, 1, 2])], lambda i, t: (np.full(i.shape, np.nan), np.zeros(i.shape, bool)),
                            seq_len=4, stride=4, batch_size=1)


# ------------------------------------------------------------------------------------------------ documents
def test_documents_from_records_score_text_and_responses_only():
    tok = CharTokenizer()
    text = document_from_record(tok, Record(text="héllo"), prefix_id=1)
    assert list(text.ids) == [1] + [ord(c) for c in "héllo"] and text.num_scored == 5
    assert text.num_bytes == len("héllo".encode()) == 6
    pair = document_from_record(tok, Record(prompt="Q?", response="Yes."), prefix_id=1)
    assert list(pair.scored) == [False, False, True, True, True, True] and pair.num_bytes == 4
    assert document_from_record(tok, Record(text="   "), prefix_id=1).num_scored == 3
    assert document_from_record(tok, Record(prompt="Q", response=""), prefix_id=1) is None
    assert prefix_token_id(tok) == 1


def test_truncation_keeps_whole_documents_then_cuts_text_exactly():
    tok = CharTokenizer()
    docs = [document_from_record(tok, Record(text=t), 1) for t in ("abcdef", "ghijklmnop", "qrs")]
    kept, truncated = truncate_documents(tok, docs, 9)
    assert truncated and [d.text for d in kept] == ["abcdef", "ghi"]
    assert sum(d.num_scored for d in kept) == 9 and kept[1].num_bytes == 3
    kept, truncated = truncate_documents(tok, docs, 100)
    assert not truncated and len(kept) == 3
    assert tokens_fingerprint(docs) != tokens_fingerprint(docs[:2])
    assert tokens_fingerprint(docs) == tokens_fingerprint(list(docs))


# ------------------------------------------------------------------------------------------------ a real model
@pytest.fixture(scope="module")
def tiny_model():
    from kimi_jax.config import tiny
    from kimi_jax.model import KimiLinearForCausalLM

    return KimiLinearForCausalLM(tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0, vocab_size=61),
                                 rngs=nnx.Rngs(0))


def test_model_scorer_matches_the_full_forward(tiny_model):
    import jax

    import kimi_jax

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 61, 40)
    logits = np.asarray(kimi_jax.forward(tiny_model, ids[None, :-1]))[0]
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    nll = -logp[np.arange(39), ids[1:]]
    out = evaluate_perplexity([doc(ids)], make_scorer(tiny_model), seq_len=64, stride=32, batch_size=2)
    assert out["num_tokens"] == 39 and out["num_windows"] == 1
    assert out["nll_sum"] == pytest.approx(float(nll.sum()), rel=1e-5)
    assert out["token_accuracy"] == pytest.approx(float(np.mean(logits.argmax(-1) == ids[1:])))
    # Rolling windows over the same document: the first window's tokens are scored exactly as above.
    short = evaluate_perplexity([doc(ids[:17])], make_scorer(tiny_model), seq_len=64, stride=32, batch_size=2)
    assert short["nll_sum"] == pytest.approx(float(nll[:16].sum()), rel=1e-5)


def test_model_with_a_zero_final_norm_is_uniform(tiny_model):
    model = nnx.clone(tiny_model)
    model.norm.weight[...] = jnp.zeros_like(model.norm.weight[...])  # every logit is exactly 0
    V = model.config.vocab_size
    rng = np.random.default_rng(1)
    docs = [doc(rng.integers(0, V, 70)), doc(rng.integers(0, V, 9))]
    out = evaluate_perplexity(docs, make_scorer(model), seq_len=64, stride=32, batch_size=2)
    assert out["perplexity"] == pytest.approx(V, rel=1e-6)
    assert out["nll_per_token"] == pytest.approx(math.log(V), rel=1e-6)
    targets = np.concatenate([d.ids[1:] for d in docs])
    assert out["token_accuracy"] == pytest.approx(float(np.mean(targets == 0)))  # argmax of ties is id 0

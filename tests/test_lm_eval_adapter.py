"""The lm-evaluation-harness adapter (`kimi_jax.evaluation.lm_eval_adapter`, `--model kimi_jax`).

A tiny model folder (2 layers, KDA + MLA, random weights) with a real Kimi-format tokenizer. Every score is checked
against an independent computation: one unpadded, unmasked `kimi_jax.forward` per sequence (right padding only,
which a causal model cannot see), log-softmax in float64. Generations are checked against `python -m
experiments.generate` (greedy) cut at the stop strings the HF way (`text.split(stop)[0]` for each stop), and the
zero-init surgery with verified commits must reproduce them token for token.

With lm-eval installed the local tasks (a 5-item multiple-choice task, a 3-item generate_until task and a 2-document
perplexity task, all from jsonl files in a tmp dir: no hub) run through `lm_eval.simple_evaluate` and through the
`python -m experiments.lm_eval` wrapper. Without lm-eval those tests skip, and the request-handling tests
still run on the adapter over a minimal stand-in for lm-eval's `LM` base class, with fake `Instance` objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io as std_io
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from flax import nnx

import kimi_jax
from kimi_jax import orbax_model
from kimi_jax import tokenizer as tokenizer_mod
from kimi_jax.config import tiny
from kimi_jax.model import KimiLinearForCausalLM
from kimi_jax.tokenizer_fixtures import build_kimi_format_tokenizer, local_corpus

from conftest import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _have_lm_eval() -> bool:
    try:
        return importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["lm_eval"] is None (import blocked)
        return False


HAVE_LM_EVAL = _have_lm_eval()
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is not installed (pip install 'kimi-jax[lmeval]')")

B = 4  # the adapter's batch size in every test (one compile per length bucket)
REF_T = 64  # the reference forward's (right-padded) length
N_GEN = 70  # > W = 64: the recursive generator commits two chunks per sample
GEN_PROMPTS = ["The quick brown fox", "Hello world, this is a longer prompt", "import os"]
MC_DOCS = [{"question": f"Question {i}: which word comes next in the sentence number {i}?",
            "choices": [" the", " of the house", " and then", "\n"], "answer": i % 4} for i in range(5)]
PPL_DOCS = [{"text": "The quick brown fox jumps over the lazy dog."},
            {"text": "def main():\n    return 0\n"}]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------------------- fixtures
def _stand_in_lm_eval() -> dict[str, types.ModuleType]:
    """The three names the adapter imports from lm-eval, for running it where lm-eval is not installed."""
    class CacheHook:
        def __init__(self):
            self.calls = []

        def add_partial(self, attr, req, res):
            self.calls.append((attr, req, res))

    class LM:
        def __init__(self):
            self._rank, self._world_size, self.cache_hook = 0, 1, CacheHook()

    registered = {}

    def register_model(*names):
        def decorate(cls):
            registered.update({n: cls for n in names})
            return cls
        return decorate

    def simple_parse_args_string(text):
        return dict(kv.split("=", 1) for kv in text.split(",") if kv)

    mods = {name: types.ModuleType(name) for name in ("lm_eval", "lm_eval.models", "lm_eval.api",
                                                      "lm_eval.api.model", "lm_eval.api.registry", "lm_eval.utils")}
    mods["lm_eval.api.model"].LM = LM
    mods["lm_eval.api.registry"].register_model = register_model
    mods["lm_eval.api.registry"].registered = registered
    mods["lm_eval.utils"].simple_parse_args_string = simple_parse_args_string
    return mods


@pytest.fixture(scope="module")
def adapter():
    """The adapter module (over real lm-eval, or over the stand-in when lm-eval is missing)."""
    name = "kimi_jax.evaluation.lm_eval_adapter"
    if HAVE_LM_EVAL:
        yield importlib.import_module(name)
        return
    with pytest.MonkeyPatch.context() as mp:
        for mod_name, mod in _stand_in_lm_eval().items():
            mp.setitem(sys.modules, mod_name, mod)
        sys.modules.pop(name, None)
        yield importlib.import_module(name)
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("lmeval") / "model")
    build_kimi_format_tokenizer([" ".join(local_corpus())[:100_000]], folder, vocab_size=300)
    tok = tokenizer_mod.load(folder)
    cfg = tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0, vocab_size=tok.vocab_size,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    orbax_model.save_model(folder, KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(5)), source="test")
    return folder


@pytest.fixture(scope="module")
def lm(adapter, model_folder):
    return adapter.KimiJaxLM(path=model_folder, batch_size=B)


@pytest.fixture(scope="module")
def small_lm(adapter, lm):
    """The same model and tokenizer with max_length 16: contexts get cut, documents roll over several windows."""
    return adapter.KimiJaxLM.from_loaded(lm.model, lm.tokenizer, batch_size=B, max_length=16)


@pytest.fixture(scope="module")
def rec_lm(adapter, model_folder):
    return adapter.KimiJaxLM(path=model_folder, use_recursive=True, chunk_width=64, max_inner_steps=2, batch_size=B)


@dataclasses.dataclass
class FakeInstance:
    """What the adapter reads from lm-eval's Instance: `.args`."""

    args: tuple


# ------------------------------------------------------------------------------------------ independent reference
def ref_logits(model, seq: list[int]) -> np.ndarray:
    """float64 logits [len(seq), V] from one unmasked forward (right-padded to REF_T: invisible to a causal model)."""
    assert 1 <= len(seq) <= REF_T
    ids = np.zeros((1, REF_T), np.int32)
    ids[0, :len(seq)] = seq
    return np.asarray(kimi_jax.forward(model, ids), np.float64)[0, :len(seq)]


def token_logprobs(model, seq: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(log p(seq[i + 1] | seq[: i + 1]), whether it is the argmax) for every i."""
    assert len(seq) >= 2
    logits = ref_logits(model, seq)[:-1]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return logp[np.arange(len(seq) - 1), seq[1:]], np.argmax(logits, -1) == np.asarray(seq[1:])


def expected_pair(tok, bos: int, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal split: trailing spaces join the continuation, the whole is cut at the context's length; an
    empty (or all-whitespace) context is the BOS prefix."""
    moved = len(context) - len(context.rstrip())
    if moved:
        context, continuation = context[:-moved], context[-moved:] + continuation
    if context == "":
        return [bos], tok.encode(continuation)
    whole = tok.encode(context + continuation)
    n = len(tok.encode(context))
    return whole[:n], whole[n:]


def expected_loglikelihood(model, tok, bos, context, continuation, max_length) -> tuple[float, bool]:
    ctx, cont = expected_pair(tok, bos, context, continuation)
    seq = (ctx + cont)[-(max_length + 1):]
    logp, greedy = token_logprobs(model, seq)
    return float(logp[-len(cont):].sum()), bool(greedy[-len(cont):].all())


def hf_style_cut(text: str, until) -> str:
    for stop in until:
        text = text.split(stop)[0]
    return text


# -------------------------------------------------------------------------------------------- pure request logic
def test_rolling_rows_score_every_token_once_with_full_context(adapter):
    for n in range(0, 40):
        for L in (1, 2, 5, 16):
            toks = list(range(100, 100 + n))
            rows = adapter.rolling_rows(toks, 7, L)
            scored = [t for r in rows for t in r.targets[len(r.targets) - r.n_scored:]]
            assert scored == toks, (n, L)
            for j, r in enumerate(rows):
                seq = [7] + toks
                start = seq.index(r.inputs[0]) if r.inputs[0] != 7 else 0
                assert list(r.inputs) == seq[start:start + len(r.inputs)]  # contiguous inputs
                assert list(r.targets) == seq[start + 1:start + 1 + len(r.inputs)]  # shifted by one
                assert len(r.inputs) <= L
                if j > 0:
                    assert len(r.inputs) == L  # every later window has a full context


@needs_lm_eval
def test_rolling_rows_match_lm_eval_windows(adapter):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in (1, 5, 16, 17, 33, 64):
        for L in (1, 4, 16):
            toks = list(range(10, 10 + n))
            theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(toks, 3, L, 1)]
            ours = adapter.rolling_rows(toks, 3, L)
            assert len(ours) == len(theirs)
            for row, (ctx, pred) in zip(ours, theirs):
                full = ctx + pred  # lm-eval's (context, continuation) pair fed as one sequence
                assert list(row.inputs) == full[:-1] and list(row.targets[-row.n_scored:]) == pred


def test_continuation_row_keeps_the_last_tokens(adapter):
    row = adapter.continuation_row([1, 2, 3, 4, 5], [6, 7], max_length=4)
    assert row.inputs == (3, 4, 5, 6) and row.targets == (4, 5, 6, 7) and row.n_scored == 2
    row = adapter.continuation_row([1], [2, 3], max_length=8)
    assert row.inputs == (1, 2) and row.targets == (2, 3) and row.n_scored == 2
    with pytest.raises(adapter.AdapterError, match="continuation has 5 tokens, more than max_length 4"):
        adapter.continuation_row([1], [2, 3, 4, 5, 6], max_length=4)
    with pytest.raises(adapter.AdapterError, match="context has no tokens"):
        adapter.continuation_row([], [2], max_length=4)


def test_gen_kwargs_and_stop_strings(adapter):
    g = adapter.parse_gen_kwargs({"until": ["\n\n", "Q:"], "max_gen_toks": 12, "temperature": 0.0,
                                  "do_sample": False}, 256)
    assert g.until == ("\n\n", "Q:") and g.max_gen_toks == 12 and g.ignored == ("temperature",)
    assert adapter.parse_gen_kwargs({"until": "END"}, 7) == adapter.GenSettings(("END",), 7, ())
    assert adapter.parse_gen_kwargs(None, 9).until == ()
    with pytest.raises(adapter.AdapterError, match="do_sample=True is not supported"):
        adapter.parse_gen_kwargs({"do_sample": True}, 8)
    with pytest.raises(adapter.AdapterError, match="`until` must be a string or a list of strings"):
        adapter.parse_gen_kwargs({"until": [1]}, 8)
    with pytest.raises(adapter.AdapterError, match="max_gen_toks must be a positive integer"):
        adapter.parse_gen_kwargs({"max_gen_toks": 0}, 8)
    assert adapter.truncate_at_stop("a b. c\n\nd Q: e", ["Q:", "\n\n"]) == "a b. c"
    assert adapter.truncate_at_stop("abc", ["", "zz"]) == "abc"
    assert adapter.truncate_at_stop("stop here", ["stop"]) == ""
    for text in ("x END y STOP z", "STOP a END", "none"):
        assert adapter.truncate_at_stop(text, ["END", "STOP"]) == hf_style_cut(text, ["END", "STOP"])


def test_batches_and_padding(adapter):
    assert adapter.length_batches([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    ids, mask = adapter.left_pad([[5, 6], [7]], 4, 0)
    np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [0, 0, 0, 7]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
    assert adapter.round_up(1, 64) == 64 and adapter.round_up(64, 64) == 64 and adapter.round_up(65, 64) == 128
    assert adapter.split_trailing_space("Answer: ", "yes") == ("Answer:", " yes")


def test_bad_model_args_are_one_line(adapter, model_folder, tmp_path):
    cases = [
        (dict(), "path=DIR is required"),
        (dict(path=str(tmp_path / "missing")), "no such folder"),
        (dict(path=str(tmp_path)), "not a model folder"),
        (dict(path=model_folder, batch_size="auto"), "batch_size='auto': expected an integer >= 1 (the kimi_jax "
                                                     "adapter uses one static batch size"),
        (dict(path=model_folder, dtype="float64"), "dtype='float64': choose one of float32, bfloat16"),
        (dict(path=model_folder, commit_mode="eager"), "commit_mode='eager': choose one of verified"),
        (dict(path=model_folder, use_recursive="maybe"), "use_recursive='maybe': expected True or False"),
        (dict(path=model_folder, temperature=0.5), "unknown argument 'temperature'"),
        (dict(path=model_folder, pretrained=str(tmp_path)), "path= or pretrained=, not both"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            adapter.KimiJaxLM(**kwargs)
        text = str(info.value)
        assert message in text and "\n" not in text, (kwargs, text)
    from kimi_jax.recursive.config import RecursiveConfigError

    with pytest.raises(RecursiveConfigError, match="multiple of 64"):
        adapter.KimiJaxLM(path=model_folder, use_recursive=True, chunk_width=96)


def test_model_args_string_and_cli_defaults(adapter, model_folder):
    """model_args as lm-eval passes them: strings parsed, model_args win over the CLI's always-sent batch_size."""
    lm = adapter.KimiJaxLM.create_from_arg_string(f"pretrained={model_folder},batch_size=3,max_length=128",
                                                  {"batch_size": 1, "device": "cuda:0", "max_batch_size": None})
    assert (lm.batch_size, lm.max_length, lm.rcfg.recursive_enabled, lm.sidecar) == (3, 128, False, None)
    lm = adapter.KimiJaxLM.create_from_arg_obj({"path": model_folder}, {"batch_size": 2})
    assert lm.batch_size == 2 and lm.max_length == adapter.DEFAULT_MAX_LENGTH


# ------------------------------------------------------------------------------------------------------ scores
def test_loglikelihood_equals_direct_forward(lm, small_lm):
    tok, model = lm.tokenizer, lm.model
    # A continuation that greedy decoding produces: the argmax after a context, decoded.
    ctx_ids = tok.encode("The house of the")
    greedy_ids = []
    for _ in range(2):
        greedy_ids.append(int(np.argmax(ref_logits(model, ctx_ids + greedy_ids)[-1])))
    greedy_text = tok.decode(greedy_ids)
    pairs = [("The quick brown fox", " jumps over"), ("Answer: ", "yes"), ("", "Hello world"),
             ("   ", "spaces first"), ("The house of the", greedy_text), ("x", ""),
             ("Question: what is two plus two?", " four")]
    got = lm.loglikelihood([FakeInstance(p) for p in pairs])
    assert len(got) == len(pairs)
    for (context, continuation), (ll, is_greedy) in zip(pairs, got):
        if continuation == "":
            assert (ll, is_greedy) == (0.0, True)
            continue
        want, want_greedy = expected_loglikelihood(model, tok, lm.prefix_token_id, context, continuation, 2048)
        assert abs(ll - want) < 1e-4 * max(1.0, abs(want)), (context, continuation, ll, want)
        assert is_greedy == want_greedy
        assert ll < 0
    ctx, cont = expected_pair(tok, lm.prefix_token_id, "The house of the", greedy_text)
    if (ctx, cont) == (ctx_ids, greedy_ids):  # the decoded text tokenizes back to the same ids
        assert got[4][1] is True
    assert not all(g for _, g in got[:4])  # and the other pairs are not all greedy: the flag is informative

    # Contexts longer than max_length: only the last max_length + 1 tokens count.
    long_ctx = " ".join(f"word{i}" for i in range(15))
    (ll, greedy), = small_lm.loglikelihood([FakeInstance((long_ctx, " end"))])
    want, want_greedy = expected_loglikelihood(model, tok, lm.prefix_token_id, long_ctx, " end", 16)
    assert abs(ll - want) < 1e-4 * max(1.0, abs(want)) and greedy == want_greedy
    assert len(tok.encode(long_ctx)) > 40
    longer, _ = expected_loglikelihood(model, tok, lm.prefix_token_id, long_ctx, " end", 40)
    assert abs(longer - want) > 1e-6  # the cut matters, so the check above can fail


def test_loglikelihood_rolling_equals_token_sum(lm, small_lm):
    tok, model, bos = lm.tokenizer, lm.model, lm.prefix_token_id
    docs = [d["text"] for d in PPL_DOCS] + [""]
    got = lm.loglikelihood_rolling([FakeInstance((d,)) for d in docs])
    for doc, total in zip(docs, got):
        if not doc:
            assert total == 0.0
            continue
        ids = tok.encode(doc)
        assert len(ids) < REF_T
        want = float(token_logprobs(model, [bos] + ids)[0].sum())  # one window: every token with all its context
        assert abs(total - want) < 1e-4 * abs(want), (total, want)
    # max_length 16: several windows; each token conditioned on at most 16 inputs, every later window full.
    got_small = small_lm.loglikelihood_rolling([FakeInstance((d,)) for d in docs[:2]])
    for doc, total in zip(docs[:2], got_small):
        ids = [bos] + tok.encode(doc)
        want, n, s = 0.0, len(ids) - 1, 0
        while s < n:
            e = min(s + 16, n)
            start = max(0, e - 16)
            logp, _ = token_logprobs(model, ids[start:e + 1])
            want += float(logp[-(e - s):].sum())
            s = e
        assert abs(total - want) < 1e-4 * abs(want), (total, want)
    assert abs(got_small[0] - got[0]) > 1e-3  # the windows really cut the context


def test_from_loaded_scores_like_the_path_adapter(adapter, lm):
    again = adapter.KimiJaxLM.from_loaded(lm.model, lm.tokenizer, batch_size=B)
    reqs = [FakeInstance(("Hello", " world")), FakeInstance(("A", " B C"))]
    assert again.loglikelihood(reqs) == lm.loglikelihood(reqs)
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert again.apply_chat_template(chat) == lm.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert again.chat_template(True) and again.chat_template(False) is None
    assert again.tokenizer_name.startswith("kimi_jax") and again.rcfg.recursive_enabled is False
    with pytest.raises(adapter.AdapterError, match="no sidecar was given"):
        from kimi_jax.recursive.config import load_preset

        adapter.KimiJaxLM.from_loaded(lm.model, lm.tokenizer, rcfg=load_preset("after_surgery"))


# -------------------------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def reference_generations(model_folder, tmp_path_factory) -> list[str]:
    """`python -m experiments.generate` (greedy) on GEN_PROMPTS: the texts (final EOS dropped)."""
    from experiments.generate import main

    path = tmp_path_factory.mktemp("ref") / "gen.json"
    args = ["--model_path", model_folder]
    for p in GEN_PROMPTS:
        args += ["--prompt", p]
    out, err = std_io.StringIO(), std_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*args, "--max_new_tokens", str(N_GEN), "--quiet", "--output_json", str(path)])
    assert rc == 0, err.getvalue()
    with open(path) as f:
        return [s["text"] for s in json.load(f)["samples"]]


@pytest.fixture(scope="module")
def stop_strings(reference_generations) -> list[str]:
    """Stop strings that occur inside the reference texts (so truncation really happens)."""
    stops = []
    for text, at in zip(reference_generations, (12, 25)):
        piece = text[at:at + 3]
        if len(text) > at + 3 and piece.strip() and text.find(piece) > 0:
            stops.append(piece)
    assert stops, reference_generations
    return stops


def test_generate_until_equals_greedy_generate_cut_at_stops(lm, reference_generations, stop_strings):
    reqs = [FakeInstance((p, {"until": stop_strings, "max_gen_toks": N_GEN, "do_sample": False,
                              "temperature": 0.0})) for p in GEN_PROMPTS]
    got = lm.generate_until(reqs)
    want = [hf_style_cut(t, stop_strings) for t in reference_generations]
    assert got == want
    assert any(w != t for w, t in zip(want, reference_generations))  # at least one text was cut
    # No stop strings: the whole greedy continuation.
    assert lm.generate_until([FakeInstance((p, {"max_gen_toks": N_GEN})) for p in GEN_PROMPTS]) == \
        reference_generations
    assert lm.generation_stats["requests"] == 3 and lm.generation_stats["use_recursive"] is False
    assert lm.generation_stats["generated_tokens"] > 0


def test_generate_until_context_is_cut_to_fit(adapter, lm):
    with pytest.raises(adapter.AdapterError, match="max_gen_toks 2048 leaves no room"):
        lm.generate_until([FakeInstance(("x", {"max_gen_toks": 2048}))])
    with pytest.raises(adapter.AdapterError, match="do_sample=True is not supported"):
        lm.generate_until([FakeInstance(("x", {"do_sample": True}))])


@pytest.mark.slow
def test_recursive_zero_init_surgery_generates_the_same(rec_lm, reference_generations, stop_strings):
    assert rec_lm.rcfg.recursive_enabled and rec_lm.rcfg.commit_mode == "verified"
    assert rec_lm.load_info["sidecar"] == "fresh"
    assert np.all(np.asarray(rec_lm.sidecar.cells.b[...]) == 0)
    reqs = [FakeInstance((p, {"until": stop_strings, "max_gen_toks": N_GEN})) for p in GEN_PROMPTS]
    assert rec_lm.generate_until(reqs) == [hf_style_cut(t, stop_strings) for t in reference_generations]
    stats = rec_lm.generation_stats
    assert stats["use_recursive"] is True and stats["avg_refine_steps"] == 1.0 and stats["num_chunks"] >= 3


# ---------------------------------------------------------------------------------- lm-eval end to end (local)
def write_tasks(folder, stops: list[str]) -> str:
    """Three local tasks (json datasets in `folder`, no hub): multiple choice, generate_until, perplexity."""
    os.makedirs(folder, exist_ok=True)
    cache = os.path.join(folder, "hf_cache")

    def data(name, rows):
        path = os.path.join(folder, f"{name}.jsonl")
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        return path

    def dataset(path):
        return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n  cache_dir: {cache}\n" \
               f"test_split: test\n"

    mc = data("mc", MC_DOCS)
    gen = data("gen", [{"prompt": p, "answer": "unknowable"} for p in GEN_PROMPTS])
    ppl = data("ppl", PPL_DOCS)
    with open(os.path.join(folder, "kimi_local_mc.yaml"), "w") as f:
        f.write("task: kimi_local_mc\n" + dataset(mc) + "output_type: multiple_choice\n"
                "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
                "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    with open(os.path.join(folder, "kimi_local_gen.yaml"), "w") as f:
        f.write("task: kimi_local_gen\n" + dataset(gen) + "output_type: generate_until\n"
                "doc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\ntarget_delimiter: \"\"\n"
                f"generation_kwargs:\n  until: {json.dumps(stops)}\n  max_gen_toks: {N_GEN}\n  do_sample: false\n"
                "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    with open(os.path.join(folder, "kimi_local_ppl.yaml"), "w") as f:
        f.write("task: kimi_local_ppl\n" + dataset(ppl) + "output_type: loglikelihood_rolling\n"
                "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                "  - metric: bits_per_byte\n")
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, stop_strings):
    return write_tasks(str(tmp_path_factory.mktemp("tasks")), stop_strings)


@pytest.fixture(scope="module")
def task_manager(task_dir):
    if not HAVE_LM_EVAL:
        pytest.skip("lm-eval is not installed (pip install 'kimi-jax[lmeval]')")
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=task_dir, include_defaults=False)


def _evaluate(model, task_manager, tasks, **kwargs):
    import lm_eval

    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE_ENV.items():
            mp.setenv(k, v)
        return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=task_manager, log_samples=True,
                                       **kwargs)


@needs_lm_eval
def test_simple_evaluate_local_tasks(lm, task_manager, reference_generations, stop_strings):
    out = _evaluate(lm, task_manager, ["kimi_local_mc", "kimi_local_gen", "kimi_local_ppl"])
    tok, model, bos = lm.tokenizer, lm.model, lm.prefix_token_id
    samples = out["samples"]

    mc = sorted(samples["kimi_local_mc"], key=lambda s: s["doc_id"])
    assert len(mc) == 5
    for s, doc in zip(mc, MC_DOCS):
        lls = [r[0] for r in s["resps"]]
        assert len(lls) == len(doc["choices"])
        assert [a[1] for a in s["arguments"]] == [" " + c for c in doc["choices"]]
        for (context, continuation), (ll, greedy) in zip(s["arguments"], lls):
            assert context == doc["question"]
            want, want_greedy = expected_loglikelihood(model, tok, bos, context, continuation, lm.max_length)
            assert abs(ll - want) < 1e-4 * max(1.0, abs(want)) and greedy == want_greedy
        assert s["acc"] == float(int(np.argmax([ll for ll, _ in lls])) == doc["answer"])
    assert out["results"]["kimi_local_mc"]["acc,none"] == pytest.approx(np.mean([s["acc"] for s in mc]))

    gen = sorted(samples["kimi_local_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in gen] == [hf_style_cut(t, stop_strings) for t in reference_generations]
    assert out["results"]["kimi_local_gen"]["exact_match,none"] == 0.0

    ppl = sorted(samples["kimi_local_ppl"], key=lambda s: s["doc_id"])
    for s, doc in zip(ppl, PPL_DOCS):
        ll = s["resps"][0][0]
        want = float(token_logprobs(model, [bos] + tok.encode(doc["text"]))[0].sum())
        assert abs(ll - want) < 1e-4 * abs(want)
    words = sum(len(re.split(r"\s+", d["text"])) for d in PPL_DOCS)  # lm-eval's word count
    total = sum(s["resps"][0][0] for s in ppl)
    assert out["results"]["kimi_local_ppl"]["word_perplexity,none"] == pytest.approx(np.exp(-total / words),
                                                                                    rel=1e-5)


@needs_lm_eval
def test_simple_evaluate_by_name_and_recursive(rec_lm, model_folder, task_manager, reference_generations,
                                                stop_strings):
    from lm_eval.api.registry import get_model

    assert get_model("kimi_jax").__name__ == "KimiJaxLM"
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models are still there
    out = _evaluate(rec_lm, task_manager, ["kimi_local_gen"])
    gen = sorted(out["samples"]["kimi_local_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in gen] == [hf_style_cut(t, stop_strings) for t in reference_generations]
    assert rec_lm.generation_stats["avg_refine_steps"] == 1.0
    # By name, with a model_args string, as the CLI does it.
    out = _evaluate("kimi_jax", task_manager, ["kimi_local_mc"], model_args=f"path={model_folder},batch_size={B}")
    assert out["config"]["model"] == "kimi_jax" and out["results"]["kimi_local_mc"]["sample_len"] == 5


def _run_cli(*args, timeout=600):
    env = child_env(PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **OFFLINE_ENV)  # one device
    return subprocess.run([sys.executable, "-m", "experiments.lm_eval", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@needs_lm_eval
def test_cli_wrapper_end_to_end(model_folder, task_dir, tmp_path):
    out_dir = tmp_path / "out"
    proc = _run_cli("--model", "kimi_jax", "--model_args", f"path={model_folder},batch_size={B}", "--tasks",
                    "kimi_local_mc", "--include_path", task_dir, "--output_path", out_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kimi_local_mc" in proc.stdout and "acc" in proc.stdout
    written = [os.path.join(d, f) for d, _, files in os.walk(out_dir) for f in files if f.startswith("results")]
    assert len(written) == 1
    with open(written[0]) as f:
        results = json.load(f)
    assert 0.0 <= results["results"]["kimi_local_mc"]["acc,none"] <= 1.0


@pytest.mark.slow
@needs_lm_eval
def test_cli_wrapper_bad_model_args_is_one_error_line(tmp_path, task_dir):
    proc = _run_cli("--model", "kimi_jax", "--model_args", f"path={tmp_path / 'nope'}", "--tasks", "kimi_local_mc",
                    "--include_path", task_dir, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: model_args path={tmp_path / 'nope'}: no such folder", last


def test_importing_without_lm_eval():
    """kimi_jax imports without lm-eval; the adapter and the CLI wrapper say how to install it."""
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import kimi_jax, kimi_jax.evaluation\n"
            "try:\n    import kimi_jax.evaluation.lm_eval_adapter\nexcept ImportError as e:\n    print('MSG', e)\n"
            "from experiments.lm_eval import main\nsys.exit(main(['--help']))\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "MSG kimi_jax.evaluation.lm_eval_adapter needs lm-evaluation-harness" in proc.stdout
    assert "pip install 'kimi-jax[lmeval]'" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pip install 'kimi-jax[lmeval]'" in lines[0]

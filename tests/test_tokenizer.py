"""The offline Kimi tokenizer loader against an independent tiktoken Encoding, HF tokenizers and the HF fallback.

The vocabulary is a 4k byte-level BPE trained here on the stdlib's pydoc topics and a few stdlib sources with Kimi's
split regex, written in Kimi's ``tiktoken.model`` format (kimi_jax.tokenizer_fixtures). No network.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Regex, pre_tokenizers

from kimi_jax.tokenizer import KIMI_PAT, TokenizerError, load, split_long_runs
from kimi_jax.tokenizer_fixtures import (K2_NAMED_SPECIALS, bpe_token_bytes, build_kimi_format_tokenizer,
                                         kimi_special_names, local_corpus, ranks_from_bpe, train_kimi_bpe)

VOCAB = 4096

TRICKY = [
    "HelloWorld camelCaseIdentifier XMLHttpRequest getHTTPResponseCode",
    "HELLO WORLD's DON'T I'LL WE'VE you're It'S",
    "你好世界 hello", " 你好", "hello你好世界 hi", "中文English混合123",
    "1234567", "3.14159 1,000,000 0x1F",
    "line one\nline two\r\nline three\r\n\r\n\n", "\t\tindented\n    spaces   \n",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇯🇵", "e\u0301te\u0301 café naïve Ωμέγα Привет",
    "", " ", "  \n", "a" * 300, "tail spaces   ",
]


def _ref_encoding(folder) -> tiktoken.Encoding:
    """An Encoding built here, independently of kimi_jax.tokenizer, from the folder's files."""
    ranks = load_tiktoken_bpe(os.path.join(folder, "tiktoken.model"))
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        decoder = json.load(f)["added_tokens_decoder"]
    n = len(ranks)
    specials = {decoder[str(i)]["content"] if str(i) in decoder else f"<|reserved_token_{i}|>": i
                for i in range(n, n + 256)}
    return tiktoken.Encoding(name="ref", pat_str=KIMI_PAT, mergeable_ranks=ranks, special_tokens=specials)


def _chunks(texts) -> list[str]:
    lines = [line for t in texts for line in t.splitlines(keepends=True)]
    paragraphs = [p for t in texts for p in t.split("\n\n")]
    return lines + paragraphs


@pytest.fixture(scope="module")
def corpus():
    return local_corpus()


@pytest.fixture(scope="module")
def bpe(corpus):
    return train_kimi_bpe(corpus, VOCAB)


@pytest.fixture(scope="module")
def folder(bpe, corpus, tmp_path_factory):
    return build_kimi_format_tokenizer(corpus, tmp_path_factory.mktemp("kimi-tok"), bpe=bpe)


@pytest.fixture(scope="module")
def tok(folder):
    return load(folder)


@pytest.fixture(scope="module")
def ref(folder):
    return _ref_encoding(folder)


@pytest.fixture(scope="module")
def chunks(corpus):
    return _chunks(corpus)


@pytest.fixture(scope="module")
def hf_folder(folder, tmp_path_factory):
    """The fixture converted to tokenizer.json with TikTokenConverter + KIMI_PAT; no tiktoken.model."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=os.path.join(folder, "tiktoken.model"), pattern=KIMI_PAT,
                                  extra_special_tokens=kimi_special_names(VOCAB)).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="[BOS]", eos_token="<|im_end|>",
                                   pad_token="[PAD]", unk_token="[UNK]")
    out = tmp_path_factory.mktemp("kimi-tok-hf")
    fast.save_pretrained(out)
    assert not (out / "tiktoken.model").exists() and (out / "tokenizer.json").exists()
    return out


# ---------------------------------------------------------------------------------------------- exactness
def test_fixture_files(folder, tok):
    assert sorted(os.listdir(folder)) == ["special_tokens_map.json", "tiktoken.model", "tokenizer_config.json"]
    assert len(load_tiktoken_bpe(os.path.join(folder, "tiktoken.model"))) == VOCAB
    assert tok.backend_name == "tiktoken"
    assert tok.vocab_size == VOCAB + 256 == len(tok)


def test_matches_independent_tiktoken(tok, ref, chunks):
    assert len(chunks) > 5000
    mismatches = [c for c in chunks + TRICKY if tok.encode(c) != ref.encode(c, allowed_special="all")]
    assert mismatches == []


def test_matches_training_bpe(tok, bpe, chunks):
    """The HF tokenizers BPE used for training, its ids mapped to tiktoken ranks through the token bytes."""
    id_bytes, ranks = bpe_token_bytes(bpe), ranks_from_bpe(bpe)
    texts = chunks + TRICKY
    hf_ids = [[ranks[id_bytes[i]] for i in enc.ids] for enc in bpe.encode_batch(texts)]
    mismatches = [t for t, ids in zip(texts, hf_ids) if tok.encode(t) != ids]
    assert mismatches == []


def test_round_trip(tok, chunks):
    for text in chunks[::7] + TRICKY:
        assert tok.decode(tok.encode(text)) == text
    assert tok.batch_encode(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_long_runs_are_chunked_like_the_remote_code(tok, ref):
    # 30k spaces, a 26,003-char non-space run, a newline: cuts at 25,000 and 55,000.
    text = " " * 30_000 + "abc" + "x" * 26_000 + "\n"
    pieces = [text[:25_000], text[25_000:55_000], text[55_000:]]
    assert list(split_long_runs(text)) == pieces
    ids = tok.encode(text)
    assert ids == [i for p in pieces for i in ref.encode(p)]
    assert tok.decode(ids) == text
    # Over 400k characters: the remote code also cuts every 400,000 characters.
    text = "ab " * 140_000
    assert tok.encode(text) == ref.encode(text[:400_000]) + ref.encode(text[400_000:])
    assert tok.decode(tok.encode(text)) == text


def _split_char_by_char(text: str, max_chars: int, max_run: int) -> list[str]:
    """Oracle: walk each max_chars block counting the current whitespace/non-whitespace run; cut where it would
    exceed max_run."""
    out = []
    for start in range(0, max(len(text), 1), max_chars):
        block, piece_start, run, prev_space = text[start:start + max_chars], 0, 0, None
        for i, ch in enumerate(block):
            run = run + 1 if ch.isspace() == prev_space else 1
            prev_space = ch.isspace()
            if run > max_run:
                out.append(block[piece_start:i])
                piece_start, run = i, 1
        out.append(block[piece_start:])
    return out


def test_split_long_runs_small_limits():
    import random

    text = "aaaaaaa   bb\t\t\t\t\t\tc"
    pieces = list(split_long_runs(text, max_chars=100, max_run=3))
    assert pieces == ["aaa", "aaa", "a   bb\t\t\t", "\t\t\tc"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab \n\u3000\u00a0x") for _ in range(rng.randrange(0, 60)))
        max_chars, max_run = rng.randrange(1, 20), rng.randrange(1, 8)
        pieces = list(split_long_runs(text, max_chars, max_run))
        assert "".join(pieces) == text
        assert pieces == _split_char_by_char(text, max_chars, max_run)
    assert list(split_long_runs("abcdefg", max_chars=3, max_run=2)) == ["ab", "c", "de", "f", "g"]
    assert list(split_long_runs("")) == [""]


# ---------------------------------------------------------------------------------------------- specials
def test_special_tokens(tok):
    n = VOCAB
    assert len(tok.special_tokens) == 256
    assert sorted(tok.special_tokens.values()) == list(range(n, n + 256))
    for offset, name in K2_NAMED_SPECIALS.items():
        assert tok.token_to_id(name) == n + offset
    assert tok.token_to_id(f"<|reserved_token_{n + 5}|>") == n + 5
    assert tok.token_to_id(f"<|reserved_token_{n + 253}|>") == n + 253
    assert f"<|reserved_token_{n}|>" not in tok.special_tokens  # id n is [BOS]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (n, n + 2, n + 255)
    assert tok.token_to_id("a") == ord("a")
    with pytest.raises(KeyError):
        tok.token_to_id("<|no_such_token|>")


def test_special_tokens_encode_and_decode(tok):
    n = VOCAB
    text = "<|im_user|>user<|im_middle|>hi<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == n + 3 and ids[-1] == n + 2 and (n + 17) in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "userhi"
    # Not allowed: the same text is encoded as plain text (no special ids), as the remote code does.
    plain = tok.encode(text, allowed_special=set())
    assert not set(plain) & set(tok.special_tokens.values()) and tok.decode(plain) == text
    only_end = tok.encode(text, allowed_special={"<|im_end|>"})
    assert only_end[-1] == n + 2 and (n + 3) not in only_end
    assert tok.encode("hi", add_bos=True) == [n] + tok.encode("hi")
    with pytest.raises(ValueError):
        tok.encode("x", allowed_special={"hello"})


def test_config_without_names(folder, tmp_path):
    """No tokenizer_config.json: every special is reserved_token_{id}; no BOS/EOS/PAD names resolve."""
    shutil.copy(os.path.join(folder, "tiktoken.model"), tmp_path)
    bare = load(tmp_path)
    assert sorted(bare.special_tokens) == sorted(f"<|reserved_token_{i}|>" for i in range(VOCAB, VOCAB + 256))
    assert (bare.bos_token_id, bare.eos_token_id, bare.pad_token_id) == (None, None, None)


def test_eos_falls_back_to_im_end_then_eos(folder, tmp_path):
    shutil.copy(os.path.join(folder, "tiktoken.model"), tmp_path)
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        config = json.load(f)
    del config["eos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load(tmp_path).eos_token_id == VOCAB + 2  # <|im_end|>
    del config["added_tokens_decoder"][str(VOCAB + 2)]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load(tmp_path).eos_token_id == VOCAB + 1  # [EOS]


# ---------------------------------------------------------------------------------------------- why the regex matters
def test_generic_gpt4_pattern_tokenizes_differently(tok, folder, chunks):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    generic = inspect.signature(TikTokenConverter.__init__).parameters["pattern"].default
    assert generic != KIMI_PAT

    def pieces(pattern, text):
        return [p for p, _ in pre_tokenizers.Split(Regex(pattern), "isolated").pre_tokenize_str(text)]

    assert pieces(KIMI_PAT, " WORLD's") == [" WORLD's"] and pieces(generic, " WORLD's") == [" WORLD", "'s"]
    assert pieces(KIMI_PAT, "HelloWorld") == ["Hello", "World"] and pieces(generic, "HelloWorld") == ["HelloWorld"]
    assert pieces(KIMI_PAT, " 你好") == [" ", "你好"] and pieces(generic, " 你好") == [" 你好"]

    ranks = load_tiktoken_bpe(os.path.join(folder, "tiktoken.model"))
    gpt4_style = tiktoken.Encoding(name="generic", pat_str=generic, mergeable_ranks=ranks, special_tokens={})
    for text in [" it's", " don't"]:  # Kimi keeps the contraction in the word's piece; this vocab merges across it
        assert tok.encode(text) != gpt4_style.encode(text)
        assert gpt4_style.decode(gpt4_style.encode(text)) == text
    assert sum(tok.encode(c) != gpt4_style.encode(c) for c in chunks) > 0


# ---------------------------------------------------------------------------------------------- tokenizer.json fallback
def test_tokenizer_json_fallback_matches(tok, hf_folder, chunks):
    fast = load(hf_folder)
    assert fast.backend_name == "transformers"
    assert fast.vocab_size == tok.vocab_size
    assert fast.special_tokens == tok.special_tokens
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                          tok.pad_token_id)
    texts = chunks + TRICKY + ["<|im_user|>user<|im_middle|>hi<|im_end|>", " " * 30_000 + "abc"]
    assert [t for t in texts if fast.encode(t) != tok.encode(t)] == []
    text = "<|im_user|>x<|im_end|>"
    for allowed in (set(), {"<|im_end|>"}):
        assert fast.encode(text, allowed_special=allowed) == tok.encode(text, allowed_special=allowed)
    ids = tok.encode(TRICKY[0] + "<|im_end|>")
    assert fast.decode(ids) == tok.decode(ids)
    assert fast.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert fast.token_to_id(" the") == tok.token_to_id(" the")


# ---------------------------------------------------------------------------------------------- chat template
MESSAGES = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi there"}]


def test_default_chat_format(tok):
    expected = ("<|im_system|>system<|im_middle|>You are helpful.<|im_end|>"
                "<|im_user|>user<|im_middle|>Hi there<|im_end|>"
                "<|im_assistant|>assistant<|im_middle|>")
    assert tok.apply_chat_template(MESSAGES) == expected
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == expected.rsplit("<|im_assistant|>")[0]
    ids = tok.encode(expected)
    assert ids[0] == tok.token_to_id("<|im_system|>") and ids[-1] == tok.token_to_id("<|im_middle|>")
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}])


def test_chat_template_from_config_and_file(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "cfg")
    config_path = tmp_path / "cfg" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
                               "{% if add_generation_prompt %}[assistant]{% endif %}")
    config_path.write_text(json.dumps(config))
    custom = load(tmp_path / "cfg")
    assert custom.apply_chat_template(MESSAGES) == ("[system]You are helpful.<|im_end|>[user]Hi there<|im_end|>"
                                                    "[assistant]")
    (tmp_path / "cfg" / "chat_template.jinja").write_text("{{ messages | length }}{{ messages[0] | tojson }}")
    assert load(tmp_path / "cfg").apply_chat_template(MESSAGES[:1]) == (
        '1{"role": "system", "content": "You are helpful."}')


# ---------------------------------------------------------------------------------------------- bad input
def _one_line_error(path, *needles) -> str:
    with pytest.raises(TokenizerError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


def test_missing_folder(tmp_path):
    _one_line_error(tmp_path / "nope", str(tmp_path / "nope"))


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _one_line_error(tmp_path, str(tmp_path), "tiktoken.model", "tokenizer.json")


def test_corrupt_tiktoken_model(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "t")
    path = tmp_path / "t" / "tiktoken.model"
    lines = path.read_text().splitlines()
    lines[9] = "not*base64! 9"
    path.write_text("\n".join(lines) + "\n")
    _one_line_error(tmp_path / "t", str(path), "line 10")
    lines[9] = lines[9 + 1]  # a duplicate token (and rank 9 missing)
    path.write_text("\n".join(lines) + "\n")
    _one_line_error(tmp_path / "t", str(path))
    path.write_text("")
    _one_line_error(tmp_path / "t", str(path))


def test_invalid_tokenizer_config(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "t")
    (tmp_path / "t" / "tokenizer_config.json").write_text('{"added_tokens_decoder": ')
    _one_line_error(tmp_path / "t", str(tmp_path / "t" / "tokenizer_config.json"))
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {str(VOCAB): {}}}))
    _one_line_error(tmp_path / "t", "tokenizer_config.json", "content")


def test_invalid_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{")
    _one_line_error(tmp_path, str(tmp_path / "tokenizer.json"))


def test_build_with_custom_named_specials(tmp_path):
    folder = build_kimi_format_tokenizer(["hello world, hello tokenizer. " * 20], tmp_path, vocab_size=300,
                                         named_specials={0: "[BOS]", 2: "<|im_end|>", 255: "[PAD]"})
    small = load(folder)
    n = small.vocab_size - 256
    assert 256 < n <= 300
    assert (small.bos_token_id, small.eos_token_id, small.pad_token_id) == (n, n + 2, n + 255)
    assert small.token_to_id(f"<|reserved_token_{n + 1}|>") == n + 1
    assert small.decode(small.encode("hello world<|im_end|>")) == "hello world<|im_end|>"

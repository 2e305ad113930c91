"""`kimi_jax.prompt_generation`: prompts tokenized and checked, the context notice, and batched generation of one
shape (what `python -m experiments.generate` runs; its command line is tests/test_generate_cli.py)."""

from __future__ import annotations

import json

import chex
import numpy as np
import pytest

from kimi_jax.errors import UsageError
from kimi_jax.prompt_generation import (UNSET_MAX_LENGTH, PromptGenerator, check_vocabulary, context_notice,
                                        encode_prompts, tokenizer_max_length)

NEW_TOKENS = 3


def test_context_notice_names_the_prompts_over_the_trained_context():
    rows = [[1] * n for n in (3, 10, 2, 9, 9, 9, 9, 9)]
    assert context_notice(rows, 2, None) is None and context_notice(rows, 2, 12) is None
    assert context_notice(rows[:3], 2, 11) == (
        "1 prompt(s) (2) plus --max_new_tokens 2 exceed the tokenizer's model_max_length 11 (prompt 2: 10 + 2 "
        "tokens); the model was not trained on longer contexts, so the continuation may degrade; generating anyway")
    assert context_notice(rows, 2, 10).startswith("6 prompt(s) (2, 4, 5, 6, 7, ...) plus --max_new_tokens 2 ")


@pytest.mark.parametrize("content,expected", [
    ({"model_max_length": 4096}, 4096),
    ({"model_max_length": UNSET_MAX_LENGTH}, None),  # transformers' "no limit"
    ({"model_max_length": True}, None),
    ({"model_max_length": -1}, None),
    ({}, None),
    ("not json", None),
])
def test_tokenizer_max_length(tmp_path, content, expected):
    (tmp_path / "tokenizer_config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    assert tokenizer_max_length(str(tmp_path)) == expected
    assert tokenizer_max_length(str(tmp_path / "missing")) is None


class _Tokenizer:
    """Characters as token ids; the chat template wraps the message in brackets."""

    def encode(self, text):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages):
        return f"[{messages[0]['content']}]"


def test_prompts_are_encoded_and_checked():
    tok = _Tokenizer()
    assert encode_prompts(tok, ["ab", "c"]) == [[97, 98], [99]]
    assert encode_prompts(tok, ["ab"], chat=True) == [[91, 97, 98, 93]]
    with pytest.raises(UsageError, match="^prompt 2 is empty after tokenization$"):
        encode_prompts(tok, ["a", ""])
    check_vocabulary([[97, 98]], 99)
    with pytest.raises(UsageError, match=r"^prompt 2: token id 99 is outside the model's vocabulary \(99\)$"):
        check_vocabulary([[97], [98, 99]], 99)


def test_batches_have_one_shape():
    from kimi_jax.recursive.config import load_preset

    rcfg = load_preset("baseline")
    gen = PromptGenerator(None, None, rcfg, [[1, 2], [3], [4, 5, 6]], max_new_tokens=2, eos_ids=[0], pad_id=0,
                          batch_size=2, diagnostic=True)
    assert gen.batches == [[0, 1], [2]] and gen.length == 3 and gen.batch_size == 2
    assert not gen.diagnostic  # diagnostic mode needs recursion
    assert PromptGenerator(None, None, rcfg, [[1]] * 3, max_new_tokens=2, eos_ids=[0], pad_id=0,
                           batch_size=8).batch_size == 3
    with pytest.raises(ValueError, match="no prompts"):
        PromptGenerator(None, None, rcfg, [], max_new_tokens=2, eos_ids=[0], pad_id=0)


def test_greedy_generation_over_several_batches(evaluation_folders):
    from conftest import forward

    from kimi_jax import model_folder
    from kimi_jax import tokenizer as tokenizer_mod
    from kimi_jax.recursive.config import load_preset

    tok = tokenizer_mod.load(evaluation_folders["model"])
    model = model_folder.load_model(evaluation_folders["model"])
    eos, pad = model_folder.special_tokens(model.config, tok)
    prompts = ["The quick brown fox", "Hello"]
    rows = encode_prompts(tok, prompts)
    gen = PromptGenerator(model, None, load_preset("baseline"), rows, max_new_tokens=NEW_TOKENS, eos_ids=eos,
                          pad_id=pad, batch_size=1)
    seen = []
    out = gen.generate(prompts, tok, progress=False, on_sample=lambda i, s: seen.append(i))
    assert seen == [0, 1] and len(gen.batches) == 2 and out.seconds > 0 and out.traces == [[], []]
    for prompt, row, sample in zip(prompts, rows, out.samples):
        assert sample["prompt"] == prompt and sample["prompt_tokens"] == row
        assert 1 <= sample["num_tokens"] == len(sample["tokens"]) <= NEW_TOKENS
        shown = sample["tokens"][:-1] if sample["tokens"][-1] in eos else sample["tokens"]
        assert sample["text"] == tok.decode(shown)
        # left padding leaves the greedy continuation alone: its first token is the argmax after the bare prompt
        logits_TV = forward(model, np.asarray([row]))[0]
        chex.assert_shape(logits_TV, (len(row), model.config.vocab_size))
        assert sample["tokens"][0] == int(np.argmax(logits_TV[-1]))

"""Small Kimi-format tokenizers built offline, for tests and demos.

``build_kimi_format_tokenizer`` trains a byte-level BPE with HF ``tokenizers`` on Kimi's split regex and writes it the
way a Kimi checkpoint ships its tokenizer: ``tiktoken.model`` (``base64(token_bytes) rank``; the 256 single bytes first,
then the merged tokens in merge order), a Kimi-style ``tokenizer_config.json`` whose ``added_tokens_decoder`` names
the K2 specials at the same offsets from the base vocabulary as the real ids 163584 + k, and
``special_tokens_map.json``. ``local_corpus`` is real English prose and Python code from the standard library.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping

from kimi_jax.tokenizer import (CONFIG_FILE, KIMI_PAT, SPECIAL_MAP_FILE, TIKTOKEN_FILE, byte_level_alphabet,
                                reserved_token_name)

# Offset from the base vocabulary size -> name, as in Kimi-K2 / Kimi-Linear (163584 + offset).
K2_NAMED_SPECIALS: dict[int, str] = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>",
    17: "<|im_middle|>",
    254: "[UNK]",
    255: "[PAD]",
}

_CORPUS_MODULES = ("textwrap", "string", "json.decoder", "difflib")


def local_corpus() -> list[str]:
    """Real text available offline: the stdlib's pydoc topics (~465k chars of prose) and a few stdlib sources."""
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())
    for name in _CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            with open(spec.origin, encoding="utf-8") as f:
                texts.append(f.read())
    return texts


def train_kimi_bpe(texts: Iterable[str], vocab_size: int = 4096):
    """A byte-level BPE (``tokenizers.Tokenizer``) trained on pieces of Kimi's split regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(KIMI_PAT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def bpe_token_bytes(bpe) -> dict[int, bytes]:
    """HF id -> token bytes for a byte-level BPE."""
    char_to_byte = {c: b for b, c in enumerate(byte_level_alphabet())}
    return {i: bytes(char_to_byte[c] for c in token) for token, i in bpe.get_vocab(with_added_tokens=False).items()}


def ranks_from_bpe(bpe) -> dict[bytes, int]:
    """tiktoken ranks of a byte-level BPE: bytes 0..255 first, then each merge's token in merge order."""
    char_to_byte = {c: b for b, c in enumerate(byte_level_alphabet())}
    merges = json.loads(bpe.to_str())["model"]["merges"]
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(char_to_byte[c] for c in left + right)
        if token in ranks:
            raise ValueError(f"merge {merge!r} repeats token {token!r}")
        ranks[token] = len(ranks)
    return ranks


def write_tiktoken_model(ranks: Mapping[bytes, int], path: str | os.PathLike) -> None:
    """Write ``base64(token) rank`` lines in rank order (the format ``tiktoken.load.load_tiktoken_bpe`` reads)."""
    with open(path, "w", encoding="ascii") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")


def write_kimi_tokenizer_config(folder: str | os.PathLike, num_base: int,
                                named_specials: Mapping[int, str] | None = None,
                                eos_token: str = "<|im_end|>") -> None:
    """Write a Kimi-style ``tokenizer_config.json`` (specials at ``num_base + offset``) and special_tokens_map.json."""
    named = dict(K2_NAMED_SPECIALS if named_specials is None else named_specials)
    decoder = {
        str(num_base + offset): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": True}
        for offset, name in sorted(named.items())
    }
    names = set(named.values())
    token_map = {key: name for key, name in (("bos_token", "[BOS]"), ("eos_token", eos_token),
                                             ("pad_token", "[PAD]"), ("unk_token", "[UNK]")) if name in names}
    config = {
        "added_tokens_decoder": decoder,
        **token_map,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
    }
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(folder, SPECIAL_MAP_FILE), "w", encoding="utf-8") as f:
        json.dump(token_map, f, indent=2, ensure_ascii=False)


def kimi_special_names(num_base: int, named_specials: Mapping[int, str] | None = None) -> list[str]:
    """The 256 special-token names in id order (``<|reserved_token_{id}|>`` where unnamed)."""
    named = K2_NAMED_SPECIALS if named_specials is None else named_specials
    return [named.get(k, reserved_token_name(num_base + k)) for k in range(256)]


def build_kimi_format_tokenizer(texts: Iterable[str], folder: str | os.PathLike, vocab_size: int = 4096,
                                named_specials: Mapping[int, str] | None = None, bpe=None) -> str:
    """Train (or take ``bpe``) a Kimi-regex byte-level BPE and write it into ``folder`` in Kimi's format."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    ranks = ranks_from_bpe(train_kimi_bpe(texts, vocab_size) if bpe is None else bpe)
    write_tiktoken_model(ranks, os.path.join(folder, TIKTOKEN_FILE))
    write_kimi_tokenizer_config(folder, len(ranks), named_specials)
    return folder

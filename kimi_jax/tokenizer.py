"""The Kimi tokenizer, loaded offline without remote code.

A Kimi checkpoint ships ``tiktoken.model`` (``base64(token) rank`` lines) and ``tokenizer_config.json``; the remote
``tokenization_kimi.py`` builds a ``tiktoken.Encoding`` with Kimi's own split regex (``KIMI_PAT``) and 256 reserved
special ids right after the base vocabulary. ``load`` rebuilds exactly that. A folder that only has an HF
``tokenizer.json`` is loaded through transformers' fast tokenizer instead; both give the same ``KimiTokenizer`` API.

transformers' own ``tiktoken.model`` conversion uses the generic GPT-4 regex, whose pieces differ from Kimi's
(contractions after upper case, Han runs, combining marks), so it is not used for ``tiktoken.model`` folders.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import AbstractSet, Any, Literal
from kimi_jax.errors import KimiJaxError

# Kimi's pre-tokenizer regex (spec section 7): eight alternatives joined with "|". A functional constant.
KIMI_PAT = r"""[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

NUM_RESERVED_SPECIAL_TOKENS = 256
MAX_ENCODE_CHARS = 400_000  # the remote code encodes at most this many characters per tiktoken call
MAX_RUN_CHARS = 25_000  # ... and at most this many consecutive whitespace (or non-whitespace) characters

TIKTOKEN_FILE = "tiktoken.model"
HF_TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# K2-family chat roles (spec section 7): role -> (opening special token, role name).
_CHAT_ROLES = {
    "system": ("<|im_system|>", "system"),
    "user": ("<|im_user|>", "user"),
    "assistant": ("<|im_assistant|>", "assistant"),
}

AllowedSpecial = Literal["all"] | AbstractSet[str]


class TokenizerError(KimiJaxError, ValueError):
    """A tokenizer folder or file that cannot be loaded."""


def reserved_token_name(token_id: int) -> str:
    """The name the remote code gives a reserved special id missing from ``added_tokens_decoder``."""
    return f"<|reserved_token_{token_id}|>"


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parse a ``tiktoken.model`` file strictly: ``base64 rank`` lines, ranks exactly 0..n-1."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror or e}") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token_b64, rank_text = line.split()
            token, rank = base64.b64decode(token_b64, validate=True), int(rank_text)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}, line {lineno}: expected 'base64_token rank', got {line[:60]!r}") from None
        if token in ranks:
            raise TokenizerError(f"{path}, line {lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_name(value: Any) -> str | None:
    """A special-token entry as written by transformers: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def kimi_special_tokens(num_base: int, config: dict[str, Any], config_path: str = CONFIG_FILE) -> dict[str, int]:
    """The 256 reserved specials ``name -> id`` (ids num_base..num_base+255), named from ``added_tokens_decoder``."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{config_path}: added_tokens_decoder must be an object")
    specials: dict[str, int] = {}
    for token_id in range(num_base, num_base + NUM_RESERVED_SPECIAL_TOKENS):
        entry = decoder.get(str(token_id))
        name = reserved_token_name(token_id) if entry is None else _token_name(entry)
        if name is None:
            raise TokenizerError(f"{config_path}: added_tokens_decoder[{token_id!r}] has no string 'content'")
        if name in specials:
            raise TokenizerError(f"{config_path}: special token {name!r} names ids {specials[name]} and {token_id}")
        specials[name] = token_id
    return specials


def split_long_runs(text: str, max_chars: int = MAX_ENCODE_CHARS, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """The remote code's chunking: pieces of at most ``max_chars`` characters, each cut so that no piece holds more
    than ``max_run`` consecutive whitespace (``str.isspace``) or non-whitespace characters. Joins back to ``text``."""
    for start in range(0, max(len(text), 1), max_chars):
        block = text[start:start + max_chars]
        if len(block) <= max_run:
            yield block
            continue
        piece_start = 0
        for run in re.finditer(r"\s+|\S+", block):  # re's \s is exactly str.isspace
            for cut in range(run.start() + max_run, run.end(), max_run):
                yield block[piece_start:cut]
                piece_start = cut
        yield block[piece_start:]


# ------------------------------------------------------------------------------------------------------ backends
class _TiktokenBackend:
    def __init__(self, ranks: dict[bytes, int], specials: dict[str, int]):
        import tiktoken

        self.encoding = tiktoken.Encoding(name="kimi", pat_str=KIMI_PAT, mergeable_ranks=ranks,
                                          special_tokens=specials)
        self.ranks = ranks
        self.specials = dict(specials)
        self.vocab_size = len(ranks) + len(specials)

    def encode(self, text: str, allowed_special: AllowedSpecial) -> list[int]:
        # Special-token text that is not allowed is encoded as plain text, as the remote code does.
        return self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    def ordinary_token_id(self, text: str) -> int | None:
        return self.ranks.get(text.encode("utf-8"))


class _HFBackend:
    def __init__(self, folder: str):
        from transformers import PreTrainedTokenizerFast

        try:
            hf = PreTrainedTokenizerFast.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        except Exception as e:  # transformers raises many types; keep the message on one line
            msg = " ".join(str(e).split())
            raise TokenizerError(f"cannot load {os.path.join(folder, HF_TOKENIZER_FILE)}: {msg}") from None
        self.hf = hf
        self.tok = hf.backend_tokenizer
        self.specials = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._byte_to_char = byte_level_alphabet()

    def encode(self, text: str, allowed_special: AllowedSpecial) -> list[int]:
        if allowed_special == "all":
            return self.tok.encode(text, add_special_tokens=False).ids
        # Treat only the allowed names as specials: cut them out ourselves, encode the rest with specials off.
        names = sorted(allowed_special, key=len, reverse=True)
        parts = re.split("(" + "|".join(map(re.escape, names)) + ")", text) if names else [text]
        ids: list[int] = []
        self.tok.encode_special_tokens = True
        try:
            for i, part in enumerate(parts):
                if i % 2:
                    ids.append(self.specials[part])
                elif part:
                    ids.extend(self.tok.encode(part, add_special_tokens=False).ids)
        finally:
            self.tok.encode_special_tokens = False
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def ordinary_token_id(self, text: str) -> int | None:
        return self.tok.token_to_id("".join(self._byte_to_char[b] for b in text.encode("utf-8")))


def byte_level_alphabet() -> list[str]:
    """GPT-2 byte-level BPE's printable stand-in character for each byte value 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


# ------------------------------------------------------------------------------------------------------ tokenizer
class KimiTokenizer:
    """Kimi's tokenizer: encode with specials allowed and no BOS, the remote code's chunking, K2 chat format."""

    def __init__(self, backend: _TiktokenBackend | _HFBackend, config: dict[str, Any], chat_template: str | None,
                 folder: str = ""):
        self._backend = backend
        self.folder = folder
        self.backend_name = "tiktoken" if isinstance(backend, _TiktokenBackend) else "transformers"
        self.special_tokens: dict[str, int] = dict(backend.specials)
        self._special_ids = frozenset(self.special_tokens.values())
        self.chat_template = chat_template
        self.bos_token = self._pick(config.get("bos_token"), "[BOS]")
        self.eos_token = self._pick(config.get("eos_token"), "<|im_end|>", "[EOS]")
        self.pad_token = self._pick(config.get("pad_token"), "[PAD]")
        self.unk_token = self._pick(config.get("unk_token"), "[UNK]")

    def _pick(self, *candidates: Any) -> str | None:
        for candidate in candidates:
            name = _token_name(candidate)
            if name is not None and self._lookup(name) is not None:
                return name
        return None

    def _lookup(self, name: str) -> int | None:
        token_id = self.special_tokens.get(name)
        return token_id if token_id is not None else self._backend.ordinary_token_id(name)

    def _id_of(self, name: str | None) -> int | None:
        return None if name is None else self._lookup(name)

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    def token_to_id(self, name: str) -> int:
        """Id of a special token, or of an ordinary token whose text is exactly ``name``."""
        token_id = self._lookup(name)
        if token_id is None:
            raise KeyError(f"no token {name!r} in this vocabulary")
        return token_id

    def encode(self, text: str, allowed_special: AllowedSpecial = "all", add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token text becomes its id when allowed; no BOS unless asked)."""
        if allowed_special != "all":
            allowed_special = frozenset(allowed_special)
            unknown = allowed_special - self.special_tokens.keys()
            if unknown:
                raise ValueError(f"not special tokens: {sorted(unknown)}")
        ids = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        for piece in split_long_runs(text):
            ids.extend(self._backend.encode(piece, allowed_special))
        return ids

    def batch_encode(self, texts: Iterable[str], allowed_special: AllowedSpecial = "all",
                     add_bos: bool = False) -> list[list[int]]:
        return [self.encode(t, allowed_special=allowed_special, add_bos=add_bos) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._backend.decode(ids)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            **template_vars: Any) -> str:
        """The prompt text for ``messages`` (``{"role", "content"}`` dicts): the checkpoint's Jinja chat template
        when it has one, else the K2-family format ``<|im_user|>user<|im_middle|>...<|im_end|>``."""
        if self.chat_template is not None:
            return _render_template(self.chat_template, messages=list(messages),
                                    add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                                    eos_token=self.eos_token, pad_token=self.pad_token, unk_token=self.unk_token,
                                    **template_vars)
        out = []
        for message in messages:
            role = message.get("role")
            if role not in _CHAT_ROLES:
                raise ValueError(f"unsupported chat role {role!r} (known: {', '.join(_CHAT_ROLES)})")
            opener, role_name = _CHAT_ROLES[role]
            out.append(f"{opener}{role_name}<|im_middle|>{_content_text(message.get('content'))}<|im_end|>")
        if add_generation_prompt:
            out.append("<|im_assistant|>assistant<|im_middle|>")
        return "".join(out)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"KimiTokenizer({self.backend_name}, vocab_size={self.vocab_size}, folder={self.folder!r})"


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def _render_template(template: str, **context: Any) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders them
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(**context)


def _chat_template(folder: str, config: dict[str, Any], config_path: str) -> str | None:
    path = os.path.join(folder, CHAT_TEMPLATE_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read {path}: {e}") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # transformers' named-templates form
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config_path}: chat_template must be a string")
    return template


def load(path: str | os.PathLike) -> KimiTokenizer:
    """Load the tokenizer of a checkpoint folder: ``tiktoken.model`` exactly as Kimi does, else ``tokenizer.json``."""
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise TokenizerError(f"tokenizer folder not found: {folder}")
    config_path = os.path.join(folder, CONFIG_FILE)
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    map_path = os.path.join(folder, SPECIAL_MAP_FILE)
    if os.path.isfile(map_path):  # tokenizer_config.json wins where both name a token
        config = {**_read_json(map_path), **config}
    tiktoken_path = os.path.join(folder, TIKTOKEN_FILE)
    if os.path.isfile(tiktoken_path):
        ranks = read_tiktoken_ranks(tiktoken_path)
        backend: _TiktokenBackend | _HFBackend = _TiktokenBackend(
            ranks, kimi_special_tokens(len(ranks), config, config_path))
    elif os.path.isfile(os.path.join(folder, HF_TOKENIZER_FILE)):
        backend = _HFBackend(folder)
    else:
        raise TokenizerError(f"no tokenizer in {folder}: looked for {TIKTOKEN_FILE} and {HF_TOKENIZER_FILE}")
    return KimiTokenizer(backend, config, _chat_template(folder, config, config_path), folder)

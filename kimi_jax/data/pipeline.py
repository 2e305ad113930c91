"""Documents to packed, loss-masked, shuffled token batches.

``load_documents(spec)`` reads records from the demo corpus, local files (``.txt``: one document per file;
``.jsonl``/``.json``: JSON lines or a list of objects; ``.parquet`` through HF ``datasets``), a folder or glob of
such files, or an HF dataset name. Each record is plain ``text``, a ``prompt``/``response`` pair (also
``question``/``answer`` and ``instruction``[+``input``]/``output``) or a chat ``messages`` list. ``PackedDataset``
tokenizes them once (``tokenize_record``: only response / assistant tokens are scored) and packs the stream into
rows; ``BatchIterator`` shuffles rows per epoch, splits each global batch across processes and can save/restore its
position exactly; ``eval_batches`` walks every row once.

Splits of local files. Files whose stem, or a folder between the spec's folder (or a glob's fixed leading folder)
and the file, has a ``validation``/``valid``/``val``/``dev``/``eval`` word (words split on ``-``, ``_``, ``.``), or
failing that a ``test`` word, are the validation files and the others the train files; a spec that names one file
uses only that file's stem. Without such files, the records (counted over the files in sorted order) are held out:
of two or more, record ``i`` is validation iff ``sha256("kimi_jax.holdout:{i}")`` falls in the lowest 5% of its
range (when that picks none, the record with the lowest hash; when it picks all, all but the highest), so whole
documents are held out; a single text record (one ``.txt`` file, or a ``.jsonl`` of one text) is split instead: its
last 5% of characters, from the first line start at or after that mark (else the first word start there, else the
last word start before it), is validation (``split_text``). Train and validation never overlap, and both are
non-empty unless the data is a single word or a single prompt/response or chat record, which is an error.

Bad files are one ``DataError`` line naming the file (and the line of a ``.jsonl``/``.json``): text that is not
UTF-8, a line that is not a JSON object, a missing field, a file that holds no records.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kimi_jax.data.corpus import SPLITS, DataError, demo_corpus

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES

HOLDOUT_FRACTION = 0.05
PAIR_FIELDS = (("prompt", "response"), ("question", "answer"), ("instruction", "output"))
CHAT_ROLES = ("system", "user", "assistant")
_VALIDATION_WORD = re.compile(r"(?:^|[-_.])(?:validation|valid|val|dev|eval)(?:[-_.]|$)")
_TEST_WORD = re.compile(r"(?:^|[-_.])test(?:[-_.]|$)")
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Record:
    """One training example: exactly one of ``text``, ``prompt`` + ``response``, or ``messages``."""

    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: list[dict] | None = None
    source: str | None = None  # file, dataset name or corpus it came from

    def __post_init__(self):
        layouts = [self.text is not None, self.prompt is not None or self.response is not None,
                   self.messages is not None]
        if sum(layouts) != 1 or (layouts[1] and (self.prompt is None or self.response is None)):
            raise DataError(f"Record{'' if self.source is None else ' from ' + self.source} needs exactly one of "
                            f"text, prompt+response or messages")

    @property
    def kind(self) -> str:
        """``"text"``, ``"pair"`` or ``"messages"``."""
        return "text" if self.text is not None else "pair" if self.prompt is not None else "messages"


def _detect_layout(columns: Sequence[str], text_field: str, where: str) -> tuple[str, tuple[str, ...]]:
    cols = set(columns)
    if text_field != "text" and text_field in cols:  # an explicitly named text field wins
        return "text", (text_field,)
    if "messages" in cols:
        return "messages", ("messages",)
    for prompt_key, response_key in PAIR_FIELDS:
        if prompt_key in cols and response_key in cols:
            extra = ("input",) if prompt_key == "instruction" and "input" in cols else ()
            return "pair", (prompt_key, response_key, *extra)
    if text_field in cols:
        return "text", (text_field,)
    pairs = ", ".join(f"{p}+{r}" for p, r in PAIR_FIELDS)
    raise DataError(f"{where}: unknown record layout; fields found: {sorted(cols)}; expected '{text_field}', "
                    f"'messages' or one of {pairs}")


def _as_str(value: Any, where: str, label: str, field: str) -> str:
    if value is None:
        raise DataError(f"{where}, {label}: field '{field}' is missing (or null)")
    if not isinstance(value, str):
        raise DataError(f"{where}, {label}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _row_to_record(row: dict, layout: str, fields: tuple[str, ...], where: str, label: str) -> Record | None:
    """A Record, or None for an empty text record (skipped). `label` says which row ("line 7", "record 3")."""
    if layout == "text":
        text = _as_str(row.get(fields[0]), where, label, fields[0])
        return Record(text=text, source=where) if text.strip() else None
    if layout == "pair":
        prompt = _as_str(row.get(fields[0]), where, label, fields[0])
        response = _as_str(row.get(fields[1]), where, label, fields[1])
        if len(fields) == 3 and row.get(fields[2]):  # alpaca: instruction + input
            prompt = f"{prompt}\n\n{_as_str(row[fields[2]], where, label, fields[2])}"
        return Record(prompt=prompt, response=response, source=where)
    messages = row.get("messages")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}, {label}: field 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}, {label}: messages[{j}] must be an object with 'role' and 'content'")
        role = message["role"]
        if role not in CHAT_ROLES:
            raise DataError(f"{where}, {label}: messages[{j}] has role {role!r}; known roles: "
                            f"{', '.join(CHAT_ROLES)}")
        out.append({"role": role, "content": _as_str(message["content"], where, label, f"messages[{j}].content")})
    return Record(messages=out, source=where)


def _records_from_rows(rows: Sequence[tuple[str, dict]], columns: Sequence[str], where: str,
                       text_field: str) -> list[Record]:
    """Records from `(label, row)` pairs whose fields are `columns` (empty text records are skipped)."""
    if not rows:
        return []
    layout, fields = _detect_layout(columns, text_field, where)
    records = []
    for label, row in rows:
        record = _row_to_record(row, layout, fields, where, label)
        if record is not None:
            records.append(record)
    return records


def _records_from_table(table, where: str, text_field: str) -> list[Record]:
    """Records from an HF ``datasets.Dataset`` (or anything with ``column_names`` and row iteration)."""
    layout, fields = _detect_layout(table.column_names, text_field, where)
    if hasattr(table, "select_columns"):
        table = table.select_columns([f for f in fields])
    records = []
    for i, row in enumerate(table):
        record = _row_to_record(row, layout, fields, where, f"record {i}")
        if record is not None:
            records.append(record)
    return records


def _one_line(e: BaseException) -> str:
    """``Type: message`` on one line, with the innermost cause (datasets wraps the useful error)."""
    inner = e
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__
    text = f"{type(e).__name__}: {e}" + ("" if inner is e else f" <- {type(inner).__name__}: {inner}")
    return " ".join(text.split())[:400]


def _read_text(path: str) -> str:
    """The file's text; an unreadable file or one that is not UTF-8 is a DataError naming the file and line."""
    from kimi_jax.safe_io import read_utf8

    return read_utf8(path, DataError, advice="; save the file as UTF-8")


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _json_rows(path: str) -> list[tuple[str, dict]]:
    """``(label, object)`` per record of a JSON file: JSON lines (one object per line, blank lines skipped; label
    "line N"), or one JSON document: a list of objects (or of strings, each a ``text`` record; label "item I") or a
    single object."""
    text = _read_text(path)
    if not text.strip():
        return []
    if text.lstrip().startswith("["):
        return _json_list(path, text)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return _json_lines(path, text)  # more than one value (or a broken one): read line by line
    if not isinstance(whole, dict):
        raise DataError(f"{path}: expected JSON objects (one per line) or a list of them, got {_json_kind(whole)}")
    return [("line 1", whole)]


def _json_list(path: str, text: str) -> list[tuple[str, dict]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    rows = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {i} of the JSON list is {_json_kind(item)}, not an object")
        rows.append((f"item {i}", item))
    return rows


def _json_lines(path: str, text: str) -> list[tuple[str, dict]]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object, got {_json_kind(obj)}")
        rows.append((f"line {lineno}", obj))
    return rows


def _load_file(path: str, text_field: str) -> list[Record]:
    """The records of one local file ([] for an empty or blank file)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in TEXT_SUFFIXES:
        text = _read_text(path)
        return [Record(text=text, source=path)] if text.strip() else []
    if suffix in JSON_SUFFIXES:
        rows = _json_rows(path)
        return _records_from_rows(rows, list(dict.fromkeys(k for _, row in rows for k in row)), path, text_field)
    import datasets

    try:
        table = datasets.load_dataset("parquet", data_files=path, split="train")
    except Exception as e:  # datasets raises many types for malformed files
        raise DataError(f"{path}: cannot be read as parquet ({_one_line(e)})") from None
    return _records_from_table(table, path, text_field)


def _name_words(path: str, root: str) -> list[str]:
    """Lower-cased names that may mark a file's split: its stem and the folders between ``root`` and it."""
    rel = os.path.relpath(path, root) if root else os.path.basename(path)
    parts = rel.split(os.sep)
    parts[-1] = os.path.splitext(parts[-1])[0]
    return [p.lower() for p in parts if p not in ("", ".", "..")]


def _marked(path: str, root: str, pattern: re.Pattern) -> bool:
    return any(pattern.search(word) for word in _name_words(path, root))


def _holdout_key(i: int) -> int:
    digest = hashlib.sha256(f"kimi_jax.holdout:{i}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _holdout(i: int) -> bool:
    return _holdout_key(i) < HOLDOUT_FRACTION * 2.0**64


def held_out_records(n: int) -> set[int]:
    """Which of ``n >= 2`` records are validation: record ``i`` iff ``sha256("kimi_jax.holdout:{i}")`` falls in the
    lowest ``HOLDOUT_FRACTION`` of its range; when that picks none (few records), the one with the lowest hash, and
    when it picks all, all but the one with the highest, so both splits have records."""
    if n < 2:
        raise DataError(f"held_out_records needs at least 2 records, got {n}")
    held = {i for i in range(n) if _holdout(i)}
    if not held:
        held = {min(range(n), key=_holdout_key)}
    elif len(held) == n:
        held.discard(max(range(n), key=_holdout_key))
    return held


_LINE_START = re.compile(r"(?<=\n)(?=[^\n]*\S)")  # the start of a line that holds text
_WORD_START = re.compile(r"(?<=\s)(?=\S)")


def split_text(text: str, where: str) -> tuple[str, str]:
    """``(train, validation)`` parts of one text, ``text == train + validation``: validation is about the last
    ``HOLDOUT_FRACTION`` of the characters. It starts at the first line start at or after the mark
    ``(1 - HOLDOUT_FRACTION) * len(text)``, else at the first word start there, else at the last word start
    before it. A text of one word cannot be split (DataError naming ``where``)."""
    mark = math.ceil(len(text) * (1 - HOLDOUT_FRACTION))
    found = _LINE_START.search(text, mark) or _WORD_START.search(text, mark)
    cut = found.start() if found else None
    if cut is None:
        before = [m.start() for m in _WORD_START.finditer(text, 0, mark) if text[:m.start()].strip()]
        cut = before[-1] if before else None
    if cut is None:
        raise DataError(f"{where}: too little text to hold out validation text from it (one word); add text, or a "
                        f"validation file named like 'validation.txt'")
    return text[:cut], text[cut:]


def _split_records(records: list[Record], split: str) -> list[Record]:
    """The ``split`` share of the records of a spec without validation files (see the module docstring)."""
    if len(records) >= 2:
        held = held_out_records(len(records))
        return [r for i, r in enumerate(records) if (i in held) == (split == "validation")]
    (record,) = records
    if record.kind != "text":
        raise DataError(f"{record.source}: a single {record.kind} record cannot be split into train and validation "
                        f"(only one text can); add records, or a validation file named like 'validation.jsonl'")
    train, validation = split_text(record.text, record.source)
    return [Record(text=train if split == "train" else validation, source=record.source)]


def _no_records(spec: str, files: list[str], split: str, val_files: list[str]) -> DataError:
    if len(files) == 1:
        return DataError(f"{files[0]}: holds no records (it is empty or blank, or all its texts are)")
    which = f"{split} files" if val_files else "files"
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return DataError(f"{spec}: no {split} records: the {len(files)} {which} ({shown}) are empty or blank")


def _looks_like_path(spec: str) -> bool:
    return (spec.startswith(("/", "./", "../", "~")) or os.sep in spec and os.path.exists(os.path.dirname(spec))
            or spec.lower().endswith(SUPPORTED_SUFFIXES))


def _resolve_files(spec: str) -> tuple[list[str], str] | None:
    """``(files, root)`` named by ``spec`` (a file, folder or glob; ``root`` is the folder, the glob's fixed leading
    folder, or "" for a single file), or None when ``spec`` is not a local path."""
    path = os.path.expanduser(spec)
    root = ""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        root = path
        files = []
        for here, dirs, names in os.walk(path):  # `root` stays the spec's folder: splits are named below it
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(here, n) for n in names
                      if not n.startswith(".") and n.lower().endswith(SUPPORTED_SUFFIXES)]
        if not files:
            raise DataError(f"{spec}: folder has no {'/'.join(SUPPORTED_SUFFIXES)} files")
    elif glob.has_magic(path):
        fixed = []
        for part in path.split(os.sep):
            if glob.has_magic(part):
                break
            fixed.append(part)
        root = os.sep.join(fixed) or "."
        files = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        if not files:
            raise DataError(f"{spec}: no files match this pattern")
    elif _looks_like_path(spec):
        raise DataError(f"{spec}: no such file or folder")
    else:
        return None
    bad = [p for p in files if not p.lower().endswith(SUPPORTED_SUFFIXES)]
    if bad:
        raise DataError(f"{bad[0]}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    return sorted(files), root


def load_documents(spec: str, *, split: str = "train", text_field: str = "text", progress: bool = False,
                   cache_dir: str | os.PathLike | None = None) -> list[Record]:
    """Records of ``split`` from ``spec``: ``"demo"``, a local file / folder / glob, or an HF dataset name.

    ``cache_dir`` and ``progress`` are passed to ``demo_corpus`` for ``"demo"``; ``progress`` also shows a bar over
    local files. Local splits follow the module docstring (validation files, else a 5% hold-out of the records, or
    of the text of a single text record)."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"data spec must be a non-empty string, got {spec!r}")
    if spec == "demo":
        _check_split(split, spec)
        corpus = demo_corpus(cache_dir, progress=progress)
        return [Record(text=d.text, source=d.source) for d in corpus[split]]
    resolved = _resolve_files(spec)
    if resolved is None:
        return _load_hf(spec, split, text_field)
    files, root = resolved
    _check_split(split, spec)
    val_files = ([f for f in files if _marked(f, root, _VALIDATION_WORD)]
                 or [f for f in files if _marked(f, root, _TEST_WORD)])
    if val_files:
        chosen = val_files if split == "validation" else [f for f in files if f not in val_files]
        if not chosen:
            raise DataError(f"{spec}: every file is a validation/test file ({', '.join(val_files)}); there are no "
                            f"train files")
    else:
        chosen = files
    from tqdm.auto import tqdm

    records: list[Record] = []
    for path in tqdm(chosen, desc=f"load {split}", disable=not progress, unit="file"):
        records += _load_file(path, text_field)
    if not records:
        raise _no_records(spec, chosen, split, val_files)
    return records if val_files else _split_records(records, split)


def _check_split(split: str, spec: str) -> None:
    if split not in SPLITS:
        raise DataError(f"{spec}: split must be one of {', '.join(SPLITS)}, got {split!r}")


def _load_hf(name: str, split: str, text_field: str) -> list[Record]:
    try:
        import datasets

        table = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(f"could not load HF dataset {name!r} (split {split!r}): {_one_line(e)}; offline, use local "
                        f"files (.txt/.jsonl/.json/.parquet, a folder or a glob) or 'demo'") from None
    return _records_from_table(table, f"{name} [{split}]", text_field)


# ---------------------------------------------------------------------------------------------- tokenization
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text)) if text else []


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"{tokenizer!r} has no EOS token; packing needs one to separate documents")
    return int(eos)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception as e:
        raise DataError(f"{where}: cannot render the chat template ({_one_line(e)})") from None


def _tokenize_messages(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
    """Chat rendering with only the assistant turns scored: each prefix up to an assistant reply (with the
    generation prompt) is unscored, the reply's rendering after that prefix is scored."""
    ids: list[int] = []
    mask: list[bool] = []

    def add(text: str, scored: bool) -> None:
        piece = _encode(tokenizer, text)
        ids.extend(piece)
        mask.extend([scored] * len(piece))

    consumed = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True, where)
        full = _render(tokenizer, messages[:i + 1], False, where)
        if not prefix.startswith(consumed) or not full.startswith(prefix):
            raise DataError(f"{where}: the chat template does not render turn by turn (a conversation's rendering "
                            f"is not a prefix of its continuation), so assistant tokens cannot be masked")
        add(prefix[len(consumed):], False)
        add(full[len(prefix):], True)
        consumed = full
    final = _render(tokenizer, messages, False, where)
    if not final.startswith(consumed):
        raise DataError(f"{where}: the chat template does not render turn by turn")
    add(final[len(consumed):], False)
    eos = _eos_id(tokenizer)
    if not ids or ids[-1] != eos:  # K2 turns already end in <|im_end|>, the Kimi EOS
        ids.append(eos)
        mask.append(messages[-1]["role"] == "assistant")
    return ids, mask


def tokenize_record(tokenizer, record: Record, *, chat: bool) -> tuple[list[int], list[bool]]:
    """``(ids, loss_mask)`` of one record, ending in EOS.

    text: every token and the EOS scored. prompt/response: the prompt unscored, the response and EOS scored; with
    ``chat``, rendered as a user/assistant conversation through the chat template. messages: the chat template's
    rendering with only the assistant turns scored (see ``_tokenize_messages``)."""
    where = f"record from {record.source}" if record.source else "record"
    if record.kind == "messages":
        return _tokenize_messages(tokenizer, list(record.messages), where)
    if record.kind == "pair" and chat:
        return _tokenize_messages(tokenizer, [{"role": "user", "content": record.prompt},
                                              {"role": "assistant", "content": record.response}], where)
    eos = _eos_id(tokenizer)
    if record.kind == "text":
        ids = _encode(tokenizer, record.text) + [eos]
        return ids, [True] * len(ids)
    prompt = _encode(tokenizer, record.prompt)
    response = _encode(tokenizer, record.response) + [eos]
    return prompt + response, [False] * len(prompt) + [True] * len(response)


# ---------------------------------------------------------------------------------------------- packing
class PackedDataset:
    """Records tokenized once and packed into rows of ``seq_len + 1`` tokens.

    Row ``r`` is ``stream[r * seq_len : r * seq_len + seq_len + 1]``: consecutive rows share one token, the last of
    a row (its final target) being the first input of the next, so the rows' targets concatenated are exactly the
    stream shifted by one. Documents are separated by their EOS. The trailing partial row is padded with the pad id
    (the EOS where the tokenizer has none) and weight 0. ``weights[t] = loss_mask[t + 1]``: a target is scored iff
    its token is."""

    def __init__(self, tokenizer, records: Sequence[Record], seq_len: int, *, chat: bool = False,
                 progress: bool = False):
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
        if not records:
            raise DataError("PackedDataset: no records")
        from tqdm.auto import tqdm

        self.seq_len = int(seq_len)
        self.chat = bool(chat)
        self.eos_id = _eos_id(tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(self.eos_id if pad is None else pad)
        id_chunks, mask_chunks = [], []
        for record in tqdm(records, desc="tokenize", disable=not progress, unit="doc"):
            if not isinstance(record, Record):
                raise DataError(f"PackedDataset: records must be Record objects, got {type(record).__name__}")
            ids, mask = tokenize_record(tokenizer, record, chat=chat)
            id_chunks.append(np.asarray(ids, np.int64))
            mask_chunks.append(np.asarray(mask, bool))
        stream = np.concatenate(id_chunks)
        if stream.size < 2:
            raise DataError("PackedDataset: the records hold fewer than 2 tokens")
        if stream.min() < 0 or stream.max() > np.iinfo(np.int32).max:
            raise DataError("PackedDataset: token ids do not fit int32")
        self.num_documents = len(records)
        self.num_tokens = int(stream.size)
        self.num_rows = -(-(self.num_tokens - 1) // self.seq_len)
        total = self.num_rows * self.seq_len + 1
        self._tokens = np.full(total, self.pad_id, np.int32)
        self._tokens[:self.num_tokens] = stream
        self._mask = np.zeros(total, bool)
        self._mask[:self.num_tokens] = np.concatenate(mask_chunks)
        self.num_scored_tokens = int(self._mask[1:].sum())
        h = hashlib.sha256(b"kimi_jax.PackedDataset/v1")
        h.update(np.asarray([self.seq_len, self.pad_id, self.num_tokens], "<i8").tobytes())
        h.update(self._tokens[:self.num_tokens].astype("<i4").tobytes())
        h.update(np.packbits(self._mask[:self.num_tokens]).tobytes())
        self.fingerprint = h.hexdigest()
        self._offsets = np.arange(self.seq_len + 1)

    @property
    def tokens(self) -> np.ndarray:
        """The packed token stream (int32, no padding), read-only."""
        view = self._tokens[:self.num_tokens]
        view.flags.writeable = False
        return view

    @property
    def loss_mask(self) -> np.ndarray:
        """Per-token scored flags of ``tokens``, read-only."""
        view = self._mask[:self.num_tokens]
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return self.num_rows

    def batch(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """``{"input_ids", "targets", "weights"}`` for these row indices; ``-1`` gives an all-padding row."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size and (rows.max() >= self.num_rows or rows.min() < -1):
            raise IndexError(f"row index out of range [0, {self.num_rows})")
        pad_rows = rows < 0
        index = np.where(pad_rows, 0, rows)[:, None] * self.seq_len + self._offsets
        tokens = self._tokens[index]
        weights = self._mask[index[:, 1:]].astype(np.float32)
        tokens[pad_rows] = self.pad_id
        weights[pad_rows] = 0.0
        return {"input_ids": np.ascontiguousarray(tokens[:, :-1]), "targets": np.ascontiguousarray(tokens[:, 1:]),
                "weights": weights}

    def __repr__(self) -> str:
        return (f"PackedDataset(rows={self.num_rows}, seq_len={self.seq_len}, tokens={self.num_tokens}, "
                f"scored={self.num_scored_tokens}, fingerprint={self.fingerprint[:12]})")


# ---------------------------------------------------------------------------------------------- batching
def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_processes(batch_size: int, process_index: Any, process_count: Any) -> tuple[int, int]:
    count = _check_int(process_count, "process_count", 1)
    index = _check_int(process_index, "process_index", 0)
    if index >= count:
        raise DataError(f"process_index {index} must be < process_count {count}")
    if batch_size % count:
        raise DataError(f"batch_size {batch_size} must divide by process_count {count}")
    return index, count


class BatchIterator:
    """Infinite shuffled batches of a ``PackedDataset``, split across processes, with exact save/restore.

    Epoch ``e`` visits the rows in the order ``numpy.random.default_rng((seed, e)).permutation(num_rows)`` (row order
    when ``shuffle=False``), ``batch_size`` rows per global batch. Process ``p`` of ``P`` gets rows
    ``[p * b, (p + 1) * b)`` of each global batch, ``b = batch_size // P``, matching a batch dimension sharded over
    processes in order. With ``drop_remainder`` the incomplete last batch of an epoch is dropped; otherwise it is
    padded with weight-0 rows. ``state()`` / ``restore()`` save and resume the position."""

    def __init__(self, dataset: PackedDataset, batch_size: int, *, seed: int, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1, drop_remainder: bool = True):
        if not isinstance(dataset, PackedDataset):
            raise DataError(f"BatchIterator needs a PackedDataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        if self.batch_size > dataset.num_rows:
            raise DataError(f"batch_size {self.batch_size} exceeds the dataset's {dataset.num_rows} rows "
                            f"({dataset.num_tokens} tokens at seq_len {dataset.seq_len})")
        self.process_index, self.process_count = _check_processes(self.batch_size, process_index, process_count)
        self.local_batch_size = self.batch_size // self.process_count
        self.seed = _check_int(seed, "seed", 0)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        rows = dataset.num_rows
        self.steps_per_epoch = rows // self.batch_size if self.drop_remainder else -(-rows // self.batch_size)
        self.epoch = 0
        self.position = 0  # batches already yielded in this epoch
        self._order_epoch = -1
        self._order = np.empty(0, np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = self.dataset.num_rows
            self._order = (np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = epoch
        return self._order

    def global_rows(self, epoch: int, position: int) -> np.ndarray:
        """Row indices of global batch ``position`` of ``epoch`` (``-1`` for padding rows)."""
        order = self._epoch_order(epoch)
        rows = order[position * self.batch_size:(position + 1) * self.batch_size]
        if rows.size < self.batch_size:
            rows = np.concatenate([rows, np.full(self.batch_size - rows.size, -1, np.int64)])
        return rows

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
        rows = self.global_rows(self.epoch, self.position)
        self.position += 1
        start = self.process_index * self.local_batch_size
        return self.dataset.batch(rows[start:start + self.local_batch_size])

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position: restoring it yields exactly the batches this iterator yields next."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "drop_remainder": self.drop_remainder,
                "num_rows": self.dataset.num_rows, "fingerprint": self.dataset.fingerprint}

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from ``state()``; the process split may differ, the data and global batching may not."""
        if not isinstance(state, dict):
            raise DataError(f"iterator state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("version", "epoch", "position", "seed", "batch_size", "shuffle", "drop_remainder",
                               "fingerprint") if k not in state]
        if missing:
            raise DataError(f"iterator state is missing {missing}")
        if state["version"] != STATE_VERSION:
            raise DataError(f"iterator state version {state['version']!r} is not {STATE_VERSION}")
        if state["fingerprint"] != self.dataset.fingerprint:
            raise DataError(f"iterator state was saved for dataset {str(state['fingerprint'])[:12]}..., this is "
                            f"{self.dataset.fingerprint[:12]}... (different data, tokenizer or seq_len)")
        for key in ("batch_size", "seed", "shuffle", "drop_remainder"):
            if state[key] != getattr(self, key):
                raise DataError(f"iterator state has {key}={state[key]!r}, this iterator {key}="
                                f"{getattr(self, key)!r}")
        epoch = _check_int(state["epoch"], "state['epoch']", 0)
        position = _check_int(state["position"], "state['position']", 0)
        if position > self.steps_per_epoch:
            raise DataError(f"state['position'] {position} exceeds {self.steps_per_epoch} batches per epoch")
        self.epoch, self.position = epoch, position


def eval_batches(dataset: PackedDataset, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every row exactly once, in order, ``batch_size`` rows per global batch (this process's share of each); the
    last batch is padded with weight-0 rows."""
    if not isinstance(dataset, PackedDataset):
        raise DataError(f"eval_batches needs a PackedDataset, got {type(dataset).__name__}")
    batch_size = _check_int(batch_size, "batch_size", 1)
    process_index, process_count = _check_processes(batch_size, process_index, process_count)
    local = batch_size // process_count
    for start in range(0, dataset.num_rows, batch_size):
        rows = np.arange(start, min(start + batch_size, dataset.num_rows))
        rows = np.concatenate([rows, np.full(batch_size - rows.size, -1, np.int64)])
        yield dataset.batch(rows[process_index * local:(process_index + 1) * local])


def num_eval_batches(dataset: PackedDataset, batch_size: int) -> int:
    """How many batches ``eval_batches`` yields."""
    return math.ceil(dataset.num_rows / batch_size)

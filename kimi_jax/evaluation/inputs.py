"""What an evaluation runs on, loaded and tokenized before the (possibly huge) model: the held-out split of
--eval_data (`HeldOut`: scored documents for perplexity and chunk accuracy), the generation prompts (the first ~200
characters of held-out documents) and the GSM8K problems with their few-shot prompts (`GSM8KTask`).

Every prompt row is left-padded to one length, `EvalInputs.prompt_length` (the longest prompt rounded up to
PROMPT_ALIGN), so each generation setting compiles once.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from kimi_jax.errors import UsageError
from kimi_jax.evaluation import generation_quality as gq
from kimi_jax.evaluation import gsm8k
from kimi_jax.evaluation.perplexity import (ScoredDocument, documents_from_records, prefix_token_id,
                                            truncate_documents)
from kimi_jax.evaluation.settings import EvalSettings

DEFAULT_GENERATION_PROMPTS = 8
PROMPT_ALIGN = 64  # generation prompts are left-padded to a multiple of this (one compiled shape per setting)
NO_GENERATION_PROMPTS = "the held-out split gave no generation prompts"


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """The held-out split of --eval_data: its records, identity (recorded in the results) and scored documents."""

    records: list
    identity: dict  # spec, split, source, document_names, fingerprint, num_documents, num_chars, num_tokens
    prefix_id: int  # the token in front of every document (BOS, else EOS), so its first token is scored too
    docs: list[ScoredDocument]  # after --max_eval_tokens
    truncated: bool  # whether --max_eval_tokens cut the split

    @property
    def scored_tokens(self) -> int:
        return int(sum(d.num_scored for d in self.docs))


@dataclasses.dataclass(frozen=True)
class GSM8KTask:
    """The GSM8K problems to score (exemplars never scored), their prompt rows, or why reasoning is skipped."""

    problems: list[dict]
    exemplars: list[dict]
    source: dict | None  # where the problems came from (gsm8k.load_gsm8k's record); None when skipped
    rows: list[list[int]]  # token ids of "k-shot prefix + Question: ...\nAnswer:" per problem
    skip_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class EvalInputs:
    held_out: HeldOut
    generation_prompts: list[str]
    generation_rows: list[list[int]]
    gsm8k: GSM8KTask
    prompt_length: int  # every prompt row is left-padded to this

    def check_vocabulary(self, vocab_size: int) -> None:
        """UsageError when a prompt token does not exist in the model (a tokenizer of another model)."""
        too_big = [t for r in self.generation_rows + self.gsm8k.rows for t in r if t >= vocab_size]
        if too_big:
            raise UsageError(f"token id {too_big[0]} is outside the model's vocabulary ({vocab_size})")


def load_eval_records(spec: str, progress: bool) -> tuple[list, dict]:
    """(records, identity) of the held-out split of --eval_data ('demo' or a path)."""
    from kimi_jax.data import Document, Record, corpus_fingerprint, corpus_source, demo_corpus, load_documents

    if spec == "demo":
        corpus = demo_corpus(progress=progress)
        docs = corpus["validation"]
        records = [Record(text=d.text, source=d.source) for d in docs]
        identity = {"spec": spec, "split": "validation", "source": corpus.source,
                    "document_names": [d.name for d in docs], "fingerprint": corpus_fingerprint(docs)}
    else:
        records = load_documents(spec, split="validation", progress=progress)
        docs = [Document(f"{r.source}#{i}", r.text if r.kind == "text" else json.dumps(
            {"prompt": r.prompt, "response": r.response, "messages": r.messages}, sort_keys=True), r.source or "")
            for i, r in enumerate(records)]
        identity = {"spec": spec, "split": "validation", "source": corpus_source(records), "document_names": None,
                    "fingerprint": corpus_fingerprint(docs)}
    identity["num_documents"] = len(records)
    identity["num_chars"] = sum(len(d.text) for d in docs)
    return records, identity


def record_prompt_text(record) -> str:
    """The text a generation prompt is cut from: a text record's text, a pair's prompt, a chat's first user turn."""
    if record.kind == "text":
        return record.text
    if record.kind == "pair":
        return record.prompt
    users = [m["content"] for m in record.messages if m["role"] == "user"]
    return users[0] if users else record.messages[0]["content"]


def load_held_out(tokenizer, spec: str, max_eval_tokens: int | None, *, progress: bool = False) -> HeldOut:
    """The held-out split of `spec` tokenized into scored documents, cut to `max_eval_tokens` when given."""
    records, identity = load_eval_records(spec, progress)
    prefix_id = prefix_token_id(tokenizer)
    all_docs = documents_from_records(tokenizer, records, prefix_id, progress=progress)
    if not all_docs:
        raise UsageError(f"--eval_data {spec}: the held-out split has no scorable tokens")
    identity["num_tokens"] = int(sum(d.num_scored for d in all_docs))
    docs, truncated = (truncate_documents(tokenizer, all_docs, max_eval_tokens) if max_eval_tokens
                       else (all_docs, False))
    return HeldOut(records=records, identity=identity, prefix_id=prefix_id, docs=list(docs), truncated=truncated)


def load_gsm8k_task(tokenizer, settings: EvalSettings, notice: Callable[[str], None],
                    load: Callable[[], tuple[list[dict], Any]] | None = None) -> GSM8KTask:
    """GSM8K's problems and prompt rows for the settings, or a skipped task (--skip_reasoning, or the data cannot
    be had: a notice says why). `load` -> (items, source) is `gsm8k.load_gsm8k` unless a caller brings its own."""
    if settings.skip_reasoning:
        return GSM8KTask(problems=[], exemplars=[], source=None, rows=[], skip_reason="--skip_reasoning")
    try:
        items, source = (load or gsm8k.load_gsm8k)()
    except gsm8k.GSM8KUnavailable as e:
        reason = f"GSM8K data unavailable: {' '.join(str(e).split())}"
        notice(f"skipping GSM8K: {reason}")
        return GSM8KTask(problems=[], exemplars=[], source=None, rows=[], skip_reason=reason)
    exemplars, problems = gsm8k.split_fewshot(items, settings.num_fewshot, settings.seed, settings.max_samples)
    fewshot = gsm8k.fewshot_prefix(exemplars)
    rows = [tokenizer.encode(fewshot + gsm8k.prompt_for(p["question"])) for p in problems]
    return GSM8KTask(problems=list(problems), exemplars=list(exemplars), source=source, rows=rows)


def padded_prompt_length(rows: list[list[int]]) -> int:
    """The longest row rounded up to PROMPT_ALIGN (PROMPT_ALIGN when there are none)."""
    longest = max([len(r) for r in rows] or [1])
    return -(-longest // PROMPT_ALIGN) * PROMPT_ALIGN


def load_inputs(tokenizer, settings: EvalSettings, notice: Callable[[str], None], *,
                load_gsm8k: Callable[[], tuple[list[dict], Any]] | None = None) -> EvalInputs:
    """The held-out documents, generation prompts and GSM8K task of a run, tokenized with `tokenizer`."""
    held_out = load_held_out(tokenizer, settings.eval_data, settings.max_eval_tokens, progress=settings.progress)
    count = min(DEFAULT_GENERATION_PROMPTS, settings.max_samples or DEFAULT_GENERATION_PROMPTS)
    prompts = gq.prompt_snippets([record_prompt_text(r) for r in held_out.records], count)
    task = load_gsm8k_task(tokenizer, settings, notice, load_gsm8k)
    rows = [tokenizer.encode(p) for p in prompts]
    return EvalInputs(held_out=held_out, generation_prompts=prompts, generation_rows=rows, gsm8k=task,
                      prompt_length=padded_prompt_length(rows + task.rows))


__all__ = ["DEFAULT_GENERATION_PROMPTS", "EvalInputs", "GSM8KTask", "HeldOut", "NO_GENERATION_PROMPTS",
           "PROMPT_ALIGN", "load_eval_records", "load_gsm8k_task", "load_held_out", "load_inputs",
           "padded_prompt_length", "record_prompt_text"]

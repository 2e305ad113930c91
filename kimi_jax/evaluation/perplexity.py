"""Perplexity, bits per byte and teacher-forced token accuracy over held-out documents (RECURSIVE_DESIGN.md §4).

Each document becomes a `ScoredDocument`: the token ids with a *prefix token* in front (the tokenizer's BOS when it
has one, else its EOS: lm-evaluation-harness's ``prefix_token_id`` for ``loglikelihood_rolling``), so that the
document's first token is scored too, and a mask over the targets (target j is ``ids[j + 1]``, predicted from
``ids[:j + 1]``) saying which are scored: every token of a plain-text document; only the response (or assistant)
tokens of a prompt/response (or chat) record.

Documents longer than the window are scored with **rolling windows** (`rolling_windows`): the first window of
``seq_len`` inputs scores its targets 0 .. seq_len-1; every later window scores the next ``stride`` targets and
ends at the last of them, so it starts ``seq_len`` positions earlier and each new target sees between
``seq_len - stride + 1`` and ``seq_len`` tokens of context. Every target is scored exactly once (stride == seq_len
reproduces lm-eval's disjoint windows; a smaller stride gives more context per token at more compute).

Over all scored targets t of all documents (never averaging per-document or per-window values):

    nll_per_token  = sum_t -log p(x_t | context) / N
    perplexity     = exp(nll_per_token)
    bits_per_byte  = sum_t -log p(x_t | context) / (ln 2 * sum of the UTF-8 bytes of the scored text)
    token_accuracy = sum_t 1[argmax p(. | context) == x_t] / N

Their uncertainty: the sums per window (``per_window``: nll_sum, num_tokens, num_correct and the document, one entry
per window in order) and per document (``per_document``: nll_sum, num_tokens, num_correct, num_bytes) are kept, and
each metric gets ``{metric}_stderr`` and ``{metric}_ci95`` from a seeded bootstrap over **windows**
(`window_uncertainty`): each window scores a contiguous block of one document, so this is a block bootstrap with
blocks of ``stride`` tokens (``seq_len`` for the first window of a document). Tokens next to each other are not
independent; blocks of hundreds of tokens nearly are, and there are enough of them for an interval even when the
held-out set is a few long documents (the demo's four plays), where a bootstrap over documents could not give one.
Bits per byte's interval is NLL per token's scaled by the scored tokens per byte (the data's, the same for every
stage). The per-window sums let `kimi_jax.evaluation.verdicts` pair two stages window by window (results from before
they existed pair by document).

A *scorer* maps a batch of windows (``ids [B, T]``, ``targets [B, T]``, right-padded to ``T = seq_len``) to the
per-position NLL and top-1 correctness; `kimi_jax.scoring.make_scorer` is the jitted one for a Kimi-Linear model (the
clean causal forward, without [B, T, V] logits: for a recursive stage, exactly the baseline/commit path, without the sidecar), and tests plug in scorers
with known probabilities. Right padding never changes the scored positions (the model is causal).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Callable, Sequence

import numpy as np

Scorer = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
MAX_EXP_ARGUMENT = 700.0  # exp(> 709) overflows a float64: no perplexity beyond this mean NLL
UNCERTAIN_METRICS = ("perplexity", "nll_per_token", "bits_per_byte", "token_accuracy")  # with *_stderr, *_ci95

__all__ = ["ScoredDocument", "Scorer", "UNCERTAIN_METRICS", "bits_per_byte", "document_from_record",
           "documents_from_records", "window_uncertainty",
           "evaluate_perplexity", "prefix_token_id", "rolling_windows", "tokens_fingerprint",
           "truncate_documents"]


@dataclasses.dataclass(frozen=True)
class ScoredDocument:
    """One held-out document: ``ids`` (int, [n + 1], ``ids[0]`` the prefix token), ``scored`` (bool, [n]: target j
    is ``ids[j + 1]``) and ``num_bytes`` (UTF-8 bytes of the scored text)."""

    ids: np.ndarray
    scored: np.ndarray
    num_bytes: int
    text: str | None = None  # the plain text, for text documents (used when truncating)

    def __post_init__(self):
        ids, scored = np.asarray(self.ids), np.asarray(self.scored, bool)
        if ids.ndim != 1 or ids.size < 2:
            raise ValueError(f"a scored document needs >= 2 ids (the prefix token and one token), got {ids.shape}")
        if scored.shape != (ids.size - 1,):
            raise ValueError(f"scored must have one flag per target ({ids.size - 1}), got {scored.shape}")
        object.__setattr__(self, "ids", ids.astype(np.int64))
        object.__setattr__(self, "scored", scored)

    @property
    def num_targets(self) -> int:
        return int(self.ids.size - 1)

    @property
    def num_scored(self) -> int:
        return int(self.scored.sum())


def prefix_token_id(tokenizer) -> int:
    """lm-eval's rolling-loglikelihood prefix: the BOS when the tokenizer has one, else the EOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"{tokenizer!r} has neither a BOS nor an EOS token to condition the first token on")


def _scored_bytes(tokenizer, ids: Sequence[int], mask: Sequence[bool]) -> int:
    """UTF-8 bytes of the text of the scored runs of ``ids`` (special tokens count 0 bytes)."""
    total, run = 0, []
    for token, scored in list(zip(ids, mask)) + [(None, False)]:
        if scored:
            run.append(token)
        elif run:
            total += len(tokenizer.decode(run, skip_special_tokens=True).encode("utf-8"))
            run = []
    return total


def document_from_record(tokenizer, record, prefix_id: int) -> ScoredDocument | None:
    """A `ScoredDocument` from a `kimi_jax.data.Record` (None when nothing in it is scored).

    text: every token; prompt/response: the response tokens (the prompt is context); messages: the assistant tokens
    of the chat-template rendering (`kimi_jax.data.tokenize_record` with ``chat=True``)."""
    kind = record.kind
    if kind == "text":
        ids = list(tokenizer.encode(record.text))
        if not ids:
            return None
        return ScoredDocument(np.asarray([prefix_id] + ids), np.ones(len(ids), bool),
                              len(record.text.encode("utf-8")), text=record.text)
    if kind == "pair":
        prompt, response = list(tokenizer.encode(record.prompt)), list(tokenizer.encode(record.response))
        if not response:
            return None
        return ScoredDocument(np.asarray([prefix_id] + prompt + response),
                              np.asarray([False] * len(prompt) + [True] * len(response)),
                              len(record.response.encode("utf-8")))
    from kimi_jax.data import tokenize_record

    ids, mask = tokenize_record(tokenizer, record, chat=True)
    if not any(mask):
        return None
    return ScoredDocument(np.asarray([prefix_id] + list(ids)), np.asarray(mask, bool),
                          _scored_bytes(tokenizer, ids, mask))


def documents_from_records(tokenizer, records, prefix_id: int, *, progress: bool = False) -> list[ScoredDocument]:
    from tqdm.auto import tqdm

    docs = []
    for record in tqdm(records, desc="tokenize eval data", unit="doc", disable=not progress):
        doc = document_from_record(tokenizer, record, prefix_id)
        if doc is not None:
            docs.append(doc)
    return docs


def truncate_documents(tokenizer, docs: Sequence[ScoredDocument], max_tokens: int
                       ) -> tuple[list[ScoredDocument], bool]:
    """The documents, in order, holding at most ``max_tokens`` scored targets -> (documents, truncated?).

    Whole documents are kept while they fit. A plain-text document that crosses the budget is cut at a character
    position (and re-tokenized) so that its tokens fit, so its byte count stays exact; any other document that
    crosses it is dropped, as are all documents after it. At least one token is always kept."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    out, used = [], 0
    for doc in docs:
        if used + doc.num_scored <= max_tokens:
            out.append(doc)
            used += doc.num_scored
            continue
        budget = max_tokens - used
        if doc.text is not None and budget > 0:
            cut = _cut_text(tokenizer, doc.text, budget)
            if cut:
                ids = list(tokenizer.encode(cut))
                out.append(ScoredDocument(np.concatenate([doc.ids[:1], np.asarray(ids, np.int64)]),
                                          np.ones(len(ids), bool), len(cut.encode("utf-8")), text=cut))
        return out, True
    return out, False


def _cut_text(tokenizer, text: str, budget: int) -> str:
    """The longest prefix of ``text`` (found by bisection over characters) that tokenizes to <= budget tokens."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(text[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def rolling_windows(num_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """[(start, first, end)]: the window's inputs are ``ids[start:end]`` (<= seq_len of them) and it scores the
    targets ``first .. end-1``. Every target in ``0 .. num_targets-1`` is scored by exactly one window."""
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise ValueError(f"need seq_len >= 1 and 1 <= stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    windows, done = [], 0
    while done < num_targets:
        end = min(num_targets, done + (seq_len if done == 0 else stride))
        start = max(0, end - seq_len)
        windows.append((start, done, end))
        done = end
    return windows


def bits_per_byte(nll_sum: float, num_bytes: int) -> float | None:
    """sum NLL (nats) / (ln 2 * bytes); None without bytes."""
    return None if num_bytes <= 0 else float(nll_sum) / (math.log(2.0) * num_bytes)


def tokens_fingerprint(docs: Sequence[ScoredDocument]) -> str:
    """sha256 over every document's ids and scored mask: equal iff the same tokens are scored the same way."""
    h = hashlib.sha256(b"kimi_jax.evaluation.perplexity/v1")
    for doc in docs:
        h.update(np.asarray([doc.ids.size], "<i8").tobytes())
        h.update(doc.ids.astype("<i8").tobytes())
        h.update(np.packbits(doc.scored).tobytes())
    return h.hexdigest()


def evaluate_perplexity(docs: Sequence[ScoredDocument], scorer: Scorer, *, seq_len: int, stride: int,
                        batch_size: int, pad_id: int = 0, progress: bool = False) -> dict:
    """Score every scored target of ``docs`` once (rolling windows) -> the JSON-ready metrics of the module doc."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    jobs = []  # (doc index, start, first, end) of windows that score something
    for d, doc in enumerate(docs):
        for start, first, end in rolling_windows(doc.num_targets, seq_len, stride):
            if doc.scored[first:end].any():
                jobs.append((d, start, first, end))
    win_nll = np.zeros(len(jobs), np.float64)  # per-window sums: the units of the bootstrap (uncertainty.py)
    win_correct = np.zeros(len(jobs), np.int64)
    win_count = np.zeros(len(jobs), np.int64)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="perplexity", unit="window", disable=not progress)
    for b0 in range(0, len(jobs), batch_size):
        batch = jobs[b0:b0 + batch_size]
        ids = np.full((batch_size, seq_len), pad_id, np.int64)
        targets = np.zeros((batch_size, seq_len), np.int64)
        weights = np.zeros((batch_size, seq_len), bool)
        for row, (d, start, first, end) in enumerate(batch):
            doc = docs[d]
            n = end - start
            ids[row, :n] = doc.ids[start:end]
            targets[row, :n] = doc.ids[start + 1:end + 1]
            weights[row, first - start:n] = doc.scored[first:end]
        nll, hit = scorer(ids, targets)
        nll, hit = np.asarray(nll, np.float64), np.asarray(hit, bool)
        if nll.shape != ids.shape or hit.shape != ids.shape:
            raise ValueError(f"the scorer returned shapes {nll.shape} and {hit.shape}, expected {ids.shape}")
        if not np.all(np.isfinite(nll[weights])):
            raise FloatingPointError("the model produced a non-finite NLL on a scored token")
        for row in range(len(batch)):
            win_nll[b0 + row] = float(nll[row][weights[row]].sum())
            win_correct[b0 + row] = int(hit[row][weights[row]].sum())
            win_count[b0 + row] = int(weights[row].sum())
        bar.update(len(batch))
    bar.close()
    win_doc = np.asarray([job[0] for job in jobs], np.int64)
    by_doc = lambda values: np.bincount(win_doc, weights=values, minlength=len(docs))  # noqa: E731
    doc_nll, doc_correct, doc_count = by_doc(win_nll), by_doc(win_correct), by_doc(win_count)
    doc_bytes = [int(doc.num_bytes) for doc in docs]
    nll_sum, correct, count = float(doc_nll.sum()), int(doc_correct.sum()), int(doc_count.sum())
    num_bytes = sum(doc_bytes)
    mean = nll_sum / count if count else None
    out = {
        "perplexity": None if mean is None or mean > MAX_EXP_ARGUMENT else float(math.exp(mean)),
        "nll_per_token": mean,
        "bits_per_byte": bits_per_byte(nll_sum, num_bytes),
        "token_accuracy": correct / count if count else None,
        "nll_sum": nll_sum,
        "num_tokens": count,
        "num_correct": correct,
        "num_bytes": num_bytes,
        "num_documents": len(docs),
        "num_windows": len(jobs),
        "seq_len": int(seq_len),
        "stride": int(stride),
        "per_document": {"nll_sum": [float(v) for v in doc_nll], "num_tokens": [int(v) for v in doc_count],
                         "num_correct": [int(v) for v in doc_correct], "num_bytes": doc_bytes},
        "per_window": {"nll_sum": [float(v) for v in win_nll], "num_tokens": [int(v) for v in win_count],
                       "num_correct": [int(v) for v in win_correct], "document": [int(d) for d in win_doc]},
        "uncertainty_unit": "window",
    }
    out.update(window_uncertainty(out["per_window"], count / num_bytes if num_bytes else None))
    return out


def window_uncertainty(per_window: dict, tokens_per_byte: float | None) -> dict:
    """The bootstrap over windows (`kimi_jax.evaluation.uncertainty.bootstrap_ratio`) of perplexity, NLL per token and
    token accuracy from the per-window sums, and bits per byte's as NLL per token's times `tokens_per_byte` / ln 2:
    ``{metric}_stderr`` and ``{metric}_ci95`` ([low, high], the `uncertainty.CONFIDENCE` percentile interval), None
    when there are fewer than two windows (or no bytes, for bits per byte) or the perplexity overflows."""
    from kimi_jax.evaluation import uncertainty as u

    nll, tokens, correct = per_window["nll_sum"], per_window["num_tokens"], per_window["num_correct"]
    mean = u.bootstrap_ratio(nll, tokens)
    intervals = {"nll_per_token": mean, "token_accuracy": u.bootstrap_ratio(correct, tokens)}
    intervals["bits_per_byte"] = None if mean is None or not tokens_per_byte else dataclasses.replace(
        mean, **{k: getattr(mean, k) * tokens_per_byte / math.log(2.0) for k in ("value", "stderr", "low", "high")})
    intervals["perplexity"] = (u.bootstrap_ratio(nll, tokens, u.perplexity_transform)
                               if mean is not None and mean.high <= MAX_EXP_ARGUMENT else None)
    out = {}
    for name in UNCERTAIN_METRICS:
        iv = intervals[name]
        out[f"{name}_stderr"] = None if iv is None else iv.stderr
        out[f"{name}_ci95"] = None if iv is None else [iv.low, iv.high]
    return out

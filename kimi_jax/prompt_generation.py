"""Continuations of a list of text prompts: what `python -m experiments.generate` runs.

* `encode_prompts`: the prompts tokenized (wrapped in the tokenizer's chat template when asked); one that is empty
  after tokenization is refused. `check_vocabulary` refuses a token the model does not have (another model's
  tokenizer). `context_notice` says when a prompt plus the new tokens passes the tokenizer's trained context
  (`tokenizer_max_length`): Kimi-Linear has no position embeddings, so that is a warning, not a limit.
* `PromptGenerator`: every batch has one shape (the longest prompt, left-padded; the last batch topped up with
  copies of its last prompt), so the generator (`kimi_jax.recursive.chunked_generation.generate_recursive`: greedy
  decoding without recursion, chunked recursive refinement with it) compiles once for the whole run.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, NamedTuple, Sequence

import numpy as np

from kimi_jax.decoding import left_pad
from kimi_jax.errors import UsageError
from kimi_jax.model import RunOptions

# transformers writes this for "no limit" (tokenization_utils_base.VERY_LARGE_INTEGER).
UNSET_MAX_LENGTH = int(1e30)
TOKENIZER_CONFIG = "tokenizer_config.json"
NOTICE_PROMPTS_SHOWN = 5  # prompt numbers a context notice lists before "..."


def tokenizer_max_length(folder: str) -> int | None:
    """`model_max_length` of the folder's tokenizer_config.json: the context the model was trained for; None when
    the file or the field is missing, or holds transformers' "no limit" value."""
    path = os.path.join(folder, TOKENIZER_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < UNSET_MAX_LENGTH:
        return None
    return value


def context_notice(rows: Sequence[Sequence[int]], max_new_tokens: int, max_length: int | None) -> str | None:
    """A notice when a prompt plus the new tokens exceeds the tokenizer's model_max_length, else None."""
    if max_length is None:
        return None
    over = [i for i, row in enumerate(rows, 1) if len(row) + max_new_tokens > max_length]
    if not over:
        return None
    longest = max(over, key=lambda i: len(rows[i - 1]))
    shown = ", ".join(map(str, over[:NOTICE_PROMPTS_SHOWN])) + (", ..." if len(over) > NOTICE_PROMPTS_SHOWN else "")
    return (f"{len(over)} prompt(s) ({shown}) plus --max_new_tokens {max_new_tokens} exceed the tokenizer's "
            f"model_max_length {max_length} (prompt {longest}: {len(rows[longest - 1])} + {max_new_tokens} tokens); "
            f"the model was not trained on longer contexts, so the continuation may degrade; generating anyway")


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool = False) -> list[list[int]]:
    """Token ids of every prompt (as a user message in the chat template with `chat`); UsageError for a prompt that
    is empty after tokenization (numbered from 1)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) if chat else p for p in prompts]
    rows = [list(tokenizer.encode(t)) for t in texts]
    for i, row in enumerate(rows, 1):
        if not row:
            raise UsageError(f"prompt {i} is empty after tokenization")
    return rows


def check_vocabulary(rows: Sequence[Sequence[int]], vocab_size: int) -> None:
    """UsageError naming the first prompt (from 1) with a token id the model does not have."""
    too_big = [(i, t) for i, row in enumerate(rows, 1) for t in row if t >= vocab_size]
    if too_big:
        raise UsageError(f"prompt {too_big[0][0]}: token id {too_big[0][1]} is outside the model's vocabulary "
                         f"({vocab_size})")


class Generations(NamedTuple):
    samples: list[dict]  # per prompt: prompt, prompt_tokens, tokens (a final EOS included), text (without), num_tokens
    traces: list[list]  # per prompt: its ChunkTraces (empty without recursion)
    seconds: float  # the generator's own time over every batch


class PromptGenerator:
    """Generates token rows in batches of one shape ([batch_size, longest row], max_new_tokens)."""

    def __init__(self, model, sidecar, rcfg, rows: Sequence[Sequence[int]], *, max_new_tokens: int,
                 eos_ids: Sequence[int], pad_id: int, batch_size: int | None = None, diagnostic: bool = False,
                 opts: RunOptions = RunOptions()):
        if not rows:
            raise ValueError("no prompts to generate from")
        self.model, self.sidecar, self.rcfg, self.rows = model, sidecar, rcfg, [list(r) for r in rows]
        self.max_new_tokens, self.eos_ids, self.pad_id, self.opts = max_new_tokens, list(eos_ids), pad_id, opts
        self.diagnostic = bool(diagnostic and rcfg.recursive_enabled)
        self.batch_size = min(batch_size or len(rows), len(rows))
        self.length = max(len(r) for r in rows)
        self.batches = [list(range(s, min(s + self.batch_size, len(rows))))
                        for s in range(0, len(rows), self.batch_size)]

    def run_batch(self, idx: Sequence[int], progress: bool = False):
        """The RecursiveResult of the rows `idx` (at most batch_size; topped up with copies of the last one)."""
        from kimi_jax.recursive.chunked_generation import generate_recursive

        batch_rows = [self.rows[i] for i in idx] + [self.rows[idx[-1]]] * (self.batch_size - len(idx))
        ids_BT, mask_BT = left_pad(batch_rows, self.length, self.pad_id)
        return generate_recursive(self.model, self.sidecar, self.rcfg, ids_BT, self.max_new_tokens,
                                  attention_mask=mask_BT, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                                  diagnostic=self.diagnostic, progress=progress, opts=self.opts)

    def generate(self, prompts: Sequence[str], tokenizer, *, progress: bool = True,
                 on_sample: Callable[[int, dict], None] | None = None) -> Generations:
        """Every prompt's continuation, in order; `on_sample(index, sample)` as each one is ready. One progress bar:
        over prompts when there are several batches, else the recursive generator's own bar over tokens."""
        from tqdm import tqdm

        several = len(self.batches) > 1
        bar = tqdm(total=len(self.rows), desc="generate", unit="prompt", disable=not progress or not several,
                   file=sys.stderr)
        samples, traces, seconds = [], [], 0.0
        for idx in self.batches:
            res = self.run_batch(idx, progress=self.rcfg.recursive_enabled and progress and not several)
            seconds += res.seconds
            for j, i in enumerate(idx):
                n = int(res.num_tokens[j])
                new = [int(t) for t in np.asarray(res.tokens[j, :n])]
                shown = new[:-1] if new and new[-1] in self.eos_ids else new
                sample = {"prompt": prompts[i], "prompt_tokens": [int(t) for t in self.rows[i]], "tokens": new,
                          "text": tokenizer.decode(shown), "num_tokens": n}
                samples.append(sample)
                traces.append(res.traces[j])
                if on_sample is not None:
                    on_sample(i, sample)
            bar.update(len(idx))
        bar.close()
        return Generations(samples, traces, seconds)


__all__ = ["Generations", "PromptGenerator", "UNSET_MAX_LENGTH", "check_vocabulary", "context_notice",
           "encode_prompts", "tokenizer_max_length"]

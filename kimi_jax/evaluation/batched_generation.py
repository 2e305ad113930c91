"""Batched generation of prompt rows with one compiled shape, shared by the generation, reasoning and performance
sections of an evaluation.

Every batch is `[batch_size, prompt_length]` (rows left-padded, the last batch topped up with copies of its last
row) and generates `max_new_tokens`, so the stage's generator (`kimi_jax.recursive.chunked_generation`: greedy
decoding without recursion, chunked recursive refinement with it) compiles once per setting.
"""

from __future__ import annotations

import sys
import time
from typing import NamedTuple, Sequence

import numpy as np

from kimi_jax.decoding import left_pad


class Generated(NamedTuple):
    """One row's generation: its new tokens (up to and including an EOS), their count and its chunk traces."""

    tokens: list[int]
    num_tokens: int
    traces: list  # ChunkTrace per chunk; empty without recursion


def strip_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> tuple[list[int], bool]:
    """(tokens without a final EOS, whether there was one): the text shown is the tokens before the EOS."""
    tokens = list(tokens)
    if tokens and tokens[-1] in eos_ids:
        return tokens[:-1], True
    return tokens, False


class BatchedGenerator:
    """Generates token rows in batches of one shape ([batch_size, prompt_length], max_new_tokens)."""

    def __init__(self, model, eos_ids: Sequence[int], pad_id: int, batch_size: int, prompt_length: int,
                 max_new_tokens: int, opts):
        self.model, self.eos_ids, self.pad_id, self.opts = model, list(eos_ids), int(pad_id), opts
        self.batch_size, self.prompt_length, self.max_new_tokens = batch_size, prompt_length, max_new_tokens

    @classmethod
    def for_stage(cls, loaded, batch_size: int, prompt_length: int, max_new_tokens: int) -> "BatchedGenerator":
        """The generator of a `kimi_jax.evaluation.stage.LoadedStage`."""
        return cls(loaded.model, loaded.eos_ids, loaded.pad_id, batch_size, prompt_length, max_new_tokens,
                   loaded.opts)

    def batch_inputs(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [batch_size, prompt_length], mask bool) of at most batch_size rows, topped up with copies."""
        if not 1 <= len(rows) <= self.batch_size:
            raise ValueError(f"a batch holds 1..{self.batch_size} rows, got {len(rows)}")
        padded = list(rows) + [rows[-1]] * (self.batch_size - len(rows))
        return left_pad(padded, self.prompt_length, self.pad_id)

    def run_batch(self, sidecar, rcfg, rows: Sequence[Sequence[int]], diagnostic: bool = False,
                  max_new_tokens: int | None = None):
        """(RecursiveResult, seconds) of one batch; `sidecar` None with a config without recursion = greedy."""
        from kimi_jax.recursive.chunked_generation import generate_recursive

        ids_BT, mask_BT = self.batch_inputs(rows)
        t0 = time.perf_counter()
        res = generate_recursive(self.model, sidecar, rcfg, ids_BT, max_new_tokens or self.max_new_tokens,
                                 attention_mask=mask_BT, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                                 diagnostic=diagnostic, opts=self.opts)
        return res, time.perf_counter() - t0

    def run_all(self, sidecar, rcfg, rows: Sequence[Sequence[int]], *, diagnostic: bool, desc: str,
                progress: bool) -> list[Generated]:
        """Every row's generation, in order."""
        from tqdm import tqdm

        out = []
        bar = tqdm(total=len(rows), desc=desc, unit="prompt", disable=not progress, file=sys.stderr)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            res, _ = self.run_batch(sidecar, rcfg, batch, diagnostic)
            for j in range(len(batch)):
                n = int(res.num_tokens[j])
                out.append(Generated([int(t) for t in np.asarray(res.tokens[j, :n])], n, res.traces[j]))
            bar.update(len(batch))
        bar.close()
        return out


__all__ = ["BatchedGenerator", "Generated", "strip_eos"]

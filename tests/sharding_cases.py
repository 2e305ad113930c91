"""The model, batch and optimizer shared by the sharding and multi-process tests (and their workers)."""

import numpy as np

from kimi_jax.config import tiny

BATCH, SEQ, LR = 8, 32, 1e-4


def make_config():
    # KDA + MLA + MoE + a dense layer; 8 experts so `expert` can shard them; heads 4, hidden 64.
    return tiny(num_hidden_layers=3, mla_layers=(2,), first_k_dense=1)


def make_batch() -> dict:
    ids = np.random.default_rng(0).integers(0, 512, (BATCH, SEQ + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((BATCH, SEQ), np.float32)}

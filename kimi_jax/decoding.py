"""Greedy generation with static shapes: one jitted prefill + `lax.scan` over decode steps, per-sample done masks.

The model is split once (`nnx.split`) and a pure function of (graphdef, state) is jitted, keyed on the prompt shape
and `max_new_tokens`, so repeated calls with the same shapes never recompile. Prompts of different lengths are
left-padded with an attention mask (KDA zeroes padded inputs, MLA masks padded keys).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimi_jax.model import KimiLinearForCausalLM, RunOptions


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "opts"))
def _greedy(graphdef, state, input_ids_BT, attention_mask_BT, eos_ids_E, pad_id, *, max_new_tokens: int,
            opts: RunOptions):
    model = nnx.merge(graphdef, state)
    B, T = input_ids_BT.shape
    cache = model.init_cache(B, T + max_new_tokens)
    logits_BTV, cache = model(input_ids_BT, cache=cache, attention_mask=attention_mask_BT, opts=opts)
    first_B = jnp.argmax(logits_BTV[:, -1], axis=-1).astype(jnp.int32)

    def is_eos(tok_B):
        return jnp.any(tok_B[:, None] == eos_ids_E[None, :], axis=-1)

    def step(carry, _):
        cache, tok_B, done_B = carry
        logits, cache = model(tok_B[:, None], cache=cache, opts=opts)
        nxt_B = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        nxt_B = jnp.where(done_B, pad_id, nxt_B)
        return (cache, nxt_B, done_B | is_eos(nxt_B)), nxt_B

    done0 = is_eos(first_B)
    _, rest_NB = jax.lax.scan(step, (cache, first_B, done0), None, length=max_new_tokens - 1)
    return jnp.concatenate([first_B[:, None], rest_NB.T], axis=1)


def prepare_inputs(model: KimiLinearForCausalLM, input_ids, max_new_tokens: int, attention_mask, eos_token_id,
                   pad_token_id):
    """Checked generation inputs -> (ids int32 [B, T], mask bool [B, T], eos ids tuple, pad id).

    `eos_token_id` (int or list) defaults to the config's ([] never stops early); the pad id defaults to the
    config's, else the first EOS, else 0.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    cfg = model.config
    eos = cfg.eos_token_ids if eos_token_id is None else (
        (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None
                                                          else (eos[0] if eos else 0))
    mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    return input_ids, mask, eos, pad


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one batch: ids int32 [B, length], each row right-aligned after `pad_id`s, and
    the bool attention mask [B, length] (True on the prompt's tokens) that the generators and scorers take."""
    ids_BT = np.full((len(rows), length), pad_id, np.int32)
    mask_BT = np.zeros((len(rows), length), bool)
    for b, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"a row of {len(row)} tokens does not fit a padded length of {length}")
        if len(row):
            ids_BT[b, length - len(row):] = row
            mask_BT[b, length - len(row):] = True
    return ids_BT, mask_BT


def generate_greedy(model: KimiLinearForCausalLM, input_ids, max_new_tokens: int, *, attention_mask=None,
                    eos_token_id=None, pad_token_id=None, opts: RunOptions = RunOptions()) -> np.ndarray:
    """Returns the new tokens [B, max_new_tokens]; after a sample's EOS the rest is `pad_token_id`.

    `eos_token_id` (int or list) defaults to the config's; pass [] to never stop early.
    """
    input_ids, mask, eos, pad = prepare_inputs(model, input_ids, max_new_tokens, attention_mask, eos_token_id,
                                               pad_token_id)
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    graphdef, state = nnx.split(model)
    out = _greedy(graphdef, state, input_ids, mask, eos_arr, jnp.int32(pad), max_new_tokens=max_new_tokens,
                  opts=opts)
    return np.asarray(out)

"""The causal-LM train step: fp32 cross-entropy, optax update, explicit shardings in and out.

The model is split once into (graphdef, params); the step is a pure function of (params, opt_state, batch), jitted
with in/out shardings from `kimi_jax.sharding`, so parameters and optimizer moments keep their shardings across
steps and the old buffers are donated.

    batch = {"input_ids": int32[B, T], "targets": int32[B, T], "weights": float32[B, T]}  (weight 0 = ignored)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kimi_jax import sharding as shard_lib
from kimi_jax.model import KimiLinearForCausalLM, RunOptions
from kimi_jax.scoring import chunked_cross_entropy

F32 = jnp.float32


def lm_loss(model: KimiLinearForCausalLM, batch: dict, opts: RunOptions):
    h_BTD, _ = model.hidden_states(batch["input_ids"], opts=opts)
    nll, count = chunked_cross_entropy(h_BTD, model.head(), batch["targets"], batch["weights"],
                                       activation_sharding=opts.activation_sharding)
    loss = nll / jnp.maximum(count, 1.0)
    return loss, {"loss": loss, "tokens": count}


def make_optimizer(learning_rate: float = 1e-4, *, warmup_steps: int = 0, total_steps: int | None = None,
                   weight_decay: float = 0.0, clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.95,
                   schedule: str = "cosine") -> optax.GradientTransformation:
    if total_steps and schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 0),
                                                max(total_steps, warmup_steps + 1), end_value=0.1 * learning_rate)
    elif total_steps and schedule == "linear":
        lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
                                   optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1))],
                                  [max(warmup_steps, 1)])
    elif warmup_steps:
        lr = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    else:
        lr = learning_rate
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


@dataclasses.dataclass
class Trainer:
    """Holds the split model, the optimizer and the jitted step with its shardings."""
    graphdef: Any
    tx: optax.GradientTransformation
    step_fn: Callable
    param_shardings: Any
    opt_shardings: Any
    batch_sharding: NamedSharding
    mesh: Mesh | None


def batch_spec(mesh: Mesh, batch_size: int) -> NamedSharding:
    return shard_lib.Resolver(mesh).named(("batch", None), (batch_size, 1), "batch")


# Parameter groups for restricted fine-tuning, by parameter path.
PARAM_GROUPS = ("embeddings", "lm_head", "mixers", "ffn", "routers", "norms")


def param_group(path) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    names = [n for n in names if n not in ("value", "raw_value")]
    key = ".".join(names)
    if names[0] == "embed_tokens":
        return "embeddings"
    if names[0] == "lm_head":
        return "lm_head"
    if key.endswith(("ffn.router", "ffn.correction_bias")):
        return "routers"
    if "norm" in names[-1] or names[-1] == "weight":  # RMSNorm weights, KDA o_norm, MLA latent norms
        return "norms"
    if "mixer" in names:
        return "mixers"
    if "ffn" in names:
        return "ffn"
    raise ValueError(f"parameter {key} belongs to no group of {PARAM_GROUPS}")


def restrict_optimizer(tx: optax.GradientTransformation, params, groups) -> optax.GradientTransformation:
    """`tx` on the parameters of `groups`, exact zeros (no moments kept) elsewhere."""
    unknown = set(groups) - set(PARAM_GROUPS)
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; choose from {PARAM_GROUPS}")
    labels = jax.tree_util.tree_map_with_path(lambda p, _: "train" if param_group(p) in groups else "frozen",
                                              params)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def build_trainer(model: KimiLinearForCausalLM, tx: optax.GradientTransformation, mesh: Mesh, batch_size: int,
                  *, opts: RunOptions = RunOptions(), loss_fn=lm_loss, grad_accum: int = 1,
                  trainable_groups=None) -> tuple[Trainer, Any, Any]:
    """Shard the model and optimizer state over `mesh`; return (trainer, params, opt_state) ready for steps.

    `grad_accum` splits the global batch into that many micro-batches whose gradients are summed (token-weighted,
    so the update equals one step on the whole batch) inside one jitted step. `trainable_groups` (names from
    PARAM_GROUPS) restricts training: other parameters get no gradient (stop_gradient), no update and no moments.
    Works on an abstract model too (from nnx.eval_shape): then params/opt_state are ShapeDtypeStructs carrying
    their shardings, suitable for AOT lowering.
    """
    if grad_accum < 1 or batch_size % grad_accum:
        raise ValueError(f"grad_accum {grad_accum} must be >= 1 and divide the batch size {batch_size}")
    graphdef, params = nnx.split(model)
    train_mask = None
    if trainable_groups is not None:
        tx = restrict_optimizer(tx, params, tuple(trainable_groups))
        train_mask = jax.tree_util.tree_map_with_path(lambda p, _: param_group(p) in trainable_groups, params)
    resolver = shard_lib.Resolver(mesh)
    param_sh = shard_lib.state_shardings(params, mesh, resolver)
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_sh = shard_lib.state_shardings(abstract_opt, mesh, resolver)
    batch_sh = batch_spec(mesh, batch_size)
    replicated = NamedSharding(mesh, P())
    if opts.activation_sharding is None:
        opts = dataclasses.replace(opts, activation_sharding=NamedSharding(mesh, P(batch_sh.spec[0], None, None)))

    def micro_grads(params, micro):
        def loss_of(p):
            if train_mask is not None:
                p = jax.tree.map(lambda x, t: x if t else jax.lax.stop_gradient(x), p, train_mask)
            return loss_fn(nnx.merge(graphdef, p), micro, opts)

        (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        return grads, metrics

    def step(params, opt_state, batch):
        if grad_accum == 1:
            grads, metrics = micro_grads(params, batch)
        else:
            # Sum token-weighted gradients over micro-batches, then divide by all tokens: the same update as one
            # big batch (the loss is a per-token mean).
            micro = jax.tree.map(lambda a: a.reshape(grad_accum, a.shape[0] // grad_accum, *a.shape[1:]), batch)

            def body(acc, mb):
                g, m = micro_grads(params, mb)
                w = m["tokens"]
                acc_g, acc_nll, acc_w = acc
                return (jax.tree.map(lambda a, b: a + b * w, acc_g, g), acc_nll + m["loss"] * w, acc_w + w), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (g_sum, nll, tokens), _ = jax.lax.scan(body, (zeros, jnp.zeros((), F32), jnp.zeros((), F32)), micro)
            denom = jnp.maximum(tokens, 1.0)
            grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), g_sum)
            metrics = {"loss": nll / denom, "tokens": tokens}
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return params, opt_state, metrics

    step_fn = jax.jit(step, in_shardings=(param_sh, opt_sh, batch_sh), out_shardings=(param_sh, opt_sh, replicated),
                      donate_argnums=(0, 1))
    trainer = Trainer(graphdef, tx, step_fn, param_sh, opt_sh, batch_sh, mesh)
    if _is_abstract(params):
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, param_sh)
        opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_opt, opt_sh)
    else:
        params = jax.device_put(params, param_sh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return trainer, params, opt_state


def _is_abstract(tree) -> bool:
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and isinstance(leaves[0], jax.ShapeDtypeStruct)


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Place a host batch (same on every process) on the mesh; see `kimi_jax.distributed` for per-process data."""
    return {k: jax.device_put(jnp.asarray(v), sharding) for k, v in batch.items()}

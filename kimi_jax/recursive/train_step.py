"""The recursive train step, phase A (RECURSIVE_DESIGN.md §3.9): the sidecar trains, the base is frozen.

The base parameters are an input of the step (sharded by `kimi_jax.sharding`, never donated, never differentiated:
the gradient is taken with respect to the sidecar alone and the clean stream is stop-gradiented inside the
objective, so no base gradient is ever formed). The sidecar (~0.1% of the base) is replicated. Its optimizer is
AdamW with the design's per-group learning rates (`optax.multi_transform`): heads at `lr_heads`, everything else
(refine cells, z-mixer, [Z]/[M] embeddings) at `lr_sidecar`; global-norm clipping at 1.0.

    batch = {"input_ids": int32[B, T], "weights": float32[B, T]}   (weights[b, p] scores the target ids[b, p+1])
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
from kimi_jax.recursive.config import RecursiveConfig
from kimi_jax.recursive.objective import recursive_objective
from kimi_jax.recursive.sidecar import Sidecar
from kimi_jax.train_step import batch_spec

HEAD_MODULES = ("halt_head", "length_head")


def sidecar_group(path) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return "heads" if names and names[0] in HEAD_MODULES else "sidecar"


def make_sidecar_optimizer(rcfg: RecursiveConfig, *, warmup_steps: int = 0, total_steps: int | None = None,
                           clip_norm: float = 1.0) -> optax.GradientTransformation:
    def schedule(peak: float):
        if total_steps:
            return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup_steps, 0),
                                                      max(total_steps, warmup_steps + 1), end_value=0.1 * peak)
        return optax.linear_schedule(0.0, peak, warmup_steps) if warmup_steps else peak

    groups = {"sidecar": optax.adamw(schedule(rcfg.lr_sidecar), b1=0.9, b2=0.95, weight_decay=rcfg.weight_decay),
              "heads": optax.adamw(schedule(rcfg.lr_heads), b1=0.9, b2=0.95, weight_decay=rcfg.weight_decay)}
    labels = lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: sidecar_group(path), tree)
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.multi_transform(groups, labels))


@dataclasses.dataclass
class RecursiveTrainer:
    graphdef: Any
    side_graphdef: Any
    tx: optax.GradientTransformation
    step_fn: Callable  # (sidecar, opt_state, base, batch, key, progress) -> (sidecar, opt_state, metrics)
    base_shardings: Any
    side_shardings: Any
    opt_shardings: Any
    batch_sharding: NamedSharding
    mesh: Mesh


def build_recursive_trainer(model: KimiLinearForCausalLM, sidecar: Sidecar, rcfg: RecursiveConfig,
                            tx: optax.GradientTransformation, mesh: Mesh, batch_size: int, *,
                            opts: RunOptions = RunOptions()):
    """Shard base and sidecar over `mesh`; return (trainer, base, sidecar params, opt_state) ready for steps.

    Accepts abstract modules (nnx.eval_shape): the returned arrays are then ShapeDtypeStructs for AOT lowering.
    """
    if rcfg.phase not in (None, "a"):
        raise NotImplementedError(f"recursive phase {rcfg.phase!r}: only phase a (frozen base) is built so far")
    graphdef, base = nnx.split(model)
    side_graphdef, side = nnx.split(sidecar)
    resolver = shard_lib.Resolver(mesh)
    replicated = NamedSharding(mesh, P())
    base_sh = shard_lib.state_shardings(base, mesh, resolver)
    side_sh = jax.tree.map(lambda _: replicated, side)
    abstract_opt = jax.eval_shape(tx.init, side)
    opt_sh = jax.tree.map(lambda _: replicated, abstract_opt)
    batch_sh = batch_spec(mesh, batch_size)
    if opts.activation_sharding is None:
        opts = dataclasses.replace(opts, activation_sharding=NamedSharding(mesh, P(batch_sh.spec[0], None, None)))
    eos = tuple(model.config.eos_token_ids)

    def step(side, opt_state, base, batch, key, progress):
        frozen = nnx.merge(graphdef, jax.lax.stop_gradient(base))

        def loss_of(s):
            return recursive_objective(frozen, nnx.merge(side_graphdef, s), rcfg, batch, key, progress=progress,
                                       opts=opts, eos_ids=eos)

        (_, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(side)
        updates, opt_state = tx.update(grads, opt_state, side)
        side = optax.apply_updates(side, updates)
        metrics = dict(aux["loss"], **aux["stats"], grad_norm=optax.global_norm(grads))
        return side, opt_state, metrics

    step_fn = jax.jit(step, in_shardings=(side_sh, opt_sh, base_sh, batch_sh, replicated, replicated),
                      out_shardings=(side_sh, opt_sh, replicated), donate_argnums=(0, 1))
    trainer = RecursiveTrainer(graphdef, side_graphdef, tx, step_fn, base_sh, side_sh, opt_sh, batch_sh, mesh)
    leaves = jax.tree.leaves(base)
    if leaves and isinstance(leaves[0], jax.ShapeDtypeStruct):
        to_abstract = lambda tree, sh: jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
        return trainer, to_abstract(base, base_sh), to_abstract(side, side_sh), to_abstract(abstract_opt, opt_sh)
    base = jax.device_put(base, base_sh)
    side = jax.device_put(side, side_sh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(side)
    return trainer, base, side, opt_state

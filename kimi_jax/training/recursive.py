"""The recursive train step for the three phases (RECURSIVE_DESIGN.md §3.9).

The step is a pure function of (trainable, opt_state, base, batch, key, progress):
  * `base`: the pretrained base parameters, sharded by `kimi_jax.sharding`, never donated, never updated; in phase C
    they are also the L2-SP anchor theta_0;
  * `trainable`: {"sidecar": the sidecar's parameters (refine cells, z-mixer, [Z]/[M], heads and, from phase B, the
    LoRA adapters of the noisy stream)} plus, in phase C, {"base": the stacked base leaves that hold an unfrozen
    block}, keyed by parameter path.
Phase A: the base is frozen and the clean stream stop-gradiented: the gradient is taken with respect to the sidecar
alone, so no base gradient is ever formed. Phase B: the same, with LoRA (b = 0) on the KDA/MLA projections of the
top third of the layers, active in the noisy stream only (the clean stream and every commit pass stay the base).
Phase C: the chosen blocks (`unfreeze_layers`, the MoE routers excepted) train in both streams with an L2-SP penalty
`l2sp_weight * ||theta - theta_0||^2` towards the pretrained weights; rows of other layers stay bit-identical
(gradients and updates are masked per stacked row).

Optimizer: AdamW per group (`optax.multi_transform`): heads at `lr_heads`, the rest of the sidecar at `lr_sidecar`
(both with `weight_decay`), LoRA at `lora_lr`, unfrozen base blocks at `lr_unfrozen` (no weight decay: L2-SP is their
regulariser); global-norm clipping at 1.0.

    batch = {"input_ids": int32[B, T], "weights": float32[B, T]}   (weights[b, p] scores the target ids[b, p+1])
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kimi_jax import sharding as shard_lib
from kimi_jax.config import KimiLinearConfig
from kimi_jax.layout import plan_segments
from kimi_jax.model import KimiLinearForCausalLM, RunOptions
from kimi_jax.recursive.config import RecursiveConfig
from kimi_jax.recursive.objective import recursive_objective
from kimi_jax.recursive.sidecar import Sidecar
from kimi_jax.training.vanilla import batch_spec
from kimi_jax.tree_paths import path_key, path_names

F32 = jnp.float32
HEAD_MODULES = ("halt_head", "length_head")
FROZEN_IN_PHASE_C = ("ffn.router", "ffn.correction_bias")  # "keep the MoE router frozen"


def _names(path) -> list[str]:
    return path_names(path, drop_wrappers=True)


def param_key(path) -> str:
    return path_key(path, drop_wrappers=True)


def trainable_group(path) -> str:
    """The optimizer group of a leaf of the trainable tree."""
    names = _names(path)
    if names[0] == "base":
        return "base"
    if len(names) > 1 and names[1] in HEAD_MODULES:
        return "heads"
    if len(names) > 1 and names[1] == "lora":
        return "lora"
    return "sidecar"


def make_recursive_optimizer(rcfg: RecursiveConfig, *, warmup_steps: int = 0, total_steps: int | None = None,
                             clip_norm: float = 1.0, lr_scale: float = 1.0) -> optax.GradientTransformation:
    """AdamW per group with warmup + cosine decay to 10% (when total_steps is given); `lr_scale` scales every
    group's learning rate (the trainer's --lr relative to the config)."""
    def schedule(peak: float):
        peak = peak * lr_scale
        if total_steps:
            return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup_steps, 0),
                                                      max(total_steps, warmup_steps + 1), end_value=0.1 * peak)
        return optax.linear_schedule(0.0, peak, warmup_steps) if warmup_steps else peak

    adamw = lambda lr, wd: optax.adamw(schedule(lr), b1=0.9, b2=0.95, weight_decay=wd)
    groups = {"sidecar": adamw(rcfg.lr_sidecar, rcfg.weight_decay), "heads": adamw(rcfg.lr_heads, rcfg.weight_decay),
              "lora": adamw(rcfg.lora_lr, 0.0), "base": adamw(rcfg.lr_unfrozen, 0.0)}
    labels = lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: trainable_group(path), tree)
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.multi_transform(groups, labels))


def unfrozen_rows(cfg: KimiLinearConfig, rcfg: RecursiveConfig, base_state) -> dict[str, np.ndarray]:
    """{base leaf key: bool[repeats] rows to train} for phase C: the stacked block leaves holding an unfrozen layer
    (row r of segment s, position p is layer segment.layer(p, r)); routers and top-level leaves stay frozen."""
    layers = set(rcfg.unfrozen_layer_indices(cfg.mixer_types))
    segments = plan_segments(cfg.layer_kinds)
    rows = {}
    for path, _ in nnx.to_flat_state(base_state):
        names = _names(path)
        key = ".".join(names)
        if names[0] != "segments" or key.endswith(FROZEN_IN_PHASE_C):
            continue
        seg = segments[int(names[1])]
        position = int(names[3])  # segments.{s}.blocks.{p}....
        mask = np.array([seg.layer(position, r) in layers for r in range(seg.repeats)])
        if mask.any():
            rows[key] = mask
    return rows


def _merge_base(base, replacements: dict | None):
    """`base` with the leaves named in `replacements` (keyed by parameter path) swapped in."""
    if not replacements:
        return base
    return jax.tree_util.tree_map_with_path(lambda path, x: replacements.get(param_key(path), x), base)


def _row_mask(mask: np.ndarray, ndim: int):
    return jnp.asarray(mask, F32).reshape((-1,) + (1,) * (ndim - 1))


@dataclasses.dataclass
class RecursiveTrainer:
    graphdef: Any
    side_graphdef: Any
    tx: optax.GradientTransformation
    step_fn: Callable  # (trainable, opt_state, base, batch, key, progress) -> (trainable, opt_state, metrics)
    base_shardings: Any
    trainable_shardings: Any
    opt_shardings: Any
    batch_sharding: NamedSharding
    mesh: Mesh
    rows: dict  # phase C: {base leaf key: rows trained}

    def materialize(self, trainable, base) -> tuple[KimiLinearForCausalLM, Sidecar]:
        """The model (phase-C blocks merged in) and the sidecar as nnx modules, for saving and evaluation."""
        model = nnx.merge(self.graphdef, _merge_base(base, trainable.get("base")))
        return model, nnx.merge(self.side_graphdef, trainable["sidecar"])


def build_recursive_trainer(model: KimiLinearForCausalLM, sidecar: Sidecar, rcfg: RecursiveConfig,
                            tx: optax.GradientTransformation, mesh: Mesh, batch_size: int, *,
                            opts: RunOptions = RunOptions()):
    """Shard base, trainable tree and optimizer over `mesh`; return (trainer, base, trainable, opt_state).

    Accepts abstract modules (nnx.eval_shape): the returned arrays are then ShapeDtypeStructs for AOT lowering.
    """
    phase = rcfg.phase or "a"
    if phase in ("b", "c") and sidecar.lora is None:
        raise ValueError(f"recursive phase {phase}: the sidecar has no LoRA adapters (build it with this config)")
    graphdef, base = nnx.split(model)
    side_graphdef, side = nnx.split(sidecar)
    rows = unfrozen_rows(model.config, rcfg, base) if phase == "c" else {}
    if phase == "c" and not rows:
        raise ValueError("recursive phase c: unfreeze_layers selects no trainable block")
    trainable = {"sidecar": side}
    if rows:
        flat = {param_key(path): x for path, x in jax.tree_util.tree_leaves_with_path(base)}
        trainable["base"] = {k: flat[k] for k in rows}
    resolver = shard_lib.Resolver(mesh)
    replicated = NamedSharding(mesh, P())
    base_sh = shard_lib.state_shardings(base, mesh, resolver)
    train_sh = {"sidecar": jax.tree.map(lambda _: replicated, side)}
    if rows:
        by_key = {param_key(path): sh for path, sh in jax.tree_util.tree_leaves_with_path(base_sh)}
        train_sh["base"] = {k: by_key[k] for k in rows}
    abstract_opt = jax.eval_shape(tx.init, trainable)
    opt_sh = shard_lib.state_shardings(abstract_opt, mesh, resolver) if rows else jax.tree.map(
        lambda _: replicated, abstract_opt)
    batch_sh = batch_spec(mesh, batch_size)
    if opts.activation_sharding is None:
        opts = dataclasses.replace(opts, activation_sharding=NamedSharding(mesh, P(batch_sh.spec[0], None, None)))
    eos = tuple(model.config.eos_token_ids)
    masks = dict(rows)

    def mask_base(tree):
        if "base" not in tree:
            return tree
        return dict(tree, base={k: v * _row_mask(masks[k], v.ndim).astype(v.dtype) for k, v in tree["base"].items()})

    def step(trainable, opt_state, base, batch, key, progress):
        frozen = jax.lax.stop_gradient(base)

        def loss_of(tr):
            m = nnx.merge(graphdef, _merge_base(frozen, tr.get("base")))
            total, aux = recursive_objective(m, nnx.merge(side_graphdef, tr["sidecar"]), rcfg, batch, key,
                                             progress=progress, train_base=phase == "c", opts=opts, eos_ids=eos)
            if phase == "c":
                flat = {param_key(path): x for path, x in jax.tree_util.tree_leaves_with_path(frozen)}
                l2 = sum(jnp.sum(_row_mask(masks[k], v.ndim) * (v.astype(F32) - flat[k].astype(F32)) ** 2)
                         for k, v in tr["base"].items())
                aux["loss"]["l2sp"] = l2
                total = total + rcfg.l2sp_weight * l2
                aux["loss"]["total"] = total
            return total, aux

        (_, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        grads = mask_base(grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, mask_base(updates))
        metrics = dict(aux["loss"], **aux["stats"], grad_norm=optax.global_norm(grads))
        return trainable, opt_state, metrics

    step_fn = jax.jit(step, in_shardings=(train_sh, opt_sh, base_sh, batch_sh, replicated, replicated),
                      out_shardings=(train_sh, opt_sh, replicated), donate_argnums=(0, 1))
    trainer = RecursiveTrainer(graphdef, side_graphdef, tx, step_fn, base_sh, train_sh, opt_sh, batch_sh, mesh, rows)
    leaves = jax.tree.leaves(base)
    if leaves and isinstance(leaves[0], jax.ShapeDtypeStruct):
        to_abstract = lambda tree, sh: jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
        return (trainer, to_abstract(base, base_sh), to_abstract(trainable, train_sh),
                to_abstract(abstract_opt, opt_sh))
    base = jax.device_put(base, base_sh)
    trainable = jax.device_put(trainable, train_sh)
    # A private copy: the step donates its trainable input, and phase C's leaves start as the base's own arrays.
    trainable = jax.tree.map(jnp.copy, trainable)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    return trainer, base, trainable, opt_state


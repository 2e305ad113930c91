"""The recursive stage: the train step for the three phases (RECURSIVE_DESIGN.md §3.9) and `RecursiveTrainer`, its
implementation of the training loop's interface (`kimi_jax.training.trainer`).

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

The trainer keeps `trainable` as state.trainable and the base as state.frozen; the step's `progress` (the curriculum's
position, 0 at the first step) is state.step / num_steps, i.e. (n - 1) / num_steps in step n. Held-out evaluation
scores the clean path (the base, phase-C blocks merged in) and runs the recursive objective with a fixed key at the
end-of-training corruption rate (progress 1).
"""

from __future__ import annotations

import dataclasses
import math
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
from kimi_jax.training.trainer import Trainer, TrainState
from kimi_jax.training.vanilla import COSINE_END_FRACTION, OPT_PREFIX, batch_spec
from kimi_jax.tree_paths import path_key, path_names

F32 = jnp.float32
HEAD_MODULES = ("halt_head", "length_head")
SIDECAR = "sidecar"  # the sidecar's entry in the trainable tree
FROZEN_IN_PHASE_C = ("ffn.router", "ffn.correction_bias")  # "keep the MoE router frozen"
# The objective's loss terms, logged as train/loss/<name> where a step reports them (l2sp: phase c).
LOSS_NAMES = ("total", "final_ce", "masked_ce", "halt", "ponder", "length", "stability", "l2sp")


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


def recursive_schedule(peak: float, *, warmup_steps: int = 0, total_steps: int | None = None):
    """The learning rate per update count (0-based) of a group with peak `peak`: warmup + cosine decay to 10% (when
    total_steps is given), an optax schedule or the constant `peak`."""
    if total_steps:
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup_steps, 0), max(total_steps, warmup_steps + 1),
                                                  end_value=COSINE_END_FRACTION * peak)
    return optax.linear_schedule(0.0, peak, warmup_steps) if warmup_steps else peak


def recursive_lr(peak: float, warmup_steps: int, total_steps: int | None, count: int) -> float:
    """The learning rate of a group with peak `peak` in `make_recursive_optimizer` at update number `count`."""
    lr = recursive_schedule(peak, warmup_steps=warmup_steps, total_steps=total_steps)
    return float(lr(count)) if callable(lr) else float(lr)


def make_recursive_optimizer(rcfg: RecursiveConfig, *, warmup_steps: int = 0, total_steps: int | None = None,
                             clip_norm: float = 1.0, lr_scale: float = 1.0) -> optax.GradientTransformation:
    """AdamW per group with warmup + cosine decay to 10% (when total_steps is given); `lr_scale` scales every
    group's learning rate (the trainer's --lr relative to the config)."""
    def schedule(peak: float):
        return recursive_schedule(peak * lr_scale, warmup_steps=warmup_steps, total_steps=total_steps)

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
class RecursiveStep:
    """The split model and sidecar, the optimizer and the jitted step with its shardings."""
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
        return model, nnx.merge(self.side_graphdef, trainable[SIDECAR])


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
    trainable = {SIDECAR: side}
    if rows:
        flat = {param_key(path): x for path, x in jax.tree_util.tree_leaves_with_path(base)}
        trainable["base"] = {k: flat[k] for k in rows}
    resolver = shard_lib.Resolver(mesh)
    replicated = NamedSharding(mesh, P())
    base_sh = shard_lib.state_shardings(base, mesh, resolver)
    train_sh = {SIDECAR: jax.tree.map(lambda _: replicated, side)}
    if rows:
        by_key = {param_key(path): sh for path, sh in jax.tree_util.tree_leaves_with_path(base_sh)}
        train_sh["base"] = {k: by_key[k] for k in rows}
    abstract_opt = jax.eval_shape(tx.init, trainable)
    # Phase C: the unfrozen blocks' moments are sharded like the blocks, the sidecar's replicated like the sidecar.
    opt_sh = shard_lib.state_shardings(abstract_opt, mesh, resolver, replicated=(SIDECAR,)) if rows else jax.tree.map(
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
            total, aux = recursive_objective(m, nnx.merge(side_graphdef, tr[SIDECAR]), rcfg, batch, key,
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
    trainer = RecursiveStep(graphdef, side_graphdef, tx, step_fn, base_sh, train_sh, opt_sh, batch_sh, mesh, rows)
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



# ------------------------------------------------------------------------------------------------- the trainer
TRAINABLE_PREFIX = "trainable."  # the trainable tree's keys in a checkpoint's train_state/
END_OF_TRAINING = 1.0  # the objective's progress for held-out evaluation: the final corruption rate


class RecursiveTrainer(Trainer):
    """The recursive stage for the training loop (see the module docstring). Checkpoints keep the base (phase-C
    blocks merged in) in params/, the sidecar in sidecar/ with its config, and the optimizer state and the trainable
    tree in train_state/ ("opt.<path>", "trainable.<path>")."""

    stage = "recursive"
    loss_metric = "total"

    def __init__(self, compiled: RecursiveStep, rcfg: RecursiveConfig, *, dtype_name: str, eval_batch_size: int,
                 opts: RunOptions, eos_ids: tuple[int, ...], num_steps: int, warmup_steps: int, lr_scale: float,
                 windows: int, params_source: str | None):
        from kimi_jax.training.trainer import eval_options, held_out_totals, replicated

        self.compiled, self.rcfg, self.sidecar_config = compiled, rcfg, rcfg
        self.phase = rcfg.phase or "a"
        self.dtype_name = dtype_name
        self.mesh, self.batch_sharding = compiled.mesh, compiled.batch_sharding
        self.eval_batch_size = eval_batch_size
        self.eval_sharding = batch_spec(compiled.mesh, eval_batch_size)
        self.num_steps, self.warmup_steps, self.lr_scale, self.windows = num_steps, warmup_steps, lr_scale, windows
        # The base never changes in phases a and b: params/ is hard-linked from the source folder (when it stores
        # these very arrays) or the newest checkpoint instead of written again.
        self.keeps_params = self.phase in ("a", "b")
        self.params_source = params_source if self.keeps_params else None
        opts = eval_options(opts, self.eval_sharding)

        def stats(trainable, base, batch, key):
            model, sidecar = compiled.materialize(trainable, base)
            rec_batch = {"input_ids": batch["input_ids"], "weights": batch["weights"]}
            _, aux = recursive_objective(model, sidecar, rcfg, rec_batch, key, progress=END_OF_TRAINING, opts=opts,
                                         eos_ids=eos_ids)
            return dict(held_out_totals(model, batch, opts), rec_tokens=aux["stats"]["tokens"].astype(F32),
                        total=aux["loss"]["total"], final_ce=aux["loss"]["final_ce"],
                        step_accuracy=aux["stats"]["step_accuracy"])

        self._eval_fn = jax.jit(stats, out_shardings=replicated(compiled.mesh))

    def step(self, state: TrainState, batch, key) -> tuple[TrainState, dict]:
        from kimi_jax import distributed

        placed = distributed.global_batch({"input_ids": batch["input_ids"], "weights": batch["weights"]},
                                          self.batch_sharding)
        progress = np.float32(state.step / self.num_steps)
        trainable, opt_state, metrics = self.compiled.step_fn(state.trainable, state.opt_state, state.frozen, placed,
                                                              key, progress)
        return state.advanced(trainable, opt_state), metrics

    def learning_rate(self, step: int) -> float:
        """The sidecar group's rate (the other groups keep the config's ratios to it)."""
        return recursive_lr(self.rcfg.lr_sidecar * self.lr_scale, self.warmup_steps, self.num_steps, step - 1)

    def materialize(self, state: TrainState):
        return self.compiled.materialize(state.trainable, state.frozen)

    def num_params(self, state: TrainState) -> int:
        return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.frozen)))

    def describe(self) -> str:
        return (f"recursive phase {self.phase} (W {self.rcfg.chunk_width}, K {self.rcfg.max_inner_steps}, "
                f"{self.windows} windows/row)")

    def state_arrays(self, state: TrainState) -> dict:
        from kimi_jax.training.checkpoints import flatten

        return {**flatten(state.opt_state, OPT_PREFIX), **flatten(state.trainable, TRAINABLE_PREFIX)}

    def restore(self, folder: str, like: TrainState, step: int) -> TrainState:
        """The trainable tree and optimizer state from the checkpoint's train_state/; the base stays `like`'s (the
        model the run started from: phases a and b never change it, phase c's changes are the trainable tree)."""
        from kimi_jax.training.checkpoints import abstract_of, restore_trees
        from kimi_jax.training.trainer import release

        likes = {TRAINABLE_PREFIX: abstract_of(like.trainable), OPT_PREFIX: abstract_of(like.opt_state)}
        release((like.trainable, like.opt_state))
        trees = restore_trees(folder, likes)
        return TrainState(trees[TRAINABLE_PREFIX], trees[OPT_PREFIX], like.frozen, step)

    def eval_stats(self, state: TrainState, batch, key) -> dict:
        from kimi_jax import distributed
        from kimi_jax.training.trainer import host_totals

        placed = distributed.global_batch(batch, self.eval_sharding)
        out = jax.device_get(self._eval_fn(state.trainable, state.frozen, placed, key))
        w = float(out["rec_tokens"])  # the objective's own token count weights its per-token means
        return dict(host_totals(out), rec_tokens=w, total=float(out["total"]) * w,
                    final_ce=float(out["final_ce"]) * w,
                    step_accuracy=np.asarray(out["step_accuracy"], np.float64) * w)

    def eval_result(self, sums) -> dict:
        w = max(sums.get("rec_tokens", 0.0), 1.0)
        accuracy = sums.get("step_accuracy")
        return {"loss/total": sums.get("total", 0.0) / w, "final_ce": sums.get("final_ce", 0.0) / w,
                "step_accuracy": (accuracy / w).tolist() if accuracy is not None else [],
                "recursive_tokens": int(sums.get("rec_tokens", 0.0))}

    def stage_train_tags(self, record) -> dict:
        tags = {f"train/loss/{name}": record[name] for name in LOSS_NAMES if name in record}
        tags.update({"train/generation/avg_refine_steps": record.get("expected_steps"),
                     "train/generation/commit_rate": record.get("commit_rate"),
                     "train/generation/avg_chunk_length": record.get("avg_chunk_length")})
        for k, prob in enumerate(record.get("halt_prob") or [], 1):
            tags[f"train/generation/halt_prob/k{k}"] = prob
        return tags

    def stage_eval_tags(self, result) -> dict:
        tags = {"evaluation/loss/total": result["loss/total"], "evaluation/final_ce": result["final_ce"]}
        for k, accuracy in enumerate(result["step_accuracy"], 1):
            tags[f"evaluation/step_accuracy/k{k}"] = accuracy
        return tags


def build_recursive(model: KimiLinearForCausalLM, sidecar: Sidecar, rcfg: RecursiveConfig, mesh: Mesh, *,
                    dtype_name: str, batch_size: int, eval_batch_size: int, seq_len: int, opts: RunOptions,
                    num_steps: int, warmup_steps: int, clip_norm: float = 1.0, lr_scale: float = 1.0,
                    params_source: str | None = None) -> tuple[RecursiveTrainer, TrainState]:
    """The recursive trainer of `model` + `sidecar` (`make_recursive_optimizer`, every group's rate times
    `lr_scale`) and its state at step 0. `params_source`: an orbax folder storing exactly `model`'s parameters (in
    this dtype), hard-linked into the checkpoints of phases a and b."""
    from kimi_jax.recursive.objective import num_windows

    tx = make_recursive_optimizer(rcfg, warmup_steps=warmup_steps, total_steps=num_steps, clip_norm=clip_norm,
                                  lr_scale=lr_scale)
    compiled, base, trainable, opt_state = build_recursive_trainer(model, sidecar, rcfg, tx, mesh, batch_size,
                                                                   opts=opts)
    trainer = RecursiveTrainer(compiled, rcfg, dtype_name=dtype_name, eval_batch_size=eval_batch_size, opts=opts,
                               eos_ids=tuple(model.config.eos_token_ids), num_steps=num_steps,
                               warmup_steps=warmup_steps, lr_scale=lr_scale,
                               windows=num_windows(seq_len, rcfg.chunk_width, model.config.kda_chunk_size),
                               params_source=params_source)
    return trainer, TrainState(trainable, opt_state, base)

"""The vanilla stage: the causal-LM train step (fp32 cross-entropy, optax update, explicit shardings in and out) and
`VanillaTrainer`, its implementation of the training loop's interface (`kimi_jax.training.trainer`).

The model is split once into (graphdef, params); the step is a pure function of (params, opt_state, batch), jitted
with in/out shardings from `kimi_jax.sharding`, so parameters and optimizer moments keep their shardings across
steps and the old buffers are donated.

    batch = {"input_ids": int32[B, T], "targets": int32[B, T], "weights": float32[B, T]}  (weight 0 = ignored)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kimi_jax import sharding as shard_lib
from kimi_jax.model import KimiLinearForCausalLM, RunOptions
from kimi_jax.scoring import chunked_cross_entropy
from kimi_jax.training.trainer import Trainer, TrainState
from kimi_jax.tree_paths import path_names

F32 = jnp.float32
OPT_PREFIX = "opt."  # the optimizer state's keys in a checkpoint's train_state/
COSINE_END_FRACTION = 0.1  # the cosine schedule decays to this fraction of the peak learning rate


def lm_loss(model: KimiLinearForCausalLM, batch: dict, opts: RunOptions):
    h_BTD, _ = model.hidden_states(batch["input_ids"], opts=opts)
    nll, count = chunked_cross_entropy(h_BTD, model.head(), batch["targets"], batch["weights"],
                                       activation_sharding=opts.activation_sharding)
    loss = nll / jnp.maximum(count, 1.0)
    return loss, {"loss": loss, "tokens": count}


def lr_schedule(peak: float, *, warmup_steps: int = 0, total_steps: int | None = None, schedule: str = "cosine"):
    """The learning rate per update count (0-based) of `make_optimizer`: an optax schedule, or the constant `peak`.
    cosine: linear warmup, cosine decay to 10% at `total_steps`; linear: warmup, then linear decay to 0."""
    if total_steps and schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup_steps, 0), max(total_steps, warmup_steps + 1),
                                                  end_value=COSINE_END_FRACTION * peak)
    if total_steps and schedule == "linear":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
                                     optax.linear_schedule(peak, 0.0, max(total_steps - warmup_steps, 1))],
                                    [max(warmup_steps, 1)])
    if warmup_steps:
        return optax.linear_schedule(0.0, peak, warmup_steps)
    return peak


def vanilla_lr(peak: float, warmup_steps: int, total_steps: int | None, schedule: str, count: int) -> float:
    """The learning rate `make_optimizer(peak, warmup_steps=, total_steps=, schedule=)` applies to update number
    `count` (0-based: the first update uses count 0)."""
    lr = lr_schedule(peak, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule)
    return float(lr(count)) if callable(lr) else float(lr)


def make_optimizer(learning_rate: float = 1e-4, *, warmup_steps: int = 0, total_steps: int | None = None,
                   weight_decay: float = 0.0, clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.95,
                   schedule: str = "cosine") -> optax.GradientTransformation:
    lr = lr_schedule(learning_rate, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


@dataclasses.dataclass
class VanillaStep:
    """The split model, the optimizer and the jitted step with its shardings."""
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
    """The group of PARAM_GROUPS a parameter belongs to, by its path (a JAX key path or an nnx flat-state path)."""
    names = path_names(path, drop_wrappers=True)
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
                  trainable_groups=None) -> tuple[VanillaStep, Any, Any]:
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
    trainer = VanillaStep(graphdef, tx, step_fn, param_sh, opt_sh, batch_sh, mesh)
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


# ------------------------------------------------------------------------------------------------- the trainer
class VanillaTrainer(Trainer):
    """The causal-LM stage for the training loop: state.trainable = the model's parameters (the groups outside
    `trainable_groups` get no update), state.frozen = None. Checkpoints keep the parameters in params/ and the
    optimizer state in train_state/ ("opt.<path>")."""

    stage = "vanilla"
    loss_metric = "loss"

    def __init__(self, compiled: VanillaStep, *, dtype_name: str, eval_batch_size: int, opts: RunOptions, lr: float,
                 warmup_steps: int, num_steps: int, schedule: str):
        from kimi_jax.training.trainer import eval_options, held_out_totals, replicated

        self.compiled = compiled
        self.dtype_name = dtype_name
        self.mesh, self.batch_sharding = compiled.mesh, compiled.batch_sharding
        self.eval_batch_size = eval_batch_size
        self.eval_sharding = batch_spec(compiled.mesh, eval_batch_size)
        self.lr, self.warmup_steps, self.num_steps, self.schedule = lr, warmup_steps, num_steps, schedule
        graphdef, opts = compiled.graphdef, eval_options(opts, self.eval_sharding)
        self._eval_fn = jax.jit(lambda params, batch: held_out_totals(nnx.merge(graphdef, params), batch, opts),
                                out_shardings=replicated(compiled.mesh))

    def step(self, state: TrainState, batch, key) -> tuple[TrainState, dict]:
        del key  # the causal-LM step draws no random numbers
        from kimi_jax import distributed

        placed = distributed.global_batch(batch, self.batch_sharding)
        params, opt_state, metrics = self.compiled.step_fn(state.trainable, state.opt_state, placed)
        return state.advanced(params, opt_state), metrics

    def learning_rate(self, step: int) -> float:
        return vanilla_lr(self.lr, self.warmup_steps, self.num_steps, self.schedule, step - 1)

    def materialize(self, state: TrainState):
        return nnx.merge(self.compiled.graphdef, state.trainable), None

    def num_params(self, state: TrainState) -> int:
        return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.trainable)))

    def state_arrays(self, state: TrainState) -> dict:
        from kimi_jax.training.checkpoints import flatten

        return flatten(state.opt_state, OPT_PREFIX)

    def restore(self, folder: str, like: TrainState, step: int) -> TrainState:
        """Parameters from the checkpoint's params/ (a model folder), optimizer state from its train_state/."""
        from kimi_jax import model_folder
        from kimi_jax.training.checkpoints import restore_trees
        from kimi_jax.training.trainer import release

        release((like.trainable, like.opt_state))
        model = model_folder.load_model(folder, jnp.dtype(self.dtype_name), mesh=self.compiled.mesh)
        params = jax.device_put(nnx.split(model)[1], self.compiled.param_shardings)
        del model
        opt_state = restore_trees(folder, {OPT_PREFIX: like.opt_state})[OPT_PREFIX]
        return TrainState(params, opt_state, None, step)

    def eval_stats(self, state: TrainState, batch, key) -> dict:
        del key
        from kimi_jax import distributed
        from kimi_jax.training.trainer import host_totals

        placed = distributed.global_batch(batch, self.eval_sharding)
        return host_totals(jax.device_get(self._eval_fn(state.trainable, placed)))

    def stage_train_tags(self, record) -> dict:
        return {"train/loss/total": record["loss"], "train/loss/final_ce": record["loss"]}


def build_vanilla_trainer(model: KimiLinearForCausalLM, mesh: Mesh, *, dtype_name: str, batch_size: int,
                          eval_batch_size: int, opts: RunOptions, lr: float, warmup_steps: int, num_steps: int,
                          schedule: str = "cosine", weight_decay: float = 0.0, clip_norm: float | None = 1.0,
                          grad_accum: int = 1, trainable_groups=None) -> tuple[VanillaTrainer, TrainState]:
    """The vanilla trainer of `model` on `mesh` (AdamW with `make_optimizer`'s schedule) and its state at step 0.
    `model` may be abstract (nnx.eval_shape): the state is then ShapeDtypeStructs, to `restore` a checkpoint into."""
    tx = make_optimizer(lr, warmup_steps=warmup_steps, total_steps=num_steps, weight_decay=weight_decay,
                        clip_norm=clip_norm, schedule=schedule)
    compiled, params, opt_state = build_trainer(model, tx, mesh, batch_size, opts=opts, grad_accum=grad_accum,
                                                trainable_groups=trainable_groups)
    trainer = VanillaTrainer(compiled, dtype_name=dtype_name, eval_batch_size=eval_batch_size, opts=opts, lr=lr,
                             warmup_steps=warmup_steps, num_steps=num_steps, schedule=schedule)
    return trainer, TrainState(params, opt_state)

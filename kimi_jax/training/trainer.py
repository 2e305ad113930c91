"""The trainer interface: one train-state pytree, and what a training stage does with it.

The training loop (`kimi_jax.training.loop.train`) knows no stage: it steps, evaluates, logs and saves through the
methods of a `Trainer`. Two implement them: `kimi_jax.training.vanilla.VanillaTrainer` (the causal-LM cross-entropy,
every parameter group or some) and `kimi_jax.training.recursive.RecursiveTrainer` (the recursive-refinement sidecar,
phases a/b/c).

A `TrainState` holds a run's arrays between steps:

    trainable   what the optimizer updates (vanilla: the model's parameters; recursive: {"sidecar": ...} and in
                phase c {"base": the stacked leaves of the unfrozen blocks})
    opt_state   the optimizer's state
    frozen      what the step reads and never changes (recursive: the base parameters; vanilla: None)
    step        optimizer steps taken so far (static metadata, not a leaf)

A trainer's methods (see `Trainer`): `step(state, batch, key) -> (state, metrics)`; `materialize(state) -> (model,
sidecar or None)`; `state_arrays(state)` (the arrays of a checkpoint's train_state/ besides the RNG) and
`restore(folder, like, step)`; `keeps_params` / `params_source` (whether params/ may be hard-linked instead of
written: the base of recursive phases a and b never changes); `eval_stats(state, batch, key)` (additive held-out sums
of one batch) and `eval_result(sums)`; `loss_metric`; `train_tags(record)` / `eval_tags(result)` (TensorBoard);
`learning_rate(step)`; `num_params(state)` and `describe()` for the logs.

Held-out perplexity and token accuracy come from `held_out_totals`, the project's one blocked scorer
(`kimi_jax.scoring`): no [B, T, V] logits.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

# The additive totals every held-out batch gives (`held_out_totals`), summed over the batches of an evaluation.
LM_TOTALS = ("nll", "tokens", "correct")


@functools.partial(jax.tree_util.register_dataclass, data_fields=("trainable", "opt_state", "frozen"),
                   meta_fields=("step",))
@dataclasses.dataclass(frozen=True)
class TrainState:
    """A run's arrays between steps (see the module docstring); `step` is the number of optimizer steps taken."""
    trainable: Any
    opt_state: Any
    frozen: Any = None
    step: int = 0

    def advanced(self, trainable, opt_state) -> TrainState:
        """The state after one more optimizer step."""
        return dataclasses.replace(self, trainable=trainable, opt_state=opt_state, step=self.step + 1)


def eval_options(opts, eval_sharding: NamedSharding):
    """`opts` for held-out batches laid out by `eval_sharding`: no rematerialisation (no backward pass), activations
    split over the batch like the rows."""
    activations = NamedSharding(eval_sharding.mesh, P(eval_sharding.spec[0], None, None))
    return dataclasses.replace(opts, remat=False, activation_sharding=activations)


def held_out_totals(model, batch: Mapping[str, Any], opts) -> dict:
    """{"nll", "tokens", "correct"}: the weighted NLL sum, weight sum and argmax-hit count of a held-out batch
    {"input_ids", "targets", "weights"} [B, T] under `model`'s clean causal forward (traceable)."""
    from kimi_jax.scoring import model_token_scores, weighted_totals

    nll_BT, correct_BT = model_token_scores(model, batch["input_ids"], batch["targets"], opts=opts)
    return weighted_totals(nll_BT, correct_BT, batch["weights"])


def host_totals(out: Mapping[str, Any]) -> dict[str, float]:
    """The LM_TOTALS of a device result as Python floats."""
    return {k: float(out[k]) for k in LM_TOTALS}


class Trainer(abc.ABC):
    """What the training loop needs of a stage. Attributes:

    stage           "vanilla" | "recursive" (the checkpoint's training.stage and the progress bar's label)
    phase           the recursive phase, None for vanilla
    loss_metric     the step metric that is its loss (logged as the record's "loss")
    mesh            the device mesh of every array
    batch_sharding  the layout of a global training batch
    eval_sharding   the layout of a global held-out batch of `eval_batch_size` rows
    sidecar_config  the RecursiveConfig saved with the sidecar, None without one
    keeps_params    the model's parameters never change (the checkpoints' params/ may be hard-linked)
    params_source   an orbax model folder whose params/ hold exactly the model's parameters, or None
    dtype_name      the parameter dtype, as kimi_jax.json records it
    """

    stage: str
    phase: str | None = None
    loss_metric: str
    mesh: Any
    batch_sharding: NamedSharding
    eval_sharding: NamedSharding
    eval_batch_size: int
    sidecar_config: Any = None
    keeps_params: bool = False
    params_source: str | None = None
    dtype_name: str

    # ------------------------------------------------------------------------------------------- stepping
    @abc.abstractmethod
    def step(self, state: TrainState, batch: Mapping[str, np.ndarray], key) -> tuple[TrainState, dict]:
        """One optimizer step on this process's rows `batch` of the global batch, with the step's RNG `key`
        (fold_in(train key, step number)); -> (the next state, the step's metrics as device arrays)."""

    @abc.abstractmethod
    def learning_rate(self, step: int) -> float:
        """The learning rate the optimizer applies in step `step` (1-based), as logged."""

    # ------------------------------------------------------------------------------------------- modules
    @abc.abstractmethod
    def materialize(self, state: TrainState) -> tuple[Any, Any]:
        """(model, sidecar or None) as nnx modules over the state's arrays: what a checkpoint saves."""

    @abc.abstractmethod
    def num_params(self, state: TrainState) -> int:
        """Parameters of the model (the base for the recursive stage)."""

    def describe(self) -> str:
        """The stage in the run's first log line."""
        return self.stage

    # ------------------------------------------------------------------------------------------- checkpoints
    @abc.abstractmethod
    def state_arrays(self, state: TrainState) -> dict[str, Any]:
        """{key: array} of a checkpoint's train_state/ (the optimizer state, "opt.<path>"; a trainable tree not in
        params/, "trainable.<path>"); the loop adds the RNG key."""

    @abc.abstractmethod
    def restore(self, folder: str, like: TrainState, step: int) -> TrainState:
        """The state saved in checkpoint `folder` (written at `step`), placed like `like`'s arrays (which may be
        abstract, or the fresh state, whose optimizer and trainable arrays are then released first)."""

    # ------------------------------------------------------------------------------------------- evaluation
    @abc.abstractmethod
    def eval_stats(self, state: TrainState, batch: Mapping[str, np.ndarray], key) -> dict[str, Any]:
        """Additive held-out sums of this process's rows `batch` of a global held-out batch (host floats or numpy
        arrays): LM_TOTALS and whatever `eval_result` turns into its fields. `key`: a fixed key per batch."""

    def eval_result(self, sums: Mapping[str, Any]) -> dict[str, Any]:
        """Fields of an evaluation record beyond perplexity and token accuracy, from the summed `eval_stats`."""
        return {}

    # ------------------------------------------------------------------------------------------- logs
    def train_tags(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """{TensorBoard tag: value} of a train record."""
        return {"train/lr": record["lr"], "train/grad_norm": record.get("grad_norm"),
                "train/performance/tokens_per_sec": record["tokens_per_sec"],
                "train/performance/steps_per_sec": record["steps_per_sec"],
                "train/performance/memory_mb": record["memory_mb"], **self.stage_train_tags(record)}

    @abc.abstractmethod
    def stage_train_tags(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The stage's own tags of a train record (its losses, its generation statistics)."""

    def eval_tags(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """{TensorBoard tag: value} of an evaluation record."""
        return {"evaluation/perplexity": result["perplexity"], "evaluation/token_accuracy": result["token_accuracy"],
                **self.stage_eval_tags(result)}

    def stage_eval_tags(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """The stage's own tags of an evaluation record."""
        return {}


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def release(tree) -> None:
    """Free the device buffers of every jax.Array in `tree` now (before a same-sized restore)."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


__all__ = ["LM_TOTALS", "TrainState", "Trainer", "eval_options", "held_out_totals", "host_totals", "release",
           "replicated"]

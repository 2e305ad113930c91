"""Training: the trainer interface, the two stages' trainers, the training loop, checkpoints and logs.

* :mod:`kimi_jax.training.trainer`: `TrainState` (trainable, optimizer state, frozen arrays, step) and the `Trainer`
  interface the loop runs (step, materialise, checkpoint arrays, held-out statistics, log tags, learning rate).
* :mod:`kimi_jax.training.vanilla` / :mod:`kimi_jax.training.recursive`: the causal-LM and the recursive-refinement
  train steps and their trainers.
* :mod:`kimi_jax.training.loop`: `train`, the loop as a library function (steps, evaluation, checkpoints, logs,
  SIGINT / SIGTERM, non-finite stops, resume).
* :mod:`kimi_jax.training.run`: a run from its options (`TrainOptions`): settings checks, the output folder's lock,
  the resume decision, data, model and trainer; `python -m experiments.train` is its command line.
* :mod:`kimi_jax.training.checkpoints`: every `step_N` folder is a complete model folder (loadable by
  `experiments.generate` / `kimi_jax.model_folder.load_model` / `kimi_jax.recursive.io`) plus the optimizer, data
  iterator, RNG and trainable state needed to resume exactly; written asynchronously and atomically.
* :mod:`kimi_jax.training.logging`: the per-step JSONL log, TensorBoard scalars (tensorboardX) and the memory figure.
"""

from kimi_jax.training.checkpoints import (CheckpointSaveError, CheckpointWriter, TrainCheckpointError,
                                           TrainWriteError, latest_checkpoint, list_checkpoints)
from kimi_jax.training.logging import LogWriteError, MetricsLog

__all__ = ["CheckpointSaveError", "CheckpointWriter", "LogWriteError", "MetricsLog", "TrainCheckpointError",
           "TrainWriteError", "latest_checkpoint", "list_checkpoints"]

"""Training support for `python -m experiments.train`: checkpoint folders with the full training state, and logs.

* :mod:`kimi_jax.training.checkpoints`: every `step_N` folder is a complete model folder (loadable by
  `experiments.generate` / `kimi_jax.orbax_model.load_model` / `kimi_jax.recursive.io`) plus the optimizer, data
  iterator, RNG and trainable state needed to resume exactly; written asynchronously and atomically.
* :mod:`kimi_jax.training.logging`: the per-step JSONL log, TensorBoard scalars (tensorboardX) and a reader for the
  event files, memory and learning-rate helpers.
"""

from kimi_jax.training.checkpoints import (CheckpointSaveError, CheckpointWriter, TrainCheckpointError,
                                           TrainWriteError, latest_checkpoint, list_checkpoints)
from kimi_jax.training.logging import LogWriteError, MetricsLog

__all__ = ["CheckpointSaveError", "CheckpointWriter", "LogWriteError", "MetricsLog", "TrainCheckpointError",
           "TrainWriteError", "latest_checkpoint", "list_checkpoints"]

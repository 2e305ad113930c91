"""Multi-process (multi-host) support: start JAX's distributed runtime from the environment, feed data per process.

Launch the same command on every host. `maybe_initialize()` then calls `jax.distributed.initialize()` when the
environment says this is one process of several:
  * TPU pods: JAX detects the slice itself (TPU_WORKER_HOSTNAMES / the metadata server); nothing to set;
  * SLURM: `srun` sets SLURM_NTASKS / SLURM_PROCID and JAX's SLURM cluster detection does the rest;
  * anything else (GPU nodes, local tests): JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i
    (optionally JAX_LOCAL_DEVICE_IDS=0,1,...).
A single process with none of these set is left alone.
"""

from __future__ import annotations

import os

import jax
import numpy as np


def _env_says_multiprocess() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS"):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return True
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        return True
    return False


def maybe_initialize() -> bool:
    """Initialise the distributed runtime if the environment describes several processes. Returns True if it did."""
    if not _env_says_multiprocess() or jax.distributed.is_initialized():
        return False
    address = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS")
    if address and "JAX_NUM_PROCESSES" in os.environ:
        local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=address, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            local_device_ids=[int(x) for x in local.split(",")] if local else None)
    else:
        jax.distributed.initialize()  # TPU pod or SLURM: JAX's cluster auto-detection
    return True


def is_main_process() -> bool:
    """Only process 0 writes logs, reports and non-orbax files."""
    return jax.process_index() == 0


def local_batch_slice(global_batch_size: int) -> slice:
    """The rows of the global batch this process loads (contiguous, equal shares)."""
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"--batch_size {global_batch_size} is not divisible by the {n} processes")
    per = global_batch_size // n
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Assemble this process's rows into global arrays laid out by `sharding` (every process calls this)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}

"""kimi_jax's orbax checkpoint format for model parameters, with streaming writes.

A converted model folder holds:
    config.json            the HF config (kimi_jax reads it with KimiLinearConfig)
    kimi_jax.json          {"format", "dtype", "num_params", "source", "source_layout"}
    params/                an orbax PyTree checkpoint: {"segments.1.blocks.0.mixer.qkv_proj": array, ...}
    tokenizer files        copied from the HF folder when present

Keys are the model's NNX state paths joined by dots, so plain orbax restores the folder too. Parameters stacked over
a scanned segment's repeats are written one repeat at a time, with on-disk chunks of one repeat, from `LazyParam`s:
the writer holds one layer's tensor in memory at a time, never the whole checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from orbax.checkpoint import type_handlers as orbax_type_handlers
from orbax.checkpoint._src.futures import future as orbax_future
from orbax.checkpoint._src.serialization import type_handlers as orbax_serialization

from kimi_jax.config import KimiLinearConfig, read_json_object
from kimi_jax.model import KimiLinearForCausalLM
from kimi_jax.orbax_failures import orbax_reading, read_array_metadata, storage_os_error
from kimi_jax.errors import KimiJaxError
from kimi_jax.tree_paths import path_key

FORMAT = "kimi_jax.params.v1"
PARAMS_DIR = "params"
META_FILE = "kimi_jax.json"


class CheckpointFormatError(KimiJaxError, ValueError):
    """A folder that is not a readable kimi_jax orbax checkpoint."""


def param_key(path) -> str:
    """The stored key of a model parameter (its dotted NNX path)."""
    return path_key(path)


class LazyParam:
    """A parameter written block by block: `blocks()` yields (index along axis 0 or None for all, array)."""

    def __init__(self, shape, dtype, blocks: Callable[[], Iterator[tuple[int | None, np.ndarray]]],
                 stacked: bool):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape, dtype=np.int64))
        self.blocks, self.stacked = blocks, stacked


_CANCEL = threading.Event()  # set when a save is abandoned (Ctrl-C, error): the writer stops at the next block
_IN_FLIGHT: list = []  # the writer futures of the current save, waited for when it is abandoned


# Streaming writes (LazyParam): chunk size on disk, and how much assembled data may wait for tensorstore.
CHUNK_BYTES = 64 << 20
WRITE_AHEAD_BYTES = 512 << 20


class SaveCancelled(Exception):
    pass


_SAVING = threading.Event()  # set while save_params runs (and unwinds a failed save)


class _DropCancelledWrites(logging.Filter):
    """orbax's commit threads log the exception that stopped them, and save_params re-raises it to its caller. After
    a deliberate cancel the record is just noise; so is one for a failed write of the storage during a save (a full
    disk: tensorstore's message with its spec dump, twice, ~100 lines), which the caller reports in one line. Any
    other failure is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        from kimi_jax.safe_io import storage_error

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, SaveCancelled):
            return False
        if _SAVING.is_set() and exc is not None and storage_error(exc):
            return False
        return "checkpoint write cancelled" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropCancelledWrites())


class _LazyParamHandler(orbax_serialization.NumpyHandler):
    """Writes LazyParams one block at a time; the on-disk format is NumpyHandler's (restores as a plain array)."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        writer = orbax_future.CommitFutureAwaitingContractedSignals(self._write(values, infos, args),
                                                                    name="kimi_jax_lazy_param")
        _IN_FLIGHT.append(writer)
        return [writer]

    async def _write(self, values, infos, args):
        # Blocks are assembled here (numpy, this thread) while tensorstore copies, compresses and writes earlier
        # ones on its own threads. Assembled-but-unwritten blocks are capped at WRITE_AHEAD_BYTES (a block larger
        # than that waits for every earlier write first), so peak memory stays within the largest block plus the
        # cap; chunks of at most CHUNK_BYTES let tensorstore compress one block on several cores.
        pending: collections.deque = collections.deque()  # (write future, bytes), oldest first
        pending_bytes = 0
        try:
            for value, info, arg in zip(values, infos, args):
                await info.await_path_creation()
                block_shape = (1,) + value.shape[1:] if value.stacked else value.shape
                if arg.chunk_byte_size is None:
                    arg = dataclasses.replace(arg, chunk_byte_size=CHUNK_BYTES)
                spec = orbax_serialization.ts_utils.build_array_write_spec(
                    info=info, arg=arg, global_shape=value.shape, local_shape=block_shape, dtype=value.dtype,
                    use_ocdbt=info.is_ocdbt_checkpoint,
                    process_index=orbax_serialization.ocdbt_utils.get_process_index_for_subdir(
                        use_ocdbt=info.is_ocdbt_checkpoint, override_ocdbt_process_id=None),
                    metadata_key=None)
                if orbax_serialization.multihost.process_index() != 0:
                    continue
                store = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
                block_bytes = int(np.prod(block_shape, dtype=np.int64)) * value.dtype.itemsize
                blocks = value.blocks()
                while True:
                    while pending and pending_bytes + block_bytes > WRITE_AHEAD_BYTES:
                        future, nbytes = pending.popleft()
                        await future
                        pending_bytes -= nbytes
                    if _CANCEL.is_set():
                        raise SaveCancelled("checkpoint write cancelled")
                    try:
                        index, block = next(blocks)
                    except StopIteration:
                        break
                    block = np.asarray(block, value.dtype)
                    pending.append(((store if index is None else store[index]).write(block), block_bytes))
                    pending_bytes += block_bytes
            while pending:
                await pending.popleft()[0]
        finally:  # on an error or a cancel, let the writes already handed to tensorstore finish first
            for future, _ in pending:
                try:
                    await future
                except BaseException:
                    pass


def _register_handler():
    # Same typestr as numpy arrays on purpose (restores without kimi_jax); silence orbax's note about it.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        orbax_type_handlers.register_type_handler(LazyParam, _LazyParamHandler(), override=True)
    finally:
        absl_logger.setLevel(level)


_register_handler()


# ------------------------------------------------------------------ write
def save_params(directory: str, params: Mapping[str, np.ndarray | LazyParam]) -> None:
    """Write an orbax PyTree checkpoint of {key: array}; `directory` must not exist yet.

    If the save is interrupted (Ctrl-C) or fails, orbax's background writer is told to stop and waited for before
    the exception propagates, so the caller can delete the partial folder without racing a live writer. A failed
    write of the storage (a full disk, a quota) is raised as the OSError tensorstore reports, naming `directory`, and
    orbax's log records of it are dropped (the caller reports it).
    """
    checkpointer = ocp.PyTreeCheckpointer()
    _CANCEL.clear()
    _IN_FLIGHT.clear()
    _SAVING.set()
    threads_before = set(threading.enumerate())
    try:
        checkpointer.save(os.path.abspath(directory), dict(params))
    except BaseException as e:
        _CANCEL.set()
        for writer in _IN_FLIGHT:
            try:
                writer.result(timeout=600)
            except BaseException:
                pass
        try:
            checkpointer.close()
        except BaseException:
            pass
        for thread in set(threading.enumerate()) - threads_before:  # orbax's commit/metadata threads
            if thread is not threading.current_thread() and thread.is_alive():
                try:
                    thread.join(timeout=600)
                except BaseException:  # orbax's threads re-raise their failure from join()
                    pass
        failed_write = storage_os_error(e, directory)
        if failed_write is not None:
            raise failed_write from e
        raise
    finally:
        _CANCEL.clear()
        _IN_FLIGHT.clear()
        _SAVING.clear()


def write_meta(folder: str, **fields) -> None:
    from kimi_jax.safe_io import write_json_atomic

    write_json_atomic(os.path.join(folder, META_FILE), {"format": FORMAT, **fields})


def model_param_arrays(model: KimiLinearForCausalLM) -> dict[str, jax.Array]:
    return {param_key(path): var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_model(folder: str, model: KimiLinearForCausalLM, **meta) -> None:
    """Write a live model as a kimi_jax checkpoint folder (config.json, kimi_jax.json, params/).

    Sharded jax.Arrays are handed to orbax as they are, so with several processes every process calls this and
    each writes its own shards; the JSON files are written by process 0.
    """
    arrays = model_param_arrays(model)
    main = jax.process_index() == 0
    if main:
        from kimi_jax.safe_io import write_json_atomic

        os.makedirs(folder, exist_ok=True)
        write_json_atomic(os.path.join(folder, "config.json"), model.config.to_hf_dict())
    save_params(os.path.join(folder, PARAMS_DIR), arrays)
    if main:
        write_meta(folder, dtype=str(model.dtype), num_params=int(sum(a.size for a in arrays.values())), **meta)


# ------------------------------------------------------------------ read
def is_checkpoint(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, PARAMS_DIR)) and os.path.exists(os.path.join(folder, META_FILE))


def read_meta(folder: str) -> dict:
    path = os.path.join(folder, META_FILE)
    meta = read_json_object(path, CheckpointFormatError,
                            missing=f"{folder}: not a kimi_jax checkpoint ({META_FILE} is missing)")
    if meta.get("format") != FORMAT:
        raise CheckpointFormatError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def restore_arrays(folder: str, targets: Mapping[str, jax.ShapeDtypeStruct], *, directory: str | None = None,
                   error: type[Exception] = CheckpointFormatError) -> dict[str, np.ndarray | jax.Array]:
    """Restore the keys of `targets` from an orbax PyTree folder of a checkpoint: `directory`, by default the model's
    `folder`/params/ (a training checkpoint's train_state/ holds its optimizer state). A partial restore: memory is
    what the targets need. Arrays come back as numpy, or as jax.Arrays placed by the target's sharding when it has
    one; dtypes are cast to the targets'. A key that is not stored, or stored with another shape, is an `error`
    naming the folder and the key, found from the metadata before any array is read."""
    directory = os.path.abspath(directory or os.path.join(folder, PARAMS_DIR))
    if not os.path.isdir(directory):
        raise error(f"{folder}: not a complete kimi_jax checkpoint ({os.path.basename(directory)}/ is missing)")
    stored = read_array_metadata(directory, error)
    missing = sorted(set(targets) - set(stored))
    if missing:
        raise error(f"{directory}: '{missing[0]}' is missing ({len(missing)} of {len(targets)} arrays)")
    for key, t in targets.items():
        if tuple(stored[key].shape) != tuple(t.shape):
            raise error(f"{directory}: '{key}' has shape {tuple(stored[key].shape)}, expected {tuple(t.shape)}")
    restore_args, item = {}, {}
    for key, t in targets.items():
        sharding = getattr(t, "sharding", None)
        if sharding is not None:
            restore_args[key] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=t.shape, dtype=t.dtype)
            item[key] = t
        else:
            restore_args[key] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype)
            item[key] = np.zeros((), t.dtype)
    with orbax_reading(directory, error):
        return ocp.PyTreeCheckpointer().restore(
            directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))


def stored_arrays(folder: str) -> dict[str, jax.ShapeDtypeStruct]:
    """{key: shape and stored dtype} of every array in the checkpoint, from its metadata (no array is read)."""
    directory = os.path.abspath(os.path.join(folder, PARAMS_DIR))
    if not os.path.isdir(directory):
        raise CheckpointFormatError(f"{folder}: not a kimi_jax checkpoint ({PARAMS_DIR}/ is missing)")
    return read_array_metadata(directory, CheckpointFormatError)


def _match_stored(folder: str, expected: Mapping[str, tuple]) -> dict[str, jax.ShapeDtypeStruct]:
    """The stored arrays of `folder`, checked against `expected` ({key: shape}) from the metadata alone, so a
    checkpoint that does not fit is refused before any array is read."""
    stored = stored_arrays(folder)
    missing = sorted(set(expected) - set(stored))
    unknown = sorted(set(stored) - set(expected))
    if missing or unknown:
        raise CheckpointFormatError(f"{folder}: checkpoint does not match config.json: missing {missing[:3]}, "
                                    f"unexpected {unknown[:3]}")
    for key, shape in expected.items():
        if tuple(stored[key].shape) != tuple(shape):
            raise CheckpointFormatError(f"{folder}: parameter '{key}' has shape {tuple(stored[key].shape)}, but "
                                        f"config.json implies {tuple(shape)}")
    return stored


def check_stored_params(folder: str, cfg: KimiLinearConfig | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Check a kimi_jax checkpoint folder against its config.json (or `cfg`) without reading any array: readable
    metadata, every parameter present with its shape, nothing else. Returns the stored arrays' shapes and dtypes."""
    cfg = cfg or KimiLinearConfig.from_pretrained(folder)
    abstract = nnx.eval_shape(lambda: KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(0)))
    expected = {param_key(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    return _match_stored(folder, expected)


def _unwrap(x):
    return x.get_value() if isinstance(x, nnx.Variable) else x


def load_model(folder: str, dtype=None, *, shardings: Mapping[str, jax.sharding.Sharding] | None = None,
               mesh: jax.sharding.Mesh | None = None) -> KimiLinearForCausalLM:
    """Restore a kimi_jax checkpoint folder into a model (dtype defaults to the stored one).

    With `mesh`, every parameter is restored straight into the sharding that kimi_jax.sharding's rules give it (each
    process reads only its shards); `shardings` ({key: Sharding}) overrides individual parameters.
    """
    meta = read_meta(folder)
    cfg = KimiLinearConfig.from_pretrained(folder)
    dtype = jnp.dtype(dtype or meta.get("dtype", "float32"))
    abstract = nnx.eval_shape(lambda: KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, abstract_state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(abstract_state))
    params = {path: v for path, v in flat.items() if isinstance(v, nnx.Param)}
    _match_stored(folder, {param_key(p): tuple(v.shape) for p, v in params.items()})
    if mesh is not None:
        from kimi_jax.sharding import state_shardings

        ruled = dict(nnx.to_flat_state(state_shardings(abstract_state, mesh)))
        shardings = {**{param_key(p): _unwrap(ruled[p]) for p in params}, **(shardings or {})}
    targets = {}
    for path, var in params.items():
        key = param_key(path)
        sharding = (shardings or {}).get(key)
        targets[key] = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding)
    arrays = restore_arrays(folder, targets)
    filled = {path: var.replace(jnp.asarray(arrays[param_key(path)])) if isinstance(var, nnx.Param) else var
              for path, var in flat.items()}
    return nnx.merge(graphdef, nnx.from_flat_state(filled))

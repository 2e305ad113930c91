"""Training checkpoints: each `{output_dir}/step_N` is a complete model folder plus the state to resume exactly.

Layout of one checkpoint (everything a model folder has, then the training state):

    step_N/
      config.json              the model's HF config
      kimi_jax.json            kimi_jax's checkpoint metadata, with a "training" entry (stage, phase, step, ...)
      params/                  the model's parameters (orbax PyTree, keys = parameter paths joined by dots; phase C:
                               the unfrozen blocks merged in), exactly the format of `kimi_jax.orbax_model.save_model`
      tiktoken.model, tokenizer_config.json, ...   the tokenizer files of the model the run started from
      recursive_config.json    (recursive stage) the RecursiveConfig, as `kimi_jax.recursive.io.save_sidecar` writes it
      sidecar/                 (recursive stage) the sidecar (with phase-B/C LoRA inside), io.save_sidecar's format
      train_state/             orbax PyTree of the optimizer state ("opt.<path>"), the trainable tree of the
                               recursive stage ("trainable.<path>") and the root RNG key data ("rng")
      train_state.json         {"format", "step", "data_state" (BatchIterator.state()), "run" (the settings that
                               determine the trajectory), "metrics" (the step's logged values)}
    latest                     the text "step_N" of the newest complete checkpoint

`step_N` only ever appears complete: it is built as the hidden sibling `.step_N.tmp` and renamed into place once
every array is on disk, so a crash (SIGKILL included) leaves either the previous checkpoints or a stale `.tmp`
folder, which the next run removes (`remove_stale`; the run holds the output folder's lock, so no other run is
writing it). Arrays are written asynchronously: `CheckpointWriter.save` returns once orbax has copied them to host
memory (so the train step may donate its buffers right after), and a background thread finishes the writes, renames
the folder, updates `latest` and prunes old checkpoints (`max_to_keep`). At most one save is in flight; the next
`save` (or `wait`) waits for it and re-raises its failure as one CheckpointSaveError line (a full disk: "no space
left on device writing .../step_N"), after removing `.step_N.tmp`: the earlier checkpoints and `latest` stay as they
were. An existing `step_N` is never replaced, and only --max_to_keep (pruning) and --no-resume (`remove_run_outputs`)
delete checkpoints.

When the model's parameters equal those of an existing orbax folder on the same file system (recursive phases A/B,
whose base never changes, started from an orbax folder with the same dtype; or the run's own previous checkpoint),
`params/` is hard-linked from it instead of written again: for the 48B this saves ~92 GB of writes per checkpoint.
Orbax never modifies files in place, so linked files are safe to share; deleting one checkpoint leaves the others
intact.

Multi-process: every process calls `save` (orbax writes each process's shards), process 0 writes the JSON and
tokenizer files, renames, and prunes. Resuming reads the newest complete checkpoint (`latest_checkpoint`); the
arrays are restored straight into the current mesh's shardings, which may differ from the saving run's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from typing import Any, Mapping

import jax
import numpy as np

from kimi_jax.safe_io import (describe_write_error, remove_path, storage_error, write_json_atomic,
                              write_text_atomic)
from kimi_jax.errors import KimiJaxError, WriteError
from kimi_jax.model_folder import STEP_PREFIX, STEP_RE
from kimi_jax.tree_paths import path_key

FORMAT = "kimi_jax.train_state.v1"
LATEST_FILE = "latest"
TRAIN_STATE_DIR = "train_state"
TRAIN_STATE_FILE = "train_state.json"
PARAMS_DIR = "params"
MODEL_META_FILE = "kimi_jax.json"
# Files of the source model folder copied into every checkpoint (the tokenizer and generation settings).
MODEL_FILES = ("tiktoken.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "generation_config.json")
ASYNC_TIMEOUT_S = 3600


class TrainCheckpointError(KimiJaxError, ValueError):
    """A training checkpoint (or output folder) that cannot be read or resumed from."""


class TrainWriteError(WriteError):
    """Writing a run's outputs failed (a full disk, a quota, permissions): not the user's flags (exit status 1)."""


class CheckpointSaveError(TrainWriteError):
    """Writing a checkpoint failed; the previous checkpoints are untouched and nothing of the new one is left."""


# ---------------------------------------------------------------------------------------------------- discovery
def step_folder(output_dir: str | os.PathLike, step: int) -> str:
    return os.path.join(os.fspath(output_dir), f"{STEP_PREFIX}{int(step)}")


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a finished training checkpoint (renamed into place, so every part is there)."""
    folder = os.fspath(folder)
    return (os.path.isfile(os.path.join(folder, TRAIN_STATE_FILE)) and os.path.isfile(os.path.join(folder,
                                                                                                   MODEL_META_FILE))
            and os.path.isdir(os.path.join(folder, PARAMS_DIR))
            and os.path.isdir(os.path.join(folder, TRAIN_STATE_DIR)))


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """[(step, folder)] of the complete `step_N` checkpoints in `output_dir`, oldest first."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = STEP_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path) and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> tuple[int, str] | None:
    """(step, folder) of the newest complete checkpoint, or None. The highest step wins; `latest` is a pointer for
    people and other tools, and is never trusted over what is on disk."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_train_state(folder: str | os.PathLike) -> dict:
    """The `train_state.json` of a checkpoint folder (format checked)."""
    from kimi_jax.config import read_json_object

    path = os.path.join(os.fspath(folder), TRAIN_STATE_FILE)
    state = read_json_object(path, TrainCheckpointError, missing=f"{folder}: not a training checkpoint "
                                                                 f"({TRAIN_STATE_FILE} is missing)")
    if state.get("format") != FORMAT:
        raise TrainCheckpointError(f"{path}: format {state.get('format')!r} is not {FORMAT!r}")
    for key in ("step", "data_state", "run"):
        if key not in state:
            raise TrainCheckpointError(f"{path}: field {key!r} is missing")
    return state


# ------------------------------------------------------------------------------------------------- tree <-> flat
def flatten(tree, prefix: str = "") -> dict[str, Any]:
    """{prefix + dotted path: leaf} over a pytree's leaves (in tree order); the keys must be unique."""
    out: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        key = prefix + path_key(path)
        if key in out:
            raise ValueError(f"flatten: two leaves share the key {key!r}")
        out[key] = leaf
    return out


def unflatten(like, flat: Mapping[str, Any], prefix: str = ""):
    """The pytree `like` (same structure) with its leaves taken from `flat` by key."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[prefix + path_key(p)] for p, _ in paths])


def abstract_of(tree):
    """ShapeDtypeStructs (with the arrays' shardings) for every leaf of `tree`: restore targets."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                        tree)


def restore_trees(folder: str, likes: Mapping[str, Any]) -> dict[str, Any]:
    """{prefix: tree} restored from checkpoint `folder`'s train_state/ in one read: each tree shaped, typed and placed
    like `likes[prefix]` (arrays or ShapeDtypeStructs; a leaf without a sharding comes back as numpy), its leaves
    stored under prefix + their dotted path (see `flatten`)."""
    from kimi_jax.orbax_model import restore_arrays

    targets = {}
    for prefix, like in likes.items():
        targets.update(flatten(abstract_of(like), prefix))
    flat = restore_arrays(folder, targets, directory=os.path.join(os.fspath(folder), TRAIN_STATE_DIR),
                          error=TrainCheckpointError)
    return {prefix: unflatten(like, flat, prefix) for prefix, like in likes.items()}


# ------------------------------------------------------------------------------------------------------ writing
def read_model_files(folder: str) -> dict[str, bytes]:
    """{name: bytes} of the MODEL_FILES present in `folder` (read once, written into every checkpoint)."""
    out = {}
    for name in MODEL_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def link_tree(src: str, dst: str) -> bool:
    """Hard-link every file under `src` into the new folder `dst` (same layout). False, and nothing left at `dst`,
    when the file system refuses (another device, no hard links) or `src` is no folder."""
    if not os.path.isdir(src):
        return False
    try:
        for root, dirs, files in os.walk(src):
            rel = os.path.relpath(root, src)
            target = os.path.join(dst, rel) if rel != "." else dst
            os.makedirs(target, exist_ok=True)
            for name in files:
                os.link(os.path.join(root, name), os.path.join(target, name))
        return True
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        return False


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_from_main(value: int) -> int:
    """Process 0's `value` on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


_PREPARED, _LINKED, _FAILED = 0, 1, 2  # process 0's outcome of preparing a checkpoint folder, sent to every process


class CheckpointWriter:
    """Asynchronous, atomic `step_N` checkpoints in `output_dir` (see the module docstring).

    `model_files` ({name: bytes}) are written into every checkpoint (the tokenizer); `max_to_keep` (0 = all) prunes
    the oldest complete checkpoints after each save, never a folder in `protect` (the model the run started from,
    should it be one of them).

    A failed save (a full disk, a quota, permissions) raises CheckpointSaveError, one line naming the
    checkpoint, from `save` or the next `save`/`wait`; by then its `.step_N.tmp` folder is removed and the earlier
    checkpoints and `latest` are as they were. orbax's own log lines about the failure are dropped (the error says
    it); those of a successful save are let through when it finishes. An existing `step_N` is never replaced.
    """

    def __init__(self, output_dir: str | os.PathLike, *, max_to_keep: int = 0,
                 model_files: Mapping[str, bytes] | None = None, protect: tuple[str, ...] = ()):
        import orbax.checkpoint as ocp

        from kimi_jax.orbax_failures import drop_orbax_failure_echoes

        self.output_dir = os.path.abspath(os.fspath(output_dir))
        self.max_to_keep = int(max_to_keep or 0)
        self.model_files = dict(model_files or {})
        self.protect = {os.path.realpath(p) for p in protect}
        self.main = jax.process_index() == 0
        # One checkpointer per item so their background writes overlap; the timeout bounds orbax's cross-process
        # barrier at the end of a write (the 48B's parameters and AdamW moments are several hundred GB).
        self._params = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(), timeout_secs=ASYNC_TIMEOUT_S)
        self._state = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(), timeout_secs=ASYNC_TIMEOUT_S)
        drop_orbax_failure_echoes()  # a failing background write echoes before the main thread learns of it
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._renamed = False  # the save in flight reached its final name (only `latest` or pruning can still fail)
        self._pending: tuple[int, str] | None = None
        self._held_logs = None
        self.last_saved: tuple[int, str] | None = None  # (step, folder) of the newest finished save
        self.last_params_folder: str | None = None  # a finished checkpoint whose params/ this run may link from
        if self.main:
            os.makedirs(self.output_dir, exist_ok=True)

    def _tmp_folder(self, step: int) -> str:
        return os.path.join(self.output_dir, f".{STEP_PREFIX}{int(step)}.tmp")

    # -------------------------------------------------------------------------------------------- save
    def save(self, step: int, *, config: dict, meta: dict, params: Mapping[str, Any] | None,
             state_arrays: Mapping[str, Any], state_json: dict, sidecar=None, rcfg=None,
             link_params_from: str | None = None) -> None:
        """Start writing checkpoint `step`. Returns once the arrays are copied to host memory.

        `params` ({key: array}, kimi_jax.orbax_model's keys) may be None when `link_params_from` names a folder whose
        `params/` holds exactly this model; with both, the link is tried first and `params` written if it fails.
        """
        from kimi_jax.orbax_failures import HeldLogRecords

        self.wait()
        final, tmp = step_folder(self.output_dir, step), self._tmp_folder(step)
        self._held_logs = HeldLogRecords()
        try:
            self._start(int(step), final, tmp, config=config, meta=meta, params=params, state_arrays=state_arrays,
                        state_json=state_json, sidecar=sidecar, rcfg=rcfg, link_params_from=link_params_from)
        except BaseException as e:
            self._abandon(tmp, failed=isinstance(e, Exception))
            if isinstance(e, Exception):
                raise self._save_error(int(step), final, e) from e
            raise
        self._pending = (int(step), final)
        self._thread = threading.Thread(target=self._finish, args=(int(step), tmp, final), daemon=True,
                                        name=f"kimi_jax-checkpoint-{step}")
        self._thread.start()

    def _start(self, step: int, final: str, tmp: str, *, config, meta, params, state_arrays, state_json, sidecar,
               rcfg, link_params_from) -> None:
        """Build `tmp` (process 0: the JSON and tokenizer files, params/ linked where possible) and hand the arrays
        to orbax's background writes."""
        import orbax.checkpoint as ocp

        outcome, failure = _PREPARED, None
        if self.main:
            try:
                outcome = self._prepare(step, final, tmp, config, meta, state_json, link_params_from)
            except Exception as e:
                outcome, failure = _FAILED, e
        outcome = broadcast_from_main(outcome)  # every process stops when process 0 could not prepare the folder
        if outcome == _FAILED:
            raise failure if failure is not None else CheckpointSaveError(
                f"process 0 could not prepare checkpoint {final}")
        linked = outcome == _LINKED
        if not linked and params is None:
            raise CheckpointSaveError(f"checkpoint step {step}: params/ could not be linked from "
                                      f"{link_params_from} and no parameters were given")
        _sync(f"kimi_jax_train_ckpt_{step}_folder")
        if sidecar is not None:
            from kimi_jax.recursive.io import save_sidecar

            save_sidecar(tmp, sidecar, rcfg)
        if not linked:
            self._params.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(dict(params)))
        self._state.save(os.path.join(tmp, TRAIN_STATE_DIR), args=ocp.args.PyTreeSave(dict(state_arrays)))

    def _prepare(self, step: int, final: str, tmp: str, config: dict, meta: dict, state_json: dict,
                 link_params_from: str | None) -> int:
        from kimi_jax.orbax_model import FORMAT as MODEL_FORMAT

        if os.path.lexists(final):  # not this run's (it saves each step once): never replaced
            raise CheckpointSaveError(f"{final} already exists; this run does not replace it (move it away, or "
                                      f"resume from it)")
        remove_path(tmp)  # a killed save's leftovers (the output folder is locked by this run)
        os.makedirs(tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, MODEL_META_FILE), "w") as f:
            json.dump({"format": MODEL_FORMAT, **meta}, f, indent=2)
        for name, data in self.model_files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        with open(os.path.join(tmp, TRAIN_STATE_FILE), "w") as f:
            json.dump({"format": FORMAT, "step": int(step), **state_json}, f, indent=2, allow_nan=False)
        if link_params_from is not None and link_tree(os.path.join(link_params_from, PARAMS_DIR),
                                                      os.path.join(tmp, PARAMS_DIR)):
            return _LINKED
        return _PREPARED

    def _drain(self) -> None:
        for ckptr in (self._params, self._state):
            try:
                ckptr.wait_until_finished()
            except BaseException:
                pass

    def _abandon(self, tmp: str, failed: bool) -> None:
        """After a failed or interrupted save: let orbax's writers stop, then remove the partial folder."""
        from kimi_jax.orbax_failures import quiet_abandoned_orbax_io

        self._drain()
        if self.main:
            remove_path(tmp)
        if self._held_logs is not None:
            self._held_logs.release(emit=not failed)
            self._held_logs = None
        if failed:
            quiet_abandoned_orbax_io()

    def _finish(self, step: int, tmp: str, final: str) -> None:
        try:
            self._params.wait_until_finished()
            self._state.wait_until_finished()
            if self.main:
                os.rename(tmp, final)  # save() refused an existing step_N; rename never replaces a non-empty one
                self._renamed = True
                write_text_atomic(os.path.join(self.output_dir, LATEST_FILE), f"{STEP_PREFIX}{step}\n")
                self._prune(keep=final)
        except BaseException as e:  # re-raised by the next save()/wait() on the main thread
            self._error = e
            if not self._renamed:
                self._drain()  # the other item may still be writing into tmp
                if self.main:
                    remove_path(tmp)

    def _prune(self, keep: str) -> None:
        if self.max_to_keep <= 0:
            return
        found = list_checkpoints(self.output_dir)
        for _, folder in found[:max(0, len(found) - self.max_to_keep)]:
            if os.path.abspath(folder) != os.path.abspath(keep) and os.path.realpath(folder) not in self.protect:
                shutil.rmtree(folder, ignore_errors=True)
                if self.last_params_folder and os.path.abspath(folder) == os.path.abspath(self.last_params_folder):
                    self.last_params_folder = None

    def _save_error(self, step: int, final: str, error: BaseException, renamed: bool = False) -> CheckpointSaveError:
        if isinstance(error, CheckpointSaveError):
            return error
        if renamed:  # the checkpoint is complete; only the `latest` pointer (or pruning) failed
            latest = os.path.join(self.output_dir, LATEST_FILE)
            return CheckpointSaveError(f"checkpoint {final} was written, but {latest} could not be updated "
                                       f"({describe_write_error(error, latest)})")
        if isinstance(error, OSError) or storage_error(error):
            why = describe_write_error(error, final)
        else:
            from kimi_jax.orbax_failures import describe_orbax_failure

            why = describe_orbax_failure(error)
        return CheckpointSaveError(f"cannot write checkpoint step {step}: {why} (nothing of it was left on disk)")

    # -------------------------------------------------------------------------------------------- wait
    def wait(self) -> tuple[int, str] | None:
        """Finish the save in flight (if any); re-raise its failure. Returns the newest finished (step, folder)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            pending, self._pending = self._pending, None
            error, self._error = self._error, None
            renamed, self._renamed = self._renamed, False
            if self._held_logs is not None:
                self._held_logs.release(emit=error is None)
                self._held_logs = None
            if renamed:
                self.last_saved = pending
                self.last_params_folder = pending[1]
            if error is not None:
                from kimi_jax.orbax_failures import quiet_abandoned_orbax_io

                quiet_abandoned_orbax_io()
                raise self._save_error(pending[0], pending[1], error, renamed) from error
            _sync(f"kimi_jax_train_ckpt_{pending[0]}_done")
        return self.last_saved

    def close(self) -> None:
        try:
            self.wait()
        finally:
            for ckptr in (self._params, self._state):
                try:
                    ckptr.close()
                except Exception:
                    pass


_STALE_RE = re.compile(r"^\.step_\d+\.(tmp|old)$")  # a killed save's folder (.old: written by earlier versions)
_STALE_FILE_RE = re.compile(r"^\.(latest|metrics\.jsonl)\..+\.tmp$")  # write_text_atomic's temporaries


def run_outputs(output_dir: str, extra_files: tuple[str, ...] = ()) -> list[str]:
    """The names of what a training run leaves in `output_dir` (what --no-resume deletes): `step_N` folders
    (complete or not), stale `.step_N.tmp`/`.old` folders, `latest` and `extra_files`."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if (STEP_RE.match(name) or _STALE_RE.match(name)) and os.path.isdir(path):
            found.append(name)
        elif (name == LATEST_FILE or name in extra_files) and os.path.isfile(path):
            found.append(name)
    return found


def remove_run_outputs(output_dir: str, extra_files: tuple[str, ...] = ()) -> list[str]:
    """Delete `run_outputs(output_dir, extra_files)` (for --no-resume, which asks for it). Returns the names; a
    failure is a TrainWriteError naming the path."""
    removed = []
    for name in run_outputs(output_dir, extra_files):
        path = os.path.join(output_dir, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError as e:
            raise TrainWriteError(f"--no-resume: cannot delete {path} ({e.strerror or e})") from None
        removed.append(name)
    return removed


def remove_stale(output_dir: str) -> list[str]:
    """Delete what a killed run can leave half-written: `.step_N.tmp` / `.step_N.old` folders and the temporary
    files of atomic writes (`.latest.*.tmp`, `.metrics.jsonl.*.tmp`). Only safe while this run holds the output
    folder's lock (no other run is writing them). Returns the names removed."""
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if (_STALE_RE.match(name) and os.path.isdir(path)) or (_STALE_FILE_RE.match(name) and os.path.isfile(path)):
            remove_path(path)
            removed.append(name)
    return removed


__all__ = ["CheckpointSaveError", "CheckpointWriter", "FORMAT", "LATEST_FILE", "MODEL_FILES", "TRAIN_STATE_DIR",
           "TRAIN_STATE_FILE", "TrainCheckpointError", "TrainWriteError", "abstract_of", "broadcast_from_main",
           "flatten", "is_complete", "latest_checkpoint", "link_tree", "list_checkpoints", "path_key",
           "read_model_files", "read_train_state", "remove_run_outputs", "remove_stale",
           "restore_trees", "run_outputs", "step_folder", "unflatten", "write_json_atomic",
           "write_text_atomic"]

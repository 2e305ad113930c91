"""Saving and loading the recursive-refinement sidecar, and loading everything recursive generation needs.

A folder that carries a sidecar (a trained checkpoint, or any model folder) holds, next to the model's own files:

    recursive_config.json   the RecursiveConfig the sidecar was built with (all fields, RecursiveConfig.to_json)
    sidecar/                an orbax PyTree checkpoint of the sidecar's nnx.Param state, keyed by flat parameter
                            paths joined with dots ("cells.b", "mixer.0.qkv", "length_head.w2", ...)

:func:`save_sidecar` builds ``sidecar/`` in a hidden sibling folder and renames it into place (an existing one is
replaced only once the new one is complete); ``recursive_config.json`` is replaced right after it, itself atomically.
:func:`load_sidecar` rebuilds the sidecar's structure from the model config and the recursive config (shapes only,
nothing is initialised) and restores every array into it, after checking the stored names and shapes against that
structure: a missing, unexpected or wrong-shaped array is one error line naming the folder, the parameter and the
recursive-config fields that differ from the saved ones (e.g. a sidecar saved with another ``chunk_width``).

:func:`load_for_generation` takes an HF folder (config.json + safetensors) or a kimi_jax orbax folder and returns the
model, the sidecar (the folder's saved one when it fits the final recursive config, else a fresh zero-init "surgery"
sidecar), the final recursive config and the folder's tokenizer.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kimi_jax import model_folder
from kimi_jax.config import KimiLinearConfig
from kimi_jax.model_folder import ModelFolderError
from kimi_jax.recursive.config import RecursiveConfig, RecursiveConfigError, load_preset, resolve
from kimi_jax.recursive.sidecar import Sidecar, build_sidecar
from kimi_jax.tree_paths import path_key

CONFIG_FILE = "recursive_config.json"
SIDECAR_DIR = "sidecar"
DEFAULT_PRESET = "after_surgery"

# RecursiveConfig fields that change the sidecar's parameter names or shapes (or, for layers_to_refine, which decoder
# layer each stacked cell row belongs to). Everything else only changes behaviour or initial values.
SHAPE_FIELDS = ("chunk_width", "layers_to_refine", "phase", "lora_rank", "lora_layers", "use_latent_token", "d_state",
                "gate_hidden", "refine_rank", "mixer_layers", "mixer_heads", "z_init", "seed", "enable_length_head")

LoadError = ModelFolderError  # the folder-level error; a sidecar that does not fit is its SidecarError


class SidecarError(LoadError):
    """A saved sidecar that is unreadable or does not match the model / recursive config it is loaded for."""


# ---------------------------------------------------------------------------------------------------------- helpers
def sidecar_arrays(sidecar: Sidecar) -> dict[str, jax.Array]:
    """{flat parameter path: array} over every nnx.Param of the sidecar."""
    return {path_key(path): var[...] for path, var in nnx.to_flat_state(nnx.state(sidecar, nnx.Param))}


def _abstract_params(model_cfg: KimiLinearConfig, rcfg: RecursiveConfig):
    """(graphdef, flat abstract state, {key: ShapeDtypeStruct}) of the sidecar `build_sidecar` would make."""
    abstract = nnx.eval_shape(lambda: build_sidecar(model_cfg, rcfg))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    targets = {}
    for path, var in flat.items():
        if not isinstance(var, nnx.Param):  # the sidecar has only Params; anything else would need real values
            raise TypeError(f"sidecar state {path_key(path)!r} is a {type(var).__name__}, not an nnx.Param")
        targets[path_key(path)] = jax.ShapeDtypeStruct(tuple(var.shape), var.dtype)
    return graphdef, flat, targets


def _check_consistent(sidecar: Sidecar, rcfg: RecursiveConfig) -> None:
    """The sidecar's own dimensions agree with `rcfg` (so the saved pair loads back)."""
    arrays = sidecar_arrays(sidecar)
    checks = [
        ("chunk_width", sidecar.chunk_width, rcfg.chunk_width),
        ("use_latent_token", sidecar.num_slots > sidecar.chunk_width, rcfg.use_latent_token),
        ("d_state", arrays["mixer_out"].shape[0], rcfg.d_state),
        ("refine_rank", arrays["cells.a_h"].shape[-1], rcfg.refine_rank),
        ("gate_hidden", arrays["halt_head.w1"].shape[-1], rcfg.gate_hidden),
        ("mixer_layers", len(sidecar.mixer), rcfg.mixer_layers),
        ("mixer_heads", sidecar.mixer[0].heads, rcfg.mixer_heads),
        ("z_init", "z0" in arrays, rcfg.z_init == "learned"),
        ("seed", "mask_embed" in arrays, rcfg.seed == "mask"),
        ("enable_length_head", "length_head.w2" in arrays, rcfg.enable_length_head),
        ("phase", sidecar.lora is not None, rcfg.uses_lora),
    ]
    for field, have, want in checks:
        if have != want:
            raise ValueError(f"save_sidecar: the sidecar does not match the recursive config's {field} "
                             f"({rcfg.to_dict()[field]!r}); it was built with another config")
    if rcfg.layers_to_refine != "all" and tuple(sidecar.cells.layers) != tuple(rcfg.layers_to_refine):
        raise ValueError(f"save_sidecar: the sidecar refines layers {list(sidecar.cells.layers)}, the recursive "
                         f"config's layers_to_refine says {list(rcfg.layers_to_refine)}")


def _stored_arrays(directory: str, label: str) -> dict[str, jax.ShapeDtypeStruct]:
    """{key: shape and dtype} of every array in an orbax PyTree checkpoint, from its metadata (no array is read)."""
    from kimi_jax.orbax_failures import read_array_metadata

    if not os.path.isdir(directory):
        raise SidecarError(f"{label}: no saved sidecar ({SIDECAR_DIR}/ is missing)")
    return read_array_metadata(directory, SidecarError, "not a readable orbax sidecar checkpoint")


def _saved_config(folder: str) -> RecursiveConfig | None:
    path = os.path.join(folder, CONFIG_FILE)
    return RecursiveConfig.from_json(path) if os.path.isfile(path) else None


def _field_hint(saved: RecursiveConfig | None, rcfg: RecursiveConfig) -> str:
    """Which shape-defining fields differ between the saved config and the requested one, as a message tail."""
    if saved is None:
        return ""
    diffs = [f"{f} {_show(getattr(saved, f))} saved vs {_show(getattr(rcfg, f))} requested" for f in SHAPE_FIELDS
             if getattr(saved, f) != getattr(rcfg, f)]
    if not diffs:
        return f" (the saved {CONFIG_FILE} agrees on every shape-defining field: was it saved for another model?)"
    return f" (the saved {CONFIG_FILE} differs: " + "; ".join(diffs) + ")"


def _show(v: Any) -> str:
    return repr(list(v)) if isinstance(v, tuple) else repr(v)


# ------------------------------------------------------------------------------------------------------------ save
def save_sidecar(folder: str | os.PathLike, sidecar: Sidecar, rcfg: RecursiveConfig) -> str:
    """Write `{folder}/recursive_config.json` and `{folder}/sidecar/` (orbax, keyed by flat parameter paths).

    `sidecar/` is built in a hidden sibling folder and renamed into place; an existing `sidecar/` is replaced only
    after the new one is complete, and a failed save leaves the folder as it was. With several processes every
    process calls this (orbax writes from all of them); process 0 does the renames and writes the JSON file.
    Returns the path of `sidecar/`.
    """
    if not isinstance(rcfg, RecursiveConfig):
        raise TypeError(f"save_sidecar: rcfg must be a RecursiveConfig, got {type(rcfg).__name__}")
    _check_consistent(sidecar, rcfg)
    from kimi_jax.orbax_model import save_params

    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"save_sidecar: {folder} exists and is not a folder")
    main = jax.process_index() == 0
    multi = jax.process_count() > 1
    suffix = "mp" if multi else str(os.getpid())  # every process must name the same temporary folder
    final = os.path.join(folder, SIDECAR_DIR)
    tmp = os.path.join(folder, f".{SIDECAR_DIR}.tmp-{suffix}")
    old = os.path.join(folder, f".{SIDECAR_DIR}.old-{suffix}")
    if main:
        os.makedirs(folder, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _sync("kimi_jax_sidecar_save_start", multi)
    try:
        save_params(tmp, sidecar_arrays(sidecar))
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync("kimi_jax_sidecar_saved", multi)
    if main:
        shutil.rmtree(old, ignore_errors=True)
        moved = False
        try:
            if os.path.lexists(final):
                os.rename(final, old)
                moved = True
            os.rename(tmp, final)
        except BaseException:
            if moved and not os.path.lexists(final):
                os.rename(old, final)  # put the previous sidecar back
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        rcfg.to_json(os.path.join(folder, CONFIG_FILE))
        shutil.rmtree(old, ignore_errors=True)
    _sync("kimi_jax_sidecar_renamed", multi)
    return final


def _sync(name: str, multi: bool) -> None:
    if multi:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------------------------ load
def has_sidecar(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a saved sidecar (a `sidecar/` folder; recursive_config.json is checked on load)."""
    return os.path.isdir(os.path.join(os.fspath(folder), SIDECAR_DIR))


def sidecar_mismatch(folder: str | os.PathLike, model_cfg: KimiLinearConfig, rcfg: RecursiveConfig) -> str | None:
    """Why the sidecar saved in `folder` cannot be loaded for (model_cfg, rcfg), or None when it fits.

    Raises SidecarError when the saved sidecar is unreadable (that is damage, not a mismatch).
    """
    return _mismatch(os.fspath(folder), model_cfg, rcfg, _abstract_params(model_cfg, rcfg)[2])


def _mismatch(folder: str, model_cfg: KimiLinearConfig, rcfg: RecursiveConfig,
              targets: Mapping[str, jax.ShapeDtypeStruct]) -> str | None:
    directory = os.path.abspath(os.path.join(folder, SIDECAR_DIR))
    stored = _stored_arrays(directory, folder)
    saved = _saved_config(folder)
    hint = _field_hint(saved, rcfg)
    missing = sorted(set(targets) - set(stored))
    unexpected = sorted(set(stored) - set(targets))
    if missing:
        return (f"{directory}: parameter '{missing[0]}' is missing"
                + (f" ({len(missing)} missing in all)" if len(missing) > 1 else "") + hint)
    if unexpected:
        return (f"{directory}: unexpected parameter '{unexpected[0]}'"
                + (f" ({len(unexpected)} unexpected in all)" if len(unexpected) > 1 else "") + hint)
    for key, t in targets.items():
        if tuple(stored[key].shape) != tuple(t.shape):
            return (f"{directory}: parameter '{key}' has shape {tuple(stored[key].shape)}, but the model config and "
                    f"recursive config imply {tuple(t.shape)}" + hint)
    if saved is not None:  # same shapes but different layers: the stacked cells would edit the wrong layers
        n = model_cfg.num_hidden_layers
        have, want = saved.refined_layers(n), rcfg.refined_layers(n)
        if have != want:
            return (f"{directory}: the refine cells were saved for layers {list(have)} but the recursive config "
                    f"refines layers {list(want)} (layers_to_refine)")
    return None


def load_sidecar(folder: str | os.PathLike, model_cfg: KimiLinearConfig,
                 rcfg: RecursiveConfig | None = None) -> tuple[Sidecar, RecursiveConfig]:
    """Restore the sidecar saved in `folder` -> (sidecar, recursive config).

    The recursive config is `{folder}/recursive_config.json` unless `rcfg` is given. The structure comes from
    `build_sidecar(model_cfg, rcfg)` (shapes only) and every stored array is checked against it first.
    """
    import orbax.checkpoint as ocp

    from kimi_jax.orbax_failures import orbax_reading

    folder = os.fspath(folder)
    if rcfg is None:
        path = os.path.join(folder, CONFIG_FILE)
        if not os.path.isfile(path):
            raise SidecarError(f"{folder}: no {CONFIG_FILE} next to the saved sidecar (pass the recursive config "
                               f"it was saved with)")
        rcfg = RecursiveConfig.from_json(path)
    elif not isinstance(rcfg, RecursiveConfig):
        raise TypeError(f"load_sidecar: rcfg must be a RecursiveConfig, got {type(rcfg).__name__}")
    graphdef, flat, targets = _abstract_params(model_cfg, rcfg)
    reason = _mismatch(folder, model_cfg, rcfg, targets)
    if reason is not None:
        raise SidecarError(reason)
    directory = os.path.abspath(os.path.join(folder, SIDECAR_DIR))
    restore_args = {k: ocp.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype) for k, t in targets.items()}
    item = {k: np.zeros((), t.dtype) for k, t in targets.items()}
    with orbax_reading(directory, SidecarError, "cannot restore the sidecar: "):
        arrays = ocp.PyTreeCheckpointer().restore(
            directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
    filled = {}
    for path, var in flat.items():
        key = path_key(path)
        array = np.asarray(arrays[key])
        if array.shape != targets[key].shape:
            raise SidecarError(f"{directory}: parameter '{key}' restored with shape {array.shape}, expected "
                               f"{targets[key].shape}")
        filled[path] = var.replace(jnp.asarray(array, targets[key].dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(filled)), rcfg


# ------------------------------------------------------------------------------------------------ for generation
def resolve_generation_config(folder: str | os.PathLike, recursive_config=None,
                              overrides: Mapping[str, Any] | None = None) -> tuple[RecursiveConfig, str]:
    """The recursive config for generating from `folder` -> (config, where it came from).

    Priority: `recursive_config` (preset name, JSON path or RecursiveConfig), else `{folder}/recursive_config.json`,
    else the preset "after_surgery"; then `overrides` ({field: value}) are applied and validated together.
    """
    folder = os.fspath(folder)
    own = os.path.join(folder, CONFIG_FILE)
    if recursive_config is not None:
        rcfg = resolve(recursive_config)
        source = (f"preset {recursive_config!r}" if isinstance(recursive_config, str) and
                  not os.path.isfile(recursive_config) else
                  "the given RecursiveConfig" if isinstance(recursive_config, RecursiveConfig) else
                  os.fspath(recursive_config))
    elif os.path.isfile(own):
        rcfg, source = RecursiveConfig.from_json(own), own
    else:
        rcfg, source = load_preset(DEFAULT_PRESET), f"preset {DEFAULT_PRESET!r} (no {CONFIG_FILE} in the folder)"
    if overrides:
        shown = ", ".join(f"{k}={v!r}" for k, v in dict(overrides).items())
        try:  # validated together with the base config; the message names both
            rcfg = rcfg.replace(**dict(overrides))
        except RecursiveConfigError as e:
            raise RecursiveConfigError(f"overrides {shown}: {e}") from None
        source = f"{source} with overrides {shown}"
    return rcfg, source


def _print_notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr, flush=True)


def load_for_generation(model_path: str | os.PathLike, *, recursive_config=None,
                        overrides: Mapping[str, Any] | None = None, dtype=None,
                        notice: Callable[[str], None] | None = _print_notice, info: dict | None = None):
    """-> (model, sidecar or None, recursive config, tokenizer) for `generate_recursive`.

    `model_path` is an HF folder (config.json + safetensors), a kimi_jax orbax folder, or a training output folder
    (its newest `step_N` is used, `kimi_jax.model_folder.resolve`: `info["model_path"]` says which); the tokenizer is loaded
    from the same folder. The recursive config follows :func:`resolve_generation_config`. The sidecar is the
    folder's saved one when it fits the final config's shape-defining fields, else a fresh zero-init one (the
    surgery, which leaves the base model's outputs unchanged); None when recursion is disabled. One line saying
    which goes to `notice` (stderr by default; None for silence). `info`, when given, is filled with
    {"model_format", "recursive_config_source", "sidecar"} ("saved", "fresh" or None) and "sidecar_notice".
    `dtype` is the parameter dtype (default: the stored one for orbax folders, float32 for HF folders).
    """
    from kimi_jax import tokenizer as tokenizer_mod

    folder, _ = model_folder.resolve(model_path)
    fmt = model_folder.model_format(folder)
    rcfg, source = resolve_generation_config(folder, recursive_config, overrides)
    tok = tokenizer_mod.load(folder)
    model = model_folder.load_model(folder, None if dtype is None else jnp.dtype(dtype))
    cfg = model.config
    model_folder.check_tokenizer(folder, tok, cfg)
    if rcfg.recursive_enabled:
        rcfg.refined_layers(cfg.num_hidden_layers)  # layer indices against this model's depth: one clear line
    sidecar, kind, message = None, None, None
    if rcfg.recursive_enabled:
        if has_sidecar(folder):
            reason = sidecar_mismatch(folder, cfg, rcfg)
            if reason is None:
                sidecar, _ = load_sidecar(folder, cfg, rcfg)
                kind = "saved"
                message = (f"loaded the saved sidecar from {os.path.join(folder, SIDECAR_DIR)} "
                           f"({sidecar.num_params():,} parameters)")
            else:
                kind = "fresh"
                message = (f"the saved sidecar does not fit the recursive config, so a fresh zero-init sidecar "
                           f"(surgery) is used instead: {reason}")
        else:
            kind = "fresh"
            message = (f"no saved sidecar in {folder}: using a fresh zero-init sidecar (surgery; the base model's "
                       f"outputs are unchanged)")
        if sidecar is None:
            sidecar = build_sidecar(cfg, rcfg)
    if message is not None and notice is not None:
        notice(message)
    if info is not None:
        info.update(model_format=fmt, recursive_config_source=source, sidecar=kind, sidecar_notice=message,
                    model_path=folder)
    return model, sidecar, rcfg, tok


__all__ = ["CONFIG_FILE", "DEFAULT_PRESET", "LoadError", "SHAPE_FIELDS", "SIDECAR_DIR", "SidecarError", "has_sidecar",
           "load_for_generation", "load_sidecar", "resolve_generation_config", "save_sidecar", "sidecar_arrays",
           "sidecar_mismatch"]

"""Model folders: what a folder holds, which folder a path names, and loading the model in it.

A *model folder* is either
  * an HF checkpoint: config.json + model.safetensors (or model.safetensors.index.json and its shards), converted in
    memory when loaded (`kimi_jax.hf.loading`), or
  * a kimi_jax orbax folder: config.json + kimi_jax.json + params/ (`kimi_jax.orbax_model`), restored straight into
    a mesh; every training checkpoint `step_N` is one, with its tokenizer files and, for the recursive stage, its
    sidecar (`kimi_jax.recursive.io`).
A *training output folder* (a `--output_dir` of `experiments.train`) is not a model folder; `resolve` maps it to its
newest `step_N` model folder, which is how `--model_path ./checkpoints/vanilla_finetune` evaluates or continues
the newest checkpoint of a run.

This module is the one place for these rules, for the dtype a folder stores, and for the EOS / pad token choice
(config.json's EOS ids, then the tokenizer's; pad = the tokenizer's, else config.json's, else the first EOS).
"""

from __future__ import annotations

import os
import re
from typing import Sequence

from kimi_jax.errors import KimiJaxError

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
STEP_PREFIX = "step_"
STEP_RE = re.compile(re.escape(STEP_PREFIX) + r"(\d+)$")
ORBAX, HF = "orbax", "hf"


class ModelFolderError(KimiJaxError, ValueError):
    """A path that is no model folder, or a model folder that cannot be loaded (missing, wrong tokenizer)."""


def model_format(folder: str | os.PathLike) -> str:
    """"orbax" for a kimi_jax orbax folder, "hf" for config.json + safetensors; else a ModelFolderError."""
    from kimi_jax.orbax_model import is_checkpoint

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ModelFolderError(f"{folder}: no such model folder")
    if is_checkpoint(folder):
        return ORBAX
    if os.path.isfile(os.path.join(folder, "config.json")) and any(
            os.path.isfile(os.path.join(folder, name)) for name in HF_WEIGHT_FILES):
        return HF
    raise ModelFolderError(f"{folder}: not a model folder (expected an HF checkpoint: config.json + model.safetensors "
                           f"or model.safetensors.index.json, or a kimi_jax orbax folder: kimi_jax.json + params/)")


def is_model_folder(folder: str | os.PathLike) -> bool:
    try:
        model_format(folder)
    except ModelFolderError:
        return False
    return True


def step_folders(folder: str | os.PathLike) -> list[tuple[int, str]]:
    """[(N, path)] of the `step_N` sub-folders of `folder` that are model folders, by step (a half-written or
    damaged step without its model files is skipped)."""
    folder = os.fspath(folder)
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        match = STEP_RE.match(name)
        path = os.path.join(folder, name)
        if match and is_model_folder(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve(path: str | os.PathLike) -> tuple[str, str | None]:
    """(model folder, notice or None): `path` itself when it is a model folder, else the newest `step_N` model folder
    inside it (a training output folder; the notice says which), else a ModelFolderError naming `path`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ModelFolderError(f"{path}: no such model folder")
    try:
        model_format(path)
        return path, None
    except ModelFolderError as not_a_model:
        steps = step_folders(path)
        if not steps:
            raise ModelFolderError(f"{not_a_model}; nor is it a training output folder with a {STEP_PREFIX}N "
                                   f"checkpoint") from None
    folder = steps[-1][1]
    return folder, f"{path} is a training output folder: using its newest checkpoint {folder}"


def stored_dtype(folder: str | os.PathLike) -> str:
    """The parameter dtype a model folder stores: kimi_jax.json's for orbax, float32 for HF (converted in memory)."""
    if model_format(folder) == ORBAX:
        from kimi_jax.orbax_model import read_meta

        return str(read_meta(os.fspath(folder)).get("dtype", "float32"))
    return "float32"


def load_model(folder: str | os.PathLike, dtype=None, *, mesh=None):
    """The model of a model folder: an orbax folder restored (into `mesh`'s shardings when given; dtype default the
    stored one), an HF folder converted in memory on one device (dtype default float32)."""
    folder = os.fspath(folder)
    if model_format(folder) == ORBAX:
        from kimi_jax.orbax_model import load_model as load_orbax

        return load_orbax(folder, dtype, mesh=mesh)
    from kimi_jax.hf.loading import from_pretrained

    return from_pretrained(folder, dtype)


def check_tokenizer(folder: str, tokenizer, cfg, error=ModelFolderError) -> None:
    """A tokenizer with more tokens than the model's vocabulary belongs to another model: refused."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise error(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
                    f"{cfg.vocab_size} (the tokenizer does not belong to this model)")


def eos_token_ids(cfg, tokenizer) -> list[int]:
    """config.json's EOS ids, then the tokenizer's EOS, without repeats."""
    extra = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return list(dict.fromkeys([int(i) for i in list(cfg.eos_token_ids) + extra]))


def pad_token_id(cfg, tokenizer, eos: Sequence[int] | None = None) -> int:
    """The tokenizer's pad id, else config.json's, else the first EOS, else 0."""
    eos = eos_token_ids(cfg, tokenizer) if eos is None else eos
    for candidate in (tokenizer.pad_token_id, cfg.pad_token_id, eos[0] if eos else None):
        if candidate is not None:
            return int(candidate)
    return 0


def special_tokens(cfg, tokenizer) -> tuple[list[int], int]:
    """(EOS ids, pad id) for generating with `cfg`'s model and `tokenizer`."""
    eos = eos_token_ids(cfg, tokenizer)
    return eos, pad_token_id(cfg, tokenizer, eos)


__all__ = ["HF", "HF_WEIGHT_FILES", "ModelFolderError", "ORBAX", "STEP_PREFIX", "STEP_RE", "check_tokenizer",
           "eos_token_ids", "is_model_folder", "load_model", "model_format", "pad_token_id", "resolve",
           "special_tokens", "step_folders", "stored_dtype"]

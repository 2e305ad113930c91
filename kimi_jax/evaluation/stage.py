"""One stage of the plan: what it evaluates, every check made before anything heavy is loaded, and its model.

* `resolve_model_path` maps --model_path to its model folder (a training output folder to its newest step_N);
* `plan_stage` settles, from the settings and the model folder, everything a run needs before the data and the
  weights load (`StagePlan`): the checkpoint step, the recursive config (validated), the chunk width of the greedy
  chunk accuracy, the stage's sidecar rule (only the small sidecar is read) and the output folders (checked, not
  created). Bad input fails here, in seconds, with one `UsageError` line.
* `load_stage_model` loads the model, the sidecar and the tokenizer (`kimi_jax.recursive.io.load_for_generation`)
  and enforces the stage's rule again on what was loaded (`LoadedStage`).

The stage decides the path: baseline and finetuned_vanilla evaluate the plain model; after_surgery must run a
zero-init sidecar (the folder's saved one only if it is still zero, else a fresh one); finetuned_recursive needs a
saved sidecar that fits the recursive config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable

import numpy as np

from kimi_jax import model_folder
from kimi_jax.errors import UsageError
from kimi_jax.evaluation.settings import DEFAULT_KDA_IMPL, RECURSIVE_STAGES, EvalSettings

Notice = Callable[[str], None]
KIMI_JAX_META = "kimi_jax.json"  # an orbax folder's metadata; a training checkpoint records its step there
# recursive config field -> the flag that overrides it
OVERRIDE_FLAGS = {"chunk_width": "--chunk_width", "max_inner_steps": "--max_inner_steps",
                  "commit_mode": "--commit_mode", "seed": "--draft_seed"}


def print_notice(message: str) -> None:
    """A `notice:` line on stderr: something the user should know that is no error."""
    print(f"notice: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """What a run settles from the settings and the model folder before anything heavy is loaded."""

    folder: str  # the model folder (a training output folder resolved to its newest step_N)
    model_path_given: str  # --model_path as given
    step: int | None  # the checkpoint's training step, None when it has none
    use_recursive: bool
    overrides: dict  # recursive config fields set by flags (recursive_enabled included)
    recursive_config: str | None  # the --recursive_config used (None at the stages without recursion)
    rcfg: Any  # RecursiveConfig of the stage's generator
    chunk_rcfg: Any  # RecursiveConfig of the chunk accuracy (rcfg, or the greedy one without recursion)
    output_dir: str  # absolute; created only when results are written
    logdir: str | None  # TensorBoard folder LOG_DIR/evaluation/STAGE; None: no scalars
    command_line: str
    t_start: float  # time.perf_counter() when the run started


def resolve_model_path(model_path: str, notice: Notice = print_notice) -> str:
    """The model folder --model_path names: itself, or the newest `step_N` of a training output folder (a notice
    says which, `kimi_jax.model_folder.resolve`); UsageError when there is no such folder."""
    if not os.path.isdir(model_path):
        raise UsageError(f"--model_path {model_path}: no such folder")
    folder, resolved = model_folder.resolve(model_path)
    if resolved is not None:
        notice(f"{model_path} is a training output folder: evaluating its newest checkpoint {folder}")
    return folder


def checkpoint_step(folder: str) -> int | None:
    """N for a `.../step_N` folder; else the `training.step` of its kimi_jax.json, if any; else None."""
    match = model_folder.STEP_RE.match(os.path.basename(os.path.normpath(folder)))
    if match:
        return int(match.group(1))
    meta = os.path.join(folder, KIMI_JAX_META)
    if os.path.isfile(meta):
        try:
            with open(meta, encoding="utf-8") as f:
                step = (json.load(f).get("training") or {}).get("step")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            return step
    return None


def sidecar_is_zero_init(sidecar) -> bool:
    """Every output matrix that the zero-init guarantee needs at 0 is exactly 0: the refine cells' b and every LoRA
    b (RECURSIVE_DESIGN.md §3.11 (i))."""
    from kimi_jax.recursive.io import sidecar_arrays

    for key, value in sidecar_arrays(sidecar).items():
        if key == "cells.b" or (key.startswith("lora.") and key.endswith("_b")):
            if np.any(np.asarray(value) != 0):
                return False
    return True


def greedy_chunk_config(chunk_width: int | None):
    """The recursive config that only serves the greedy chunk accuracy of a stage without recursion: the default
    preset's chunk width (or --chunk_width), one inner step."""
    from kimi_jax.recursive.config import RecursiveConfigError, load_preset
    from kimi_jax.recursive.io import DEFAULT_PRESET

    base = load_preset(DEFAULT_PRESET)
    try:
        return base.replace(chunk_width=chunk_width or base.chunk_width, max_inner_steps=1)
    except RecursiveConfigError as e:
        raise UsageError(f"--chunk_width {chunk_width}: {e}") from None


def _trained_sidecar_message(folder: str) -> str:
    return (f"--stage after_surgery evaluates the zero-init surgery, but the sidecar saved in {folder} is trained "
            f"(non-zero refine-cell or LoRA outputs); use --stage finetuned_recursive")


def check_stage_sidecar(stage: str, folder: str, rcfg) -> None:
    """Before the model is loaded (only the small sidecar is read): after_surgery must not run a trained sidecar,
    finetuned_recursive must run the folder's saved one."""
    from kimi_jax.config import KimiLinearConfig
    from kimi_jax.recursive import io

    if stage not in RECURSIVE_STAGES:
        return
    if not io.has_sidecar(folder):
        if stage == "finetuned_recursive":
            raise UsageError(f"--stage finetuned_recursive needs a trained sidecar, but {folder} has none "
                             f"(no {io.SIDECAR_DIR}/); for the untrained surgery use --stage after_surgery")
        return
    model_cfg = KimiLinearConfig.from_pretrained(folder)
    reason = io.sidecar_mismatch(folder, model_cfg, rcfg)
    if stage == "finetuned_recursive" and reason is not None:
        raise UsageError(f"--stage finetuned_recursive needs the folder's trained sidecar, but it does not fit the "
                         f"recursive config: {reason}")
    if stage == "after_surgery" and reason is None:
        saved, _ = io.load_sidecar(folder, model_cfg, rcfg)
        if not sidecar_is_zero_init(saved):
            raise UsageError(_trained_sidecar_message(folder))


def check_output_folder(path: str, flag: str, model_path: str) -> str:
    """`path` made absolute, after checking that it can be created and written (it is created only when results
    are written) and that it neither is, contains nor lies inside the model folder."""
    from kimi_jax.safe_io import check_writable_location, refuse_overlap

    path = os.path.abspath(path)
    refuse_overlap(path, flag, {"--model_path": model_path}, error=UsageError)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: exists and is not a folder")
    check_writable_location(path, flag, UsageError)
    return path


def plan_stage(settings: EvalSettings, folder: str, *, model_path_given: str, output_dir: str, log_dir: str | None,
               command_line: str, t_start: float, notice: Notice = print_notice) -> StagePlan:
    """Configs and output folders of a run on the model folder `folder` (already resolved), all checked before any
    data or weights are loaded; `log_dir` None writes no TensorBoard scalars."""
    from kimi_jax.config import KimiLinearConfig
    from kimi_jax.recursive import io

    step = checkpoint_step(folder)
    use_recursive = settings.recursive
    KimiLinearConfig.from_pretrained(folder)  # config.json checked before anything is loaded
    overrides = {field: getattr(settings, "draft_seed" if field == "seed" else field) for field in OVERRIDE_FLAGS}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if use_recursive:
        overrides["recursive_enabled"] = True
    else:
        unused = [OVERRIDE_FLAGS[k] for k in overrides if k != "chunk_width"] + (
            ["--recursive_config"] if settings.recursive_config else [])
        if unused:
            notice(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect at --stage "
                   f"{settings.stage} (it evaluates the model without recursion)")
        overrides = {"recursive_enabled": False}
    recursive_config = settings.recursive_config if use_recursive else None
    rcfg, _ = io.resolve_generation_config(folder, recursive_config, overrides)  # validated before any loading
    chunk_rcfg = rcfg if use_recursive else greedy_chunk_config(settings.chunk_width)
    check_stage_sidecar(settings.stage, folder, rcfg)
    output_dir = check_output_folder(output_dir, "--output_dir", model_path_given)
    logdir = None if log_dir is None else check_output_folder(
        os.path.join(log_dir, "evaluation", settings.stage), "--log_dir", model_path_given)
    return StagePlan(folder=folder, model_path_given=model_path_given, step=step, use_recursive=use_recursive,
                     overrides=overrides, recursive_config=recursive_config, rcfg=rcfg, chunk_rcfg=chunk_rcfg,
                     output_dir=output_dir, logdir=logdir, command_line=command_line, t_start=t_start)


# ------------------------------------------------------------------------------------------------ the model
@dataclasses.dataclass(frozen=True)
class LoadedStage:
    """The stage's model, sidecar (None without recursion), recursive config and tokenizer, with the EOS / pad
    choice and the run options every section uses."""

    model: Any  # KimiLinearForCausalLM
    sidecar: Any  # Sidecar or None
    rcfg: Any  # RecursiveConfig (recursive_enabled: the stage's generator is the recursive one)
    tokenizer: Any
    eos_ids: list[int]
    pad_id: int
    opts: Any  # RunOptions
    info: dict = dataclasses.field(default_factory=dict)  # load_for_generation's: model_format, sidecar, ...
    zero_init: bool | None = None  # whether the sidecar is still the zero-init surgery; None without one

    @classmethod
    def from_loaded(cls, model, sidecar, rcfg, tokenizer, *, kda_impl: str = DEFAULT_KDA_IMPL,
                    info: dict | None = None) -> "LoadedStage":
        """A stage around an already loaded model (and sidecar when `rcfg` enables recursion)."""
        from kimi_jax.model import RunOptions

        eos, pad = model_folder.special_tokens(model.config, tokenizer)
        return cls(model=model, sidecar=sidecar, rcfg=rcfg, tokenizer=tokenizer, eos_ids=eos, pad_id=int(pad),
                   opts=RunOptions(kda_impl=kda_impl), info=dict(info or {}),
                   zero_init=sidecar_is_zero_init(sidecar) if sidecar is not None else None)

    @property
    def use_recursive(self) -> bool:
        return bool(self.rcfg.recursive_enabled)

    @property
    def generation_sidecar(self):
        """The sidecar the stage's generator runs: None without recursion (greedy decoding)."""
        return self.sidecar if self.use_recursive else None


def load_stage_model(settings: EvalSettings, plan: StagePlan, notice: Notice = print_notice) -> LoadedStage:
    """The model, sidecar and tokenizer of `plan.folder`, refused when they break the stage's rule."""
    from kimi_jax.recursive import io

    info: dict = {}
    model, sidecar, rcfg, tok = io.load_for_generation(plan.folder, recursive_config=plan.recursive_config,
                                                       overrides=plan.overrides, dtype=settings.dtype, notice=notice,
                                                       info=info)
    loaded = LoadedStage.from_loaded(model, sidecar, rcfg, tok, kda_impl=settings.kda_impl, info=info)
    if settings.stage == "after_surgery" and sidecar is not None and not loaded.zero_init:
        raise UsageError(_trained_sidecar_message(plan.folder))
    if settings.stage == "finetuned_recursive" and info.get("sidecar") != "saved":
        raise UsageError(f"--stage finetuned_recursive needs the folder's trained sidecar, but it cannot be used: "
                         f"{info.get('sidecar_notice')}")
    return loaded


__all__ = ["LoadedStage", "OVERRIDE_FLAGS", "StagePlan", "check_output_folder", "check_stage_sidecar",
           "checkpoint_step", "greedy_chunk_config", "load_stage_model", "plan_stage", "print_notice",
           "resolve_model_path", "sidecar_is_zero_init"]

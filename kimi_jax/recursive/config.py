"""RecursiveConfig: every knob of the recursive-refinement sidecar, its training phases and its inference loop.

One frozen, hashable dataclass (it is passed to ``jax.jit`` as a static argument), validated on construction: each
rejected value raises a :class:`RecursiveConfigError` with one line naming the source, the field and the value.
The prototype's field names are kept (design §3.12) and the design's new fields are added (§3.2-3.10):

* the window: ``chunk_width`` W (a multiple of the KDA chunk 64), ``max_inner_steps`` K, the commit rule
  (``commit_mode``, ``commit_threshold`` tau, ``min_commit_threshold`` tau_min) and the draft ``seed``;
* the sidecar: refine cells (``layers_to_refine``, ``refine_rank``, ``refine_gate_init``), the z-mixer
  (``d_state``, ``mixer_layers``, ``mixer_heads``, ``latent_cycles``, ``z_init``), the [Z] token and the heads;
* training: the corruption of drafts, the six loss weights, halting/length targets, and the phase fields
  (``phase``, learning rates, LoRA, unfrozen layers, L2-SP).

Presets ``baseline``, ``after_surgery``, ``phase_a``, ``phase_b``, ``phase_c`` are JSON files next to this module
(``configs/{name}.json``) listing only the fields that define the stage; defaults fill in the rest.
:func:`resolve` takes a preset name or a path to a JSON file.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import math
import numbers
import os
import tempfile
from typing import Any, Sequence

from kimi_jax.config import read_json_object
from kimi_jax.errors import KimiJaxError

DEFAULT_SOURCE = "recursive config"
KDA_CHUNK = 64  # the chunked KDA kernel's chunk size (kimi_jax/ops/kda.py)

COMMIT_MODES = ("verified", "learned", "baseline_verified")
SEED_MODES = ("ar", "leftover", "mask")
Z_INITS = ("learned", "draft", "zero")
HALT_TARGETS = ("final_agree", "target_exact")
LENGTH_TARGETS = ("final_agree", "reference")
HALTING_MODES = ("bce", "pondernet")
CORRUPTION_SCHEDULES = ("constant", "linear", "cosine")
CORRUPTION_KINDS = ("mask", "sampled", "tf_argmax", "uniform")  # sorted: the stored order of corruption_mix
PHASES = (None, "a", "b", "c")
CACHE_RESET_POLICIES = ("rewind_to_prefix",)

DEFAULT_CORRUPTION_MIX = (("mask", 0.0), ("sampled", 0.45), ("tf_argmax", 0.45), ("uniform", 0.1))

PRESET_NAMES = ("baseline", "after_surgery", "phase_a", "phase_b", "phase_c")


class RecursiveConfigError(KimiJaxError, ValueError):
    """A recursive-refinement config (JSON file, preset or keyword arguments) with an invalid field."""


@dataclasses.dataclass(frozen=True)
class RecursiveConfig:
    # --- Prototype names (kept) -------------------------------------------------------------------------------------
    recursive_enabled: bool = True  # false: plain baseline generation (identical program minus the sidecar)
    chunk_width: int = 128  # W: window length; a positive multiple of the KDA chunk (64)
    max_inner_steps: int = 4  # K: scan length in training, step cap at inference
    commit_threshold: float = 0.5  # tau: stop refining when the halt probability reaches it
    min_commit_threshold: float = 0.3  # tau_min: below it, learned mode falls back to the verified length
    layers_to_refine: str | tuple[int, ...] = "all"  # 0-based decoder layers that get a refine cell, or "all"
    use_latent_token: bool = True  # append the [Z] token at window position W (readout and global mixer slot)
    d_state: int = 512  # d_z: width of the latent z and of the z-mixer
    gate_hidden: int = 256  # hidden width of the halt and length head MLPs
    max_chunk_len: int | None = None  # None means chunk_width; the length head covers commit lengths 0..W
    corruption_rate: float = 0.5  # omega: upper bound of the corruption rate t ~ U[beta, omega]
    corruption_rate_final: float = 0.5  # omega annealed to this value over training
    corruption_min_rate: float = 0.05  # beta: lower bound of t
    corruption_schedule: str = "linear"  # how omega goes from corruption_rate to corruption_rate_final
    # Shares of the draft corruption kinds, stored as sorted (kind, share) pairs so the config stays hashable.
    corruption_mix: tuple[tuple[str, float], ...] = DEFAULT_CORRUPTION_MIX
    lambda_final: float = 1.0
    lambda_masked: float = 0.5
    lambda_halt: float = 0.5
    lambda_length: float = 0.05
    lambda_ponder: float = 0.01
    lambda_stability: float = 0.1  # raised from the prototype's 0.01: the hinge is O(CE)
    enable_length_head: bool = True  # off: learned mode commits the verified length
    use_soft_tokens: bool = False  # expected-embedding drafts for the steps inside grad_steps
    cache_reset_policy: str = "rewind_to_prefix"  # every inner step rewinds to the committed-prefix snapshot
    # --- New fields from the design ---------------------------------------------------------------------------------
    commit_mode: str = "verified"  # verified: 1 + LCP (baseline-exact); learned: length head; baseline_verified
    seed: str = "ar"  # draft seed mode (not a random seed): AR greedy, previous chunk's leftover, or all [M]
    z_init: str = "learned"  # initial latent z: learned per-slot vector, Mixer(E[draft]), or zeros
    halt_target: str = "final_agree"  # halt BCE target: step agrees with the last step, or equals the reference
    length_target: str = "final_agree"  # length CE target: LCP with the last step, or with the reference
    halting_mode: str = "bce"  # bce: TRM-style supervised halt; pondernet: PonderNet L_rec + KL
    refine_rank: int = 256  # r: bottleneck rank of each refine cell
    refine_gate_init: float = 1.0  # alpha init (B = 0 keeps zero-init whatever alpha is; 0 gives "double zero")
    halt_bias_init: float = -4.0  # halt head output bias, so the untrained model never halts voluntarily
    latent_cycles: int = 1  # z-mixer iterations per full-depth step
    mixer_layers: int = 1  # bidirectional transformer layers in the z-mixer
    mixer_heads: int = 4  # attention heads of the z-mixer (must divide d_state)
    grad_steps: int = 0  # truncated BPTT: the last grad_steps steps do not stop the gradient of z
    ponder_prior: float = 0.5  # lambda_p of the geometric prior Geom_K(lambda_p)
    ponder_kl_beta: float = 0.0  # weight of KL(p || Geom_K(lambda_p)) added to the ponder cost
    soft_token_temperature: float = 1.0  # tau of softmax(logits / tau) for soft-token drafts
    rng_seed: int = 0  # seeds the sidecar init and the corruption RNG
    # --- Training phase ---------------------------------------------------------------------------------------------
    phase: str | None = None  # None (no training) or "a" (sidecar), "b" (+ LoRA), "c" (+ unfrozen blocks)
    lr_sidecar: float = 3e-4  # refine cells, z-mixer, [Z]/[M] embeddings
    lr_heads: float = 5e-4  # halt and length heads
    weight_decay: float = 0.05
    lora_lr: float = 1e-5
    lora_rank: int = 16
    lora_layers: str | tuple[int, ...] = "top_third"  # layers with LoRA on the KDA/MLA projections (noisy stream)
    unfreeze_layers: str | tuple[int, ...] = "every_4th"  # phase C blocks trained in both streams: or "mla"
    lr_unfrozen: float = 1e-5
    l2sp_weight: float = 1e-3  # mu of the L2-SP penalty mu * ||theta - theta_0||^2 on unfrozen weights
    # Where this config came from, for error messages only (not compared, hashed or serialised).
    _source: str = dataclasses.field(default=DEFAULT_SOURCE, compare=False, hash=False, repr=False)

    # --- Validation -------------------------------------------------------------------------------------------------

    def __post_init__(self):
        src = self._source if isinstance(self._source, str) else DEFAULT_SOURCE
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731

        def fail(name: str, must: str, value: Any):
            raise RecursiveConfigError(f"{src}: field {name!r} must be {must}, got {value!r}")

        def get_bool(name):
            v = getattr(self, name)
            if not isinstance(v, bool):
                fail(name, "a boolean (true or false)", v)

        def get_int(name, lo=None, hi=None, must=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                fail(name, must or "an integer", v)
            v = int(v)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                fail(name, must or "an integer " + _range_text(lo, hi), v)
            set_(name, v)
            return v

        def get_float(name, lo=None, hi=None, lo_open=False, hi_open=False, must=None):
            raw = getattr(self, name)
            if lo is None and hi is None:
                must = must or "a finite number"
            else:
                must = must or "a finite number " + _range_text(lo, hi, lo_open, hi_open)
            if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
                fail(name, must, raw)
            v = float(raw)
            bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
            bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
            if not math.isfinite(v) or bad_lo or bad_hi:
                fail(name, must, raw)
            set_(name, v)
            return v

        def get_choice(name, choices, why=""):
            v = getattr(self, name)
            if v not in choices or (v is not None and not isinstance(v, str)):
                fail(name, "one of " + ", ".join("null" if c is None else repr(c) for c in choices) + why, v)
            return v

        def get_layers(name, keywords):
            v = getattr(self, name)
            v = list(v) if isinstance(v, tuple) else v  # as written in JSON, for messages
            words = " or ".join(repr(k) for k in keywords)
            must = f"{words} or a list of distinct non-negative layer indices"
            if isinstance(v, str):
                if v not in keywords:
                    fail(name, must, v)
                return
            if not isinstance(v, (list, tuple)):
                fail(name, must, v)
            for i in v:
                if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                    fail(name, must + f" (entry {i!r} is not an integer)", v)
                if i < 0:
                    fail(name, must + f" (entry {int(i)} is negative)", v)
            ints = [int(i) for i in v]
            if len(set(ints)) != len(ints):
                dup = sorted({i for i in ints if ints.count(i) > 1})
                fail(name, must + f" (duplicated: {dup})", v)
            set_(name, tuple(sorted(ints)))

        # Window and commit rule.
        get_bool("recursive_enabled")
        w = get_int("chunk_width", lo=1)
        if w % KDA_CHUNK:
            fail("chunk_width", f"a positive multiple of {KDA_CHUNK} (the chunked KDA kernel processes "
                 f"{KDA_CHUNK}-token chunks, so window boundaries must fall on chunk boundaries)", w)
        k = get_int("max_inner_steps", lo=1)
        tau = get_float("commit_threshold", lo=0.0, hi=1.0, lo_open=True)
        get_float("min_commit_threshold", lo=0.0, hi=tau,
                  must=f"in [0, commit_threshold={tau}] (the learned-mode fallback threshold cannot exceed tau)")
        get_layers("layers_to_refine", ("all",))
        if self.layers_to_refine == ():
            fail("layers_to_refine", "'all' or a non-empty list of layer indices (use recursive_enabled false to "
                 "turn refinement off)", [])
        get_bool("use_latent_token")
        d = get_int("d_state", lo=1)
        get_int("gate_hidden", lo=1)
        mcl = self.max_chunk_len
        if mcl is not None:
            if isinstance(mcl, bool) or not isinstance(mcl, numbers.Integral) or int(mcl) != w:
                fail("max_chunk_len", f"null or equal to chunk_width={w} (the length head predicts commit lengths "
                     f"0..W over exactly one window)", mcl)
            set_("max_chunk_len", int(mcl))

        # Corruption of training drafts.
        omega = get_float("corruption_rate", lo=0.0, hi=1.0)
        omega_final = get_float("corruption_rate_final", lo=0.0, hi=1.0)
        lo_max = min(omega, omega_final)
        get_float("corruption_min_rate", lo=0.0, hi=lo_max,
                  must=f"in [0, min(corruption_rate, corruption_rate_final)={lo_max}] (beta is the lower bound of "
                  f"t ~ U[beta, omega])")
        get_choice("corruption_schedule", CORRUPTION_SCHEDULES)
        self._check_mix(fail)

        # Loss weights.
        for name in ("lambda_final", "lambda_masked", "lambda_halt", "lambda_length", "lambda_ponder",
                     "lambda_stability"):
            get_float(name, lo=0.0, must="a finite number >= 0")
        get_bool("enable_length_head")
        get_bool("use_soft_tokens")
        v = self.cache_reset_policy
        if v != "rewind_to_prefix" or not isinstance(v, str):
            fail("cache_reset_policy", "'rewind_to_prefix' (the only valid policy: inner steps re-process the same "
                 "window positions, so every step must rewind to the committed-prefix snapshot; keeping the KDA "
                 "recurrent state would consume the chunk twice)", v)

        # Modes.
        get_choice("commit_mode", COMMIT_MODES)
        seed = get_choice("seed", SEED_MODES, " (the draft seed mode; the random seed is rng_seed)")
        get_choice("z_init", Z_INITS)
        get_choice("halt_target", HALT_TARGETS)
        get_choice("length_target", LENGTH_TARGETS)
        get_choice("halting_mode", HALTING_MODES)
        if dict(self.corruption_mix)["mask"] > 0 and seed != "mask":
            fail("corruption_mix", f"free of 'mask' corruption unless seed is 'mask' (the [M] embedding only "
                 f"exists for mask seeding; seed is {seed!r})", self.corruption_mix_dict)

        # Sidecar sizes.
        get_int("refine_rank", lo=1)
        get_float("refine_gate_init")
        get_float("halt_bias_init")
        get_int("latent_cycles", lo=1)
        get_int("mixer_layers", lo=1)
        heads = get_int("mixer_heads", lo=1)
        if d % heads:
            fail("mixer_heads", f"a divisor of d_state={d}", heads)
        get_int("grad_steps", lo=0, hi=k, must=f"in [0, max_inner_steps={k}]")
        get_float("ponder_prior", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        get_float("ponder_kl_beta", lo=0.0, must="a finite number >= 0")
        get_float("soft_token_temperature", lo=0.0, lo_open=True)
        get_int("rng_seed", lo=0)

        # Training phase.
        get_choice("phase", PHASES)
        for name in ("lr_sidecar", "lr_heads", "lora_lr", "lr_unfrozen"):
            get_float(name, lo=0.0, lo_open=True)
        get_float("weight_decay", lo=0.0, must="a finite number >= 0")
        get_int("lora_rank", lo=1)
        get_layers("lora_layers", ("top_third",))
        get_layers("unfreeze_layers", ("every_4th", "mla"))
        get_float("l2sp_weight", lo=0.0, must="a finite number >= 0")
        if not isinstance(self._source, str):
            set_("_source", DEFAULT_SOURCE)

    def _check_mix(self, fail) -> None:
        name = "corruption_mix"
        raw = self.corruption_mix
        must = "an object with shares for " + ", ".join(repr(k) for k in CORRUPTION_KINDS)
        if isinstance(raw, dict):
            items = list(raw.items())
        elif isinstance(raw, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in raw):
            items = [tuple(p) for p in raw]
        else:
            fail(name, must, raw)
        shown = dict(items)
        if len(shown) != len(items):
            fail(name, must + " (each kind once)", raw)
        unknown = [k for k, _ in items if k not in CORRUPTION_KINDS]
        if unknown:
            fail(name, must + f" (unknown kind {unknown[0]!r})", shown)
        mix = dict.fromkeys(CORRUPTION_KINDS, 0.0)  # missing kinds have share 0
        for kind, share in items:
            if isinstance(share, bool) or not isinstance(share, numbers.Real) or not math.isfinite(share) or share < 0:
                fail(name, must + f" (share of {kind!r} must be a finite number >= 0)", shown)
            mix[kind] = float(share)
        total = sum(mix.values())
        if abs(total - 1.0) > 1e-6:
            fail(name, must + f" summing to 1 (they sum to {total!r})", shown)
        object.__setattr__(self, name, tuple(sorted(mix.items())))

    # --- Derived values ---------------------------------------------------------------------------------------------

    @property
    def corruption_mix_dict(self) -> dict[str, float]:
        """The corruption shares as a plain dict (all four kinds present)."""
        return dict(self.corruption_mix)

    @property
    def uses_lora(self) -> bool:
        """Phase-B LoRA adapters exist from phase b on (phase c keeps them and unfreezes blocks besides)."""
        return self.phase in ("b", "c")

    @property
    def effective_max_chunk_len(self) -> int:
        """The longest commit (the length head covers 0..this); always chunk_width."""
        return self.chunk_width

    def refined_layers(self, num_hidden_layers: int) -> tuple[int, ...]:
        """The 0-based layers with a refine cell, checked against the model's depth."""
        n = self._check_depth(num_hidden_layers)
        if self.layers_to_refine == "all":
            return tuple(range(n))
        return self._check_indices("layers_to_refine", self.layers_to_refine, n)

    def lora_layer_indices(self, num_hidden_layers: int) -> tuple[int, ...]:
        """Layers with LoRA adapters: "top_third" is the last ceil(n / 3) layers."""
        n = self._check_depth(num_hidden_layers)
        if self.lora_layers == "top_third":
            return tuple(range(n - math.ceil(n / 3), n))
        return self._check_indices("lora_layers", self.lora_layers, n)

    def unfrozen_layer_indices(self, mixer_types: Sequence[str]) -> tuple[int, ...]:
        """Blocks unfrozen in phase C: "every_4th" (3, 7, 11, ...), "mla" (the MLA blocks) or an explicit list."""
        if isinstance(mixer_types, str) or not all(isinstance(m, str) for m in mixer_types):
            raise RecursiveConfigError(f"{self._source}: mixer_types must be a sequence of mixer names like 'kda' "
                                       f"and 'mla', got {mixer_types!r}")
        n = self._check_depth(len(mixer_types))
        if self.unfreeze_layers == "every_4th":
            return tuple(i for i in range(n) if i % 4 == 3)
        if self.unfreeze_layers == "mla":
            found = tuple(i for i, m in enumerate(mixer_types) if m == "mla")
            if not found:
                raise RecursiveConfigError(f"{self._source}: field 'unfreeze_layers' must name existing layers, got "
                                           f"'mla' but the schedule has no MLA layer")
            return found
        return self._check_indices("unfreeze_layers", self.unfreeze_layers, n)

    def _check_depth(self, n: Any) -> int:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise RecursiveConfigError(f"{self._source}: num_hidden_layers must be a positive integer, got {n!r}")
        return int(n)

    def _check_indices(self, name: str, layers: tuple[int, ...], n: int) -> tuple[int, ...]:
        bad = [i for i in layers if i >= n]
        if bad:
            raise RecursiveConfigError(f"{self._source}: field {name!r} must hold layer indices in [0, {n - 1}] for a "
                                       f"{n}-layer model, got {bad[0]!r} in {list(layers)!r}")
        return tuple(layers)

    # --- Construction and serialisation -----------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if not f.name.startswith("_"))

    @classmethod
    def _check_keys(cls, keys, source: str) -> None:
        valid = cls.field_names()
        unknown = [k for k in keys if k not in valid]
        if not unknown:
            return
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), valid, n=1) if isinstance(k, str) else []
            parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RecursiveConfigError(f"{source}: unknown field{'s' if len(parts) > 1 else ''} " + ", ".join(parts))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = DEFAULT_SOURCE) -> "RecursiveConfig":
        """Build from a JSON-like dict; unknown keys are an error that suggests the closest field."""
        if not isinstance(d, dict):
            raise RecursiveConfigError(f"{source}: expected an object of config fields, got {type(d).__name__}")
        cls._check_keys(d.keys(), source)
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kwargs, _source=str(source))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "RecursiveConfig":
        """Read a JSON object of fields from `path` (errors name the file)."""
        path = os.fspath(path)
        return cls.from_dict(read_json_object(path, RecursiveConfigError), source=path)

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-ready: lists for tuples and corruption_mix as an object."""
        out = {}
        for name in self.field_names():
            v = getattr(self, name)
            if name == "corruption_mix":
                v = self.corruption_mix_dict
            elif isinstance(v, tuple):
                v = list(v)
            out[name] = v
        return out

    def to_json(self, path: str | os.PathLike) -> str:
        """Write all fields to `path` atomically (temp file in the same folder, then os.replace); returns the path."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint's config must be readable on shared storage
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path

    def replace(self, **changes) -> "RecursiveConfig":
        """A copy with `changes` applied, validated again."""
        self._check_keys(changes.keys(), self._source)
        changes = {k: (tuple(v) if isinstance(v, list) else v) for k, v in changes.items()}
        return dataclasses.replace(self, **changes)


def _range_text(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"{'<' if hi_open else '<='} {hi:g}"


def preset_path(name: str) -> str:
    """The path of preset `name`'s JSON file inside the installed package."""
    if name not in PRESET_NAMES:
        raise RecursiveConfigError(f"unknown recursive preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return str(importlib.resources.files("kimi_jax.recursive").joinpath("configs", f"{name}.json"))


def load_preset(name: str) -> RecursiveConfig:
    """One of PRESET_NAMES, read from kimi_jax/recursive/configs/{name}.json."""
    return RecursiveConfig.from_json(preset_path(name))


def resolve(spec: str | os.PathLike | RecursiveConfig) -> RecursiveConfig:
    """A preset name, a path to a JSON file of fields, or a RecursiveConfig (returned as is)."""
    if isinstance(spec, RecursiveConfig):
        return spec
    if isinstance(spec, str) and spec in PRESET_NAMES:
        return load_preset(spec)
    path = os.fspath(spec)
    if not os.path.isfile(path):
        raise RecursiveConfigError(f"{path}: neither a recursive preset ({', '.join(PRESET_NAMES)}) nor a JSON file")
    return RecursiveConfig.from_json(path)

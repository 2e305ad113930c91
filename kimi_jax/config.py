"""KimiLinearConfig: one frozen config for the whole stack, read from an HF ``config.json``.

Two dialects exist on disk and both are accepted:

* the hub's remote-code config: ``linear_attn_config`` with 1-indexed ``kda_layers`` / ``full_attn_layers`` and
  ``first_k_dense_replace`` / ``moe_layer_freq`` for the FFN schedule;
* transformers' native config: 0-indexed ``layer_types`` ("linear_attention" / "full_attention") and
  ``mlp_layer_types`` ("dense" / "sparse").

The layer schedule always comes from the file. transformers falls back to "MLA every 4th layer" when the lists are
missing; that pattern is wrong for Kimi-Linear-48B, so a config without a schedule is an error here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
import typing
from typing import Any, Literal
from kimi_jax.errors import KimiJaxError

KDA = "kda"
MLA = "mla"
DENSE = "dense"
MOE = "moe"

MixerKind = Literal["kda", "mla"]
FfnKind = Literal["dense", "moe"]


class ConfigError(KimiJaxError, ValueError):
    """A config.json (or preset override) that cannot describe a Kimi-Linear model."""


def read_json_object(path: str, error: type[Exception] = ConfigError, missing: str | None = None) -> dict:
    """Read a JSON object from `path`, turning every failure into one `error` line naming the file."""
    from kimi_jax.safe_io import read_utf8

    text = read_utf8(path, error, missing=missing)
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object")
    return d


@dataclasses.dataclass(frozen=True)
class KimiLinearConfig:
    # Sizes.
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int  # dense SwiGLU width (the first `first_k_dense_replace` layers)
    # MLA (NoPE).
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int  # the shared, never-rotated key part
    v_head_dim: int
    q_lora_rank: int | None
    # KDA.
    kda_num_heads: int
    kda_head_dim: int
    conv_kernel_size: int
    # Schedule (0-indexed, one entry per layer).
    mixer_types: tuple[str, ...]
    ffn_types: tuple[str, ...]
    # MoE.
    num_experts: int
    num_experts_per_token: int
    num_shared_experts: int
    moe_intermediate_size: int
    routed_scaling_factor: float
    moe_renormalize: bool
    num_expert_group: int
    topk_group: int
    # The hub remote code reads routing weights from the bias-corrected scores (an aliasing bug, spec §4.2);
    # transformers and vLLM use the unbiased scores. False = transformers/vLLM, True = remote-code parity.
    router_weights_use_correction_bias: bool = False
    # Norms.
    rms_norm_eps: float = 1e-5
    mla_latent_norm_eps: float = 1e-6  # kv_a_layernorm / q_a_layernorm use the default eps in the reference
    # Head and special tokens.
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Kernel choices (not in config.json).
    kda_chunk_size: int = 64

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kda_projection_dim(self) -> int:
        return self.kda_num_heads * self.kda_head_dim

    @property
    def layer_kinds(self) -> tuple[tuple[str, str], ...]:
        return tuple(zip(self.mixer_types, self.ffn_types))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        self.validate()

    def validate(self, source: str = "config") -> None:
        def fail(msg: str):
            raise ConfigError(f"{source}: {msg}")

        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_nope_head_dim", "v_head_dim", "kda_num_heads", "kda_head_dim", "conv_kernel_size", "kda_chunk_size",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"field '{name}' must be a positive integer, got {value!r}")
        if not isinstance(self.qk_rope_head_dim, int) or self.qk_rope_head_dim < 0:
            fail(f"field 'qk_rope_head_dim' must be a non-negative integer, got {self.qk_rope_head_dim!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            fail(f"field 'q_lora_rank' must be null or a positive integer, got {self.q_lora_rank!r}")
        n = self.num_hidden_layers
        if len(self.mixer_types) != n:
            fail(f"the attention schedule has {len(self.mixer_types)} entries but num_hidden_layers is {n}")
        if len(self.ffn_types) != n:
            fail(f"the FFN schedule has {len(self.ffn_types)} entries but num_hidden_layers is {n}")
        for i, kind in enumerate(self.mixer_types):
            if kind not in (KDA, MLA):
                fail(f"layer {i} has attention type {kind!r}; expected 'kda' or 'mla'")
        for i, kind in enumerate(self.ffn_types):
            if kind not in (DENSE, MOE):
                fail(f"layer {i} has FFN type {kind!r}; expected 'dense' or 'moe'")
        if DENSE in self.ffn_types and (not isinstance(self.intermediate_size, int) or self.intermediate_size <= 0):
            fail(f"field 'intermediate_size' must be a positive integer, got {self.intermediate_size!r}")
        if MOE in self.ffn_types:
            for name in ("num_experts", "num_experts_per_token", "moe_intermediate_size", "num_expert_group",
                         "topk_group"):
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    fail(f"field '{name}' must be a positive integer for MoE layers, got {value!r}")
            if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
                fail(f"field 'num_shared_experts' must be a non-negative integer, got {self.num_shared_experts!r}")
            if self.num_experts_per_token > self.num_experts:
                fail(f"num_experts_per_token={self.num_experts_per_token} exceeds num_experts={self.num_experts}")
            if self.num_experts % self.num_expert_group:
                fail(f"num_experts={self.num_experts} is not divisible by num_expert_group={self.num_expert_group}")
            if self.topk_group > self.num_expert_group:
                fail(f"topk_group={self.topk_group} exceeds num_expert_group={self.num_expert_group}")
            per_group = self.num_experts // self.num_expert_group
            if self.num_expert_group > 1 and per_group < 2:
                fail("grouped routing scores each group by its top-2 experts; need at least 2 experts per group")
            if self.num_experts_per_token > self.topk_group * per_group:
                fail(f"num_experts_per_token={self.num_experts_per_token} exceeds the experts in the "
                     f"{self.topk_group} selected group(s) ({self.topk_group * per_group})")
        if not self.rms_norm_eps > 0 or not self.mla_latent_norm_eps > 0:
            fail("norm epsilons must be positive")
        for name in ("bos_token_id", "pad_token_id"):
            tok = getattr(self, name)
            if tok is not None and not (0 <= tok < self.vocab_size):
                fail(f"field '{name}'={tok} is outside the vocabulary (vocab_size={self.vocab_size})")
        for tok in self.eos_token_ids:
            if not 0 <= tok < self.vocab_size:
                fail(f"field 'eos_token_id' entry {tok} is outside the vocabulary (vocab_size={self.vocab_size})")

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides) -> "KimiLinearConfig":
        """Build from an HF config dict of either dialect; `source` names the file in error messages.

        Every key that is read is type-checked first (`check_hf_types`); null counts as absent."""

        def fail(msg: str):
            raise ConfigError(f"{source}: {msg}")

        check_hf_types(d, source)

        def get(*names, default=None, required=False):
            for name in names:
                value = _lookup(d, name)
                if value is not None:
                    return value
            if required:
                fail(f"missing required field '{names[0]}'")
            return default

        model_type = get("model_type")
        if model_type not in (None, "kimi_linear"):
            fail(f"model_type is {model_type!r}, expected 'kimi_linear'")
        if get("attention_bias", default=False):
            fail("attention_bias=true is not supported: Kimi-Linear's MLA has no biases")
        act = get("hidden_act", default="silu")
        if act != "silu":
            fail(f"hidden_act={act!r} is not supported (Kimi-Linear uses 'silu')")
        router_act = get("moe_router_activation_func", default="sigmoid")
        if router_act != "sigmoid":
            fail(f"moe_router_activation_func={router_act!r} is not supported (Kimi-Linear uses 'sigmoid')")
        if get("mla_use_nope", default=True) is not True:
            fail("mla_use_nope=false (rotary MLA) is not supported: Kimi-Linear's MLA is NoPE")
        if get("num_nextn_predict_layers", default=0):
            fail("num_nextn_predict_layers > 0 (an MTP head) is not supported")

        n_layers = get("num_hidden_layers", required=True)
        linear = get("linear_attn_config", default={})

        # --- attention schedule
        from_lists = None
        if "kda_layers" in linear or "full_attn_layers" in linear:
            kda_layers = linear.get("kda_layers") or []
            full_layers = linear.get("full_attn_layers") or []
            kinds: list[str | None] = [None] * n_layers
            for field_name, layers, kind in (("kda_layers", kda_layers, KDA), ("full_attn_layers", full_layers, MLA)):
                for one_based in layers:
                    if not 1 <= one_based <= n_layers:
                        fail(f"linear_attn_config.{field_name} entry {one_based!r} is not a layer in 1..{n_layers} "
                             "(the hub lists are 1-indexed)")
                    if kinds[one_based - 1] is not None:
                        fail(f"linear_attn_config: layer {one_based} (1-indexed) is listed in both kda_layers and "
                             "full_attn_layers")
                    kinds[one_based - 1] = kind
            missing = [i + 1 for i, k in enumerate(kinds) if k is None]
            if missing:
                fail(f"linear_attn_config: layers {missing} (1-indexed) are in neither kda_layers nor full_attn_layers")
            from_lists = tuple(kinds)
        from_types = None
        listed = get("layer_types")
        if listed is not None:
            names = {"linear_attention": KDA, "full_attention": MLA, "kda": KDA, "mla": MLA}
            if len(listed) != n_layers:
                fail(f"layer_types has {len(listed)} entries but num_hidden_layers is {n_layers}")
            unknown = sorted({t for t in listed if t not in names})
            if unknown:
                fail(f"layer_types has unknown entries {unknown}; expected 'linear_attention' or 'full_attention'")
            from_types = tuple(names[t] for t in listed)
        if from_lists is not None and from_types is not None and from_lists != from_types:
            fail("layer_types disagrees with linear_attn_config.kda_layers/full_attn_layers")
        mixer_types = from_types or from_lists
        if mixer_types is None:
            fail("no layer schedule: give linear_attn_config.kda_layers/full_attn_layers or layer_types "
                 "(the 'MLA every 4th layer' fallback is wrong for Kimi-Linear and is not applied)")

        # --- FFN schedule
        num_experts = get(*HF_FIELD_KEYS["num_experts"], default=0)
        listed = get("mlp_layer_types")
        if listed is not None:
            names = {"dense": DENSE, "sparse": MOE, "moe": MOE}
            if len(listed) != n_layers:
                fail(f"mlp_layer_types has {len(listed)} entries but num_hidden_layers is {n_layers}")
            unknown = sorted({t for t in listed if t not in names})
            if unknown:
                fail(f"mlp_layer_types has unknown entries {unknown}; expected 'dense' or 'sparse'")
            ffn_types = tuple(names[t] for t in listed)
        else:
            first_dense = get("first_k_dense_replace", default=0)
            freq = get("moe_layer_freq", default=1)
            if freq <= 0:
                fail(f"moe_layer_freq must be positive, got {freq}")
            ffn_types = tuple(
                MOE if num_experts and i >= first_dense and i % freq == 0 else DENSE for i in range(n_layers)
            )

        n_heads = get("num_attention_heads", required=True)
        n_kv = get("num_key_value_heads", default=n_heads)
        if n_kv != n_heads:
            fail(f"num_key_value_heads={n_kv} differs from num_attention_heads={n_heads}; MLA expands one latent "
                 "into every head, so they must be equal")

        kwargs: dict[str, Any] = dict(mixer_types=mixer_types, ffn_types=ffn_types)
        for field_name, keys in HF_FIELD_KEYS.items():
            required = field_name in HF_REQUIRED_FIELDS
            value = get(*keys, default=HF_DEFAULTS.get(field_name), required=required)
            if isinstance(value, list):  # JSON lists are the config's tuples
                value = tuple(value)
            elif _hf_key_types()[keys[0]] is float and value is not None:
                value = float(value)  # a JSON integer is a valid number; the config holds floats
            kwargs[field_name] = value
        if get("use_grouped_topk", default=True) is False:
            kwargs["num_expert_group"], kwargs["topk_group"] = 1, 1
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides) -> "KimiLinearConfig":
        path = os.fspath(path)
        return cls.from_hf_dict(read_json_object(path), source=path, **overrides)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "KimiLinearConfig":
        """Read `config.json` from a checkpoint folder (or a config file path directly)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return cls.from_json_file(path, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that both transformers' native class and the hub remote code read (both dialects)."""
        first_dense = next((i for i, k in enumerate(self.ffn_types) if k == MOE), self.num_hidden_layers)
        return {
            "architectures": ["KimiLinearForCausalLM"],
            "model_type": "kimi_linear",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": self.q_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "mla_use_nope": True,
            "linear_attn_config": {
                "num_heads": self.kda_num_heads,
                "head_dim": self.kda_head_dim,
                "short_conv_kernel_size": self.conv_kernel_size,
                "kda_layers": [i + 1 for i, k in enumerate(self.mixer_types) if k == KDA],
                "full_attn_layers": [i + 1 for i, k in enumerate(self.mixer_types) if k == MLA],
            },
            "layer_types": ["linear_attention" if k == KDA else "full_attention" for k in self.mixer_types],
            "mlp_layer_types": ["dense" if k == DENSE else "sparse" for k in self.ffn_types],
            "first_k_dense_replace": first_dense,
            "moe_layer_freq": 1,
            "num_experts": self.num_experts,
            "num_experts_per_token": self.num_experts_per_token,
            "num_shared_experts": self.num_shared_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "routed_scaling_factor": self.routed_scaling_factor,
            "moe_renormalize": self.moe_renormalize,
            "moe_router_activation_func": "sigmoid",
            "use_grouped_topk": True,
            "num_expert_group": self.num_expert_group,
            "topk_group": self.topk_group,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "attention_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def replace(self, **changes) -> "KimiLinearConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- config.json keys and their JSON types
# The config.json keys that set each KimiLinearConfig field, in order of precedence (the two dialects' names for the
# same field; a dotted key lies inside linear_attn_config). Each key's JSON type is its field's annotation.
HF_FIELD_KEYS: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size",),
    "num_hidden_layers": ("num_hidden_layers",),
    "intermediate_size": ("intermediate_size",),
    "num_attention_heads": ("num_attention_heads",),
    "kv_lora_rank": ("kv_lora_rank",),
    "qk_nope_head_dim": ("qk_nope_head_dim",),
    "qk_rope_head_dim": ("qk_rope_head_dim",),
    "v_head_dim": ("v_head_dim",),
    "q_lora_rank": ("q_lora_rank",),
    "kda_num_heads": ("linear_attn_config.num_heads", "linear_num_heads"),
    "kda_head_dim": ("linear_attn_config.head_dim", "linear_head_dim"),
    "conv_kernel_size": ("linear_attn_config.short_conv_kernel_size", "linear_conv_kernel_dim"),
    "num_experts": ("num_experts", "num_local_experts"),
    "num_experts_per_token": ("num_experts_per_token", "num_experts_per_tok"),
    "num_shared_experts": ("num_shared_experts", "n_shared_experts"),
    "moe_intermediate_size": ("moe_intermediate_size",),
    "routed_scaling_factor": ("routed_scaling_factor",),
    "moe_renormalize": ("moe_renormalize", "norm_topk_prob"),
    "num_expert_group": ("num_expert_group", "n_group"),
    "topk_group": ("topk_group",),
    "rms_norm_eps": ("rms_norm_eps",),
    "tie_word_embeddings": ("tie_word_embeddings",),
    "bos_token_id": ("bos_token_id",),
    "eos_token_id": ("eos_token_id",),
    "pad_token_id": ("pad_token_id",),
}
HF_REQUIRED_FIELDS = frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"})
# What an absent (or null) key means; the fields not listed here default to None.
HF_DEFAULTS: dict[str, Any] = {
    "intermediate_size": 0, "kda_num_heads": 32, "kda_head_dim": 128, "conv_kernel_size": 4, "num_experts": 0,
    "num_experts_per_token": 0, "num_shared_experts": 0, "moe_intermediate_size": 0, "routed_scaling_factor": 1.0,
    "moe_renormalize": True, "num_expert_group": 1, "topk_group": 1, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
# Keys that set no field directly: the layer schedules, and switches that must hold the one supported value.
HF_OTHER_KEYS: dict[str, Any] = {
    "model_type": str, "hidden_act": str, "moe_router_activation_func": str, "attention_bias": bool,
    "mla_use_nope": bool, "use_grouped_topk": bool, "num_nextn_predict_layers": int, "num_key_value_heads": int,
    "first_k_dense_replace": int, "moe_layer_freq": int, "layer_types": list[str], "mlp_layer_types": list[str],
    "linear_attn_config": dict, "linear_attn_config.kda_layers": list[int],
    "linear_attn_config.full_attn_layers": list[int],
}
_JSON_NAMES = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers"),
               bool: ("true or false", "true/false values"), str: ("a string", "strings"),
               dict: ("an object", "objects")}


@functools.lru_cache(maxsize=None)
def _hf_key_types() -> dict[str, Any]:
    """{config.json key: the Python type its parsed JSON value must have} for every key `from_hf_dict` reads."""
    hints = typing.get_type_hints(KimiLinearConfig)
    key_types = {key: hints[field] for field, keys in HF_FIELD_KEYS.items() for key in keys}
    key_types.update(HF_OTHER_KEYS)
    return key_types


def _lookup(d: dict, key: str):
    """`d[key]`, or for a dotted key the entry inside the nested object; None when absent."""
    head, _, rest = key.partition(".")
    value = d.get(head)
    if not rest:
        return value
    return _lookup(value, rest) if isinstance(value, dict) else None


def _has_type(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args if a is not type(None))
    if origin in (list, tuple):  # a JSON list; tuple[X, ...] is how the config holds one
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, tp)


def _describe(tp, plural: bool = False) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a, plural) for a in args if a is not type(None)] + (["null"] if type(None) in args else [])
        return ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin in (list, tuple):
        return "lists" if plural else f"a list of {_describe(args[0], plural=True)}"
    return _JSON_NAMES[tp][plural]


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction" if math.isfinite(value) and not value.is_integer() else (
            "a decimal number" if math.isfinite(value) else "not a finite number")
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _shown(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _list_entry_type(tp):
    """The entry type of the list that `tp` allows (`list[X]`, `tuple[X, ...]`, or one inside a union), else None."""
    if typing.get_origin(tp) in (list, tuple):
        return typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((e for e in map(_list_entry_type, typing.get_args(tp)) if e is not None), None)
    return None


def hf_type_problem(key: str, value, tp) -> str | None:
    """Why `value` (parsed JSON, not null) cannot be config.json's `key` of type `tp`, or None when it can."""
    if _has_type(value, tp):
        return None
    why = _json_kind(value)
    entry_type = _list_entry_type(tp)
    if isinstance(value, list) and entry_type is not None:
        bad = next(i for i, v in enumerate(value) if not _has_type(v, entry_type))
        why = f"entry {bad} is {_json_kind(value[bad])}"
    return f"field '{key}' must be {_describe(tp)}, got {_shown(value)} ({why})"


def check_hf_types(d: dict, source: str = "config.json") -> None:
    """Raise ConfigError naming `source` and the key when a config.json key that kimi_jax reads has the wrong JSON
    type: integers must be JSON integers (not booleans, decimals or strings), numbers finite JSON numbers, switches
    true/false, lists lists of the right entries. Null means absent; keys kimi_jax does not read are not checked."""
    for key, tp in _hf_key_types().items():
        value = _lookup(d, key)
        if value is None:
            continue
        problem = hf_type_problem(key, value, tp)
        if problem is not None:
            raise ConfigError(f"{source}: {problem}")


# ---------------------------------------------------------------------- presets
def kimi_linear_48b_a3b() -> KimiLinearConfig:
    """The released Kimi-Linear-48B-A3B (Base and Instruct share the architecture); spec §1."""
    mla_layers = {3, 7, 11, 15, 19, 23, 26}
    return KimiLinearConfig(
        vocab_size=163840, hidden_size=2304, num_hidden_layers=27, intermediate_size=9216,
        num_attention_heads=32, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        q_lora_rank=None, kda_num_heads=32, kda_head_dim=128, conv_kernel_size=4,
        mixer_types=tuple(MLA if i in mla_layers else KDA for i in range(27)),
        ffn_types=tuple(DENSE if i < 1 else MOE for i in range(27)),
        num_experts=256, num_experts_per_token=8, num_shared_experts=1, moe_intermediate_size=1024,
        routed_scaling_factor=2.446, moe_renormalize=True, num_expert_group=1, topk_group=1,
        rms_norm_eps=1e-5, bos_token_id=163584, eos_token_id=163586, pad_token_id=163839,
    )


def tiny(num_hidden_layers: int = 4, mla_layers: tuple[int, ...] = (3,), first_k_dense: int = 1,
         **overrides) -> KimiLinearConfig:
    """A tiny model of the same architecture (KDA + MLA + MoE) for tests and CPU demos."""
    base = dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=num_hidden_layers, intermediate_size=128,
        num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        q_lora_rank=None, kda_num_heads=4, kda_head_dim=16, conv_kernel_size=4,
        mixer_types=tuple(MLA if i in mla_layers else KDA for i in range(num_hidden_layers)),
        ffn_types=tuple(DENSE if i < first_k_dense else MOE for i in range(num_hidden_layers)),
        num_experts=8, num_experts_per_token=2, num_shared_experts=1, moe_intermediate_size=32,
        routed_scaling_factor=2.446, moe_renormalize=True, num_expert_group=1, topk_group=1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    base.update(overrides)
    return KimiLinearConfig(**base)


PRESETS = {"kimi-linear-48b-a3b": kimi_linear_48b_a3b, "tiny": tiny}


def get_preset(name: str) -> KimiLinearConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()

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
import json
import os
from typing import Any, Literal

KDA = "kda"
MLA = "mla"
DENSE = "dense"
MOE = "moe"

MixerKind = Literal["kda", "mla"]
FfnKind = Literal["dense", "moe"]


class ConfigError(ValueError):
    """A config.json (or preset override) that cannot describe a Kimi-Linear model."""


def read_json_object(path: str, error: type[Exception] = ConfigError, missing: str | None = None) -> dict:
    """Read a JSON object from `path`, turning every failure into one `error` line naming the file."""
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise error(missing or f"{path}: file not found") from None
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
        """Build from an HF config dict of either dialect; `source` names the file in error messages."""

        def fail(msg: str):
            raise ConfigError(f"{source}: {msg}")

        def get(*names, default=None, required=False):
            for name in names:
                if name in d and d[name] is not None:
                    return d[name]
            if required:
                fail(f"missing required field '{names[0]}'")
            return default

        model_type = d.get("model_type")
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

        n_layers = int(get("num_hidden_layers", required=True))
        linear = d.get("linear_attn_config") or {}
        if not isinstance(linear, dict):
            fail("linear_attn_config must be an object")

        # --- attention schedule
        from_lists = None
        if "kda_layers" in linear or "full_attn_layers" in linear:
            kda_layers = linear.get("kda_layers") or []
            full_layers = linear.get("full_attn_layers") or []
            kinds: list[str | None] = [None] * n_layers
            for field_name, layers, kind in (("kda_layers", kda_layers, KDA), ("full_attn_layers", full_layers, MLA)):
                for one_based in layers:
                    if not isinstance(one_based, int) or not 1 <= one_based <= n_layers:
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
        if d.get("layer_types") is not None:
            names = {"linear_attention": KDA, "full_attention": MLA, "kda": KDA, "mla": MLA}
            types = d["layer_types"]
            if len(types) != n_layers:
                fail(f"layer_types has {len(types)} entries but num_hidden_layers is {n_layers}")
            unknown = sorted({t for t in types if t not in names})
            if unknown:
                fail(f"layer_types has unknown entries {unknown}; expected 'linear_attention' or 'full_attention'")
            from_types = tuple(names[t] for t in types)
        if from_lists is not None and from_types is not None and from_lists != from_types:
            fail("layer_types disagrees with linear_attn_config.kda_layers/full_attn_layers")
        mixer_types = from_types or from_lists
        if mixer_types is None:
            fail("no layer schedule: give linear_attn_config.kda_layers/full_attn_layers or layer_types "
                 "(the 'MLA every 4th layer' fallback is wrong for Kimi-Linear and is not applied)")

        # --- FFN schedule
        num_experts = get("num_experts", "num_local_experts", default=0)
        if d.get("mlp_layer_types") is not None:
            names = {"dense": DENSE, "sparse": MOE, "moe": MOE}
            types = d["mlp_layer_types"]
            if len(types) != n_layers:
                fail(f"mlp_layer_types has {len(types)} entries but num_hidden_layers is {n_layers}")
            unknown = sorted({t for t in types if t not in names})
            if unknown:
                fail(f"mlp_layer_types has unknown entries {unknown}; expected 'dense' or 'sparse'")
            ffn_types = tuple(names[t] for t in types)
        else:
            first_dense = int(get("first_k_dense_replace", default=0))
            freq = int(get("moe_layer_freq", default=1))
            if freq <= 0:
                fail(f"moe_layer_freq must be positive, got {freq}")
            ffn_types = tuple(
                MOE if num_experts and i >= first_dense and i % freq == 0 else DENSE for i in range(n_layers)
            )

        q_lora = get("q_lora_rank")
        n_heads = int(get("num_attention_heads", required=True))
        n_kv = get("num_key_value_heads", default=n_heads)
        if n_kv != n_heads:
            fail(f"num_key_value_heads={n_kv} differs from num_attention_heads={n_heads}; MLA expands one latent "
                 "into every head, so they must be equal")
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)

        def as_int_or_none(x):
            return None if x is None else int(x)

        kwargs = dict(
            vocab_size=int(get("vocab_size", required=True)),
            hidden_size=int(get("hidden_size", required=True)),
            num_hidden_layers=n_layers,
            intermediate_size=int(get("intermediate_size", default=0)),
            num_attention_heads=n_heads,
            kv_lora_rank=int(get("kv_lora_rank", required=True)),
            qk_nope_head_dim=int(get("qk_nope_head_dim", required=True)),
            qk_rope_head_dim=int(get("qk_rope_head_dim", required=True)),
            v_head_dim=int(get("v_head_dim", required=True)),
            q_lora_rank=as_int_or_none(q_lora),
            kda_num_heads=int(linear.get("num_heads", get("linear_num_heads", default=32))),
            kda_head_dim=int(linear.get("head_dim", get("linear_head_dim", default=128))),
            conv_kernel_size=int(linear.get("short_conv_kernel_size", get("linear_conv_kernel_dim", default=4))),
            mixer_types=mixer_types,
            ffn_types=ffn_types,
            num_experts=int(num_experts or 0),
            num_experts_per_token=int(get("num_experts_per_token", "num_experts_per_tok", default=0)),
            num_shared_experts=int(get("num_shared_experts", "n_shared_experts", default=0)),
            moe_intermediate_size=int(get("moe_intermediate_size", default=0)),
            routed_scaling_factor=float(get("routed_scaling_factor", default=1.0)),
            moe_renormalize=bool(get("moe_renormalize", "norm_topk_prob", default=True)),
            num_expert_group=int(get("num_expert_group", "n_group", default=1)),
            topk_group=int(get("topk_group", default=1)),
            rms_norm_eps=float(get("rms_norm_eps", default=1e-5)),
            tie_word_embeddings=bool(get("tie_word_embeddings", default=False)),
            bos_token_id=as_int_or_none(d.get("bos_token_id")),
            eos_token_id=eos,
            pad_token_id=as_int_or_none(d.get("pad_token_id")),
        )
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

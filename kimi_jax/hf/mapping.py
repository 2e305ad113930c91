"""Declarative mapping between HF Kimi-Linear tensors and kimi_jax parameters (both directions).

Two HF layouts exist (spec §6):
  * "hub": the original remote-code names (`block_sparse_moe.experts.{e}.w1.weight`, `q_conv1d`, flat
    `f_a_proj`/`dt_bias`/`A_log`); this is also what transformers' `save_pretrained` writes;
  * "native": transformers' in-memory names (`mlp.experts.gate_up_proj` fused 3-D, `conv1d` of 3P channels,
    `forget_gate.*`).

Each `Rule` says: these JAX parameters (paths inside a decoder layer, or global) come from these HF tensors (names
relative to `model.layers.{i}.`; `a|b` lists accepted alternatives, the first is written on export), through a pair
of numpy transforms. `{e}` in a name expands over the experts. Everything else (the converter, the in-memory loader,
the exporter) walks these tables; nothing else knows a tensor name.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import numpy as np

from kimi_jax.config import KDA, MOE, KimiLinearConfig
from kimi_jax.layout import plan_segments

HUB, NATIVE = "hub", "native"
LAYOUTS = (HUB, NATIVE)

Transform = Callable[[list, KimiLinearConfig], list]


@dataclasses.dataclass(frozen=True)
class Rule:
    jax: tuple[str | tuple, ...]  # JAX paths (tuples of keys); a str is a single key
    hf: tuple[str, ...]  # HF names; "{e}" expands over experts, "a|b" lists alternatives
    to_jax: Transform
    to_hf: Transform
    shapes: Callable[[KimiLinearConfig], tuple]  # the HF shape of each name in `hf` (per expert for "{e}")

    def hf_names(self, cfg: KimiLinearConfig) -> list[str]:
        return [n for n, _ in self.hf_names_and_shapes(cfg)]

    def hf_names_and_shapes(self, cfg: KimiLinearConfig) -> list[tuple[str, tuple]]:
        out = []
        for name, shape in zip(self.hf, self.shapes(cfg)):
            if "{e}" in name:
                out.extend((name.replace("{e}", str(e)), tuple(shape)) for e in range(cfg.num_experts))
            else:
                out.append((name, tuple(shape)))
        return out


def _path(p) -> tuple:
    return p if isinstance(p, tuple) else tuple(p.split("."))


# ------------------------------------------------------------------ transforms (numpy, HF (out, in) <-> JAX (in, out))
def linear(in_shape: Callable | None = None, out_shape: Callable | None = None) -> tuple[Transform, Transform]:
    """A torch Linear weight (out, in) <-> a JAX kernel (*in_shape, *out_shape)."""

    def to_jax(ts, cfg):
        w = ts[0].T
        i_shape = in_shape(cfg) if in_shape else (w.shape[0],)
        o_shape = out_shape(cfg) if out_shape else (w.shape[1],)
        return [w.reshape(*i_shape, *o_shape)]

    def to_hf(arrs, cfg):
        a = arrs[0]
        n_in = len(in_shape(cfg)) if in_shape else 1
        in_size = int(np.prod(a.shape[:n_in]))
        return [a.reshape(in_size, -1).T]

    return to_jax, to_hf


def identity() -> tuple[Transform, Transform]:
    return (lambda ts, cfg: [ts[0]]), (lambda arrs, cfg: [arrs[0]])


def reshaped(jax_shape: Callable, hf_shape: Callable) -> tuple[Transform, Transform]:
    return (lambda ts, cfg: [ts[0].reshape(jax_shape(cfg))]), (lambda arrs, cfg: [arrs[0].reshape(hf_shape(cfg))])


def kda_heads(cfg):
    return (cfg.kda_num_heads, cfg.kda_head_dim)


def kda_qkv() -> tuple[Transform, Transform]:
    """q/k/v_proj (P, D) x3 <-> qkv_proj [D, 3, H, K]."""

    def to_jax(ts, cfg):
        D = ts[0].shape[1]
        return [np.stack([t.T for t in ts], axis=1).reshape(D, 3, *kda_heads(cfg))]

    def to_hf(arrs, cfg):
        a = arrs[0]
        return [a[:, i].reshape(a.shape[0], -1).T for i in range(3)]

    return to_jax, to_hf


def kda_conv(fused: bool) -> tuple[Transform, Transform]:
    """Depthwise conv (P, 1, W) x3 [hub] or (3P, 1, W) [native] <-> conv [W, 3, H, K] (no kernel flip)."""

    def to_jax(ts, cfg):
        w = np.concatenate([t[:, 0, :] for t in ts], axis=0)  # (3P, W), channels ordered [q; k; v]
        return [w.T.reshape(w.shape[1], 3, *kda_heads(cfg))]

    def to_hf(arrs, cfg):
        a = arrs[0]
        W = a.shape[0]
        w = a.reshape(W, 3, -1)  # (W, 3, P)
        parts = [w[:, i, :].T[:, None, :] for i in range(3)]
        return [np.concatenate(parts, axis=0)] if fused else parts

    return to_jax, to_hf


def expert_stack() -> tuple[Transform, Transform]:
    """experts.{e}.w (out, in) for every expert <-> one stacked kernel [E, in, out]."""
    return (lambda ts, cfg: [np.stack([t.T for t in ts])]), (lambda arrs, cfg: [w.T for w in arrs[0]])


def experts_gate_up() -> tuple[Transform, Transform]:
    """experts.gate_up_proj (E, 2F, D) <-> w_gate, w_up [E, D, F] (rows 0..F-1 are the gate, F..2F-1 the up)."""

    def to_jax(ts, cfg):
        F = cfg.moe_intermediate_size
        return [ts[0][:, :F].transpose(0, 2, 1), ts[0][:, F:].transpose(0, 2, 1)]

    def to_hf(arrs, cfg):
        return [np.concatenate([arrs[0].transpose(0, 2, 1), arrs[1].transpose(0, 2, 1)], axis=1)]

    return to_jax, to_hf


def expert_transpose() -> tuple[Transform, Transform]:
    """experts.down_proj (E, D, F) <-> w_down [E, F, D]."""
    return (lambda ts, cfg: [ts[0].transpose(0, 2, 1)]), (lambda arrs, cfg: [arrs[0].transpose(0, 2, 1)])


def R(jax, hf, transforms, shapes) -> Rule:
    """A rule: JAX path(s), HF name(s), (to_jax, to_hf), and cfg -> HF shape(s) (one shape, or one per name)."""
    jax = (jax,) if isinstance(jax, str) else jax
    hf = (hf,) if isinstance(hf, str) else hf

    def shape_list(cfg):
        got = shapes(cfg)
        return (got,) * len(hf) if got and isinstance(got[0], int) else tuple(got)

    return Rule(tuple(_path(p) for p in jax), tuple(hf), *transforms, shape_list)


# ------------------------------------------------------------------ per-layer tables
def mla_out(cfg):
    return (cfg.num_attention_heads, cfg.v_head_dim)


def mla_rules(cfg: KimiLinearConfig) -> list[Rule]:
    heads_qk = lambda c: (c.num_attention_heads, c.qk_head_dim)
    rules = []
    if cfg.q_lora_rank is None:
        rules.append(R("mixer.q_proj", "self_attn.q_proj.weight", linear(out_shape=heads_qk),
                       lambda c: (c.num_attention_heads * c.qk_head_dim, c.hidden_size)))
    else:
        rules += [R("mixer.q_a_proj", "self_attn.q_a_proj.weight", linear(), lambda c: (c.q_lora_rank, c.hidden_size)),
                  R("mixer.q_a_norm", "self_attn.q_a_layernorm.weight", identity(), lambda c: (c.q_lora_rank,)),
                  R("mixer.q_b_proj", "self_attn.q_b_proj.weight", linear(out_shape=heads_qk),
                    lambda c: (c.num_attention_heads * c.qk_head_dim, c.q_lora_rank))]
    rules += [
        R("mixer.kv_a_proj", "self_attn.kv_a_proj_with_mqa.weight", linear(),
          lambda c: (c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size)),
        R("mixer.kv_a_norm", "self_attn.kv_a_layernorm.weight", identity(), lambda c: (c.kv_lora_rank,)),
        R("mixer.kv_b_proj", "self_attn.kv_b_proj.weight",
          linear(out_shape=lambda c: (c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim)),
          lambda c: (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)),
        R("mixer.o_proj", "self_attn.o_proj.weight", linear(in_shape=mla_out),
          lambda c: (c.hidden_size, c.num_attention_heads * c.v_head_dim)),
    ]
    return rules


def kda_rules(layout: str) -> list[Rule]:
    gate = "self_attn." if layout == HUB else "self_attn.forget_gate."
    conv_names = (("self_attn.q_conv1d.weight", "self_attn.k_conv1d.weight", "self_attn.v_conv1d.weight")
                  if layout == HUB else ("self_attn.conv1d.weight",))
    return [
        R("mixer.qkv_proj", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
          kda_qkv(), lambda c: (c.kda_projection_dim, c.hidden_size)),
        R("mixer.conv", conv_names, kda_conv(fused=layout == NATIVE),
          lambda c: (c.kda_projection_dim * (3 if layout == NATIVE else 1), 1, c.conv_kernel_size)),
        R("mixer.f_a_proj", gate + "f_a_proj.weight", linear(), lambda c: (c.kda_head_dim, c.hidden_size)),
        R("mixer.f_b_proj", gate + "f_b_proj.weight", linear(out_shape=kda_heads),
          lambda c: (c.kda_projection_dim, c.kda_head_dim)),
        R("mixer.dt_bias", gate + "dt_bias", reshaped(kda_heads, lambda c: (c.kda_projection_dim,)),
          lambda c: (c.kda_projection_dim,)),
        R("mixer.A_log", gate + "A_log", reshaped(lambda c: (c.kda_num_heads,), lambda c: (1, 1, c.kda_num_heads, 1)),
          lambda c: (1, 1, c.kda_num_heads, 1)),
        R("mixer.b_proj", "self_attn.b_proj.weight", linear(), lambda c: (c.kda_num_heads, c.hidden_size)),
        R("mixer.g_a_proj", "self_attn.g_a_proj.weight", linear(), lambda c: (c.kda_head_dim, c.hidden_size)),
        R("mixer.g_b_proj", "self_attn.g_b_proj.weight", linear(out_shape=kda_heads),
          lambda c: (c.kda_projection_dim, c.kda_head_dim)),
        R("mixer.o_norm", "self_attn.o_norm.weight", identity(), lambda c: (c.kda_head_dim,)),
        R("mixer.o_proj", "self_attn.o_proj.weight", linear(in_shape=kda_heads),
          lambda c: (c.hidden_size, c.kda_projection_dim)),
    ]


def swiglu_rules(jax_prefix: str, hf_prefixes: Sequence[str], width: Callable[[KimiLinearConfig], int]
                 ) -> list[Rule]:
    def names(leaf):
        return "|".join(p + leaf for p in hf_prefixes)

    return [R(f"{jax_prefix}.gate_proj", names("gate_proj.weight"), linear(), lambda c: (width(c), c.hidden_size)),
            R(f"{jax_prefix}.up_proj", names("up_proj.weight"), linear(), lambda c: (width(c), c.hidden_size)),
            R(f"{jax_prefix}.down_proj", names("down_proj.weight"), linear(), lambda c: (c.hidden_size, width(c)))]


def moe_rules(cfg: KimiLinearConfig, layout: str) -> list[Rule]:
    moe = "block_sparse_moe." if layout == HUB else "mlp."
    rules = [R("ffn.router", moe + "gate.weight", linear(), lambda c: (c.num_experts, c.hidden_size)),
             R("ffn.correction_bias", moe + "gate.e_score_correction_bias", identity(), lambda c: (c.num_experts,))]
    if layout == HUB:
        F, D = (lambda c: c.moe_intermediate_size), (lambda c: c.hidden_size)
        rules += [R("ffn.w_gate", moe + "experts.{e}.w1.weight", expert_stack(), lambda c: (F(c), D(c))),
                  R("ffn.w_up", moe + "experts.{e}.w3.weight", expert_stack(), lambda c: (F(c), D(c))),
                  R("ffn.w_down", moe + "experts.{e}.w2.weight", expert_stack(), lambda c: (D(c), F(c)))]
    else:
        rules += [R(("ffn.w_gate", "ffn.w_up"), moe + "experts.gate_up_proj", experts_gate_up(),
                    lambda c: (c.num_experts, 2 * c.moe_intermediate_size, c.hidden_size)),
                  R("ffn.w_down", moe + "experts.down_proj", expert_transpose(),
                    lambda c: (c.num_experts, c.hidden_size, c.moe_intermediate_size))]
    if cfg.num_shared_experts:
        rules += swiglu_rules("ffn.shared_experts", [moe + "shared_experts."],
                              lambda c: c.moe_intermediate_size * c.num_shared_experts)
    return rules


def layer_rules(cfg: KimiLinearConfig, layer: int, layout: str) -> list[Rule]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    hidden = lambda c: (c.hidden_size,)
    rules = [R("input_norm.weight", "input_layernorm.weight", identity(), hidden),
             R("post_attention_norm.weight", "post_attention_layernorm.weight", identity(), hidden)]
    rules += kda_rules(layout) if cfg.mixer_types[layer] == KDA else mla_rules(cfg)
    if cfg.ffn_types[layer] == MOE:
        rules += moe_rules(cfg, layout)
    else:
        # The hub names layer 0's dense MLP `mlp.*`; transformers' save_pretrained writes `block_sparse_moe.*`.
        prefixes = ["mlp.", "block_sparse_moe."] if layout == HUB else ["mlp."]
        rules += swiglu_rules("ffn", prefixes, lambda c: c.intermediate_size)
    return rules


def global_rules(cfg: KimiLinearConfig) -> list[Rule]:
    rules = [R(("embed_tokens",), "model.embed_tokens.weight", identity(), lambda c: (c.vocab_size, c.hidden_size)),
             R("norm.weight", "model.norm.weight", identity(), lambda c: (c.hidden_size,))]
    if not cfg.tie_word_embeddings:
        rules.append(R(("lm_head",), "lm_head.weight", linear(), lambda c: (c.vocab_size, c.hidden_size)))
    return rules


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


# ------------------------------------------------------------------ layout detection and walking
def detect_layout(names: Sequence[str]) -> str:
    hub_marks = ("block_sparse_moe.", "q_conv1d", "self_attn.f_a_proj", "self_attn.dt_bias", "self_attn.A_log")
    native_marks = ("self_attn.conv1d", "forget_gate.", "experts.gate_up_proj")
    is_hub = any(m in n for n in names for m in hub_marks)
    is_native = any(m in n for n in names for m in native_marks)
    if is_hub and is_native:
        raise ValueError("checkpoint mixes hub names (e.g. 'block_sparse_moe.', 'q_conv1d') and transformers-native "
                         "names (e.g. 'forget_gate.', 'conv1d', 'experts.gate_up_proj')")
    return NATIVE if is_native else HUB


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One JAX parameter and the HF tensors it is assembled from (stacked over a segment's repeats)."""
    path: tuple  # full NNX state path, e.g. ("segments", 1, "blocks", 0, "mixer", "qkv_proj")
    rule: Rule
    output_index: int  # which of the rule's JAX outputs
    layers: tuple[int, ...]  # one per repeat; () for global parameters
    hf_names: tuple[tuple[str, ...], ...]  # per repeat (or one entry for globals): the rule's HF names


def plan(cfg: KimiLinearConfig, layout: str) -> list[ParamSpec]:
    """Every JAX parameter of the model with its HF sources, in model order."""
    specs = []
    for rule in global_rules(cfg):
        for k, p in enumerate(rule.jax):
            specs.append(ParamSpec(p, rule, k, (), (tuple(rule.hf_names(cfg)),)))
    for s, seg in enumerate(plan_segments(cfg.layer_kinds)):
        for position in range(seg.period):
            layers = tuple(seg.layer(position, r) for r in range(seg.repeats))
            for rule in layer_rules(cfg, layers[0], layout):
                names = tuple(tuple("|".join(layer_prefix(l) + alt for alt in n.split("|")) for n in rule.hf_names(cfg))
                              for l in layers)
                for k, p in enumerate(rule.jax):
                    specs.append(ParamSpec(("segments", s, "blocks", position) + p, rule, k, layers, names))
    return specs


def resolve_name(name: str, available) -> str:
    """Pick the first alternative of `a|b` that exists (the name itself if it has no alternatives)."""
    options = name.split("|")
    for option in options:
        if option in available:
            return option
    return options[0]


def expected_hf_tensors(cfg: KimiLinearConfig, layout: str, available=()) -> dict[str, tuple]:
    """{HF name: shape} of every tensor a checkpoint of this config and layout holds, in model order
    (alternative names resolved against `available`)."""
    out = {}
    for rule, prefix in iter_rules(cfg, layout):
        for name, shape in rule.hf_names_and_shapes(cfg):
            out.setdefault(resolve_name("|".join(prefix + alt for alt in name.split("|")), available), shape)
    return out


def iter_rules(cfg: KimiLinearConfig, layout: str) -> Iterator[tuple[Rule, str]]:
    """(rule, HF name prefix) for the global rules and every layer, in model order."""
    for rule in global_rules(cfg):
        yield rule, ""
    for layer in range(cfg.num_hidden_layers):
        for rule in layer_rules(cfg, layer, layout):
            yield rule, layer_prefix(layer)


def hf_tensor_names(cfg: KimiLinearConfig, layout: str, available=()) -> list[str]:
    return list(expected_hf_tensors(cfg, layout, available))


def assemble(spec: ParamSpec, cfg: KimiLinearConfig, get: Callable[[str], np.ndarray]) -> np.ndarray:
    """Build one JAX parameter from HF tensors fetched by `get(name)` (alternatives already resolved by `get`)."""
    per_repeat = [spec.rule.to_jax([get(n) for n in names], cfg)[spec.output_index] for names in spec.hf_names]
    if not spec.layers:
        return per_repeat[0]
    return np.stack(per_repeat)


def disassemble(cfg: KimiLinearConfig, layout: str, get_param: Callable[[tuple], np.ndarray]
                ) -> Iterator[tuple[str, np.ndarray]]:
    """Inverse walk for export: yields (HF name, tensor) from JAX parameters fetched by `get_param(path)`."""
    done = set()
    for spec in plan(cfg, layout):
        key = (id(spec.rule), spec.path[:-len(spec.rule.jax[spec.output_index])], spec.layers)
        if key in done:
            continue
        done.add(key)
        base = spec.path[:len(spec.path) - len(spec.rule.jax[spec.output_index])]
        arrays = [get_param(base + p) for p in spec.rule.jax]
        repeats = len(spec.hf_names)
        for r in range(repeats):
            sliced = [a if not spec.layers else a[r] for a in arrays]
            tensors = spec.rule.to_hf(sliced, cfg)
            for name, t in zip(spec.hf_names[r], tensors):
                yield name.split("|")[0], np.ascontiguousarray(t)

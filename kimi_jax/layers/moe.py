"""Sigmoid-routed mixture of experts with shared experts (spec §4.2). Dropless: no token is ever dropped.

Shapes: T tokens (batch flattened), D hidden, E experts, F expert width, k experts per token.
    router [D, E] f32   correction_bias [E] f32   w_gate/w_up [E, D, F]   w_down [E, F, D]   shared: SwiGLU

Routing: s = sigmoid(x W_r) in fp32; experts are *selected* by s + correction_bias (grouped top-k); the weights are
the unbiased s at the selected experts (transformers/vLLM), or the biased ones with
`router_weights_use_correction_bias` (the hub remote code's aliasing), renormalised, times routed_scaling_factor.

Two dispatches compute the same thing:
  * "ragged": assignments sorted by expert, `jax.lax.ragged_dot` grouped matmuls, scattered back (GPU/TPU);
  * "dense": every expert on every token, combined with the (mostly zero) routing weights. More FLOPs but plain
    batched matmuls, which beat ragged_dot several times over on CPU for small expert counts (JAX_NOTES §11).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kimi_jax.config import KimiLinearConfig
from kimi_jax.layers.init import normal_param
from kimi_jax.layers.mlp import SwiGLU

F32 = jnp.float32
DISPATCHES = ("auto", "ragged", "dense")


def route(x_TD, router_DE, bias_E, *, top_k: int, num_groups: int, topk_groups: int, renormalize: bool,
          scaling: float, weights_use_bias: bool):
    """Returns (weights_Tk f32, experts_Tk int32)."""
    T = x_TD.shape[0]
    E = router_DE.shape[1]
    logits_TE = jnp.einsum("td,de->te", x_TD.astype(F32), router_DE.astype(F32), precision=jax.lax.Precision.HIGHEST)
    scores_TE = jax.nn.sigmoid(logits_TE)
    choice_TE = scores_TE + bias_E.astype(F32)
    if num_groups > 1:
        grouped_TGe = choice_TE.reshape(T, num_groups, E // num_groups)
        group_score_TG = jnp.sum(jax.lax.top_k(grouped_TGe, 2)[0], axis=-1)
        _, keep_groups = jax.lax.top_k(group_score_TG, topk_groups)
        group_mask_TG = jnp.zeros((T, num_groups), bool).at[jnp.arange(T)[:, None], keep_groups].set(True)
        choice_TE = jnp.where(jnp.repeat(group_mask_TG, E // num_groups, axis=1), choice_TE, -jnp.inf)
    _, experts_Tk = jax.lax.top_k(choice_TE, top_k)
    source_TE = (scores_TE + bias_E.astype(F32)) if weights_use_bias else scores_TE
    weights_Tk = jnp.take_along_axis(source_TE, experts_Tk, axis=-1)
    if renormalize:
        weights_Tk = weights_Tk / (jnp.sum(weights_Tk, axis=-1, keepdims=True) + 1e-20)
    return weights_Tk * scaling, experts_Tk.astype(jnp.int32)


def experts_dense(x_TD, weights_Tk, experts_Tk, w_gate_EDF, w_up_EDF, w_down_EFD):
    E = w_gate_EDF.shape[0]
    combine_TE = jnp.sum(jax.nn.one_hot(experts_Tk, E, dtype=F32) * weights_Tk[..., None], axis=1)
    gate_TEF = jnp.einsum("td,edf->tef", x_TD, w_gate_EDF)
    up_TEF = jnp.einsum("td,edf->tef", x_TD, w_up_EDF)
    out_TED = jnp.einsum("tef,efd->ted", jax.nn.silu(gate_TEF) * up_TEF, w_down_EFD)
    return jnp.einsum("ted,te->td", out_TED.astype(F32), combine_TE)


def experts_ragged(x_TD, weights_Tk, experts_Tk, w_gate_EDF, w_up_EDF, w_down_EFD):
    T, k = experts_Tk.shape
    E = w_gate_EDF.shape[0]
    flat_expert_A = experts_Tk.reshape(-1)  # A = T*k assignments
    order_A = jnp.argsort(flat_expert_A, stable=True)
    token_A = order_A // k
    group_sizes_E = jnp.bincount(flat_expert_A, length=E).astype(jnp.int32)
    x_AD = x_TD[token_A]
    gate_AF = jax.lax.ragged_dot(x_AD, w_gate_EDF, group_sizes_E)
    up_AF = jax.lax.ragged_dot(x_AD, w_up_EDF, group_sizes_E)
    out_AD = jax.lax.ragged_dot(jax.nn.silu(gate_AF) * up_AF, w_down_EFD, group_sizes_E)
    weighted_AD = out_AD.astype(F32) * weights_Tk.reshape(-1)[order_A][:, None]
    return jax.ops.segment_sum(weighted_AD, token_A, num_segments=T)


def resolve_dispatch(dispatch: str, num_experts: int) -> str:
    if dispatch not in DISPATCHES:
        raise ValueError(f"moe dispatch {dispatch!r} is not one of {DISPATCHES}")
    if dispatch == "auto":
        return "dense" if jax.default_backend() == "cpu" and num_experts <= 16 else "ragged"
    return dispatch


class MoE(nnx.Module):
    def __init__(self, cfg: KimiLinearConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.router = normal_param(rngs, (D, E), F32)
        self.correction_bias = nnx.Param(jnp.zeros((E,), F32))
        self.w_gate = normal_param(rngs, (E, D, F), dtype)
        self.w_up = normal_param(rngs, (E, D, F), dtype)
        self.w_down = normal_param(rngs, (E, F, D), dtype)
        self.shared_experts = (SwiGLU(D, F * cfg.num_shared_experts, rngs=rngs, dtype=dtype)
                               if cfg.num_shared_experts else None)
        self.top_k = cfg.num_experts_per_token
        self.num_groups, self.topk_groups = cfg.num_expert_group, cfg.topk_group
        self.renormalize = cfg.moe_renormalize
        self.scaling = cfg.routed_scaling_factor
        self.weights_use_bias = cfg.router_weights_use_correction_bias
        self.dispatch = "auto"

    def __call__(self, x_BTD, dispatch: str | None = None, token_sharding=None):
        """`token_sharding`: the [B, T, D] activation sharding. When given, routing and dispatch run locally on each
        batch shard (shard_map; expert weights are gathered per layer as in FSDP), so no device ever sorts or holds
        another shard's tokens; otherwise GSPMD would all-gather the whole batch for the global sort."""
        B, T, D = x_BTD.shape
        kind = resolve_dispatch(dispatch or self.dispatch, self.w_gate.shape[0])
        run = experts_dense if kind == "dense" else experts_ragged

        def routed(x_TD, router, bias, w_gate, w_up, w_down):
            weights_Tk, experts_Tk = route(
                x_TD, router, bias, top_k=self.top_k, num_groups=self.num_groups, topk_groups=self.topk_groups,
                renormalize=self.renormalize, scaling=self.scaling, weights_use_bias=self.weights_use_bias)
            return run(x_TD, weights_Tk, experts_Tk, w_gate, w_up, w_down)

        params = (self.router[...], self.correction_bias[...], self.w_gate[...], self.w_up[...], self.w_down[...])
        x_TD = x_BTD.reshape(B * T, D)
        if token_sharding is not None:
            tokens = P(token_sharding.spec[0], None)
            routed = jax.shard_map(routed, mesh=token_sharding.mesh, in_specs=(tokens,) + (P(),) * len(params),
                                   out_specs=tokens, check_vma=False)
        routed_TD = routed(x_TD, *params)
        out_BTD = routed_TD.astype(x_BTD.dtype).reshape(B, T, D)
        if self.shared_experts is not None:
            out_BTD = out_BTD + self.shared_experts(x_BTD)
        return out_BTD

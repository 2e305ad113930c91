"""Sigmoid-routed mixture of experts with shared experts (spec §4.2). Dropless: no token is ever dropped.

Shapes: T tokens (batch flattened), D hidden, E experts, F expert width, k experts per token.
    router [D, E] f32   correction_bias [E] f32   w_gate/w_up [E, D, F]   w_down [E, F, D]   shared: SwiGLU

Routing: s = sigmoid(x W_r) in fp32; experts are *selected* by s + correction_bias (grouped top-k); the weights are
the unbiased s at the selected experts (transformers/vLLM), or the biased ones with
`router_weights_use_correction_bias` (the hub remote code's aliasing), renormalised, times routed_scaling_factor.

Four dispatches compute the same thing:
  * "gmm": assignments sorted by expert, grouped matmuls from maintained kernels (`ops.grouped_matmul`: megablox
    on TPU, tokamax on GPU when installed, megablox in Pallas interpret mode on CPU), scattered back;
  * "ragged": the same with `jax.lax.ragged_dot` (on TPU its weight gradient is a dense convolution over every
    expert: ~G/2 times the grouped kernels' backward in our TPU compiles);
  * "tiled": assignments sorted by expert, each expert's group padded to whole tiles of rows, one batched matmul
    over the tiles with each tile's expert weights (the block-sparse form of grouped GEMM). Only the routed rows
    plus at most one partial tile per expert are computed; on CPU it is ~3x faster than "dense" for a training
    step of 8 experts top-2 and ragged_dot is slower than both there;
  * "dense": every expert on every token, combined with the (mostly zero) routing weights: E / k times the routed
    FLOPs; the plainest form, and the cheapest when E / k is small.
"auto" picks gmm on TPU and on Hopper GPUs, tiled on other GPUs (measured, see resolve_dispatch); on CPU, tiled
when it touches fewer expert matrices (decode: top-k of E) or computes fewer rows than dense, else dense.

Expert parallelism: given the activations' sharding on a mesh whose `expert` axis divides E, the experts stay
split over that axis and routed rows travel to them by all-to-all (`layers/expert_parallel.py`); the dispatch
above then runs on each device's own experts.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kimi_jax.config import KimiLinearConfig
from kimi_jax.layers.expert_parallel import experts_exchanged, experts_local_then_summed, receive_rows
from kimi_jax.layers.init import normal_param
from kimi_jax.ops.expert_exchange import default_emulate
from kimi_jax.layers.mlp import SwiGLU, swiglu
from kimi_jax.ops.grouped_matmul import grouped_matmul, hopper_gpu
from kimi_jax.sharding import batch_axes, target_platform

F32 = jnp.float32
DISPATCHES = ("auto", "gmm", "ragged", "tiled", "dense")


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
    # Batched over experts (tokens broadcast): the weights are read in their stored [E, D, F] layout. The
    # "td,edf->tef" form makes XLA transpose every expert matrix to [D, E*F] first, a full weight copy per call
    # that doubled the cost of a decode step.
    x_ETD = jnp.broadcast_to(x_TD, (E,) + x_TD.shape)
    gate_ETF = jnp.einsum("etd,edf->etf", x_ETD, w_gate_EDF)
    up_ETF = jnp.einsum("etd,edf->etf", x_ETD, w_up_EDF)
    out_ETD = jnp.einsum("etf,efd->etd", jax.nn.silu(gate_ETF) * up_ETF, w_down_EFD)
    return jnp.einsum("etd,te->td", out_ETD.astype(F32), combine_TE)


def experts_grouped(x_TD, weights_Tk, experts_Tk, w_gate_EDF, w_up_EDF, w_down_EFD, *, impl: str = "ragged",
                    platform: str | None = None):
    """Assignments sorted by expert, three grouped matmuls (`ops.grouped_matmul`), scattered back to tokens. An
    expert id of E or more marks an assignment to skip: it sorts last, outside every group, and adds nothing."""
    T, k = experts_Tk.shape
    E = w_gate_EDF.shape[0]
    flat_expert_A = experts_Tk.reshape(-1)  # A = T*k assignments
    order_A = jnp.argsort(flat_expert_A, stable=True)
    token_A = order_A // k
    group_sizes_E = jnp.bincount(flat_expert_A, length=E).astype(jnp.int32)
    x_AD = x_TD[token_A]
    matmul = functools.partial(grouped_matmul, impl=impl, platform=platform)
    gate_AF = matmul(x_AD, w_gate_EDF, group_sizes_E)
    up_AF = matmul(x_AD, w_up_EDF, group_sizes_E)
    out_AD = matmul(jax.nn.silu(gate_AF) * up_AF, w_down_EFD, group_sizes_E)
    weighted_AD = out_AD.astype(F32) * weights_Tk.reshape(-1)[order_A][:, None]
    return jax.ops.segment_sum(weighted_AD, token_A, num_segments=T)


def experts_ragged(x_TD, weights_Tk, experts_Tk, w_gate_EDF, w_up_EDF, w_down_EFD):
    return experts_grouped(x_TD, weights_Tk, experts_Tk, w_gate_EDF, w_up_EDF, w_down_EFD, impl="ragged")


def experts_gmm(x_TD, weights_Tk, experts_Tk, w_gate_EDF, w_up_EDF, w_down_EFD, platform: str | None = None):
    return experts_grouped(x_TD, weights_Tk, experts_Tk, w_gate_EDF, w_up_EDF, w_down_EFD, impl="gmm",
                           platform=platform)


def tile_rows(num_assignments: int, num_experts: int) -> int:
    """Rows per tile: about one expert's share of the assignments, a power of two in [1, 256]."""
    share = max(1, -(-num_assignments // num_experts))
    return int(min(256, 1 << (share - 1).bit_length()))


def num_tiles(num_assignments: int, num_experts: int, tile: int) -> int:
    """Static bound on the tiles: sum_e ceil(n_e / tile) <= A / tile + (groups that can be non-empty)."""
    if tile == 1:
        return num_assignments
    return -(-num_assignments // tile) + min(num_experts, num_assignments)


def experts_tiled(x_TD, weights_Tk, experts_Tk, w_gate_EDF, w_up_EDF, w_down_EFD):
    T, k = experts_Tk.shape
    E, D, _ = w_gate_EDF.shape
    skip_Tk = experts_Tk >= E  # an assignment to skip (see experts_grouped): weight 0 on the last expert
    weights_Tk, experts_Tk = jnp.where(skip_Tk, 0.0, weights_Tk), jnp.where(skip_Tk, E - 1, experts_Tk)
    A = T * k
    tile = tile_rows(A, E)
    n_tiles = num_tiles(A, E, tile)
    R = n_tiles * tile
    flat_expert_A = experts_Tk.reshape(-1)
    order_A = jnp.argsort(flat_expert_A, stable=True)  # sorted slot -> assignment
    expert_A = flat_expert_A[order_A]
    count_E = jnp.bincount(flat_expert_A, length=E)
    padded_E = (count_E + tile - 1) // tile * tile
    padded_end_E = jnp.cumsum(padded_E)
    first_slot_E = jnp.cumsum(count_E) - count_E
    row_A = padded_end_E[expert_A] - padded_E[expert_A] + jnp.arange(A) - first_slot_E[expert_A]
    # Padding rows read a zero token (index T) and carry weight 0.
    token_R = jnp.full((R,), T, jnp.int32).at[row_A].set((order_A // k).astype(jnp.int32))
    weight_R = jnp.zeros((R,), F32).at[row_A].set(weights_Tk.reshape(-1)[order_A])
    x_NtD = jnp.concatenate([x_TD, jnp.zeros((1, D), x_TD.dtype)])[token_R].reshape(n_tiles, tile, D)
    # Tile n starts at row n * tile; its expert is the group whose padded range holds that row (unused tail tiles
    # clamp to the last expert and only see zero rows).
    expert_N = jnp.minimum(jnp.searchsorted(padded_end_E, jnp.arange(n_tiles) * tile, side="right"), E - 1)
    gate_NtF = jnp.einsum("ntd,ndf->ntf", x_NtD, w_gate_EDF[expert_N])
    up_NtF = jnp.einsum("ntd,ndf->ntf", x_NtD, w_up_EDF[expert_N])
    out_NtD = jnp.einsum("ntf,nfd->ntd", jax.nn.silu(gate_NtF) * up_NtF, w_down_EFD[expert_N])
    weighted_RD = out_NtD.reshape(R, D).astype(F32) * weight_R[:, None]
    return jax.ops.segment_sum(weighted_RD, token_R, num_segments=T + 1)[:T]


DISPATCH_FUNCTIONS = {"dense": experts_dense, "tiled": experts_tiled, "ragged": experts_ragged, "gmm": experts_gmm}
EXPERT_AXIS = "expert"


def expert_parallel_size(mesh, num_experts: int) -> int:
    """How many ways the experts are split: the mesh's expert axis when it divides E (else they are replicated,
    as kimi_jax.sharding's resolver then leaves them)."""
    if mesh is None or EXPERT_AXIS not in mesh.shape:
        return 1
    ep = mesh.shape[EXPERT_AXIS]
    return ep if ep > 1 and num_experts % ep == 0 else 1


def resolve_dispatch(dispatch: str, num_experts: int, num_tokens: int | None = None, top_k: int = 1,
                     platform: str | None = None) -> str:
    """The concrete dispatch for "auto" (others pass through). Without a token count, CPU resolves to tiled."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"moe dispatch {dispatch!r} is not one of {DISPATCHES}")
    if dispatch != "auto":
        return dispatch
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "gmm"
    if platform == "gpu":
        # Measured on an H200 (bench moe, the 48B's layer, bf16, jax 0.11.2), forward / forward + backward: gmm
        # (JAX's Hopper Mosaic GPU kernels) 4.1 / 11.6 ms at 4096 tokens and 11.0 / 28.5 at 16384; tiled 6.1 / 41.2
        # and 11.4 / 67.6; dense 26.0 / 71.2 and ragged_dot 169.9 / 587.1 at 4096. Off Hopper: tiled.
        return "gmm" if hopper_gpu() else "tiled"
    if num_tokens is None:
        return "tiled"
    A = num_tokens * top_k
    tile = tile_rows(A, num_experts)
    tiles = num_tiles(A, num_experts, tile)
    if tiles < num_experts:  # a few tokens (decode): reading only the routed experts' weights wins
        return "tiled"
    return "dense" if num_tokens * num_experts <= tiles * tile else "tiled"


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
        E = self.w_gate.shape[0]
        mesh = token_sharding.mesh if token_sharding is not None else None
        token_axes = batch_axes(token_sharding)
        ep = expert_parallel_size(mesh, E)
        platform = target_platform(mesh)
        if ep > 1:
            tokens_here = B * T // math.prod(mesh.shape[a] for a in token_axes)
            if EXPERT_AXIS in token_axes:  # rows received on one device: the worst-case buffer
                rows, experts_here, k = receive_rows(tokens_here, self.top_k, ep, E // ep), E // ep, 1
            else:
                rows, experts_here, k = tokens_here, E // ep, self.top_k
            kind = resolve_dispatch(dispatch or self.dispatch, experts_here, rows, k, platform)
        else:
            kind = resolve_dispatch(dispatch or self.dispatch, E, B * T, self.top_k, platform)
        run = DISPATCH_FUNCTIONS[kind]
        if kind == "gmm":
            run = functools.partial(run, platform=platform)
        if ep > 1 and EXPERT_AXIS in token_axes:
            run = functools.partial(experts_exchanged, run=run, axis=EXPERT_AXIS, devices=ep,
                                    emulate=default_emulate(platform))
        elif ep > 1:
            run = functools.partial(experts_local_then_summed, run=run, axis=EXPERT_AXIS)

        shared = self.shared_experts

        def moe(x_TD, router, bias, w_gate, w_up, w_down, *shared_params):
            weights_Tk, experts_Tk = route(
                x_TD, router, bias, top_k=self.top_k, num_groups=self.num_groups, topk_groups=self.topk_groups,
                renormalize=self.renormalize, scaling=self.scaling, weights_use_bias=self.weights_use_bias)
            out_TD = run(x_TD, weights_Tk, experts_Tk, w_gate, w_up, w_down).astype(x_TD.dtype)
            if shared_params:
                out_TD = out_TD + swiglu(x_TD, *shared_params)
            return out_TD

        params = (self.router[...], self.correction_bias[...], self.w_gate[...], self.w_up[...], self.w_down[...])
        if shared is not None:
            params += (shared.gate_proj[...], shared.up_proj[...], shared.down_proj[...])
        x_TD = x_BTD.reshape(B * T, D)
        if token_sharding is not None:
            tokens = P(token_sharding.spec[0], None)
            # Experts stay split over the expert axis (gathered over the others, as FSDP does); the router, its
            # bias and the shared experts are whole on every device. The shared experts run inside too: computed
            # outside, GSPMD could not bring their gradients back to an fsdp sharding when tokens are also split
            # over the expert axis (an "Involuntary full rematerialization" of the whole weight).
            experts = P(EXPERT_AXIS, None, None) if ep > 1 else P()
            moe = jax.shard_map(moe, mesh=mesh, in_specs=(tokens, P(), P(), experts, experts, experts)
                                + (P(),) * (len(params) - 5), out_specs=tokens, check_vma=False)
        out_BTD = moe(x_TD, *params).reshape(B, T, D)
        return out_BTD

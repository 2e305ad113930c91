"""The routed experts with expert parallelism: run inside `shard_map` over a mesh whose `axis` shards the experts.

Each device holds E_loc = E / n experts ([E_loc, D, F] after the per-layer gather over the other weight axes, as
FSDP does) and its own tokens, already routed (weights and global expert ids [T, k]). Two cases:

  * tokens split over the expert axis too (training, prefill): the assignments are sorted by expert and sent to
    the devices of their experts with a dropless ragged all-to-all (`ops.expert_exchange`), computed there by the
    local dispatch, sent back along the reversed plan and combined with the routing weights where their tokens
    live. The per-expert counts are all-gathered first (n x E integers) so every offset is known everywhere;
  * tokens replicated over the expert axis (e.g. decode with a batch smaller than the axis): every device runs its
    own experts on the assignments routed to them and the partial outputs are summed over the axis.

Either way every assignment is computed exactly once, on the device of its expert; no token is dropped or
duplicated, and the result equals the single-device layer up to summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_jax.ops.expert_exchange import default_emulate, exchange, plan_from_counts, received_experts

F32 = jnp.float32


def receive_rows(tokens: int, top_k: int, devices: int, experts_per_device: int) -> int:
    """Static size of the receive buffer: every source's tokens, each sending at most min(k, E_loc) copies here."""
    return devices * tokens * min(top_k, experts_per_device)


def balanced_fill(top_k: int, devices: int, experts_per_device: int) -> float:
    """The fraction of that buffer a balanced routing fills: every device receives, on average, the k copies of
    as many tokens as it sends. (The grouped-matmul kernels compute only filled rows; their cost estimates, read by
    the planner, count the whole buffer.)"""
    return top_k / (devices * min(top_k, experts_per_device))


def experts_exchanged(x_TD, weights_Tk, experts_Tk, w_gate_EDF, w_up_EDF, w_down_EFD, *, run, axis: str,
                      devices: int, emulate: bool | None = None):
    """Tokens split over `axis`: dispatch by all-to-all, compute with `run` on the local experts, return, combine."""
    emulate = default_emulate() if emulate is None else emulate
    T, k = experts_Tk.shape
    E_loc = w_gate_EDF.shape[0]
    E = E_loc * devices
    me = jax.lax.axis_index(axis)
    flat_expert_A = experts_Tk.reshape(-1)
    order_A = jnp.argsort(flat_expert_A, stable=True)  # sorted by expert, hence by destination device
    token_A = order_A // k
    counts_nE = jax.lax.all_gather(jnp.bincount(flat_expert_A, length=E).astype(jnp.int32), axis)
    plan = plan_from_counts(counts_nE, me, E_loc)
    R = receive_rows(T, k, devices, E_loc)
    x_RD = exchange(x_TD[token_A], plan, R, axis, emulate)
    expert_R = received_experts(counts_nE, me, E_loc, R)  # E_loc: a row nobody filled
    filled_R1 = (expert_R < E_loc)[:, None]
    # Each received row is one "token" with one expert of weight 1; unfilled rows add nothing.
    y_RD = run(x_RD, filled_R1.astype(F32), expert_R[:, None], w_gate_EDF, w_up_EDF, w_down_EFD)
    back_AD = exchange(y_RD.astype(x_TD.dtype), plan.reversed(), T * k, axis, emulate)
    weighted_AD = back_AD.astype(F32) * weights_Tk.reshape(-1)[order_A][:, None]
    return jax.ops.segment_sum(weighted_AD, token_A, num_segments=T)


def experts_local_then_summed(x_TD, weights_Tk, experts_Tk, w_gate_EDF, w_up_EDF, w_down_EFD, *, run, axis: str):
    """Tokens replicated over `axis`: each device computes the assignments to its experts; outputs summed."""
    E_loc = w_gate_EDF.shape[0]
    first = jax.lax.axis_index(axis) * E_loc
    local_Tk = (experts_Tk >= first) & (experts_Tk < first + E_loc)
    partial_TD = run(x_TD, jnp.where(local_Tk, weights_Tk, 0.0), jnp.where(local_Tk, experts_Tk - first, E_loc),
                     w_gate_EDF, w_up_EDF, w_down_EFD)
    return jax.lax.psum(partial_TD, axis)

"""Moving routed rows to their experts' devices and back: dropless ragged all-to-all over one mesh axis.

Used inside `shard_map` over a mesh whose `axis` (of size n) shards the experts: device d holds experts
[d * E_loc, (d + 1) * E_loc). Every device has its assignments (token copies, one per chosen expert) sorted by
expert, so the rows for one destination are contiguous. An exchange is described by a `Plan` built from the
all-gathered per-expert counts (every device knows every count, so every offset is computed locally, and no
device waits on a second round trip):

    send:   my rows [send_off[d], send_off[d] + size[me -> d]) go to device d, landing at its dst_off[d]
    recv:   device s's rows for me land at [recv_off[s], recv_off[s] + size[s -> me]) of my buffer, sorted by
            expert within each source

The receive buffer has a static size (shapes are static): the worst case, every source sending all its rows to
one device, so nothing can ever be dropped. The way back is the same exchange with the plan reversed, which is
also its transpose: `exchange` carries a custom VJP that sends cotangents back along the reversed plan, so the
gradient is the same code path on every backend.

Backends: on TPU and GPU, `jax.lax.ragged_all_to_all` (each device moves only its real rows). XLA:CPU has no
ragged-all-to-all, so there (and with `emulate=True`) the same semantics are built from `jax.lax.all_to_all` over
fixed blocks of the largest possible chunk per destination: the tests on fake CPU devices run this form, and the
plan and the placement of rows, which are the parts that can be wrong, are shared by both.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

I32 = jnp.int32


class Plan(NamedTuple):
    """Offsets and sizes (each int32 [n], indexed by the peer device) of one exchange, seen from this device."""
    send_off: jax.Array  # where my rows for peer d start in my send buffer
    send_size: jax.Array  # how many rows I send to d
    dst_off: jax.Array  # where they land in d's receive buffer
    recv_off: jax.Array  # where rows from peer s land in my receive buffer
    recv_size: jax.Array  # how many rows s sends me
    src_off: jax.Array  # where they start in s's send buffer

    def reversed(self) -> "Plan":
        return Plan(self.recv_off, self.recv_size, self.src_off, self.send_off, self.send_size, self.dst_off)


def exclusive_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


def plan_from_counts(counts_nE, me, experts_per_device: int) -> Plan:
    """The plan of the outbound exchange from all devices' per-expert counts.

    `counts_nE[s, e]`: how many rows device s sends to expert e (global ids, all E); `me`: this device's index on
    the axis. Rows are laid out by source, then by expert: receive offsets are cumulative over sources.
    """
    n, E = counts_nE.shape
    sizes_nn = counts_nE.reshape(n, n, experts_per_device).sum(-1).astype(I32)  # [source, destination]
    send_off_nn = exclusive_cumsum(sizes_nn, axis=1)  # source's buffer is sorted by destination
    recv_off_nn = exclusive_cumsum(sizes_nn, axis=0)  # destination's buffer is ordered by source
    return Plan(send_off=send_off_nn[me], send_size=sizes_nn[me], dst_off=recv_off_nn[me],
                recv_off=recv_off_nn[:, me], recv_size=sizes_nn[:, me], src_off=send_off_nn[:, me])


def received_experts(counts_nE, me, experts_per_device: int, rows: int):
    """For each row of my receive buffer: its local expert (0..E_loc-1), or E_loc for a row nobody filled."""
    n, E = counts_nE.shape
    mine_nE = jax.lax.dynamic_slice_in_dim(counts_nE, me * experts_per_device, experts_per_device, axis=1)
    ends = jnp.cumsum(mine_nE.reshape(-1))  # source-major, expert-minor: the buffer's layout
    slot = jnp.searchsorted(ends, jnp.arange(rows), side="right")
    return jnp.where(slot < n * experts_per_device, slot % experts_per_device, experts_per_device).astype(I32)


def _rows_at(offsets, sizes, width: int, limit: int):
    """Row indices [n, width] of n contiguous runs; positions past a run's size point at `limit` (dropped)."""
    i = jnp.arange(width)
    return jnp.where(i[None, :] < sizes[:, None], offsets[:, None] + i[None, :], limit)


def _exchange_impl(x, plan: Plan, out_rows: int, axis: str, emulate: bool):
    out = jnp.zeros((out_rows,) + x.shape[1:], x.dtype)
    if not emulate:
        return jax.lax.ragged_all_to_all(x, out, plan.send_off, plan.send_size, plan.dst_off, plan.recv_size,
                                         axis_name=axis)
    # Fixed blocks: block d holds my rows for d (padded to the largest chunk one device can send one peer).
    width = min(x.shape[0], out_rows)
    take = _rows_at(plan.send_off, plan.send_size, width, x.shape[0])
    blocks = jnp.take(x, take.reshape(-1), axis=0, mode="fill", fill_value=0)
    got = jax.lax.all_to_all(blocks, axis, 0, 0, tiled=True)  # block s is now what s sent me
    put = _rows_at(plan.recv_off, plan.recv_size, width, out_rows)
    return out.at[put.reshape(-1)].set(got, mode="drop")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def exchange(x, plan: Plan, out_rows: int, axis: str, emulate: bool):
    """Rows of `x` [N, ...] moved per `plan` into a zero buffer of `out_rows` rows on every device."""
    return _exchange_impl(x, plan, out_rows, axis, emulate)


def _exchange_fwd(x, plan, out_rows, axis, emulate):
    return _exchange_impl(x, plan, out_rows, axis, emulate), (plan, x.shape[0])


def _exchange_bwd(out_rows, axis, emulate, residual, g):
    plan, in_rows = residual
    return _exchange_impl(g, plan.reversed(), in_rows, axis, emulate), None


exchange.defvjp(_exchange_fwd, _exchange_bwd)


def default_emulate(platform: str | None = None) -> bool:
    """XLA:CPU cannot run ragged-all-to-all (JAX_NOTES §12): emulate it there."""
    return (platform or jax.default_backend()) == "cpu"

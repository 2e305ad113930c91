"""ops/expert_exchange on 8 fake CPU devices: the plan, the row placement and the reversed exchange (its VJP)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from kimi_jax.ops import expert_exchange as ex

N, E_LOC, ROWS = 8, 2, 12  # devices, experts per device, assignments per device


def routed_rows(seed):
    """Per device: expert ids sorted (as the MoE sorts them), skewed towards the first devices, some to none."""
    rng = np.random.default_rng(seed)
    p = np.array([0.5, 0.3, 0.1, 0.1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # experts 8..15 receive nothing
    experts = np.sort(rng.choice(N * E_LOC, size=(N, ROWS), p=p / p.sum()), axis=1).astype(np.int32)
    values = rng.normal(size=(N, ROWS, 3)).astype(np.float32)
    return experts, values


def run_exchange(experts, values, mesh):
    R = N * ROWS

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("expert"), P("expert")),
                       out_specs=(P("expert"), P("expert"), P("expert")), check_vma=False)
    def go(e, v):
        e, v = e[0], v[0]
        counts = jax.lax.all_gather(jnp.bincount(e, length=N * E_LOC).astype(jnp.int32), "expert")
        plan = ex.plan_from_counts(counts, jax.lax.axis_index("expert"), E_LOC)
        got = ex.exchange(v, plan, R, "expert", True)
        local = ex.received_experts(counts, jax.lax.axis_index("expert"), E_LOC, R)
        back = ex.exchange(got, plan.reversed(), ROWS, "expert", True)
        return got[None], local[None], back[None]

    return go(jnp.asarray(experts), jnp.asarray(values))


@pytest.mark.slow
def test_rows_arrive_at_their_experts_in_source_order_and_come_back():
    mesh = Mesh(np.array(jax.devices()[:N]), ("expert",))
    experts, values = routed_rows(0)
    got, local, back = map(np.asarray, run_exchange(experts, values, mesh))
    for d in range(N):
        # Expected: every source's rows for d's experts, by source then expert (each source's rows are sorted).
        want = [(s, i) for s in range(N) for i in range(ROWS) if experts[s, i] // E_LOC == d]
        n = len(want)
        chex.assert_trees_all_equal(got[d, :n], np.stack([values[s, i] for s, i in want]) if n else got[d, :0])
        chex.assert_trees_all_equal(local[d, :n], np.asarray([experts[s, i] % E_LOC for s, i in want], np.int32))
        # The unfilled tail: zero rows, expert index E_LOC (none).
        chex.assert_trees_all_equal((got[d, n:], local[d, n:]), (np.zeros_like(got[d, n:]),
                                                                  np.full_like(local[d, n:], E_LOC)))
    chex.assert_trees_all_equal(got[4:], np.zeros_like(got[4:]))  # devices 4..7 hold only experts nobody chose
    chex.assert_trees_all_equal(back, values)  # the reversed plan brings every row home


@pytest.mark.slow
def test_exchange_gradient_is_the_reversed_exchange():
    mesh = Mesh(np.array(jax.devices()[:N]), ("expert",))
    experts, values = routed_rows(1)
    ct = np.random.default_rng(2).normal(size=(N, N * ROWS, 3)).astype(np.float32)

    def loss(v):
        return jnp.sum(run_exchange(experts, v, mesh)[0] * ct)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(values)))
    got, _, _ = run_exchange(experts, values, mesh)
    # d loss / d values[s, i] = ct at the row where values[s, i] landed.
    for s in range(N):
        for i in range(ROWS):
            d = experts[s, i] // E_LOC
            row = int(np.flatnonzero((np.asarray(got[d]) == values[s, i]).all(-1))[0])
            chex.assert_trees_all_equal(grad[s, i], ct[d, row])
    chex.assert_tree_all_finite(grad)


def test_plan_offsets():
    counts = jnp.asarray([[1, 2, 0, 3], [4, 0, 1, 1]], jnp.int32)  # 2 devices x 2 experts each
    plan = ex.plan_from_counts(counts, 1, 2)
    # device 1 sends 4 rows to device 0 (after device 0's own 3) and 2 to itself (after device 0's 3).
    want = {"send_size": [4, 2], "send_off": [0, 4], "dst_off": [3, 3], "recv_size": [3, 2], "recv_off": [0, 3],
            "src_off": [3, 4]}
    chex.assert_trees_all_equal({k: np.asarray(getattr(plan, k)) for k in want},
                                {k: np.asarray(v, np.int32) for k, v in want.items()})
    chex.assert_trees_all_equal(ex.received_experts(counts, 1, 2, 6), np.asarray([1, 1, 1, 0, 1, 2], np.int32))

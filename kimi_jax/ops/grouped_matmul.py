"""Grouped matmul for the MoE: rows sorted by group, each group multiplied by its own matrix, from maintained kernels.

    out[r] = x[r] @ w[g(r)]   for the rows r of group g (groups are consecutive runs of rows, sizes given);
    rows past the last group's end are zero.

Implementations (`impl`):
  * "ragged": `jax.lax.ragged_dot` (XLA's own; on TPU it is costed and, in our compiles, computed densely over the
    groups);
  * "megablox": JAX's Pallas TPU grouped matmul (`jax.experimental.pallas.ops.tpu.megablox.gmm`, with its custom
    VJP: `gmm` for the input gradient, `tgmm` for the weights'); only the row tiles that hold a group are visited.
    Off TPU it runs in Pallas interpret mode (slow, exact: what the CPU tests run);
  * "mosaic_gpu": JAX's own Pallas Mosaic GPU grouped matmuls for Hopper (`jax.experimental.pallas.ops.gpu`:
    `ragged_dot_mgpu.ragged_dot` for the forward and, with the weights transposed, the input gradient;
    `transposed_ragged_dot_mgpu.transposed_ragged_dot` for the weights' gradient), joined by a custom VJP here.
    They ship with jax itself, so they match its version; they need sm_90 (H100 / H200) and have no interpret
    mode: CPU tests check the VJP's wiring with reference kernels in their place;
  * "tokamax": tokamax's `ragged_dot` (Mosaic GPU kernels on H100/H200/B200, Triton elsewhere) when the optional
    `tokamax` package is installed (`pip install -e ".[gpu]"`); its "xla" implementation runs on CPU.
"gmm" (what the MoE's "gmm" dispatch calls) is megablox on TPU; on GPU mosaic_gpu on Hopper, else tokamax when
installed, else ragged_dot; megablox in interpret mode on CPU. `gmm_backend()` names the path a call takes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLS = ("gmm", "ragged", "megablox", "mosaic_gpu", "tokamax")
# megablox's tiles on TPU: its default (128, 128, 128). Mosaic needs the last two block dims divisible by (8, 128)
# or equal to the array's; 128 over a smaller or ragged k / n is masked by the kernel, and the backward reuses the
# tiling with k and n swapped, so one square tile serves both (checked by compiling for v5p with libtpu 0.0.42.1).
TPU_TILE = 128
# megablox's kernels as they are named in compiled HLO (forward / input gradient, and weight gradient). Their cost
# estimates count every row of the lhs buffer (2 m k n); they compute only the tiles of rows the group sizes cover.
MEGABLOX_KERNELS = ("gmm", "tgmm")
# Sublane multiple for the interpret-mode row tile (the smallest tile Mosaic would accept).
MIN_ROW_TILE = 8


@functools.cache
def tokamax_available() -> bool:
    try:
        import tokamax  # noqa: F401
    except Exception:  # not installed, or a version that does not import with this jax
        return False
    return True


def hopper_gpu() -> bool:
    """Whether JAX's first device is an NVIDIA GPU of compute capability 9.x (wgmma: H100, H200)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def gmm_backend(backend: str | None = None) -> str:
    """The implementation "gmm" resolves to on a backend ("cpu", "gpu", "tpu"; default: JAX's)."""
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "megablox"
    if backend == "gpu":
        if hopper_gpu():
            return "mosaic_gpu"
        return "tokamax" if tokamax_available() else "ragged"
    return "megablox"  # interpret mode


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def megablox_tiling(m: int, k: int, n: int, backend: str) -> tuple[int, int, int]:
    if backend == "tpu":
        return (min(TPU_TILE, _round_up(m, MIN_ROW_TILE)), TPU_TILE, TPU_TILE)
    # Interpret mode: one tile over k and n (no alignment rules), rows in tiles of up to 128.
    return (min(TPU_TILE, _round_up(m, MIN_ROW_TILE)), k, n)


def _megablox(x_MK, w_GKN, group_sizes_G, backend: str):
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox_ops

    M, K = x_MK.shape
    N = w_GKN.shape[2]
    tm, tk, tn = megablox_tiling(M, K, N, backend)
    M_pad = _round_up(M, tm)
    x_pad = jnp.pad(x_MK, ((0, M_pad - M), (0, 0))) if M_pad != M else x_MK
    out = megablox_ops.gmm(x_pad, w_GKN, group_sizes_G, x_MK.dtype, (tm, tk, tn), None, None, False,
                           backend != "tpu")
    return out[:M]


# Tiles of JAX's Hopper kernels: (block_m, block_n, block_k, max_concurrent_steps, grid_block_n). block_k must
# divide the contracted width and, for the weight gradient, block_m / block_n the two weight dims (the 48B's 2304
# and 1024 are multiples of 128); MOSAIC_GPU_ROW_TILE is the token-row block of the weight gradient's reduction.
MOSAIC_GPU_TILES = (128, 128, 64, 4, 1)
MOSAIC_GPU_ROW_TILE = 64


def mosaic_gpu_kernels():
    """(ragged_dot, transposed_ragged_dot) of JAX's Hopper Mosaic GPU ops, tiles bound (tests swap in references)."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    bm, bn, bk, steps, grid_n = MOSAIC_GPU_TILES

    def forward(x_MK, w_GKN, group_sizes_G, transpose_rhs=False):
        n = w_GKN.shape[1] if transpose_rhs else w_GKN.shape[2]
        return ragged_dot_mgpu.ragged_dot(x_MK, w_GKN, group_sizes=group_sizes_G, block_m=bm, block_n=bn,
                                          block_k=bk, max_concurrent_steps=steps,
                                          grid_block_n=grid_n if n % (grid_n * bn) == 0 else 1,
                                          transpose_rhs=transpose_rhs)

    def weight_gradient(x_MK, dy_MN, group_sizes_G):
        return transposed_ragged_dot_mgpu.transposed_ragged_dot(
            x_MK, dy_MN, group_sizes=group_sizes_G, block_m=bm, block_n=bn, block_k=MOSAIC_GPU_ROW_TILE,
            max_concurrent_steps=steps, grid_block_n=1)

    return forward, weight_gradient


@jax.custom_vjp
def _mosaic_gpu(x_MK, w_GKN, group_sizes_G):
    return mosaic_gpu_kernels()[0](x_MK, w_GKN, group_sizes_G)


def _mosaic_gpu_fwd(x_MK, w_GKN, group_sizes_G):
    return _mosaic_gpu(x_MK, w_GKN, group_sizes_G), (x_MK, w_GKN, group_sizes_G)


def _mosaic_gpu_bwd(res, dy_MN):
    x_MK, w_GKN, group_sizes_G = res
    forward, weight_gradient = mosaic_gpu_kernels()
    dy_MN = dy_MN.astype(x_MK.dtype)
    dx_MK = forward(dy_MN, w_GKN, group_sizes_G, transpose_rhs=True)  # dy @ w_g^T per group
    dw_GKN = weight_gradient(x_MK, dy_MN, group_sizes_G)  # x_g^T @ dy_g per group, rows reduced
    return dx_MK, dw_GKN.astype(w_GKN.dtype), None


_mosaic_gpu.defvjp(_mosaic_gpu_fwd, _mosaic_gpu_bwd)


def _tokamax(x_MK, w_GKN, group_sizes_G, implementation=None):
    import tokamax
    from absl import flags

    # tokamax reads absl flags, which would otherwise parse the host program's own command line and stop at its
    # first flag (seen: "Unknown command line flag 'tokens'" under `experiments.bench moe --tokens`).
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

    return tokamax.ragged_dot(x_MK, w_GKN, group_sizes_G, implementation=implementation)


def grouped_matmul(x_MK, w_GKN, group_sizes_G, *, impl: str = "gmm", platform: str | None = None):
    """x [M, K] rows sorted by group, w [G, K, N], group_sizes int32 [G] (sum <= M) -> [M, N] in x's dtype.

    `platform`: the platform the program is compiled for ("cpu", "gpu", "tpu"; default JAX's backend), which
    differs from JAX's backend when compiling ahead of time for a TPU topology from a CPU host."""
    if impl not in IMPLS:
        raise ValueError(f"grouped matmul impl {impl!r} is not one of {IMPLS}")
    platform = platform or jax.default_backend()
    if impl == "gmm":
        impl = gmm_backend(platform)
    group_sizes_G = group_sizes_G.astype(jnp.int32)
    if impl == "ragged":
        return jax.lax.ragged_dot(x_MK, w_GKN, group_sizes_G)
    # Kernels leave the row tiles past the last group unvisited, in the forward and in the input gradient (whose
    # rows there are uninitialised memory): select those rows away on the way in and out, as ragged_dot's zeros.
    filled_M = (jnp.arange(x_MK.shape[0]) < jnp.sum(group_sizes_G))[:, None]
    x_MK = jnp.where(filled_M, x_MK, jnp.zeros((), x_MK.dtype))
    if impl == "tokamax":
        out = _tokamax(x_MK, w_GKN, group_sizes_G, implementation="xla" if platform == "cpu" else None)
    elif impl == "mosaic_gpu":
        out = _mosaic_gpu(x_MK, w_GKN.astype(x_MK.dtype), group_sizes_G)
    else:
        out = _megablox(x_MK, w_GKN, group_sizes_G, platform)
    return jnp.where(filled_M, out, jnp.zeros((), out.dtype)).astype(x_MK.dtype)

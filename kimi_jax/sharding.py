"""Meshes, logical axis names and the resolver from logical names to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded weights), `expert` (routed experts),
`tensor` (heads / MLP width / vocab). A mesh is built from a spec such as "data=2,fsdp=4" (one axis may be -1: it
takes the remaining devices; unnamed axes have size 1).

Every parameter gets logical axis names from its path (the table below, by suffix, like the HF mapping), and the
resolver maps each name to mesh axes through an ordered list of candidates: a candidate is skipped when its mesh axes
are already used by another dimension of the same array, or when they do not divide the dimension. A dimension whose
candidates all fail is replicated, never mis-sharded; `explain()` reports each such drop. An array without a rule
is an error (`state_shardings` raises, naming it), unless the caller names its path prefix as replicated on purpose.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from kimi_jax.errors import KimiJaxError

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> ordered candidates; each candidate is a tuple of mesh axes used together.
DEFAULT_RULES: dict[str, tuple[tuple[str, ...], ...]] = {
    "batch": (("data", "fsdp", "expert"), ("data", "fsdp"), ("data",), ("fsdp",)),
    "vocab": (("tensor",),),
    "embed": (("fsdp",),),
    "heads": (("tensor",),),
    "mlp": (("tensor",),),
    "experts": (("expert",),),
    "expert_embed": (("fsdp",),),
    "expert_mlp": (("tensor",),),
}

# Parameter path suffix -> logical names per dimension (stacked parameters get a leading, unsharded "layers" axis).
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "norm.weight": (None,),
    "input_norm.weight": (None,),
    "post_attention_norm.weight": (None,),
    # KDA
    "mixer.qkv_proj": ("embed", None, "heads", None),
    "mixer.conv": (None, None, "heads", None),
    "mixer.f_a_proj": ("embed", None),
    "mixer.f_b_proj": (None, "heads", None),
    "mixer.dt_bias": ("heads", None),
    "mixer.A_log": ("heads",),
    "mixer.b_proj": ("embed", "heads"),
    "mixer.g_a_proj": ("embed", None),
    "mixer.g_b_proj": (None, "heads", None),
    "mixer.o_norm": (None,),
    # MLA (mixer.o_proj is shared by name with KDA: [heads, head_dim, embed] in both)
    "mixer.q_proj": ("embed", "heads", None),
    "mixer.q_a_proj": ("embed", None),
    "mixer.q_a_norm": (None,),
    "mixer.q_b_proj": (None, "heads", None),
    "mixer.kv_a_proj": ("embed", None),
    "mixer.kv_a_norm": (None,),
    "mixer.kv_b_proj": (None, "heads", None),
    "mixer.o_proj": ("heads", None, "embed"),
    # MoE
    "ffn.router": ("embed", None),
    "ffn.correction_bias": (None,),
    "ffn.w_gate": ("experts", "expert_embed", "expert_mlp"),
    "ffn.w_up": ("experts", "expert_embed", "expert_mlp"),
    "ffn.w_down": ("experts", "expert_mlp", "expert_embed"),
    # dense SwiGLU and shared experts
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


class ShardingError(KimiJaxError, ValueError):
    """A mesh spec or rule set that cannot be applied."""


def parse_mesh_spec(spec: str | None, num_devices: int) -> dict[str, int]:
    """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}; one axis may be -1 (the rest)."""
    sizes = {a: 1 for a in MESH_AXES}
    if not spec:
        sizes["fsdp"] = num_devices
        return sizes
    fill = None
    for part in spec.split(","):
        name, _, value = part.strip().partition("=")
        if name not in MESH_AXES:
            raise ShardingError(f"--mesh {spec!r}: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        try:
            size = int(value)
        except ValueError:
            raise ShardingError(f"--mesh {spec!r}: axis {name!r} needs an integer size, got {value!r}") from None
        if size == -1:
            if fill is not None:
                raise ShardingError(f"--mesh {spec!r}: only one axis may be -1")
            fill = name
        elif size < 1:
            raise ShardingError(f"--mesh {spec!r}: axis {name!r} must be >= 1 or -1")
        else:
            sizes[name] = size
    known = math.prod(s for a, s in sizes.items() if a != fill)
    if fill is not None:
        if num_devices % known:
            raise ShardingError(f"--mesh {spec!r}: {num_devices} devices are not divisible by {known}")
        sizes[fill] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(f"--mesh {spec!r} has {math.prod(sizes.values())} devices, but {num_devices} are present")
    return sizes


def make_mesh(spec: str | None = None, devices: Sequence | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # non-TPU/odd topologies: plain row-major order
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


@dataclasses.dataclass
class Resolver:
    mesh: Mesh
    rules: Mapping[str, tuple[tuple[str, ...], ...]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))
    dropped: list = dataclasses.field(default_factory=list)  # (where, logical name, dim, reason)

    def spec(self, logical: Sequence[str | None], shape: Sequence[int], where: str = "") -> P:
        used: set[str] = set()
        out = []
        for dim, (name, size) in enumerate(zip(logical, shape)):
            chosen = None
            if name is not None:
                if name not in self.rules:
                    raise ShardingError(f"{where}: no sharding rule for logical axis {name!r}")
                for candidate in self.rules[name]:
                    axes = tuple(a for a in candidate if self.mesh.shape[a] > 1)
                    if not axes or used & set(axes):
                        continue
                    ways = math.prod(self.mesh.shape[a] for a in axes)
                    if size % ways:
                        self.dropped.append((where, name, dim, f"size {size} not divisible by {axes}={ways}"))
                        continue
                    chosen = axes
                    break
            if chosen:
                used.update(chosen)
                out.append(chosen[0] if len(chosen) == 1 else chosen)
            else:
                out.append(None)
        return P(*out)

    def named(self, logical, shape, where: str = "") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape, where))


def _rule_for(key: str) -> tuple[str | None, ...] | None:
    """The logical axes of the longest PARAM_AXES suffix that ends the dotted parameter path `key`, or None."""
    for suffix, axes in sorted(PARAM_AXES.items(), key=lambda kv: -len(kv[0])):
        if key == suffix or key.endswith("." + suffix):
            return axes
    return None


def param_logical_axes(path: tuple, ndim: int) -> tuple[str | None, ...]:
    key = ".".join(str(p) for p in path)
    axes = _rule_for(key)
    if axes is None:
        raise ShardingError(f"no logical axes for parameter {key}; add it to kimi_jax.sharding.PARAM_AXES")
    extra = ndim - len(axes)
    if extra not in (0, 1):
        raise ShardingError(f"parameter {key} has {ndim} dims; its logical axes {axes} expect {len(axes)}")
    return (None,) * extra + axes  # the stacked "layers" axis is never sharded


def state_shardings(state, mesh: Mesh, resolver: Resolver | None = None, *, replicated: Sequence[str] = ()):
    """A pytree of NamedShardings matching an nnx.State (or abstract state) of the model or its optimizer.

    Parameters (and optimizer moments, which carry the same paths under the optimizer's own prefixes) follow their
    logical axes (`PARAM_AXES`); scalars (step counters, RNG keys) are replicated. Every other array must be
    accounted for: one whose path (or, for optimizer state, any tail of its path) starts with a dotted prefix in
    `replicated` is replicated on purpose (e.g. `replicated=("sidecar",)` for the recursive sidecar, which is ~0.1%
    of the base); anything else raises ShardingError naming it, so that a new parameter is never silently copied
    onto every chip of a pod.
    """
    resolver = resolver or Resolver(mesh)
    whole = NamedSharding(mesh, P())
    prefixes = tuple(replicated)

    def leaf(path, value):
        shape = getattr(value, "shape", ())
        if not shape:
            return whole
        names = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
        names = tuple(n for n in names if n not in ("value", "raw_value"))
        if _explicitly_replicated(names, prefixes):
            return whole
        return resolver.named(_axes_for(names, len(shape)), shape, ".".join(map(str, names)))

    return jax.tree_util.tree_map_with_path(leaf, state)


def _explicitly_replicated(names: tuple, prefixes: tuple[str, ...]) -> bool:
    """Whether the path, or one of its tails (optimizer state nests the parameter path), starts with a prefix."""
    for start in range(len(names)):
        key = ".".join(map(str, names[start:]))
        if any(key == p or key.startswith(p + ".") for p in prefixes):
            return True
    return False


def _axes_for(names: tuple, ndim: int):
    # Optimizer states nest the parameter path under their own keys (e.g. opt_state.0.mu.<param path>): try every
    # tail of the path until one names a parameter.
    mismatch = ""
    for start in range(len(names)):
        key = ".".join(map(str, names[start:]))
        axes = _rule_for(key)
        if axes is None:
            continue
        if ndim - len(axes) in (0, 1):
            return param_logical_axes(names[start:], ndim)
        mismatch = mismatch or f" (the rule for {key} gives {len(axes)} dims)"
    raise ShardingError(f"parameter {'.'.join(map(str, names))} ({ndim} dims) has no logical axes{mismatch}: no "
                        "rule in kimi_jax.sharding.PARAM_AXES fits it. Add one, or, if it is meant to be copied "
                        "whole onto every device, pass its path prefix in state_shardings(..., replicated=...)")


def model_shardings(model, mesh: Mesh, resolver: Resolver | None = None, *, replicated: Sequence[str] = ()):
    """NamedShardings for the model's full state (params + anything else), as an nnx.State-shaped pytree."""
    return state_shardings(nnx.state(model), mesh, resolver, replicated=replicated)


def gathered_for_use(x, logical: Sequence[str | None], activation_sharding):
    """FSDP's gather-before-use, made explicit: `x` constrained to the sharding of `logical` (the dims that stay
    sharded while it is used, e.g. the vocab over `tensor`; the rest whole) on the activations' mesh. Used where
    GSPMD, left alone, keeps a weight fsdp-sharded into its use and then moves activations instead: the token
    embedding (its cotangents replicated whole on meshes splitting the batch over more axes than the weights) and
    the LM head inside the chunked loss (gathered, and its gradient all-reduced, once per chunk). A no-op without a
    mesh."""
    if activation_sharding is None:
        return x
    mesh = activation_sharding.mesh
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, Resolver(mesh).spec(logical, x.shape)))


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, an axis name or a tuple of names)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def batch_axes(activation_sharding) -> tuple[str, ...]:
    """The mesh axes the activations' batch (dim 0) is split over; () without a mesh."""
    if activation_sharding is None or not activation_sharding.spec:
        return ()
    return spec_axes(activation_sharding.spec[0])


def target_platform(mesh) -> str:
    """The platform a program runs on: the mesh's devices' (a TPU topology compiled from a CPU host is "tpu"), else
    JAX's default backend."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def batch_shards(activation_sharding) -> int:
    """How many ways the activations' batch (dim 0) is split; 1 without a mesh."""
    return math.prod(activation_sharding.mesh.shape[a] for a in batch_axes(activation_sharding))


def explain(resolver: Resolver) -> list[str]:
    return [f"{where} dim {dim} ({name}): replicated, {reason}" for where, name, dim, reason in resolver.dropped]

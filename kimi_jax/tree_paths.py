"""Dotted names for pytree paths: the one spelling of a parameter's or leaf's key in every checkpoint and rule table.

Works for JAX key paths (`DictKey`, `GetAttrKey`, `SequenceKey` entries) and for NNX flat-state paths (tuples of
strings and ints) alike: "segments.0.blocks.mixer.qkv_proj", "0.mu.embed_tokens".
"""

from __future__ import annotations

VARIABLE_WRAPPERS = ("value", "raw_value")  # the attribute an nnx.Variable keeps its array in, in JAX key paths


def entry_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_names(path, *, drop_wrappers: bool = False) -> list[str]:
    """The names along `path`; `drop_wrappers` leaves out nnx.Variable's own value attribute."""
    names = [entry_name(e) for e in path]
    return [n for n in names if n not in VARIABLE_WRAPPERS] if drop_wrappers else names


def path_key(path, *, drop_wrappers: bool = False) -> str:
    """`path` as dot-joined names."""
    return ".".join(path_names(path, drop_wrappers=drop_wrappers))


__all__ = ["VARIABLE_WRAPPERS", "entry_name", "path_key", "path_names"]

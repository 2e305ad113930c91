"""kimi_jax's orbax checkpoint format (kimi_jax/checkpoint.py): exact save/load, dtype casting on load, format errors,
per-layer (chunked) writes of stacked parameters, and sharded restores."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from kimi_jax import orbax_model
from kimi_jax.orbax_model import CheckpointFormatError
from kimi_jax.config import tiny
from kimi_jax.model import KimiLinearForCausalLM

from conftest import flat_params

FP32_PARAMS = ("router", "correction_bias", "dt_bias", "A_log")  # kept in float32 whatever the model dtype


def _kept_fp32(path: tuple) -> bool:
    return path[-1] in FP32_PARAMS


@pytest.fixture(scope="module")
def model():
    """A random `KimiLinearForCausalLM(tiny(), rngs=nnx.Rngs(0))` with every parameter drawn from a seeded normal, so
    no parameter is a constant such as ones or zeros. Built abstractly and filled: the eager (or jitted) initializer
    takes ~7 s on a 2-core CPU box, the fill well under one."""
    abstract = nnx.eval_shape(lambda: KimiLinearForCausalLM(tiny(), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    filled = {}
    for path, var in nnx.to_flat_state(state):
        assert isinstance(var, nnx.Param), path  # nothing but parameters to save
        filled[path] = var.replace(jnp.asarray(rng.standard_normal(var.shape), var.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    orbax_model.save_model(folder, model)
    return folder


def _stored_chunk_shapes(folder) -> dict[str, tuple]:
    meta = ocp.PyTreeCheckpointer().metadata(os.path.join(os.path.abspath(folder), orbax_model.PARAMS_DIR))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return {k: tuple(v.storage.chunk_shape) for k, v in dict(tree).items()}


# ------------------------------------------------------------------------------------------------ round trip
def test_save_load_round_trip_is_exact(model, saved):
    assert orbax_model.is_checkpoint(saved)
    assert sorted(os.listdir(saved)) == ["config.json", orbax_model.META_FILE, orbax_model.PARAMS_DIR]
    want = flat_params(model)
    meta = orbax_model.read_meta(saved)
    assert meta["format"] == orbax_model.FORMAT and meta["dtype"] == "float32"
    assert meta["num_params"] == sum(a.size for a in want.values())
    with open(os.path.join(saved, "config.json")) as f:
        assert json.load(f) == model.config.to_hf_dict()
    stored = orbax_model.stored_arrays(saved)
    assert sorted(stored) == sorted(orbax_model.param_key(p) for p in want)

    loaded = orbax_model.load_model(saved)
    assert loaded.config == model.config
    got = flat_params(loaded)
    assert sorted(got) == sorted(want)
    for path, array in want.items():
        assert got[path].dtype == array.dtype and got[path].shape == array.shape, path
        assert np.array_equal(got[path], array), path
    # The same module graph (structure and static attributes) comes back.
    assert nnx.graphdef(loaded) == nnx.graphdef(model)


def test_load_as_bfloat16_keeps_fp32_params(model, saved):
    want = flat_params(model)
    got = flat_params(orbax_model.load_model(saved, dtype=jnp.bfloat16))
    assert sorted(got) == sorted(want)
    kept = {p[-1] for p in want if _kept_fp32(p)}
    assert kept == set(FP32_PARAMS)
    for path, array in want.items():
        if _kept_fp32(path):
            assert got[path].dtype == np.float32, path
            assert np.array_equal(got[path], array), path
        else:
            assert got[path].dtype == ml_dtypes.bfloat16, path
            assert np.array_equal(got[path], array.astype(ml_dtypes.bfloat16)), path


def test_restore_with_sharding_returns_jax_array(model, saved):
    stored = orbax_model.stored_arrays(saved)
    key = next(k for k, s in stored.items() if k.startswith("segments.") and len(s.shape) >= 3)
    want = np.asarray(orbax_model.model_param_arrays(model)[key])
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.ShapeDtypeStruct(stored[key].shape, stored[key].dtype, sharding=sharding)
    out = orbax_model.restore_arrays(saved, {key: target})[key]
    assert isinstance(out, jax.Array)
    assert out.sharding == sharding and out.shape == want.shape and out.dtype == want.dtype
    assert np.array_equal(np.asarray(out), want)
    # Without a sharding it is numpy; a different target dtype is a cast on restore.
    plain = orbax_model.restore_arrays(saved, {key: jax.ShapeDtypeStruct(want.shape, jnp.bfloat16)})[key]
    assert isinstance(plain, np.ndarray) and plain.dtype == ml_dtypes.bfloat16
    assert np.array_equal(plain, want.astype(ml_dtypes.bfloat16))


# ------------------------------------------------------------------------------------------------ format errors
def test_params_that_do_not_match_config(saved, tmp_path):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(saved, folder)
    cfg = tiny()
    with open(os.path.join(folder, "config.json"), "w") as f:  # one more layer than the stored parameters hold
        json.dump(tiny(num_hidden_layers=cfg.num_hidden_layers + 1).to_hf_dict(), f)
    with pytest.raises(CheckpointFormatError) as info:
        orbax_model.load_model(folder)
    msg = str(info.value)
    assert folder in msg and "config.json" in msg and "segments." in msg

    # Same parameter names, other shapes: named with the parameter and both shapes.
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(tiny(moe_intermediate_size=16).to_hf_dict(), f)
    with pytest.raises(CheckpointFormatError) as info:
        orbax_model.load_model(folder)
    msg = str(info.value)
    assert folder in msg and "ffn." in msg and "config.json" in msg


def test_read_meta_and_missing_pieces(saved, tmp_path):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(saved, folder)
    meta_path = os.path.join(folder, orbax_model.META_FILE)

    os.remove(meta_path)
    assert not orbax_model.is_checkpoint(folder)
    for call in (orbax_model.read_meta, orbax_model.load_model):
        with pytest.raises(CheckpointFormatError) as info:
            call(folder)
        assert folder in str(info.value) and orbax_model.META_FILE in str(info.value)

    with open(meta_path, "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointFormatError, match="not valid JSON") as info:
        orbax_model.read_meta(folder)
    assert meta_path in str(info.value)

    with open(meta_path, "w") as f:
        json.dump({"format": "kimi_jax.params.v0"}, f)
    with pytest.raises(CheckpointFormatError, match="kimi_jax.params.v0") as info:
        orbax_model.read_meta(folder)
    assert meta_path in str(info.value)

    shutil.rmtree(os.path.join(folder, orbax_model.PARAMS_DIR))
    with pytest.raises(CheckpointFormatError) as info:
        orbax_model.stored_arrays(folder)
    assert folder in str(info.value) and "params/" in str(info.value)


# ------------------------------------------------------------------------------------------------ chunked writes
def test_stacked_params_are_written_per_layer(reference_factory, tmp_path):
    """hf_to_orbax streams a scanned segment's parameters one repeat at a time (LazyParam): each layer lands in its
    own slot (on-disk chunks of one layer) and the whole equals the in-memory loader's stacked parameter."""
    from convert.hf_to_orbax import convert

    irregular = reference_factory("irregular")
    out = str(tmp_path / "irregular")
    convert(irregular.folder("hub"), out, "float32", progress=False)
    stored = orbax_model.stored_arrays(out)
    stacked = sorted(k for k, s in stored.items() if k.startswith("segments.") and s.shape[0] > 1)
    assert any(".blocks.0." in k for k in stacked), stacked
    assert any(k.endswith("mixer.qkv_proj") for k in stacked) and any(k.endswith("ffn.w_up") for k in stacked)

    chunks = _stored_chunk_shapes(out)
    for key in stacked:
        assert chunks[key] == (1,) + tuple(stored[key].shape[1:]), (key, chunks[key])

    in_memory = {k: np.asarray(v) for k, v in orbax_model.model_param_arrays(irregular.model()).items()}
    assert sorted(in_memory) == sorted(stored)
    restored = orbax_model.restore_arrays(out, stored)
    for key in stored:
        assert restored[key].dtype == in_memory[key].dtype, key
        assert np.array_equal(restored[key], in_memory[key]), key
    for key in stacked:  # every repeat holds its own layer, not a copy of another
        layers = restored[key]
        assert all(not np.array_equal(layers[0], layers[r]) for r in range(1, layers.shape[0])), key


def test_lazy_params_blocks_in_any_order(tmp_path):
    rng = np.random.default_rng(1)
    stacked = rng.standard_normal((3, 4, 5)).astype(np.float32)
    whole = rng.standard_normal((4, 5)).astype(ml_dtypes.bfloat16)
    calls = []

    def stacked_blocks():
        for r in (2, 0, 1):
            calls.append(r)
            yield r, stacked[r]

    params = {"a.stacked": orbax_model.LazyParam(stacked.shape, np.float32, stacked_blocks, stacked=True),
              "b.whole": orbax_model.LazyParam(whole.shape, whole.dtype, lambda: iter([(None, whole)]), stacked=False),
              "c.plain": stacked[0] * 2}
    folder = tmp_path / "lazy"
    folder.mkdir()
    orbax_model.save_params(str(folder / orbax_model.PARAMS_DIR), params)
    assert calls == [2, 0, 1]
    stored = orbax_model.stored_arrays(str(folder))
    assert {k: (s.shape, np.dtype(s.dtype)) for k, s in stored.items()} == {
        "a.stacked": ((3, 4, 5), np.dtype(np.float32)), "b.whole": ((4, 5), np.dtype(ml_dtypes.bfloat16)),
        "c.plain": ((4, 5), np.dtype(np.float32))}
    assert _stored_chunk_shapes(folder)["a.stacked"] == (1, 4, 5)
    out = orbax_model.restore_arrays(str(folder), stored)
    assert np.array_equal(out["a.stacked"], stacked)
    assert out["b.whole"].dtype == ml_dtypes.bfloat16 and np.array_equal(out["b.whole"], whole)
    assert np.array_equal(out["c.plain"], stacked[0] * 2)


@pytest.mark.parametrize("write_ahead", [0, 1 << 30])
def test_lazy_params_with_small_chunks_and_any_write_ahead(tmp_path, monkeypatch, write_ahead):
    """Blocks split into several on-disk chunks (compressed in parallel) and any write-ahead budget (0: every
    write waits for the one before; 1 GiB: all blocks in flight) store the same values."""
    monkeypatch.setattr(orbax_model, "CHUNK_BYTES", 4 * 5 * 4 // 2)  # half a block of [4, 5] float32
    monkeypatch.setattr(orbax_model, "WRITE_AHEAD_BYTES", write_ahead)
    rng = np.random.default_rng(2)
    stacked = rng.standard_normal((6, 4, 5)).astype(np.float32)
    params = {"s": orbax_model.LazyParam(stacked.shape, np.float32, lambda: ((r, stacked[r]) for r in range(6)),
                                        stacked=True)}
    folder = tmp_path / "chunks"
    folder.mkdir()
    orbax_model.save_params(str(folder / orbax_model.PARAMS_DIR), params)
    chunk = _stored_chunk_shapes(folder)["s"]
    assert chunk[0] == 1 and np.prod(chunk) < 4 * 5
    out = orbax_model.restore_arrays(str(folder), orbax_model.stored_arrays(str(folder)))
    assert np.array_equal(out["s"], stacked)

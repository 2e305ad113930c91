"""Saving and loading the recursive sidecar (kimi_jax.recursive.io): round trip, mismatches, atomic overwrite.

No XLA compile of a model here: sidecars are built from a tiny config, saved, restored and compared as arrays.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimi_jax.config import tiny
from kimi_jax.recursive import io
from kimi_jax.recursive.config import RecursiveConfig, RecursiveConfigError, load_preset
from kimi_jax.recursive.sidecar import build_sidecar

CFG = tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0)
SMALL = dict(chunk_width=64, max_inner_steps=2, d_state=32, refine_rank=8, gate_hidden=16, mixer_heads=2)


def small_rcfg(**changes) -> RecursiveConfig:
    return load_preset("after_surgery").replace(**{**SMALL, **changes})


def randomized(sidecar, seed: int):
    """Every parameter (b included) replaced by seeded normal values, so a round trip of zeros proves nothing."""
    rng = np.random.default_rng(seed)
    state = nnx.state(sidecar, nnx.Param)
    nnx.update(sidecar, jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), state))
    return sidecar


def arrays(sidecar) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in io.sidecar_arrays(sidecar).items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def hidden_leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".")]


@pytest.fixture
def saved(tmp_path):
    """(folder, sidecar with random weights, its config) saved once per test."""
    rcfg = small_rcfg()
    sidecar = randomized(build_sidecar(CFG, rcfg), seed=0)
    io.save_sidecar(tmp_path / "ckpt", sidecar, rcfg)
    return str(tmp_path / "ckpt"), sidecar, rcfg


def test_round_trip_restores_every_array(saved):
    folder, sidecar, rcfg = saved
    assert sorted(os.listdir(folder)) == [io.CONFIG_FILE, io.SIDECAR_DIR]
    assert io.has_sidecar(folder)
    assert np.any(arrays(sidecar)["cells.b"] != 0)
    loaded, loaded_rcfg = io.load_sidecar(folder, CFG)
    assert loaded_rcfg == rcfg
    assert_same(arrays(sidecar), arrays(loaded))
    assert nnx.graphdef(loaded) == nnx.graphdef(sidecar)  # same structure: jitted code is shared
    assert loaded.cells.layers == sidecar.cells.layers and loaded.chunk_width == 64
    # An explicit config that agrees with the saved one loads too; the JSON file is every field.
    again, same = io.load_sidecar(folder, CFG, small_rcfg(commit_mode="learned"))
    assert same.commit_mode == "learned"
    assert_same(arrays(sidecar), arrays(again))
    with open(os.path.join(folder, io.CONFIG_FILE)) as f:
        assert json.load(f) == rcfg.to_dict()


def test_round_trip_of_optional_parameters(tmp_path):
    """[M] embedding, no [Z] token, no length head, zero z-init, two mixer layers, a layer subset."""
    rcfg = small_rcfg(seed="mask", use_latent_token=False, enable_length_head=False, z_init="zero", mixer_layers=2,
                      layers_to_refine=[1])
    sidecar = randomized(build_sidecar(CFG, rcfg), seed=1)
    keys = set(io.sidecar_arrays(sidecar))
    assert {"mask_embed", "mixer.1.qkv"} <= keys and not keys & {"z0", "z_embed", "length_head.w2"}
    io.save_sidecar(tmp_path, sidecar, rcfg)
    loaded, _ = io.load_sidecar(tmp_path, CFG)
    assert_same(arrays(sidecar), arrays(loaded))
    assert loaded.cells.layers == (1,)


@pytest.mark.parametrize("changes, parameter, hint", [
    ({"chunk_width": 128}, "length_head.b2", "chunk_width 64 saved vs 128 requested"),
    ({"d_state": 64}, None, "d_state 32 saved vs 64 requested"),
    ({"seed": "mask"}, "'mask_embed' is missing", "seed 'ar' saved vs 'mask' requested"),
    ({"enable_length_head": False}, "unexpected parameter 'length_head.", "enable_length_head True saved vs False"),
    ({"layers_to_refine": [1]}, "cells.", "layers_to_refine 'all' saved vs [1] requested"),
])
def test_mismatched_config_is_one_line_naming_folder_and_parameter(saved, changes, parameter, hint):
    folder, _, _ = saved
    with pytest.raises(io.SidecarError) as e:
        io.load_sidecar(folder, CFG, small_rcfg(**changes))
    msg = str(e.value)
    assert "\n" not in msg and os.path.join(folder, io.SIDECAR_DIR) in msg and hint in msg, msg
    if parameter:
        assert parameter in msg, msg
    reason = io.sidecar_mismatch(folder, CFG, small_rcfg(**changes))
    assert reason == msg
    assert io.sidecar_mismatch(folder, CFG, small_rcfg(commit_mode="baseline_verified", seed="leftover")) is None


def test_same_shapes_but_other_layers_is_a_mismatch(tmp_path):
    cfg = tiny(num_hidden_layers=3, mla_layers=(2,), first_k_dense=0)
    rcfg = small_rcfg(layers_to_refine=[0])
    io.save_sidecar(tmp_path, build_sidecar(cfg, rcfg), rcfg)
    with pytest.raises(io.SidecarError, match=r"saved for layers \[0\] but the recursive config refines layers \[2\]"):
        io.load_sidecar(tmp_path, cfg, small_rcfg(layers_to_refine=[2]))


def test_another_model_is_a_mismatch(saved):
    folder, _, _ = saved
    other = tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0, hidden_size=96)
    with pytest.raises(io.SidecarError, match="agrees on every shape-defining field: was it saved for another model"):
        io.load_sidecar(folder, other)


def test_overwrite_is_atomic(saved, monkeypatch):
    folder, first, rcfg = saved
    second = randomized(build_sidecar(CFG, rcfg), seed=5)
    io.save_sidecar(folder, second, rcfg)
    assert_same(arrays(second), arrays(io.load_sidecar(folder, CFG)[0]))
    assert hidden_leftovers(folder) == []

    # A save that dies half-way (after orbax wrote part of the temporary folder) leaves the previous one intact.
    from kimi_jax import orbax_model

    real = orbax_model.save_params

    def dying(directory, params):
        real(directory, dict(list(params.items())[:3]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(orbax_model, "save_params", dying)
    new_rcfg = small_rcfg(refine_rank=4)
    with pytest.raises(OSError, match="No space left"):
        io.save_sidecar(folder, build_sidecar(CFG, new_rcfg), new_rcfg)
    assert hidden_leftovers(folder) == []
    loaded, loaded_rcfg = io.load_sidecar(folder, CFG)
    assert loaded_rcfg == rcfg
    assert_same(arrays(second), arrays(loaded))


def test_save_refuses_a_config_the_sidecar_was_not_built_with(tmp_path):
    sidecar = build_sidecar(CFG, small_rcfg())
    for changes, field in (({"chunk_width": 128}, "chunk_width"), ({"refine_rank": 4}, "refine_rank"),
                           ({"seed": "mask"}, "seed"), ({"layers_to_refine": [0]}, "layers_to_refine")):
        with pytest.raises(ValueError, match=field):
            io.save_sidecar(tmp_path, sidecar, small_rcfg(**changes))
    assert not os.path.exists(tmp_path / io.SIDECAR_DIR)


def test_missing_or_damaged_files(tmp_path, saved):
    assert not io.has_sidecar(tmp_path)
    with pytest.raises(io.SidecarError, match="no saved sidecar"):
        io.load_sidecar(tmp_path, CFG, small_rcfg())
    with pytest.raises(io.SidecarError, match=f"no {io.CONFIG_FILE}"):
        io.load_sidecar(tmp_path, CFG)
    folder, _, _ = saved
    with open(os.path.join(folder, io.CONFIG_FILE), "w") as f:
        f.write('{"chunk_width": 100}')
    with pytest.raises(RecursiveConfigError, match=r"recursive_config.json: field 'chunk_width' must be a positive "
                                                   r"multiple of 64"):
        io.load_sidecar(folder, CFG)
    os.remove(os.path.join(folder, io.SIDECAR_DIR, "_METADATA"))
    with pytest.raises(io.SidecarError, match="not a readable orbax sidecar checkpoint") as e:
        io.load_sidecar(folder, CFG, small_rcfg())
    assert "\n" not in str(e.value)


def test_a_truncated_sidecar_file_names_the_array(tmp_path, saved):
    import shutil

    from test_bad_model_folders import truncate_largest

    folder = str(tmp_path / "copy")
    shutil.copytree(saved[0], folder)
    truncate_largest(os.path.join(folder, io.SIDECAR_DIR))
    with pytest.raises(io.SidecarError) as e:
        io.load_sidecar(folder, CFG, small_rcfg())
    message = str(e.value)
    assert message.startswith(f"{folder}/{io.SIDECAR_DIR}: cannot restore the sidecar: array '"), message
    assert "truncated data" in message and "\n" not in message



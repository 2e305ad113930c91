"""Checkpoint loading errors, the hub's `mlp.*` naming of dense layers, and the exporter (mapping.disassemble)."""

from __future__ import annotations

import copy
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import kimi_jax
from kimi_jax.hf import mapping
from kimi_jax.config import DENSE, ConfigError
from kimi_jax.hf.loading import CheckpointError

from conftest import flat_params


@pytest.fixture(scope="module")
def small(reference_factory):
    return reference_factory("small")


def edit_single_file(folder: str, fn) -> None:
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def load_error(folder: str, error=CheckpointError) -> str:
    with pytest.raises(error) as info:
        kimi_jax.from_pretrained(folder)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("layout, name", [
    ("hub", "model.layers.1.self_attn.kv_b_proj.weight"),
    ("hub", "model.layers.0.block_sparse_moe.experts.5.w3.weight"),
    ("hub", "lm_head.weight"),
    ("native", "model.layers.0.self_attn.forget_gate.A_log"),
    ("native", "model.layers.1.mlp.experts.gate_up_proj"),
])
def test_missing_tensor(small, checkpoint_copy, layout, name):
    folder = checkpoint_copy(small.folder(layout))
    edit_single_file(folder, lambda t: t.pop(name))
    msg = load_error(folder)
    assert folder in msg and name in msg and "missing" in msg


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.bogus.weight", "model.layers.2.input_layernorm.weight",
                                  "model.layers.1.block_sparse_moe.experts.8.w1.weight"])
def test_extra_unknown_tensor(small, checkpoint_copy, name):
    folder = checkpoint_copy(small.folder("hub"))
    edit_single_file(folder, lambda t: t.__setitem__(name, np.zeros((4, 4), np.float32)))
    msg = load_error(folder)
    assert folder in msg and name in msg


@pytest.mark.parametrize("name, shape", [
    ("lm_head.weight", (512, 63)),
    ("model.embed_tokens.weight", (500, 64)),
    ("model.norm.weight", (65,)),
    ("model.layers.0.self_attn.b_proj.weight", (5, 64)),
    ("model.layers.0.self_attn.q_proj.weight", (60, 64)),
    ("model.layers.0.self_attn.A_log", (1, 1, 3, 1)),
    ("model.layers.1.self_attn.q_proj.weight", (95, 64)),
    ("model.layers.1.block_sparse_moe.experts.3.w1.weight", (31, 64)),
])
def test_wrong_shape(small, checkpoint_copy, name, shape):
    folder = checkpoint_copy(small.folder("hub"))
    edit_single_file(folder, lambda t: t.__setitem__(name, np.zeros(shape, np.float32)))
    msg = load_error(folder)
    assert folder in msg and name in msg and str(shape) in msg


def test_integer_weights_are_rejected(small, checkpoint_copy):
    folder = checkpoint_copy(small.folder("hub"))
    edit_single_file(folder, lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"].astype(np.int32)))
    msg = load_error(folder)
    assert folder in msg and "lm_head.weight" in msg and "I32" in msg


def test_mixed_layouts_are_rejected(small, checkpoint_copy):
    folder = checkpoint_copy(small.folder("hub"))
    name = "model.layers.0.self_attn.forget_gate.dt_bias"
    edit_single_file(folder, lambda t: t.__setitem__(name, np.zeros((64,), np.float32)))
    msg = load_error(folder)
    assert folder in msg and "forget_gate" in msg


def test_index_pointing_at_missing_shard(small, checkpoint_copy):
    folder = checkpoint_copy(small.folder("hub", num_shards=3))
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) == 3
    os.remove(os.path.join(folder, shards[1]))
    msg = load_error(folder)
    assert folder in msg and shards[1] in msg


def test_index_listing_a_tensor_its_shard_lacks(small, checkpoint_copy):
    folder = checkpoint_copy(small.folder("hub", num_shards=3))
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index) as f:
        data = json.load(f)
    shards = sorted(set(data["weight_map"].values()))
    name = next(n for n, s in data["weight_map"].items() if s == shards[0])
    data["weight_map"][name] = shards[1]
    with open(index, "w") as f:
        json.dump(data, f)
    msg = load_error(folder)
    assert folder in msg and name in msg


def test_folder_without_weights(small, tmp_path):
    folder = str(tmp_path / "empty")
    os.makedirs(folder)
    with open(os.path.join(small.folder("hub"), "config.json")) as f:
        config = f.read()
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config)
    msg = load_error(folder)
    assert folder in msg and "model.safetensors" in msg


def test_folder_without_config(small, checkpoint_copy):
    folder = checkpoint_copy(small.folder("hub"))
    os.remove(os.path.join(folder, "config.json"))
    msg = load_error(folder, ConfigError)
    assert os.path.join(folder, "config.json") in msg


# ------------------------------------------------------------------------------------------------ hub naming
def _rename_dense_to_mlp(cfg, tensors: dict) -> list[str]:
    """transformers' save_pretrained writes dense layers as `block_sparse_moe.*_proj`; the hub has `mlp.*_proj`."""
    renamed = []
    for layer, kind in enumerate(cfg.ffn_types):
        if kind != DENSE:
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            old = f"model.layers.{layer}.block_sparse_moe.{proj}.weight"
            new = f"model.layers.{layer}.mlp.{proj}.weight"
            tensors[new] = tensors.pop(old)
            renamed.append(new)
    return renamed


@pytest.mark.parametrize("name", ["irregular", "dense2"])
def test_hub_mlp_naming_of_dense_layers_loads(reference_factory, checkpoint_copy, name):
    case = reference_factory(name)
    folder = checkpoint_copy(case.folder("hub"))
    renamed = []
    edit_single_file(folder, lambda t: renamed.extend(_rename_dense_to_mlp(case.cfg, t)))
    assert len(renamed) == 3 * case.cfg.ffn_types.count(DENSE) > 0
    assert "model.layers.0.mlp.gate_proj.weight" in load_file(os.path.join(folder, "model.safetensors"))
    loaded = flat_params(kimi_jax.from_pretrained(folder))
    expected = flat_params(case.model("hub"))
    assert loaded.keys() == expected.keys()
    for path in expected:
        assert np.array_equal(loaded[path], expected[path]), path


# ------------------------------------------------------------------------------------------------ export
def expected_hf_tensors(case, layout: str) -> dict:
    if layout == "native":
        return {k: v.detach().numpy() for k, v in case.ref.state_dict().items()}
    tensors = load_file(os.path.join(case.folder("hub"), "model.safetensors"))
    _rename_dense_to_mlp(case.cfg, tensors)  # the exporter writes the hub's own naming
    return tensors


def export(model, layout: str) -> dict:
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    out = {}
    for name, tensor in mapping.disassemble(model.config, layout, lambda p: np.asarray(flat[p][...])):
        assert name not in out, f"exported twice: {name}"
        out[name] = tensor
    return out


@pytest.mark.parametrize("name", ["irregular", "dense2"])
@pytest.mark.parametrize("layout", ["hub", "native"])
@pytest.mark.parametrize("loaded_from", ["hub", "native"])
def test_disassemble_reproduces_hf_tensors(reference_factory, name, layout, loaded_from):
    case = reference_factory(name)
    exported = export(case.model(loaded_from), layout)
    expected = expected_hf_tensors(case, layout)
    assert sorted(exported) == sorted(expected)
    for key, want in expected.items():
        got = exported[key]
        assert got.shape == want.shape, (key, got.shape, want.shape)
        assert got.dtype == np.float32, key
        assert np.array_equal(got, want), key


def test_bf16_checkpoint_reads_exact_values_and_runs(small, checkpoint_copy):
    """The hub checkpoint is bf16; numpy has no bf16, so the reader decodes it itself (no torch)."""
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    from kimi_jax.hf.loading import SafetensorsReader

    folder = checkpoint_copy(small.folder("hub"))
    path = os.path.join(folder, "model.safetensors")
    tensors = {k: v.to(torch.bfloat16) for k, v in load_torch(path).items()}
    save_torch(tensors, path)
    reader = SafetensorsReader(folder)
    for name, t in tensors.items():
        np.testing.assert_array_equal(reader.get(name).astype(np.float32), t.float().numpy())
    model = kimi_jax.from_pretrained(folder, dtype=jnp.bfloat16)
    ids = small.random_ids(2, 20)
    logits = np.asarray(kimi_jax.forward(model, ids))
    assert np.isfinite(logits).all()
    # Same weights (bf16-rounded) in an fp32 torch model: only bf16 activations differ.
    ref = copy.deepcopy(small.ref).to(torch.bfloat16).float()
    with torch.no_grad():
        want = ref(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(logits - want).max() < 0.3

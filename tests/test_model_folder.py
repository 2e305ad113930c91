"""kimi_jax.model_folder: format detection, a training output folder resolved to its newest checkpoint, the stored
dtype, loading either format into the same model, and the EOS / pad choice."""

from __future__ import annotations

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimi_jax import model_folder, orbax_model
from kimi_jax.config import tiny
from kimi_jax.errors import KimiJaxError
from kimi_jax.model import KimiLinearForCausalLM

CFG = tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0, vocab_size=61)


def fake_orbax(folder):
    (folder / "params").mkdir(parents=True)
    (folder / "kimi_jax.json").write_text(f'{{"format": "{orbax_model.FORMAT}", "dtype": "bfloat16"}}')
    (folder / "config.json").write_text("{}")
    return folder


def test_format_detection(tmp_path):
    assert model_folder.model_format(fake_orbax(tmp_path / "orbax")) == model_folder.ORBAX
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(model_folder.ModelFolderError, match="not a model folder"):
        model_folder.model_format(hf)  # config.json alone is no model
    (hf / "model.safetensors.index.json").write_text("{}")
    assert model_folder.model_format(hf) == model_folder.HF
    with pytest.raises(model_folder.ModelFolderError, match="no such model folder"):
        model_folder.model_format(tmp_path / "missing")
    assert issubclass(model_folder.ModelFolderError, KimiJaxError)
    assert model_folder.ModelFolderError("x").exit_code == 2


def test_a_training_output_folder_resolves_to_its_newest_model_step(tmp_path):
    """The plan evaluates `--model_path ./checkpoints/vanilla_finetune` (the output folder): its newest step folder
    that is a model folder is used; one without its model files (half-written, or a stray step_N) is skipped."""
    run = tmp_path / "run"
    for step in (100, 2000):
        fake_orbax(run / f"step_{step}")
    (run / "step_30000" / "params").mkdir(parents=True)  # no kimi_jax.json: not a model folder
    (run / ".step_40000.tmp").mkdir()
    (run / "step_x").mkdir()
    assert [s for s, _ in model_folder.step_folders(run)] == [100, 2000]
    folder, notice = model_folder.resolve(run)
    assert folder == str(run / "step_2000") and "newest checkpoint" in notice and str(run) in notice
    assert model_folder.resolve(run / "step_100") == (str(run / "step_100"), None)
    with pytest.raises(model_folder.ModelFolderError, match="nor is it a training output folder"):
        model_folder.resolve(run / "step_x")
    with pytest.raises(model_folder.ModelFolderError, match="no such model folder"):
        model_folder.resolve(tmp_path / "nothing")
    assert model_folder.stored_dtype(run / "step_100") == "bfloat16"


def test_both_formats_load_the_same_model(tmp_path):
    from convert.orbax_to_hf import export

    model = KimiLinearForCausalLM(CFG, rngs=nnx.Rngs(3))
    orbax_model.save_model(str(tmp_path / "orbax"), model)
    export(str(tmp_path / "orbax"), str(tmp_path / "hf"), progress=False)
    assert model_folder.stored_dtype(tmp_path / "hf") == "float32"
    from_orbax = model_folder.load_model(tmp_path / "orbax")
    from_hf = model_folder.load_model(tmp_path / "hf")
    chex.assert_trees_all_equal(nnx.state(from_orbax, nnx.Param), nnx.state(model, nnx.Param))
    chex.assert_trees_all_equal(nnx.state(from_hf, nnx.Param), nnx.state(model, nnx.Param))
    half = model_folder.load_model(tmp_path / "orbax", jnp.bfloat16)
    assert jnp.dtype(jnp.bfloat16) in {x.dtype for x in jax.tree.leaves(nnx.state(half, nnx.Param))}


def tok(eos=None, pad=None, vocab_size=50):
    return types.SimpleNamespace(eos_token_id=eos, pad_token_id=pad, vocab_size=vocab_size)


@pytest.mark.parametrize("cfg_eos, cfg_pad, tok_eos, tok_pad, want_eos, want_pad", [
    ((7,), None, 9, 3, [7, 9], 3),  # the tokenizer's pad wins
    ((7, 8), 5, 8, None, [7, 8], 5),  # then config.json's; EOS ids without repeats
    ((7,), None, None, None, [7], 7),  # then the first EOS
    ((), None, None, None, [], 0),  # nothing at all: 0
])
def test_special_tokens(cfg_eos, cfg_pad, tok_eos, tok_pad, want_eos, want_pad):
    cfg = types.SimpleNamespace(eos_token_ids=cfg_eos, pad_token_id=cfg_pad)
    eos, pad = model_folder.special_tokens(cfg, tok(tok_eos, tok_pad))
    assert eos == want_eos and pad == want_pad and all(isinstance(i, int) for i in eos + [pad])


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    cfg = types.SimpleNamespace(vocab_size=61)
    model_folder.check_tokenizer("m", tok(vocab_size=61), cfg)
    with pytest.raises(model_folder.ModelFolderError, match="m: the tokenizer has 62 tokens .* vocab_size is 61"):
        model_folder.check_tokenizer("m", tok(vocab_size=62), cfg)
    assert np.isscalar(cfg.vocab_size)

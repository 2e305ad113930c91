"""RecursiveConfig: presets, JSON round trip, one-line validation errors, hashability, layer-index helpers."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

from kimi_jax.recursive.config import (
    PRESET_NAMES,
    RecursiveConfig,
    RecursiveConfigError,
    load_preset,
    preset_path,
    resolve,
)

# Kimi-Linear-48B's schedule: MLA at 3, 7, 11, 15, 19, 23, 26 (0-based), KDA elsewhere.
MLA_AT = (3, 7, 11, 15, 19, 23, 26)
MIXERS_27 = tuple("mla" if i in MLA_AT else "kda" for i in range(27))


def test_every_preset_loads_and_is_valid():
    for name in PRESET_NAMES:
        c = load_preset(name)
        assert isinstance(c, RecursiveConfig)
        assert c.effective_max_chunk_len == c.chunk_width
        assert resolve(name) == c
        with open(preset_path(name)) as f:
            listed = json.load(f)
        for k, v in listed.items():  # each listed field really lands in the config
            assert c.to_dict()[k] == v, (name, k)


def test_presets_differ_in_intended_fields():
    base, surg, a, b, c = (load_preset(n) for n in PRESET_NAMES)
    assert len({base, surg, a, b, c}) == 5
    assert base.recursive_enabled is False and base.phase is None
    assert surg.recursive_enabled is True and surg.phase is None
    assert (surg.commit_mode, surg.seed, surg.chunk_width, surg.max_inner_steps) == ("verified", "ar", 128, 4)
    assert (a.phase, a.commit_mode, a.halt_target, a.lr_sidecar, a.lr_heads) == ("a", "learned", "final_agree",
                                                                                  3e-4, 5e-4)
    assert (b.phase, b.commit_mode, b.seed, b.lora_rank, b.lora_lr, b.lora_layers) == (
        "b", "learned", "leftover", 16, 1e-5, "top_third")
    assert b.lr_sidecar < a.lr_sidecar and b.lr_heads < a.lr_heads
    assert (c.phase, c.commit_mode, c.unfreeze_layers, c.lr_unfrozen, c.l2sp_weight) == (
        "c", "learned", "every_4th", 1e-5, 1e-3)
    # The surgery changes nothing but turning refinement on.
    assert surg.replace(recursive_enabled=False) == base


def test_defaults():
    c = RecursiveConfig()
    assert c.corruption_mix_dict == {"tf_argmax": 0.45, "sampled": 0.45, "uniform": 0.1, "mask": 0.0}
    assert c.cache_reset_policy == "rewind_to_prefix"
    assert c.max_chunk_len is None and c.effective_max_chunk_len == 128
    assert c.layers_to_refine == "all" and c.refined_layers(27) == tuple(range(27))


def test_json_round_trip(tmp_path):
    c = RecursiveConfig(layers_to_refine=[5, 1, 3], lora_layers=[20, 26], unfreeze_layers="mla", max_chunk_len=128,
                        seed="mask", corruption_mix={"mask": 0.25, "sampled": 0.75}, phase="b", grad_steps=2,
                        use_soft_tokens=True, commit_threshold=1)
    assert c.layers_to_refine == (1, 3, 5)
    assert isinstance(c.commit_threshold, float)
    path = c.to_json(tmp_path / "rc.json")
    with open(path) as f:
        text = f.read()
    d = json.loads(text)
    assert d["layers_to_refine"] == [1, 3, 5] and d["corruption_mix"]["uniform"] == 0.0
    assert list(d) == sorted(d) and "_source" not in d
    assert text.startswith("{\n  \"")  # indent 2
    back = RecursiveConfig.from_json(path)
    assert back == c and hash(back) == hash(c)
    for name in PRESET_NAMES:
        p = load_preset(name)
        assert RecursiveConfig.from_json(p.to_json(tmp_path / f"{name}.json")) == p
        assert RecursiveConfig.from_dict(p.to_dict()) == p
    assert resolve(str(path)) == c and resolve(path) == c and resolve(c) is c


def test_to_json_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old contents that are not JSON")
    RecursiveConfig(chunk_width=64).to_json(path)
    assert RecursiveConfig.from_json(path).chunk_width == 64
    RecursiveConfig(chunk_width=256).to_json(path)
    assert RecursiveConfig.from_json(path).chunk_width == 256
    assert os.listdir(tmp_path) == ["out.json"]


def test_hashable_and_dict_key():
    a, b = RecursiveConfig(), RecursiveConfig.from_dict({})
    assert a == b and hash(a) == hash(b)
    table = {a: "x"}
    assert table[b] == "x"
    assert RecursiveConfig(d_state=256) not in table
    # The source is for messages only: it does not affect equality.
    assert RecursiveConfig.from_dict({}, source="elsewhere.json") == a


BAD = [
    ({"chunk_width": 100}, "chunk_width", "64"),
    ({"chunk_width": 0}, "chunk_width", None),
    ({"chunk_width": 128.0}, "chunk_width", None),
    ({"max_chunk_len": 64}, "max_chunk_len", "chunk_width"),
    ({"max_inner_steps": 0}, "max_inner_steps", None),
    ({"commit_threshold": 0}, "commit_threshold", None),
    ({"commit_threshold": 1.5}, "commit_threshold", None),
    ({"min_commit_threshold": 0.6}, "min_commit_threshold", "commit_threshold"),
    ({"min_commit_threshold": -0.1}, "min_commit_threshold", None),
    ({"layers_to_refine": [1, 1]}, "layers_to_refine", "duplicated"),
    ({"layers_to_refine": [-1, 2]}, "layers_to_refine", "negative"),
    ({"layers_to_refine": "some"}, "layers_to_refine", None),
    ({"layers_to_refine": [1, True]}, "layers_to_refine", None),
    ({"layers_to_refine": []}, "layers_to_refine", None),
    ({"cache_reset_policy": "keep_kda_recurrent_reset_mla"}, "cache_reset_policy", "rewind"),
    ({"cache_reset_policy": "other"}, "cache_reset_policy", "rewind"),
    ({"recursive_enabled": 1}, "recursive_enabled", None),
    ({"use_latent_token": "true"}, "use_latent_token", None),
    ({"d_state": True}, "d_state", None),
    ({"corruption_mix": {"tf_argmax": 0.5, "sampled": 0.4}}, "corruption_mix", "sum"),
    ({"corruption_mix": {"tf_argmax": 1.2, "sampled": -0.2}}, "corruption_mix", None),
    ({"corruption_mix": {"argmax": 1.0}}, "corruption_mix", "argmax"),
    ({"corruption_mix": [0.5, 0.5]}, "corruption_mix", None),
    ({"corruption_mix": {"mask": 0.2, "sampled": 0.8}}, "corruption_mix", "seed"),
    ({"corruption_rate": 1.5}, "corruption_rate", None),
    ({"corruption_rate_final": -0.1}, "corruption_rate_final", None),
    ({"corruption_min_rate": 0.6}, "corruption_min_rate", None),
    ({"corruption_rate_final": 0.01}, "corruption_min_rate", None),
    ({"corruption_schedule": "exp"}, "corruption_schedule", "linear"),
    ({"lambda_halt": -1.0}, "lambda_halt", None),
    ({"lambda_final": math.nan}, "lambda_final", None),
    ({"lr_sidecar": math.inf}, "lr_sidecar", None),
    ({"refine_gate_init": math.nan}, "refine_gate_init", None),
    ({"lr_heads": 0.0}, "lr_heads", None),
    ({"weight_decay": -0.01}, "weight_decay", None),
    ({"commit_mode": "eager"}, "commit_mode", "verified"),
    ({"seed": 3}, "seed", "rng_seed"),
    ({"z_init": "random"}, "z_init", None),
    ({"halt_target": "exact"}, "halt_target", None),
    ({"length_target": "lcp"}, "length_target", None),
    ({"halting_mode": "act"}, "halting_mode", None),
    ({"mixer_heads": 3}, "mixer_heads", "d_state"),
    ({"mixer_heads": 0}, "mixer_heads", None),
    ({"grad_steps": 5}, "grad_steps", "max_inner_steps"),
    ({"grad_steps": -1}, "grad_steps", None),
    ({"latent_cycles": 0}, "latent_cycles", None),
    ({"ponder_prior": 1.0}, "ponder_prior", None),
    ({"ponder_prior": 0}, "ponder_prior", None),
    ({"soft_token_temperature": 0.0}, "soft_token_temperature", None),
    ({"phase": "d"}, "phase", None),
    ({"phase": 1}, "phase", None),
    ({"lora_rank": 0}, "lora_rank", None),
    ({"lora_layers": "top_half"}, "lora_layers", "top_third"),
    ({"unfreeze_layers": "every_3rd"}, "unfreeze_layers", "every_4th"),
    ({"l2sp_weight": -1e-3}, "l2sp_weight", None),
    ({"rng_seed": 1.5}, "rng_seed", None),
    ({"commit_treshold": 0.4}, "commit_treshold", "did you mean 'commit_threshold'"),
    ({"_source": "x"}, "_source", "unknown field"),
]


@pytest.mark.parametrize("changes,field,hint", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_values_raise_one_line_naming_the_field(changes, field, hint):
    with pytest.raises(RecursiveConfigError) as e:
        RecursiveConfig.from_dict(changes, source="my.json")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("my.json: ")
    assert f"'{field}'" in msg
    if hint:
        assert hint in msg
    assert isinstance(e.value, ValueError)


def test_replace_revalidates():
    c = RecursiveConfig()
    assert c.replace(chunk_width=256).chunk_width == 256
    with pytest.raises(RecursiveConfigError, match="'chunk_width'"):
        c.replace(chunk_width=96)
    with pytest.raises(RecursiveConfigError, match="did you mean 'max_inner_steps'"):
        c.replace(max_inner_step=3)
    with pytest.raises(RecursiveConfigError, match="'grad_steps'"):
        c.replace(grad_steps=3).replace(max_inner_steps=2)
    assert c.replace(layers_to_refine=[2, 0]).layers_to_refine == (0, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.chunk_width = 64


def test_mask_share_allowed_with_mask_seed():
    c = RecursiveConfig(seed="mask", corruption_mix={"mask": 0.5, "uniform": 0.5})
    assert c.corruption_mix_dict == {"mask": 0.5, "sampled": 0.0, "tf_argmax": 0.0, "uniform": 0.5}


def test_source_in_errors_from_json(tmp_path):
    p = tmp_path / "bad_value.json"
    p.write_text(json.dumps({"commit_mode": "eager"}))
    with pytest.raises(RecursiveConfigError, match=f"^{p}: field 'commit_mode'"):
        RecursiveConfig.from_json(p)
    # Layer-index checks against the model name the config's file too.
    p.write_text(json.dumps({"layers_to_refine": [0, 27]}))
    c = RecursiveConfig.from_json(p)
    with pytest.raises(RecursiveConfigError, match=f"^{p}: field 'layers_to_refine'.*27"):
        c.refined_layers(27)


@pytest.mark.parametrize("text,why", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                      ("3", "expected a JSON object")])
def test_bad_json_file_names_the_file(tmp_path, text, why):
    p = tmp_path / "broken.json"
    p.write_text(text)
    with pytest.raises(RecursiveConfigError) as e:
        RecursiveConfig.from_json(p)
    assert str(p) in str(e.value) and why in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(RecursiveConfigError, match="not found"):
        RecursiveConfig.from_json(tmp_path / "nope.json")
    with pytest.raises(RecursiveConfigError, match="phase_a"):
        load_preset("phase_d")
    with pytest.raises(RecursiveConfigError, match="after_surgery"):
        resolve("phase_d")


def test_refined_layers():
    assert RecursiveConfig(layers_to_refine=[26, 0]).refined_layers(27) == (0, 26)
    c = RecursiveConfig(layers_to_refine=[3, 27])
    with pytest.raises(RecursiveConfigError, match=r"'layers_to_refine'.*27") as e:
        c.refined_layers(27)
    assert "\n" not in str(e.value)
    assert c.refined_layers(28) == (3, 27)
    with pytest.raises(RecursiveConfigError, match="num_hidden_layers"):
        c.refined_layers(0)


def test_lora_and_unfreeze_indices_on_27_layers():
    c = RecursiveConfig()
    assert c.lora_layer_indices(27) == tuple(range(18, 27))  # ceil(27 / 3) = 9 layers
    assert c.lora_layer_indices(4) == (2, 3)  # ceil(4 / 3) = 2
    assert c.unfrozen_layer_indices(MIXERS_27) == (3, 7, 11, 15, 19, 23)
    assert c.replace(unfreeze_layers="mla").unfrozen_layer_indices(MIXERS_27) == MLA_AT
    assert c.replace(unfreeze_layers=[26, 1]).unfrozen_layer_indices(MIXERS_27) == (1, 26)
    assert c.replace(lora_layers=[0, 5]).lora_layer_indices(27) == (0, 5)
    with pytest.raises(RecursiveConfigError, match=r"'lora_layers'.*30"):
        c.replace(lora_layers=[30]).lora_layer_indices(27)
    with pytest.raises(RecursiveConfigError, match=r"'unfreeze_layers'.*27"):
        c.replace(unfreeze_layers=[27]).unfrozen_layer_indices(MIXERS_27)
    with pytest.raises(RecursiveConfigError, match="'unfreeze_layers'"):
        c.replace(unfreeze_layers="mla").unfrozen_layer_indices(("kda",) * 8)
    # Phase C on the real schedule.
    assert load_preset("phase_c").unfrozen_layer_indices(MIXERS_27) == (3, 7, 11, 15, 19, 23)


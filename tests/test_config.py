"""KimiLinearConfig: both config.json dialects, the real 48B hub config, validation errors, HF round trip."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest

from kimi_jax.config import DENSE, KDA, MLA, MOE, ConfigError, KimiLinearConfig, kimi_linear_48b_a3b, tiny

# The hub config.json of moonshotai/Kimi-Linear-48B-A3B-Instruct, as published (spec §1).
HUB_48B = {
    "architectures": ["KimiLinearForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_kimi.KimiLinearConfig",
        "AutoModel": "modeling_kimi.KimiLinearModel",
        "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
    },
    "bos_token_id": 163584,
    "dtype": "bfloat16",
    "eos_token_id": 163586,
    "first_k_dense_replace": 1,
    "head_dim": 72,
    "hidden_act": "silu",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "kv_lora_rank": 512,
    "linear_attn_config": {
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "head_dim": 128,
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
        "num_heads": 32,
        "short_conv_kernel_size": 4,
    },
    "mla_use_nope": True,
    "model_max_length": 1048576,
    "model_type": "kimi_linear",
    "moe_intermediate_size": 1024,
    "moe_layer_freq": 1,
    "moe_renormalize": True,
    "moe_router_activation_func": "sigmoid",
    "num_attention_heads": 32,
    "num_expert_group": 1,
    "num_experts": 256,
    "num_experts_per_token": 8,
    "num_hidden_layers": 27,
    "num_key_value_heads": 32,
    "num_nextn_predict_layers": 0,
    "num_shared_experts": 1,
    "pad_token_id": 163839,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "routed_scaling_factor": 2.446,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "transformers_version": "4.57.0",
    "use_cache": True,
    "use_grouped_topk": True,
    "v_head_dim": 128,
    "vocab_size": 163840,
}

# A tiny model in the hub dialect (1-indexed lists, first_k_dense_replace, hub key names) ...
TINY_HUB = {
    "model_type": "kimi_linear",
    "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 6, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 12,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "linear_attn_config": {"num_heads": 4, "head_dim": 16, "short_conv_kernel_size": 4,
                           "kda_layers": [1, 2, 5], "full_attn_layers": [3, 4, 6]},
    "first_k_dense_replace": 2, "moe_layer_freq": 1,
    "num_experts": 8, "num_experts_per_token": 3, "num_shared_experts": 2, "moe_intermediate_size": 32,
    "routed_scaling_factor": 2.0, "moe_renormalize": False, "num_expert_group": 2, "topk_group": 1,
    "use_grouped_topk": True, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0,
}

# ... and the same model in transformers' native dialect (0-indexed layer_types, mlp_layer_types, attribute aliases).
TINY_NATIVE = {
    "model_type": "kimi_linear",
    "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 6, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 12,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "linear_num_heads": 4, "linear_head_dim": 16, "linear_conv_kernel_dim": 4,
    "layer_types": ["linear_attention", "linear_attention", "full_attention", "full_attention", "linear_attention",
                    "full_attention"],
    "mlp_layer_types": ["dense", "dense", "sparse", "sparse", "sparse", "sparse"],
    "num_local_experts": 8, "num_experts_per_tok": 3, "n_shared_experts": 2, "moe_intermediate_size": 32,
    "routed_scaling_factor": 2.0, "norm_topk_prob": False, "n_group": 2, "topk_group": 1,
    "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0,
}


def indices(kinds, kind):
    return {i for i, k in enumerate(kinds) if k == kind}


# ------------------------------------------------------------------------------------------------ dialects
def test_hub_and_native_dialects_give_the_same_config():
    hub = KimiLinearConfig.from_hf_dict(TINY_HUB)
    native = KimiLinearConfig.from_hf_dict(TINY_NATIVE)
    assert hub == native
    assert hub.mixer_types == (KDA, KDA, MLA, MLA, KDA, MLA)
    assert hub.ffn_types == (DENSE, DENSE, MOE, MOE, MOE, MOE)
    assert (hub.num_experts, hub.num_experts_per_token, hub.num_shared_experts) == (8, 3, 2)
    assert (hub.num_expert_group, hub.topk_group, hub.moe_renormalize, hub.q_lora_rank) == (2, 1, False, 12)
    assert hub.eos_token_id == (2, 5) and hub.eos_token_ids == (2, 5)


def test_both_dialects_in_one_file_must_agree():
    both = dict(TINY_HUB, layer_types=TINY_NATIVE["layer_types"])
    assert KimiLinearConfig.from_hf_dict(both) == KimiLinearConfig.from_hf_dict(TINY_HUB)
    bad = dict(TINY_HUB, layer_types=["linear_attention"] * 6)
    with pytest.raises(ConfigError, match="layer_types disagrees"):
        KimiLinearConfig.from_hf_dict(bad, source="both.json")


def test_real_48b_hub_config_equals_preset():
    cfg = KimiLinearConfig.from_hf_dict(HUB_48B)
    assert cfg == kimi_linear_48b_a3b()
    assert indices(cfg.mixer_types, MLA) == {3, 7, 11, 15, 19, 23, 26}
    assert len(indices(cfg.mixer_types, KDA)) == 20
    assert indices(cfg.ffn_types, DENSE) == {0}
    assert (cfg.num_experts, cfg.num_experts_per_token, cfg.num_shared_experts) == (256, 8, 1)
    assert cfg.q_lora_rank is None and cfg.qk_head_dim == 192 and cfg.kda_projection_dim == 4096
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (163584, 163586, 163839)
    assert cfg.routed_scaling_factor == 2.446 and cfg.moe_renormalize


def test_from_pretrained_reads_config_json_in_a_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_48B))
    assert KimiLinearConfig.from_pretrained(tmp_path) == kimi_linear_48b_a3b()
    assert KimiLinearConfig.from_pretrained(tmp_path / "config.json") == kimi_linear_48b_a3b()


def test_missing_schedule_is_an_error_not_the_every_4th_fallback(tmp_path):
    d = copy.deepcopy(HUB_48B)
    for key in ("kda_layers", "full_attn_layers"):
        d["linear_attn_config"].pop(key)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as info:
        KimiLinearConfig.from_json_file(path)
    msg = str(info.value)
    assert str(path) in msg and "fallback" in msg and "layer_types" in msg


# ------------------------------------------------------------------------------------------------ bad values
def _with(**changes):
    def mutate(d):
        d.update(changes)
    return mutate


def _lists(kda, full):
    def mutate(d):
        d["linear_attn_config"]["kda_layers"] = kda
        d["linear_attn_config"]["full_attn_layers"] = full
    return mutate


BAD_VALUES = [
    # (id, mutation of the 48B hub dict, words the message must contain)
    ("overlapping-lists", _lists(list(range(1, 27)), [4, 8, 12, 16, 20, 24, 27]), ["kda_layers", "full_attn_layers"]),
    ("zero-layer", _lists([0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
                          [4, 8, 12, 16, 20, 24, 27]), ["kda_layers", "1-indexed"]),
    ("out-of-range-layer", _lists([1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
                                  [4, 8, 12, 16, 20, 24, 28]), ["full_attn_layers", "28"]),
    ("layer-in-neither-list", _lists([1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25],
                                     [4, 8, 12, 16, 20, 24, 27]), ["kda_layers", "26"]),
    ("layer-types-length", _with(layer_types=["linear_attention"] * 26), ["layer_types", "26"]),
    ("layer-types-unknown", _with(layer_types=["linear_attention"] * 26 + ["sliding_attention"]),
     ["layer_types", "sliding_attention"]),
    ("mlp-layer-types-length", _with(mlp_layer_types=["sparse"] * 28), ["mlp_layer_types", "28"]),
    ("top-k-exceeds-experts", _with(num_experts_per_token=300), ["num_experts_per_token", "num_experts"]),
    ("kv-heads", _with(num_key_value_heads=8), ["num_key_value_heads", "num_attention_heads"]),
    ("attention-bias", _with(attention_bias=True), ["attention_bias"]),
    ("gelu", _with(hidden_act="gelu"), ["hidden_act", "gelu"]),
    ("softmax-router", _with(moe_router_activation_func="softmax"), ["moe_router_activation_func"]),
    ("rope", _with(mla_use_nope=False), ["mla_use_nope"]),
    ("mtp", _with(num_nextn_predict_layers=1), ["num_nextn_predict_layers"]),
    ("model-type", _with(model_type="deepseek_v3"), ["model_type", "deepseek_v3"]),
    ("missing-hidden-size", lambda d: d.pop("hidden_size"), ["hidden_size"]),
    ("zero-hidden-size", _with(hidden_size=0), ["hidden_size"]),
    ("groups-not-dividing", _with(num_expert_group=3), ["num_expert_group"]),
    ("pad-outside-vocab", _with(pad_token_id=163840), ["pad_token_id"]),
    ("eos-outside-vocab", _with(eos_token_id=[163586, 200000]), ["eos_token_id"]),
]


@pytest.mark.parametrize("mutate, words", [pytest.param(m, w, id=i) for i, m, w in BAD_VALUES])
def test_bad_values_raise_with_field_and_file(tmp_path, mutate, words):
    d = copy.deepcopy(HUB_48B)
    mutate(d)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as info:
        KimiLinearConfig.from_json_file(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for word in words:
        assert word in msg, (word, msg)


def test_invalid_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"vocab_size": 512,,}')
    with pytest.raises(ConfigError) as info:
        KimiLinearConfig.from_json_file(path)
    assert str(path) in str(info.value) and "JSON" in str(info.value)


def test_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="object"):
        KimiLinearConfig.from_json_file(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "config.json"
    with pytest.raises(ConfigError) as info:
        KimiLinearConfig.from_json_file(path)
    assert str(path) in str(info.value) and "not found" in str(info.value)
    with pytest.raises(ConfigError) as info:
        KimiLinearConfig.from_pretrained(tmp_path)  # a folder without config.json
    assert str(tmp_path / "config.json") in str(info.value)


def test_constructor_and_replace_validate():
    cfg = tiny()
    with pytest.raises(ConfigError, match="num_experts_per_token"):
        cfg.replace(num_experts_per_token=9)
    with pytest.raises(ConfigError, match="attention schedule"):
        cfg.replace(mixer_types=(KDA,) * 3)
    with pytest.raises(ConfigError, match="layer 1"):
        cfg.replace(mixer_types=(KDA, "gla", KDA, MLA))


def test_config_is_frozen():
    cfg = kimi_linear_48b_a3b()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 1024
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mixer_types = ()
    assert cfg.hidden_size == 2304
    assert hash(cfg) == hash(kimi_linear_48b_a3b())


# ------------------------------------------------------------------------------------------------ round trip
ROUND_TRIP = {
    "48b": kimi_linear_48b_a3b,
    "tiny": tiny,
    "irregular": lambda: tiny(num_hidden_layers=7, mla_layers=(2, 3, 6), first_k_dense=1),
    "grouped-qlora": lambda: KimiLinearConfig.from_hf_dict(TINY_HUB),
    "all-dense": lambda: tiny(num_hidden_layers=3, mla_layers=(0,), first_k_dense=3),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_to_hf_dict_round_trips(name, tmp_path):
    cfg = ROUND_TRIP[name]()
    d = cfg.to_hf_dict()
    assert KimiLinearConfig.from_hf_dict(d) == cfg
    # Through a file (JSON turns tuples into lists).
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert KimiLinearConfig.from_pretrained(tmp_path) == cfg
    # Each dialect alone also describes the same model.
    hub_only = {k: v for k, v in d.items() if k not in ("layer_types", "mlp_layer_types")}
    native_only = copy.deepcopy(d)
    for key in ("kda_layers", "full_attn_layers"):
        native_only["linear_attn_config"].pop(key)
    assert KimiLinearConfig.from_hf_dict(hub_only) == cfg
    assert KimiLinearConfig.from_hf_dict(native_only) == cfg


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_to_hf_dict_is_read_the_same_by_transformers(name):
    transformers = pytest.importorskip("transformers")
    cfg = ROUND_TRIP[name]()
    d = cfg.to_hf_dict()
    d.pop("architectures")
    d.pop("model_type")
    hf = transformers.KimiLinearConfig(**d)
    ours_types = ["linear_attention" if k == KDA else "full_attention" for k in cfg.mixer_types]
    assert hf.layer_types == ours_types
    assert hf.mlp_layer_types == ["dense" if k == DENSE else "sparse" for k in cfg.ffn_types]
    assert (hf.linear_num_heads, hf.linear_head_dim, hf.linear_conv_kernel_dim) == (
        cfg.kda_num_heads, cfg.kda_head_dim, cfg.conv_kernel_size)
    assert hf.q_lora_rank == cfg.q_lora_rank
    if MOE in cfg.ffn_types:
        assert (hf.num_experts_per_tok, hf.n_shared_experts, hf.n_group, hf.topk_group, hf.norm_topk_prob) == (
            cfg.num_experts_per_token, cfg.num_shared_experts, cfg.num_expert_group, cfg.topk_group,
            cfg.moe_renormalize)
        assert hf.num_experts == cfg.num_experts


def test_transformers_reads_the_hub_dialect_1_indexed_like_we_do():
    transformers = pytest.importorskip("transformers")
    d = {k: v for k, v in HUB_48B.items() if k not in ("architectures", "model_type", "auto_map", "rope_scaling")}
    hf = transformers.KimiLinearConfig(**d)
    ours = KimiLinearConfig.from_hf_dict(HUB_48B)
    assert [i for i, t in enumerate(hf.layer_types) if t == "full_attention"] == sorted(indices(ours.mixer_types, MLA))
    assert hf.mlp_layer_types == ["dense"] + ["sparse"] * 26


# ------------------------------------------------------------------------------------------------ field types
def _set(d: dict, key: str, value) -> None:
    head, _, rest = key.partition(".")
    if rest:
        _set(d[head], rest, value)
    else:
        d[head] = value


TYPE_ERRORS = [
    # (key, value, the message after "field 'KEY' must be ")
    ("hidden_size", [64], "an integer, got [64] (a list)"),
    ("hidden_size", "abc", 'an integer, got "abc" (a string)'),
    ("hidden_size", "64", 'an integer, got "64" (a string)'),  # was silently int("64")
    ("hidden_size", 64.7, "an integer, got 64.7 (a number with a fraction)"),  # was silently truncated to 64
    ("hidden_size", 64.0, "an integer, got 64.0 (a decimal number)"),
    ("hidden_size", True, "an integer, got true (a boolean)"),
    ("rms_norm_eps", "abc", 'a finite number, got "abc" (a string)'),
    ("rms_norm_eps", float("nan"), "a finite number, got NaN (not a finite number)"),
    ("routed_scaling_factor", [2.4], "a finite number, got [2.4] (a list)"),
    ("moe_renormalize", 1, "true or false, got 1 (an integer)"),
    ("tie_word_embeddings", "false", 'true or false, got "false" (a string)'),
    ("eos_token_id", [163586, "2"], 'an integer, a list of integers or null, got [163586, "2"] (entry 1 is a string)'),
    ("q_lora_rank", "none", 'an integer or null, got "none" (a string)'),
    ("model_type", 5, "a string, got 5 (an integer)"),
    ("layer_types", "linear_attention", 'a list of strings, got "linear_attention" (a string)'),
    ("linear_attn_config", [], "an object, got [] (a list)"),
    ("linear_attn_config.num_heads", "32", 'an integer, got "32" (a string)'),
    ("linear_attn_config.full_attn_layers", [4, 8.0], "a list of integers, got [4, 8.0] (entry 1 is a decimal number)"),
    ("num_experts_per_tok", "8", 'an integer, got "8" (a string)'),  # an alias is checked like its field
]


@pytest.mark.parametrize("key, value, expected", TYPE_ERRORS, ids=[f"{k}={v!r}" for k, v, _ in TYPE_ERRORS])
def test_every_field_read_from_config_json_is_type_checked(tmp_path, key, value, expected):
    d = copy.deepcopy(HUB_48B)
    _set(d, key, value)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as info:
        KimiLinearConfig.from_pretrained(tmp_path)
    assert str(info.value) == f"{path}: field '{key}' must be {expected}"


def test_valid_json_types_are_accepted_and_null_means_absent():
    d = dict(copy.deepcopy(HUB_48B), routed_scaling_factor=2, rms_norm_eps=None, q_lora_rank=None)
    d["linear_attn_config"]["num_heads"] = None  # falls back to the native key, then the default 32
    cfg = KimiLinearConfig.from_hf_dict(d)
    assert cfg.routed_scaling_factor == 2.0 and isinstance(cfg.routed_scaling_factor, float)
    assert cfg.rms_norm_eps == 1e-5 and cfg.kda_num_heads == 32
    assert KimiLinearConfig.from_hf_dict(dict(d, unknown_field=[object.__name__])) == cfg  # unread keys: unchecked


def test_the_type_table_covers_every_key_from_hf_dict_reads():
    """A key read without a declared type would escape the checks: record every key the reader touches."""
    from kimi_jax.config import _hf_key_types

    touched = set()

    class Recording(dict):
        def get(self, key, default=None):
            touched.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            touched.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            touched.add(key)
            return super().__contains__(key)

    for source in (HUB_48B, TINY_NATIVE):
        d = Recording(copy.deepcopy(source))
        d["linear_attn_config"] = Recording(d.get("linear_attn_config") or {})
        touched.clear()
        KimiLinearConfig.from_hf_dict(d)
        declared = {key.split(".")[-1] for key in _hf_key_types()}
        assert touched <= declared, sorted(touched - declared)


def test_a_folder_named_config_json_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError) as info:
        KimiLinearConfig.from_pretrained(tmp_path)
    assert str(info.value) == f"{tmp_path / 'config.json'}: is a folder, not a file"
    (tmp_path / "bad.json").write_bytes(b'{"hidden_size": "caf\xe9"}')
    with pytest.raises(ConfigError, match=r"bad\.json, line 1: not UTF-8 text \(byte 0xe9 at byte offset 20\)$"):
        KimiLinearConfig.from_json_file(tmp_path / "bad.json")


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_config_json_round_trips_through_transformers(name, tmp_path):
    """What kimi_jax writes (to_hf_dict, which convert.orbax_to_hf copies) loads with AutoConfig, and what
    transformers writes back passes every type check and describes the same model."""
    transformers = pytest.importorskip("transformers")
    cfg = ROUND_TRIP[name]()
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    (ours / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    hf = transformers.AutoConfig.from_pretrained(ours)
    assert type(hf).__name__ == "KimiLinearConfig" and hf.hidden_size == cfg.hidden_size
    hf.save_pretrained(theirs)
    assert KimiLinearConfig.from_pretrained(theirs) == cfg


# ------------------------------------------------------------------------------------------------ CLIs
def _orbax_folder_with(tmp_path, **changes) -> str:
    """A folder that every CLI takes for a kimi_jax checkpoint, with a config.json that has `changes`; config.json
    is read before anything else in it."""
    folder = tmp_path / "model"
    (folder / "params").mkdir(parents=True)
    (folder / "kimi_jax.json").write_text(json.dumps({"format": "kimi_jax"}))
    d = tiny().to_hf_dict()
    d.update(changes)
    (folder / "config.json").write_text(json.dumps(d))
    return str(folder)


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_train_cli_names_the_bad_config_field(tmp_path, capsys):
    from experiments import train

    folder = _orbax_folder_with(tmp_path, hidden_size="64")
    assert train.main(["--model_path", folder, "--output_dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert _one_error_line(capsys) == (f"error: {folder}/config.json: field 'hidden_size' must be an integer, got "
                                       f"\"64\" (a string)")


def test_hf_to_orbax_names_the_bad_config_field_and_writes_nothing(tmp_path, capsys):
    from convert import hf_to_orbax
    from convert.cli import run_main

    folder = _orbax_folder_with(tmp_path, rms_norm_eps="abc")
    out = tmp_path / "orbax"
    assert run_main(hf_to_orbax.main, ["--hf_path", folder, "--output", str(out), "--quiet"]) == 2
    assert _one_error_line(capsys) == (f"error: {folder}/config.json: field 'rms_norm_eps' must be a finite number, "
                                       f"got \"abc\" (a string)")
    assert sorted(os.listdir(tmp_path)) == ["model"]

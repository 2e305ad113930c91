"""The AOT planner compiles a scaled-down Kimi-Linear train step on 8 fake CPU devices."""

import json

import pytest

from experiments import plan
from kimi_jax.config import kimi_linear_48b_a3b, tiny


def test_plan_compiles_a_scaled_config_on_8_devices(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny(num_hidden_layers=5, mla_layers=(3,)).to_hf_dict()))
    rc = plan.main(["--config", str(config), "--mesh", "fsdp=4,tensor=2", "--devices", "8", "--batch_size", "8",
                    "--seq_len", "64", "--chip", "v5p"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "on 8 cpu devices" in out and "'fsdp': 4" in out and "'tensor': 2" in out
    assert "compiled FLOPs per step per device" in out and "implied step time" in out


def test_plan_compiles_recursive_phase_a_on_8_devices(tmp_path, capsys):
    """The recursive phase-A step (frozen sharded base, replicated sidecar, K scanned inner steps over every
    window) compiles from shapes alone."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny(num_hidden_layers=4, mla_layers=(1, 3)).to_hf_dict()))
    rc = plan.main(["--config", str(config), "--mesh", "fsdp=4,tensor=2", "--devices", "8", "--batch_size", "8",
                    "--seq_len", "200", "--stage", "recursive", "--phase", "a", "--chunk_width", "64",
                    "--max_inner_steps", "2", "--chip", "v5p"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "recursive phase a: W 64, K 2, 3 windows per sequence" in out
    assert "compiled FLOPs per step per device" in out


def test_plan_refuses_unbuilt_phases_and_bad_meshes(capsys):
    assert plan.main(["--config", "tiny", "--devices", "8", "--batch_size", "8", "--seq_len", "64",
                      "--stage", "recursive", "--phase", "b"]) == 2
    assert "only phase a" in capsys.readouterr().err
    assert plan.main(["--config", "tiny", "--devices", "8", "--batch_size", "8", "--seq_len", "64",
                      "--stage", "recursive", "--chunk_width", "100"]) == 2
    assert "chunk_width" in capsys.readouterr().err
    assert plan.main(["--config", "tiny", "--mesh", "data=3", "--devices", "8", "--batch_size", "8",
                      "--seq_len", "64"]) == 2
    assert "data=3" in capsys.readouterr().err


def test_analytic_flops_of_the_48b():
    cfg = kimi_linear_48b_a3b()
    flops = plan.analytic_flops_per_token(cfg, 4096)
    # Active matmul weights: every non-routed weight except the embedding, plus 8 routed experts per MoE layer
    # (spec §1: 3.11e9 active excluding the input embedding; norms, biases, dt_bias, A_log and convs are not
    # matmul weights, so ours is slightly lower).
    assert 3.0e9 < flops["matmul_weights"] < 3.11e9
    assert flops["train"] == pytest.approx(3 * flops["forward"])
    assert flops["forward"] > 2 * flops["matmul_weights"]


def test_bad_config_files_are_one_error_line(tmp_path, capsys):
    """A missing config.json is named as missing (not as an unknown preset); a bad field names the file and field.
    Both are refused before JAX sets up any device."""
    argv = ["--devices", "8", "--batch_size", "8", "--seq_len", "64"]
    missing = tmp_path / "missing.json"
    assert plan.main(["--config", str(missing), *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: --config {missing}: no such file or folder"]
    assert plan.main(["--config", "tinyy", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --config tinyy: neither a preset (kimi-linear-48b-a3b, tiny)") and "\n" not in err
    d = tiny().to_hf_dict()
    d["linear_attn_config"]["num_heads"] = 4.5
    config = tmp_path / "config.json"
    config.write_text(json.dumps(d))
    assert plan.main(["--config", str(tmp_path), *argv]) == 2  # the folder holding it
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {config}: field 'linear_attn_config.num_heads' must be an integer, got 4.5 (a number with a "
        f"fraction)"]


def test_help_describes_every_flag_and_its_default(capsys):
    with pytest.raises(SystemExit):
        plan.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--seq_len SEQ_LEN tokens per sequence", "recursive (the sidecar's)", "(default bfloat16)",
                     "(default 0.4)", "(default a)", "(default on)"):
        assert expected in text, expected

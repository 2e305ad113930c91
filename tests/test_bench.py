"""Each benchmark runs once in a tiny setting: the harness (shapes, references, printing), not the timings."""

from __future__ import annotations

import pytest

from experiments import bench


def test_kda_flop_count_matches_the_issue_figure():
    # "about 176k FLOPs per token per head at chunk 64" for d_k = d_v = 128.
    assert 170e3 < bench.kda_flops_per_token_head(64, 128) < 185e3


@pytest.mark.slow
@pytest.mark.parametrize("what,expect", [
    ("kda", ["ours fwd", "torch fwd", "% peak", "ours recurrent"]),
    ("train", ["ours (jax, AdamW)", "ours, unrolled layers", "transformers + torch", "analytic MFU", "ratio", "step breakdown",
               "kda+moe layer", "KDA mixer", "of which the KDA kernel", "MoE (tiled dispatch)"]),
    ("decode", ["transformers generate", "per decode token", "of the measured bandwidth", "KDA layer", "MLA layer",
                "MLA attention analytic"]),
])
def test_benchmark_harness_runs_tiny(what, expect, capsys):
    pytest.importorskip("torch")
    assert bench.main([what, "--tiny"]) == 0
    out = capsys.readouterr().out
    for text in expect:
        assert text in out, (text, out)
    assert "nan" not in out.lower()


@pytest.mark.slow
def test_convert_benchmark_harness_runs_small(tmp_path, capsys):
    assert bench.main(["convert", "--size_gb", "0.02", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for text in ("hf_to_orbax (streaming)", "orbax_to_hf (export)", "reference: from_pretrained", "MB/s"):
        assert text in out


def test_moe_benchmark_checks_every_dispatch_against_dense(capsys):
    bench.main(["moe", "--config", "tiny", "--tokens", "64", "--repeats", "1", "--dtype", "float32"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("gmm", "ragged", "tiled", "dense")}
    assert set(rows) == {"gmm", "ragged", "tiled", "dense"}, out
    for name, cols in rows.items():
        assert float(cols[1]) > 0 and float(cols[2]) > 0, name  # forward and forward + backward times
        assert float(cols[-1]) < 1e-5, f"{name} differs from dense: {cols[-1]}"
    assert "gmm runs megablox" in out  # on CPU: the Pallas TPU kernel in interpret mode

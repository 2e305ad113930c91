"""The AOT planner compiles a scaled-down Kimi-Linear train step on 8 fake CPU devices."""

import gzip
import json
import re

import pytest

from experiments import plan
from kimi_jax import hlo_costs
from kimi_jax.config import kimi_linear_48b_a3b, tiny

GIB = r"(\d+\.\d\d) GiB"
COLLECTIVES_LINE = re.compile(rf"^collectives: all-gather {GIB}, reduce-scatter {GIB}, all-reduce {GIB}, "
                              rf"all-to-all {GIB}, collective-permute {GIB}$", re.M)
BOUND_LINE = re.compile(r"^step time bound: compute (\d+\.\d{3}) s at (\d+)% MFU, communication (\d+\.\d{3}) s "
                        r"\((\d+) GB/s per chip\), bound (\d+\.\d{3}) s$", re.M)


FLOPS_LINE = re.compile(r"^compiled FLOPs per step per device: ([\d.e+-]+) TFLOP by XLA's cost analysis \(loop bodies "
                        r"once\); ([\d.e+-]+) TFLOP with loop bodies x trip counts \(matmuls and convolutions "
                        r"([\d.e+-]+), kernels' own estimates ([\d.e+-]+)\) = ([\d.]+) x the analytic ([\d.e+-]+) "
                        r"TFLOP$", re.M)


def assert_communication_lines(out: str, chip: bool = True):
    """The two lines scripts read, each exactly once, in their exact form."""
    assert len(COLLECTIVES_LINE.findall(out)) == 1, out
    if chip:
        (compute, mfu, comm, bandwidth, bound), = BOUND_LINE.findall(out)
        assert float(bound) == max(float(compute), float(comm)) and mfu == "40"
        return int(bandwidth)
    assert not BOUND_LINE.search(out)
    assert "step time bound: cannot be bounded without a chip" in out


def run_plan(argv, capsys, monkeypatch):
    """plan.main in-process -> (rc, stdout, HLO text of the compiled step or None)."""
    texts = []
    analyze = hlo_costs.analyze
    monkeypatch.setattr(hlo_costs, "analyze", lambda text, **kw: (texts.append(text), analyze(text, **kw))[1])
    rc = plan.main(argv)
    return rc, capsys.readouterr().out, texts[0] if texts else None


@pytest.mark.slow
def test_plan_compiles_a_scaled_config_on_8_devices(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny(num_hidden_layers=5, mla_layers=(3,)).to_hf_dict()))
    rc = plan.main(["--config", str(config), "--mesh", "fsdp=4,tensor=2", "--devices", "8", "--batch_size", "8",
                    "--seq_len", "64", "--chip", "v5p"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "on 8 cpu devices" in out and "'fsdp': 4" in out and "'tensor': 2" in out
    assert "implied step time" in out
    assert assert_communication_lines(out) == plan.ICI_GB_PER_S["v5p"] == 600
    (xla, counted, matmuls, kernels, ratio, analytic), = FLOPS_LINE.findall(out)
    # XLA:CPU: no kernels; the layer scans' bodies count once in cost analysis, once per layer here.
    assert float(kernels) == 0 and float(counted) == pytest.approx(float(matmuls), rel=1e-3)
    assert float(counted) > float(xla) and float(ratio) == pytest.approx(float(counted) / float(analytic), abs=0.01)


@pytest.mark.slow
def test_plan_counts_the_collectives_of_an_fsdp_step(tmp_path, capsys, monkeypatch):
    """tiny on fsdp=8: the parameters are all-gathered for use (and again in the remat'ed backward), inside the layer
    scans, whose bodies count their trip counts: more than cost analysis' single body. Two more scanned layers add
    exactly two more bodies."""
    # ragged_dot: the only loops are then the layer scans (CPU's default tiled dispatch adds binary searches).
    argv = ["--devices", "8", "--mesh", "fsdp=8", "--batch_size", "8", "--seq_len", "64", "--moe_dispatch", "ragged"]
    saved = tmp_path / "step.hlo.gz"
    rc, out, text = run_plan(["--config", "tiny", *argv, "--chip", "v5p", "--save_hlo", str(saved)], capsys,
                             monkeypatch)
    assert rc == 0, out
    assert_communication_lines(out)
    assert gzip.decompress(saved.read_bytes()).decode() == text and f"compiled HLO written to {saved}" in out
    assert [p.name for p in tmp_path.iterdir()] == ["step.hlo.gz"]  # no temporary left beside it
    stats = hlo_costs.analyze(text)
    once = hlo_costs.analyze(text, multiply_loops=False)
    assert stats.bytes["all-gather"] > once.bytes["all-gather"] > 0 and stats.bytes["all-reduce"] > 0
    assert stats.loops and all(loop.source == "xla" for loop in stats.loops)
    assert max(loop.trips for loop in stats.loops) == 2  # tiny: layers 1-2 are one scanned (kda, moe) segment
    assert (f"all-gather {stats.ops['all-gather']:,} ({plan.human_bytes(stats.bytes['all-gather'])})" in out
            and f"{len(stats.loops)} while loops, trip counts: {len(stats.loops)} from XLA" in out)
    # The bound: communication = every collective byte at the chip's bandwidth.
    communication = float(BOUND_LINE.search(out).group(3))
    assert communication == pytest.approx(stats.total_bytes / 600e9, abs=5e-4)
    # tiny is (kda, dense), (kda, moe) x 2 scanned, (mla, moe); with 6 layers the scan runs 4 times.
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny(num_hidden_layers=6, mla_layers=(5,)).to_hf_dict()))
    rc, out6, text6 = run_plan(["--config", str(config), *argv], capsys, monkeypatch)
    assert rc == 0, out6
    assert_communication_lines(out6, chip=False)
    deeper = hlo_costs.analyze(text6)
    assert max(loop.trips for loop in deeper.loops) == 4
    body = stats.bytes["all-gather"] - once.bytes["all-gather"]  # every scan body once more (trip count 2)
    assert deeper.bytes["all-gather"] - stats.bytes["all-gather"] == pytest.approx(2 * body)


@pytest.mark.slow
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
    assert len(FLOPS_LINE.findall(out)) == 1, out
    assert_communication_lines(out)


@pytest.mark.slow
def test_plan_compiles_recursive_phase_c_on_8_devices(capsys, monkeypatch):
    """Phase c (LoRA on the noisy stream, as in phase b, and the every_4th block, here layer 3, trained with L2-SP)
    compiles with the step experiments.train builds; its inner-step scans count K times."""
    phase = "c"
    chip = ["--chip", "v5p"]
    rc, out, text = run_plan(["--config", "tiny", "--mesh", "fsdp=8", "--devices", "8", "--batch_size", "8",
                              "--seq_len", "128", "--stage", "recursive", "--phase", phase, "--chunk_width", "64",
                              "--max_inner_steps", "2", *chip], capsys, monkeypatch)
    assert rc == 0, out
    assert f"recursive phase {phase}: W 64, K 2, 1 windows per sequence" in out
    assert "LoRA on the noisy stream included" in out
    assert "base blocks of layers [3] trained" in out and "base frozen" not in out
    assert len(FLOPS_LINE.findall(out)) == 1, out
    assert_communication_lines(out)
    stats = hlo_costs.analyze(text)
    assert stats.bytes["all-gather"] > 0 and 2 in {loop.trips for loop in stats.loops}


def test_plan_refuses_bad_recursive_setups_and_bad_meshes(tmp_path, capsys):
    assert plan.main(["--config", "tiny", "--devices", "8", "--batch_size", "8", "--seq_len", "64",
                      "--stage", "recursive", "--phase", "b"]) == 2
    assert "seq_len 64 holds no window of width 128" in capsys.readouterr().err
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny(num_hidden_layers=3, mla_layers=(2,)).to_hf_dict()))
    assert plan.main(["--config", str(config), "--devices", "8", "--batch_size", "8", "--seq_len", "128",
                      "--stage", "recursive", "--phase", "c", "--chunk_width", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: recursive phase c: unfreeze_layers every_4th selects no layer of this 3-layer "
                          "model") and "\n" not in err
    assert plan.main(["--config", "tiny", "--devices", "8", "--batch_size", "8", "--seq_len", "64",
                      "--stage", "recursive", "--chunk_width", "100"]) == 2
    assert "chunk_width" in capsys.readouterr().err
    assert plan.main(["--config", "tiny", "--mesh", "data=3", "--devices", "8", "--batch_size", "8",
                      "--seq_len", "64"]) == 2
    assert "data=3" in capsys.readouterr().err


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


def test_save_hlo_is_refused_before_compiling_where_it_would_harm_an_input(tmp_path, capsys):
    """--save_hlo onto or inside the --config input, onto a folder, or under a file: one error line, exit 2,
    before any compile, and the input untouched."""
    config = tmp_path / "model" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(tiny().to_hf_dict()))
    before = config.read_bytes()
    argv = ["--devices", "8", "--batch_size", "8", "--seq_len", "64"]
    cases = {str(config): "is the input --config", str(config.parent / "x.hlo"): "lies inside the input --config",
             str(tmp_path / "plans"): "is a folder", str(tmp_path / "notes.txt" / "x.hlo"): "is not a folder"}
    (tmp_path / "plans").mkdir()
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    for out, message in cases.items():
        spec = str(config.parent) if "inside" in message else str(config)
        assert plan.main(["--config", spec, *argv, "--save_hlo", out]) == 2, out
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --save_hlo") and message in err and "\n" not in err, err
    assert config.read_bytes() == before and sorted(p.name for p in config.parent.iterdir()) == ["config.json"]


def test_help_describes_every_flag_and_its_default(capsys):
    with pytest.raises(SystemExit):
        plan.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--seq_len SEQ_LEN tokens per sequence", "recursive (the sidecar's)", "(default bfloat16)",
                     "(default 0.4)", "(default a)", "(default on)"):
        assert expected in text, expected


def test_grouped_matmul_kernels_are_also_counted_at_the_rows_routing_fills(capsys):
    """megablox's estimates cover the whole receive buffer of the expert all-to-all; the planner prints the total
    with them and, beside it, with the grouped-matmul kernels at the balanced fill (1/8 for the 48B on expert=8)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kimi_jax import sharding
    from kimi_jax.layers.expert_parallel import balanced_fill

    cfg = kimi_linear_48b_a3b()
    mesh = sharding.make_mesh("fsdp=1,expert=8", jax.devices("cpu")[:8])
    assert plan.kernel_fill(cfg, mesh, NamedSharding(mesh, P(("fsdp", "expert")))) == balanced_fill(8, 8, 32) == 1 / 8
    assert plan.kernel_fill(cfg, mesh, NamedSharding(mesh, P("fsdp"))) == 1.0  # tokens replicated: no exchange
    fsdp = sharding.make_mesh("fsdp=8", jax.devices("cpu")[:8])
    assert plan.kernel_fill(cfg, fsdp, NamedSharding(fsdp, P("fsdp"))) == 1.0
    stats = hlo_costs.HloCosts(bytes={}, ops={}, loops=[], flops={"dot": 0.0, "convolution": 40e12},
                               kernel_flops={"gmm": 64e12, "tgmm": 16e12, "other": 2e12})
    plan.print_flops(stats, {"flops": 30e12}, analytic=50e12, fill=1 / 8)
    out = capsys.readouterr().out
    (_, counted, _, kernels, ratio, _), = FLOPS_LINE.findall(out)
    assert (float(counted), float(kernels), float(ratio)) == (122, 82, 2.44)
    assert "grouped-matmul kernels: 80 TFLOP" in out and "0.125 of the buffer" in out
    assert "52 TFLOP = 1.04 x analytic" in out  # 40 + 2 + 80 / 8
    plan.print_flops(stats, {"flops": 30e12}, analytic=50e12, fill=1.0, executed=61e12)
    out = capsys.readouterr().out
    assert "grouped-matmul kernels" not in out and "the analytic step is 61 TFLOP: compiled = 2.00 x that" in out


def test_ragged_all_to_alls_are_counted_balanced_and_bounded(capsys):
    """The expert exchange's ragged all-to-alls count at the rows balanced routing moves; their worst case (every
    one at its larger buffer) is printed beside it, with the communication time it would take."""
    gib = 1 << 30
    stats = hlo_costs.HloCosts(bytes={"all-gather": 10 * gib, "reduce-scatter": 0.0, "all-reduce": 20 * gib,
                                      "all-to-all": 6 * gib, "collective-permute": 0.0},
                               ops={k: 1 for k in hlo_costs.KINDS}, loops=[], ragged_bytes=4 * gib,
                               ragged_bound_bytes=32 * gib)
    plan.print_communication(stats, "tpu", 0.01, "v5p", 0.4)
    out = capsys.readouterr().out
    assert "4.00 GiB above" in out and "32.00 GiB, all collectives 64.00 GiB (communication 0.115 s)" in out
    (_, _, comm, _, bound), = BOUND_LINE.findall(out)
    assert float(comm) == round(36 * gib / 600e9, 3) and float(bound) == float(comm)


@pytest.mark.slow
def test_plan_threads_kda_impl_to_the_layers(tmp_path, capsys, monkeypatch):
    """`--kda_impl pallas_tpu` reaches every KDA layer (here in interpret mode, per shard on fsdp=4,tensor=2), and the
    plan compiles."""
    from kimi_jax.layers import kda as kda_layer

    seen = []
    real = kda_layer.resolve_kda_impl
    monkeypatch.setattr(kda_layer, "resolve_kda_impl", lambda impl, platform=None: seen.append(impl) or real(
        impl, platform))
    rc = plan.main(["--config", "tiny", "--mesh", "fsdp=4,tensor=2", "--devices", "8", "--batch_size", "8",
                    "--seq_len", "128", "--kda_impl", "pallas_tpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert seen and set(seen) == {"pallas_tpu"}

"""The flags shared by the experiment CLIs (`experiments/flags.py`): one spelling, accepted by every CLI."""

from __future__ import annotations

import pytest

from experiments import bench, evaluate, flags, generate, plan, train
from kimi_jax.ops.kda import KDA_IMPLS


def test_kda_impls_agree_with_the_library():
    assert flags.KDA_IMPLS == KDA_IMPLS


REQUIRED = {
    "train": ["--model_path", "m", "--output_dir", "o"],
    "evaluate": ["--model_path", "m", "--stage", "baseline"],
    "generate": ["--model_path", "m", "--prompt", "hi"],
    "plan": ["--config", "tiny", "--devices", "8", "--batch_size", "8", "--seq_len", "64"],
}


@pytest.mark.parametrize("cli", sorted(REQUIRED))
def test_every_cli_takes_kda_impl(cli):
    parse = {"train": lambda a: train.build_parser().parse_args(a),
             "evaluate": lambda a: evaluate.build_parser().parse_args(a),
             "generate": lambda a: generate.build_parser().parse_args(a),
             "plan": plan.parse_args}[cli]
    assert parse(REQUIRED[cli]).kda_impl == "auto"
    for impl in KDA_IMPLS:
        assert parse(REQUIRED[cli] + ["--kda_impl", impl]).kda_impl == impl
    # argparse exits; train / evaluate / generate raise their one-line usage error (exit status 2 in main)
    with pytest.raises((SystemExit, Exception)) as bad:
        parse(REQUIRED[cli] + ["--kda_impl", "triton"])
    assert bad.type is SystemExit or "--kda_impl" in str(bad.value), bad.value


def test_bench_kda_takes_impl_lists(capsys):
    assert bench.main(["kda", "--impl", "xla,pallas_tpu,pallas_gpu", "--tiny", "--reference", "none"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["128"]]
    assert [r[1] for r in rows] == ["xla", "pallas_tpu", "pallas_gpu"], out
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    errors = out.split("(max |diff| / max |o|): ")[1]
    for part in errors.split(", "):
        name, value = part.rsplit(" ", 1)
        assert float(value) < 1e-5, (name, value)

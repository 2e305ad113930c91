"""`python -m experiments.demo --quick` end to end (README command one): the whole evaluation plan on a tiny model
with the real demo corpus, in a child process as a user runs it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "w"
    env = child_env()  # one real CPU device, as a user has
    proc = subprocess.run([sys.executable, "-m", "experiments.demo", "--workdir", str(workdir), "--quick"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    return workdir, proc.stdout


@pytest.mark.slow
def test_demo_produces_every_stage_report_and_plot(demo):
    workdir, stdout = demo
    results = workdir / "eval_results"
    for stage in ("baseline", "finetuned_vanilla", "after_surgery", "finetuned_recursive"):
        data = json.loads((results / f"{stage}_results.json").read_text())
        assert data["metadata"]["stage"] == stage
    assert (results / "comparison.md").exists()
    assert all((results / f"{name}.png").stat().st_size > 1000 for name in ("quality", "recursion"))
    assert "tensorboard --logdir" in stdout


@pytest.mark.slow
def test_demo_surgery_verdict_and_the_recursive_stage_trained(demo):
    workdir, stdout = demo
    verdict = next(line for line in stdout.splitlines() if line.startswith("1. Does surgery"))
    assert "Does surgery preserve the baseline? yes" in verdict
    # The recursive phase-a run trained: finite losses, and its saved sidecar moved off the zero init.
    rows = [json.loads(line) for line in (workdir / "checkpoints" / "recursive_finetune" / "metrics.jsonl")
            .read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if r.get("type") == "train"]
    assert losses and all(np.isfinite(losses))
    from kimi_jax.config import KimiLinearConfig
    from kimi_jax import model_folder
    from kimi_jax.recursive import io

    step, _ = model_folder.resolve(workdir / "checkpoints" / "recursive_finetune")
    sidecar, _ = io.load_sidecar(step, KimiLinearConfig.from_pretrained(step))
    arrays = io.sidecar_arrays(sidecar)
    assert float(np.abs(np.asarray(arrays["cells.b"])).max()) > 0


@pytest.mark.slow
def test_demo_rerun_reuses_finished_steps(demo):
    workdir, _ = demo
    env = child_env()
    proc = subprocess.run([sys.executable, "-m", "experiments.demo", "--workdir", str(workdir), "--quick"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done earlier, reused") == 9  # every step; --quick evaluates the final step only


def test_study_and_quick_are_exclusive_and_a_workdir_keeps_its_size(tmp_path, capsys):
    """--study and --quick cannot be combined; a workdir of one size refuses a run of another (one error line)."""
    from experiments import demo

    with pytest.raises(SystemExit) as e:
        demo.main(["--quick", "--study", "--workdir", str(tmp_path / "w")])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    done = tmp_path / "w" / ".done"
    done.mkdir(parents=True)
    (done / "sizes.json").write_text(json.dumps(dataclasses.asdict(demo.QUICK)))
    assert demo.main(["--study", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "another size (--quick, --study or default)" in err and err.count("\n") == 1
    assert json.loads((done / "sizes.json").read_text()) == dataclasses.asdict(demo.QUICK)  # left as it was

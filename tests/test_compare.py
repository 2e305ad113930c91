"""`python -m experiments.compare` on real evaluation results (the session runs of tests/conftest.py's
`evaluation_runs`: baseline, after_surgery and a finetuned_recursive checkpoint with a non-zero sidecar)."""

from __future__ import annotations

import contextlib
import copy
import io as std_io
import json
import os

import pytest

from experiments import compare


def run(*args) -> tuple[int, str, str]:
    out, err = std_io.StringIO(), std_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = compare.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def write_stage(folder, stage: str, result: dict) -> None:
    result = copy.deepcopy(result)
    result["metadata"]["stage"] = stage
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{stage}_results.json"), "w") as f:
        json.dump(result, f)


def answer(stdout: str, number: int) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(f"{number}. "))


def test_surgery_verdict_yes_on_the_real_zero_init_runs(evaluation_runs, tmp_path):
    out = evaluation_runs["out"]
    report = tmp_path / "report.md"
    rc, stdout, stderr = run("baseline", "after_surgery", "--eval_dir", out, "--output", report)
    assert rc == 0, stderr
    verdict = answer(stdout, 1)
    assert "Does surgery preserve the baseline? yes" in verdict and "identical" in verdict
    text = report.read_text()
    assert "| perplexity |" in text and "Does surgery preserve the baseline?** yes" in text
    for name in ("quality.png", "generation.png", "performance.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "not answered: needs baseline and finetuned_vanilla" in answer(stdout, 2)


def test_a_non_zero_sidecar_makes_the_surgery_verdict_say_no(evaluation_runs, tmp_path):
    """The finetuned_recursive run has random non-zero refine-cell outputs: presented as after_surgery, its
    generations differ from the baseline's, so the surgery did not preserve the baseline."""
    runs = evaluation_runs
    write_stage(tmp_path, "baseline", runs["baseline"]["json"])
    write_stage(tmp_path, "after_surgery", runs["finetuned_recursive"]["json"])
    rc, stdout, _ = run("baseline", "after_surgery", "--eval_dir", tmp_path)
    assert rc == 0
    assert "Does surgery preserve the baseline? no" in answer(stdout, 1)
    assert "differ" in answer(stdout, 1)


def test_all_four_questions_and_highlighting(evaluation_runs, tmp_path):
    runs = evaluation_runs
    write_stage(tmp_path, "baseline", runs["baseline"]["json"])
    write_stage(tmp_path, "after_surgery", runs["after_surgery"]["json"])
    vanilla = copy.deepcopy(runs["baseline"]["json"])
    vanilla["core"]["perplexity"] *= 0.5  # fine-tuning halved the perplexity
    write_stage(tmp_path, "finetuned_vanilla", vanilla)
    write_stage(tmp_path, "finetuned_recursive", runs["finetuned_recursive"]["json"])
    rc, stdout, _ = run(*compare.STAGES, "--eval_dir", tmp_path)
    assert rc == 0
    assert "Does fine-tuning help? yes" in answer(stdout, 2) and "-50.00%" in answer(stdout, 2)
    assert "Does recursion help?" in answer(stdout, 3) and "not answered" not in answer(stdout, 3)
    assert "avg_refine_steps" in answer(stdout, 4)
    rows = {label: (values, marks) for label, values, marks in
            compare.table_rows({s: compare.load_stage(str(tmp_path), s) for s in compare.STAGES},
                               list(compare.STAGES))}
    assert rows["perplexity"][1][2] == "+"  # lower perplexity than the first stage: better


def test_missing_stages_are_reported_and_skipped(evaluation_runs, tmp_path):
    write_stage(tmp_path, "baseline", evaluation_runs["baseline"]["json"])
    rc, stdout, _ = run(*compare.STAGES, "--eval_dir", tmp_path)
    assert rc == 0
    assert "missing:" in stdout and "finetuned_recursive_results.json (stage finetuned_recursive skipped)" in stdout


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"hello": 1}', "not an experiments.evaluate results file"),
    ('[1, 2]', "not an experiments.evaluate results file"),
])
def test_corrupt_or_foreign_files_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "baseline_results.json").write_text(content)
    rc, _, stderr = run("baseline", "--eval_dir", tmp_path)
    assert rc == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith("error: ") and "baseline_results.json" in stderr


def test_schema_violations_and_wrong_stage_files(evaluation_runs, tmp_path):
    broken = copy.deepcopy(evaluation_runs["baseline"]["json"])
    broken["core"]["perplexity"] = "low"
    write_stage(tmp_path, "baseline", broken)
    rc, _, stderr = run("baseline", "--eval_dir", tmp_path)
    assert rc == 2 and "does not match the results schema" in stderr and "perplexity" in stderr
    with open(tmp_path / "baseline_results.json", "w") as f:
        json.dump(evaluation_runs["after_surgery"]["json"], f)  # another stage's file under this name
    rc, _, stderr = run("baseline", "--eval_dir", tmp_path)
    assert rc == 2 and "holds stage 'after_surgery'" in stderr
    rc, _, stderr = run("nonsense", "--eval_dir", tmp_path)
    assert rc == 2 and "unknown stage" in stderr
    rc, _, stderr = run("finetuned_vanilla", "--eval_dir", tmp_path / "empty")
    assert rc == 2 and "none of the stages" in stderr

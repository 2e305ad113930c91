"""`python -m experiments.compare` on real evaluation results (the session runs of tests/conftest.py's
`evaluation_runs`: baseline, after_surgery and a finetuned_recursive checkpoint with a non-zero sidecar)."""

from __future__ import annotations

import contextlib
import copy
import io as std_io
import json
import math
import os

import pytest

from experiments import compare
from kimi_jax.evaluation.uncertainty import MIN_PAIRED_UNITS


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_all_four_questions_and_highlighting(evaluation_runs, tmp_path):
    runs = evaluation_runs
    write_stage(tmp_path, "baseline", runs["baseline"]["json"])
    write_stage(tmp_path, "after_surgery", runs["after_surgery"]["json"])
    vanilla = copy.deepcopy(runs["baseline"]["json"])
    core = vanilla["core"]  # fine-tuning halved the perplexity: every window ln 2 nats per token better
    for field in ("per_document", "per_window"):
        per = core[field]
        per["nll_sum"] = [v - math.log(2) * t for v, t in zip(per["nll_sum"], per["num_tokens"])]
    core["nll_sum"] = sum(per["nll_sum"])
    core["nll_per_token"] = core["nll_sum"] / core["num_tokens"]
    core["perplexity"] = math.exp(core["nll_per_token"])
    write_stage(tmp_path, "finetuned_vanilla", vanilla)
    write_stage(tmp_path, "finetuned_recursive", runs["finetuned_recursive"]["json"])
    rc, stdout, _ = run(*compare.STAGES, "--eval_dir", tmp_path)
    assert rc == 0
    # A verdict needs MIN_PAIRED_UNITS windows and an interval two: the demo's held-out tokens here may be fewer
    # windows, and then even a halving is not shown to be significant (the old answer was "yes").
    docs = len(per["nll_sum"])
    expected = "yes" if docs >= MIN_PAIRED_UNITS else "inconclusive" if docs >= 2 else "inconclusive (no uncertainty)"
    assert f"Does fine-tuning help? {expected}: perplexity" in answer(stdout, 2)
    perplexity_part = answer(stdout, 2).split("; GSM8K")[0]
    assert "-50.00%" in perplexity_part and ("95% CI [" in perplexity_part) == (docs >= 2)
    assert "GSM8K strict" in answer(stdout, 2) and "Does fine-tuning help?" in (tmp_path / "comparison.md").read_text()
    assert "Does recursion help?" in answer(stdout, 3) and "not answered" not in answer(stdout, 3)
    assert "avg_refine_steps" in answer(stdout, 4)
    rows = {label: (values, marks) for label, values, marks in
            compare.table_rows({s: compare.load_stage(str(tmp_path), s) for s in compare.STAGES},
                               list(compare.STAGES))}
    assert rows["perplexity"][1][2] == "+"  # lower perplexity than the first stage: better


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_a_results_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "baseline_results.json").write_bytes(b'{"metadata": {"stage": "caf\xe9"}}\n')
    rc, _, stderr = run("baseline", "--eval_dir", tmp_path)
    assert rc == 2 and stderr.strip().splitlines() == [
        f"error: {tmp_path / 'baseline_results.json'}, line 1: not UTF-8 text (byte 0xe9 at byte offset 27); not a "
        f"results file written by experiments.evaluate"]


@pytest.mark.parametrize("where, message", [
    ("results", "is the input baseline results"),  # the report would replace an input
    ("folder", "is a folder"),
    ("under a file", "is not a folder"),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, where, message):
    (tmp_path / "baseline_results.json").write_text('{"metadata": {"stage": "baseline"}}')  # never read
    before = (tmp_path / "baseline_results.json").read_bytes()
    (tmp_path / "notes.txt").write_text("not a folder")
    output = {"results": tmp_path / "baseline_results.json", "folder": tmp_path,
              "under a file": tmp_path / "notes.txt" / "report.md"}[where]
    rc, stdout, stderr = run("baseline", "--eval_dir", tmp_path, "--output", output)
    assert rc == 2 and len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: --output "), stderr
    assert message in stderr and stdout == ""  # refused before anything was read or printed
    assert (tmp_path / "baseline_results.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["baseline_results.json", "notes.txt"]


@pytest.mark.slow
def test_a_failed_plot_or_report_write_is_one_line_and_keeps_the_old_files(evaluation_runs, tmp_path, monkeypatch):
    import errno

    import matplotlib.figure

    from kimi_jax import safe_io

    write_stage(tmp_path, "baseline", evaluation_runs["baseline"]["json"])
    (tmp_path / "quality.png").write_bytes(b"old plot")

    def full_disk(self, target, **kwargs):
        target.write(b"half a plot")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(matplotlib.figure.Figure, "savefig", full_disk)
        rc, _, stderr = run("baseline", "--eval_dir", tmp_path)
    assert rc == 1 and stderr.strip().splitlines() == [
        f"error: no space left on device writing {tmp_path / 'quality.png'}"]
    assert (tmp_path / "quality.png").read_bytes() == b"old plot"
    assert sorted(os.listdir(tmp_path)) == ["baseline_results.json", "quality.png"]  # no temporary file left

    (tmp_path / "comparison.md").write_text("old report")

    def no_space(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safe_io, "write_text_atomic", no_space)
    rc, _, stderr = run("baseline", "--eval_dir", tmp_path)
    assert rc == 1 and stderr.strip() == f"error: no space left on device writing {tmp_path / 'comparison.md'}"
    assert (tmp_path / "comparison.md").read_text() == "old report"


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "folder of the {stage}_results.json files (default ./eval_results)" in text
    assert "(default: {eval_dir}/comparison.md)" in text and "(default 1e-4)" in text


def _old_format(value):
    """A result as written before the uncertainty fields (``*_stderr``, ``*_ci95``, per-unit lists) existed."""
    if isinstance(value, dict):
        return {k: _old_format(v) for k, v in value.items() if not k.endswith(("_stderr", "_ci95"))
                and k not in ("per_document", "per_window", "uncertainty_unit", "per_chunk_correct",
                                                "per_chunk_correct_at_k")}
    if isinstance(value, list):
        return [_old_format(v) for v in value]
    return value


@pytest.mark.slow
def test_old_results_without_uncertainty_still_compare(evaluation_runs, tmp_path):
    runs = evaluation_runs
    old = _old_format(runs["baseline"]["json"])
    assert "per_document" not in old["core"]
    write_stage(tmp_path, "baseline", old)
    write_stage(tmp_path, "after_surgery", _old_format(runs["after_surgery"]["json"]))
    write_stage(tmp_path, "finetuned_vanilla", runs["baseline"]["json"])  # a new-format file against an old one
    rc, stdout, stderr = run("baseline", "after_surgery", "finetuned_vanilla", "--eval_dir", tmp_path)
    assert rc == 0, stderr
    assert "Does surgery preserve the baseline? yes" in answer(stdout, 1) and "no uncertainty" in answer(stdout, 1)
    assert "Does fine-tuning help? inconclusive (no uncertainty): perplexity" in answer(stdout, 2)


def test_plots_draw_95_percent_error_bars_and_the_table_shows_standard_errors(tmp_path, monkeypatch, capsys):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    seen = []
    original = Axes.bar

    def bar(self, x, height, *args, **kwargs):
        seen.append(kwargs.get("yerr"))
        return original(self, x, height, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", bar)
    rows = [("perplexity", [10.0, 9.0], ["", "+"]), ("distinct-2", [0.3, 0.4], ["", "+"])]
    stages = ["baseline", "finetuned_vanilla"]
    written = compare.plot(rows, stages, str(tmp_path), {"perplexity": [0.5, None]})
    assert seen == [[compare.Z_95 * 0.5, 0.0], None] and len(written) == 2  # no standard error: no error bar
    compare.print_table(rows, stages, {"perplexity": [0.5, None]})
    out = capsys.readouterr().out
    assert "10.00 ± 0.5" in out and "± one standard error" in " ".join(out.split())

r"""Compare evaluation stages: a terminal table, PNG plots, a Markdown report and a verdict on the plan's questions.

    python -m experiments.compare baseline after_surgery finetuned_vanilla finetuned_recursive \
        [--eval_dir ./eval_results] [--output report.md] [--plots_dir DIR] [--ppl_tolerance 1e-4]

Reads `{eval_dir}/{stage}_results.json` (written by `python -m experiments.evaluate`). Stages whose file is missing
are reported and skipped; a file that is not UTF-8 JSON or not an evaluation result (wrong schema, another stage's
file) is a one-line error with exit status 2, and so is an --output or --plots_dir that cannot be written or an
--output that is one of the results files (checked before anything is read). The report and the plots are written
atomically (the old file or the new one, never a part); a write that fails (a full disk) is one line, exit status 1.
The four questions of EVALUATION_PLAN.md are answered explicitly, with the numbers and tolerances used:
  1. Does surgery preserve the baseline? after_surgery vs baseline: perplexity within --ppl_tolerance (relative)
     and identical greedy generations / GSM8K completions (the zero-init sidecar with verified commits).
  2. Does fine-tuning help? finetuned_vanilla vs baseline: perplexity (the answer) and reasoning accuracy.
  3. Does recursion help? finetuned_recursive vs finetuned_vanilla: leak-free chunk accuracy after K inner steps
     vs the vanilla model's greedy chunk accuracy (the answer), and reasoning accuracy.
Questions 2 and 3 are paired comparisons (kimi_jax.evaluation.verdicts): the difference with its 95% interval from a
paired bootstrap over the windows of the held-out documents, problems or chunks, and "yes" only when the interval
lies entirely on the improving side ("no": entirely on the other side; else "inconclusive"). Results without
per-unit data compare on the point estimates, marked "no uncertainty", and are never "yes". The tables show
"value ± standard error" where the results carry one.
  4. Is recursion efficient? finetuned_recursive's avg_refine_steps (the plan's target: 1-2) and its decode
     throughput relative to the baseline path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile

from kimi_jax.errors import KimiJaxError, WriteError, report

STAGES = ("baseline", "after_surgery", "finetuned_vanilla", "finetuned_recursive")

# (label, path in the results JSON (`-1` indexes the last list entry), which direction is better)
METRICS = [
    ("perplexity", "core.perplexity", "lower"),
    ("bits per byte", "core.bits_per_byte", "lower"),
    ("token accuracy", "core.token_accuracy", "higher"),
    ("GSM8K strict", "reasoning.strict_match", "higher"),
    ("GSM8K flexible", "reasoning.flexible_extract", "higher"),
    ("distinct-2", "generation.distinct_2", "higher"),
    ("4-gram repetition", "generation.repetition_rate_4gram", "lower"),
    ("mean gen length", "generation.length.mean_tokens", None),
    ("prefill tok/s", "performance.baseline.prefill_tokens_per_sec", "higher"),
    ("decode tok/s", "performance.baseline.decode_tokens_per_sec", "higher"),
    ("recursive decode tok/s", "performance.recursive.decode_tokens_per_sec", "higher"),
    ("peak memory MiB", "performance.peak_memory_bytes", "lower"),
    ("avg refine steps", "recursive.metrics.avg_refine_steps", None),
    ("commit rate", "recursive.metrics.commit_rate", "higher"),
    ("avg chunk length", "recursive.metrics.avg_chunk_length", "higher"),
    ("stability@K", "recursive.metrics.stability_at_k", "higher"),
    ("chunk accuracy@K", "recursive.chunk_accuracy_at_k.token_accuracy_at_k.-1", "higher"),
    ("greedy chunk accuracy", "greedy_chunk_accuracy.token_accuracy", "higher"),
]
SCALE = {"performance.peak_memory_bytes": 1 / 2 ** 20}
CHUNK_ACC = "recursive.chunk_accuracy_at_k.token_accuracy_at_k.-1"
GREEDY_CHUNK_ACC = "greedy_chunk_accuracy.token_accuracy"  # every stage scores its own greedy continuation
PLOT_DPI = 110
Z_95 = 1.959964  # the standard normal quantile of a two-sided 95% interval: the plots' error bars


class CompareError(KimiJaxError):
    """A results file that cannot be compared, or an output that cannot be written there: one `error:` line, exit
    status 2."""


class WriteFailed(WriteError):
    """The report or a plot could not be written (a full disk, a read-only folder): one `error:` line, exit 1."""


@contextlib.contextmanager
def _writing(path: str):
    from kimi_jax.safe_io import describe_write_error

    try:
        yield
    except OSError as e:
        raise WriteFailed(describe_write_error(e, path)) from None


def get(d: dict, path: str):
    value = d
    for key in path.split("."):
        if isinstance(value, list) and key.lstrip("-").isdigit() and value:
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return value * SCALE.get(path, 1)


def stage_path(eval_dir: str, stage: str) -> str:
    return os.path.join(eval_dir, f"{stage}_results.json")


def _read_json(path: str):
    """The parsed JSON of `path`; an unreadable file, bytes that are not UTF-8 or text that is not JSON are one
    CompareError naming the file."""
    from kimi_jax.safe_io import read_utf8

    text = read_utf8(path, CompareError, advice="; not a results file written by experiments.evaluate")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CompareError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def load_stage(eval_dir: str, stage: str) -> dict | None:
    path = stage_path(eval_dir, stage)
    if not os.path.exists(path):
        return None
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict) or "core" not in data:
        raise CompareError(f"{path}: not an experiments.evaluate results file (no metadata/core sections)")
    try:
        from kimi_jax.evaluation.schema import validate_results
    except ImportError:  # pragma: no cover - the schema module ships with the evaluation module
        validate_results = None
    if validate_results is not None:
        try:
            validate_results(data)
        except ValueError as e:  # SchemaError
            raise CompareError(f"{path}: does not match the results schema: {str(e).splitlines()[0]}") from None
    if data["metadata"].get("stage") != stage:
        raise CompareError(f"{path}: holds stage {data['metadata'].get('stage')!r}, not {stage!r}")
    return data


def _fmt(v) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.2f}"
    return f"{v:.4g}"


def _samples(data: dict) -> list:
    return [s.get("tokens") or s.get("completion") for s in (data.get("generation", {}).get("samples") or [])]


def _completions(data: dict) -> list:
    return [r.get("completion") for r in (data.get("reasoning", {}).get("items") or [])]


def _chunk_comparison(rec: dict, vanilla: dict):
    """Chunk accuracy after K inner steps (recursive) against the vanilla model's greedy continuation, paired by
    chunk when both scored the same chunks (same width and count)."""
    from kimi_jax.evaluation.verdicts import compare_chunk_accuracy

    acc = (rec.get("recursive") or {}).get("chunk_accuracy_at_k") or {}
    greedy = vanilla.get("greedy_chunk_accuracy") or {}
    per_k = acc.get("per_chunk_correct_at_k") or [None]
    same = acc.get("chunk_width") == greedy.get("chunk_width") and acc.get("num_chunks") == greedy.get("num_chunks")
    return compare_chunk_accuracy("chunk accuracy (greedy vanilla -> recursive after K steps)",
                                  get(vanilla, GREEDY_CHUNK_ACC), greedy.get("per_chunk_correct"),
                                  get(rec, CHUNK_ACC), per_k[-1], acc.get("chunk_width") if same else None)


def verdicts(results: dict[str, dict], ppl_tol: float) -> list[tuple[str, str]]:
    """[(question, answer sentence)] for the plan's four key questions, from whatever stages are present.

    Questions 2 and 3 are paired comparisons with a 95% interval (`kimi_jax.evaluation.verdicts`); the answer is
    the verdict of the question's primary metric (2: perplexity, 3: chunk accuracy), the other one is reported with
    its own verdict. Question 1 stays an exactness check (perplexity within the tolerance, identical generations),
    with the perplexity interval reported."""
    from kimi_jax.evaluation.verdicts import compare_gsm8k, compare_perplexity

    out = []
    base, surg = results.get("baseline"), results.get("after_surgery")
    vanilla, rec = results.get("finetuned_vanilla"), results.get("finetuned_recursive")

    q = "1. Does surgery preserve the baseline?"
    if base and surg:
        p0, p1 = get(base, "core.perplexity"), get(surg, "core.perplexity")
        rel = abs(p1 - p0) / p0 if p0 and p1 is not None else None
        same_gen = _samples(base) == _samples(surg)
        same_gsm = _completions(base) == _completions(surg)
        ok = rel is not None and rel <= ppl_tol and same_gen and same_gsm
        interval = compare_perplexity(base, surg)
        out.append((q, f"{'yes' if ok else 'no'}: max |delta ppl| = {abs(p1 - p0) if rel is not None else 'n/a'}"
                       f" (relative {_fmt(rel)}, tolerance {ppl_tol:g}); greedy generations "
                       f"{'identical' if same_gen else 'differ'} ({len(_samples(surg))} samples); GSM8K completions "
                       f"{'identical' if same_gsm else 'differ'} ({len(_completions(surg))} items); "
                       f"{interval.describe(with_verdict=False)}"))
    else:
        out.append((q, "not answered: needs baseline and after_surgery"))

    q = "2. Does fine-tuning help?"
    if base and vanilla:
        ppl = compare_perplexity(base, vanilla)
        gsm = compare_gsm8k(base, vanilla)
        p0, p1 = ppl.a, ppl.b
        out.append((q, f"{ppl.verdict}: {ppl.describe()}"
                       + (f", relative {(p1 - p0) / p0:+.2%}" if p0 and p1 is not None else "")
                       + f"; {gsm.describe()}"))
    else:
        out.append((q, "not answered: needs baseline and finetuned_vanilla"))

    q = "3. Does recursion help?"
    if vanilla and rec:
        chunk = _chunk_comparison(rec, vanilla)
        gsm = compare_gsm8k(vanilla, rec)
        out.append((q, f"{chunk.verdict}: {chunk.describe()}; {gsm.describe()} (vanilla -> recursive)"))
    else:
        out.append((q, "not answered: needs finetuned_vanilla and finetuned_recursive"))

    q = "4. Is recursion efficient?"
    if rec:
        t_base = get(rec, "performance.baseline.decode_tokens_per_sec")
        t_rec = get(rec, "performance.recursive.decode_tokens_per_sec")
        steps = get(rec, "recursive.metrics.avg_refine_steps")
        ok = steps is not None and steps <= 2
        ratio = f"{t_rec / t_base:.2f}x the baseline decode throughput" if t_rec and t_base else "throughput n/a"
        out.append((q, f"{'yes' if ok else 'no'}: avg_refine_steps {_fmt(steps)} (target 1-2, a point estimate), "
                       f"{ratio}"))
    else:
        out.append((q, "not answered: needs finetuned_recursive"))
    return out


def table_rows(results: dict[str, dict], stages: list[str]):
    """[(label, [value per stage], [mark per stage])]; marks: '+' better than baseline, '-' worse, '' same/none."""
    rows = []
    reference = next((results[s] for s in stages if s in results), None)
    for label, path, better in METRICS:
        values = [get(results[s], path) if s in results else None for s in stages]
        if all(v is None for v in values):
            continue
        ref = get(reference, path) if reference else None
        marks = []
        for v in values:
            if better is None or v is None or ref is None or v == ref:
                marks.append("")
            else:
                marks.append("+" if (v < ref) == (better == "lower") else "-")
        rows.append((label, values, marks))
    return rows


def stderr_path(path: str) -> str:
    """Where a metric's standard error is: `{field}_stderr` next to the field (for a list entry, the same entry of
    `{field}_stderr`)."""
    parts = path.split(".")
    if parts[-1].lstrip("-").isdigit():
        return ".".join(parts[:-2] + [parts[-2] + "_stderr", parts[-1]])
    return path + "_stderr"


def table_stderrs(results: dict[str, dict], stages: list[str]) -> dict[str, list]:
    """{label: [standard error per stage, None where the results carry none]} for the table's metrics."""
    return {label: [get(results[s], stderr_path(path)) if s in results else None for s in stages]
            for label, path, _ in METRICS}


def _cell(v, se) -> str:
    return _fmt(v) if se is None or v is None else f"{_fmt(v)} ± {_fmt(se)}"


def print_table(rows, stages: list[str], stderrs: dict[str, list] | None = None) -> None:
    stderrs = stderrs or {}
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(" | ".join(["metric"] + stages))
        for label, values, marks in rows:
            ses = stderrs.get(label) or [None] * len(values)
            print(" | ".join([label] + [_cell(v, se) + m for v, m, se in zip(values, marks, ses)]))
        return
    table = Table(title="Evaluation stages (± one standard error; green: better than the first stage, red: worse)")
    table.add_column("metric")
    for s in stages:
        table.add_column(s, justify="right")
    color = {"+": "green", "-": "red", "": ""}
    for label, values, marks in rows:
        ses = stderrs.get(label) or [None] * len(values)
        table.add_row(label, *[f"[{color[m]}]{_cell(v, se)}[/]" if color[m] else _cell(v, se)
                               for v, m, se in zip(values, marks, ses)])
    Console().print(table)


def markdown(rows, stages, answers, missing, plots, stderrs: dict[str, list] | None = None) -> str:
    lines = ["# Stage comparison", ""]
    if missing:
        lines += [f"Missing stages (skipped): {', '.join(missing)}", ""]
    lines.append("| metric | " + " | ".join(stages) + " |")
    lines.append("|---|" + "---|" * len(stages))
    for label, values, marks in rows:
        ses = (stderrs or {}).get(label) or [None] * len(values)
        cells = [(f"**{_cell(v, se)}**" if m == "+" else f"*{_cell(v, se)}*" if m == "-" else _cell(v, se))
                 for v, m, se in zip(values, marks, ses)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: better than the first stage; italics: worse (point estimates; ± one standard error where "
                  "the results carry one). The key questions below say which differences are significant: the "
                  "difference of the paired units with its 95% interval.", "", "## Key questions", ""]
    lines += [f"- **{q}** {a}" for q, a in answers]
    if plots:
        lines += ["", "## Plots", "", "Error bars: +- 1.96 standard errors (the normal 95% interval of each stage's "
                  "own value; the paired intervals above are the ones that compare stages).", ""]
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(rows, stages, plots_dir: str, stderrs: dict[str, list] | None = None) -> list[str]:
    """One PNG per group of metrics, a bar per stage; error bars span +- Z_95 standard errors (the normal 95%
    interval) where the results carry a standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with _writing(plots_dir):
        os.makedirs(plots_dir, exist_ok=True)
    groups = {"quality": ("perplexity", "bits per byte", "token accuracy", "GSM8K strict", "GSM8K flexible"),
              "generation": ("distinct-2", "4-gram repetition", "mean gen length"),
              "performance": ("prefill tok/s", "decode tok/s", "recursive decode tok/s", "peak memory MiB"),
              "recursion": ("avg refine steps", "commit rate", "avg chunk length", "stability@K",
                            "chunk accuracy@K", "greedy chunk accuracy")}
    by_label = {label: values for label, values, _ in rows}
    written = []
    for name, labels in groups.items():
        present = [l for l in labels if l in by_label]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 3.0), squeeze=False)
        for ax, label in zip(axes[0], present):
            vals = [v if v is not None else float("nan") for v in by_label[label]]
            ses = (stderrs or {}).get(label) or [None] * len(vals)
            errs = [Z_95 * se if se is not None else 0.0 for se in ses]
            ax.bar(range(len(stages)), vals, color="#4c72b0", yerr=errs if any(errs) else None, capsize=3,
                   ecolor="black")
            ax.set_xticks(range(len(stages)), [s.replace("_", "\n") for s in stages], fontsize=7)
            ax.set_title(label, fontsize=9)
        fig.tight_layout()
        path = os.path.join(plots_dir, f"{name}.png")
        try:
            with _writing(path):
                _save_figure_atomic(fig, path)
        finally:
            plt.close(fig)
        written.append(path)
    return written


def _save_figure_atomic(fig, path: str) -> None:
    """A PNG written to a temporary sibling and renamed over `path`: the old plot or the new one, never a part; the
    temporary file is removed on every exit path."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=PLOT_DPI)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_file(path: str, flag: str, inputs: dict[str, str]) -> str:
    """`path` made absolute after checking, before any work, that it is not a folder, can be created and written,
    and is none of the input files ({label: path})."""
    from kimi_jax.safe_io import check_writable_location, refuse_overlap

    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise CompareError(f"{flag} {path}: is a folder, not a file")
    refuse_overlap(path, flag, inputs, error=CompareError)
    check_writable_location(os.path.dirname(path), flag, CompareError, shown=path)
    return path


def check_output_folder(path: str, flag: str) -> str:
    from kimi_jax.safe_io import check_writable_location

    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CompareError(f"{flag} {path}: exists and is not a folder")
    check_writable_location(path, flag, CompareError)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", nargs="+", help=f"stages to compare, in order (any of {', '.join(STAGES)})")
    p.add_argument("--eval_dir", default="./eval_results",
                   help="folder of the {stage}_results.json files (default ./eval_results)")
    p.add_argument("--output", default=None,
                   help="Markdown report (default: {eval_dir}/comparison.md); never one of the results files")
    p.add_argument("--plots_dir", default=None, help="PNG plots (default: the report's folder)")
    p.add_argument("--ppl_tolerance", type=float, default=1e-4,
                   help="relative perplexity tolerance for 'surgery preserves the baseline' (default 1e-4)")
    return p


def main(argv=None) -> int:
    """Bad input is one `error:` line and exit status 2; a failed write of the report or plots one line, exit 1."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KimiJaxError as e:
        return report(e)


def run(args: argparse.Namespace) -> int:
    from kimi_jax.safe_io import write_text_atomic

    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        raise CompareError(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    inputs = {f"{s} results": stage_path(args.eval_dir, s) for s in args.stages}
    output = check_output_file(args.output or os.path.join(args.eval_dir, "comparison.md"), "--output", inputs)
    plots_dir = check_output_folder(args.plots_dir or os.path.dirname(output), "--plots_dir")
    results = {s: r for s in args.stages if (r := load_stage(args.eval_dir, s)) is not None}
    missing = [s for s in args.stages if s not in results]
    for s in missing:
        print(f"missing: {stage_path(args.eval_dir, s)} (stage {s} skipped)")
    if not results:
        raise CompareError(f"none of the stages has a results file in {args.eval_dir}")
    stages = [s for s in args.stages if s in results]
    rows = table_rows(results, stages)
    stderrs = table_stderrs(results, stages)
    print_table(rows, stages, stderrs)
    answers = verdicts(results, args.ppl_tolerance)
    for q, a in answers:
        print(f"{q} {a}")
    plots = plot(rows, stages, plots_dir, stderrs)
    with _writing(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
        write_text_atomic(output, markdown(rows, stages, answers, missing, plots, stderrs))
    print(f"report: {output}; plots: {', '.join(plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m experiments.setup_metrics`: folders, the custom-scalars layout event (read back independently of the
module's own reader: a plain TFRecord parse plus tensorboardX's protobufs), idempotence and one-line errors."""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import subprocess
import sys

import pytest

from experiments import setup_metrics
from experiments.setup_metrics import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The evaluation plan's tags, by category (EVALUATION_PLAN.md "Monitoring During Training" plus the design's
# length/stability losses and steps/s); stage tags are examples the regex charts must catch.
PLAN = {
    "Losses": ["train/loss/total", "train/loss/final_ce", "train/loss/masked_ce", "train/loss/halt",
               "train/loss/ponder", "train/loss/length", "train/loss/stability"],
    "Generation": ["train/generation/avg_refine_steps", "train/generation/commit_rate",
                   "train/generation/avg_chunk_length"],
    "Performance": ["train/performance/tokens_per_sec", "train/performance/memory_mb",
                    "train/performance/steps_per_sec"],
}
STAGE_TAGS = {"evaluation/.*/perplexity": ["evaluation/baseline/perplexity", "evaluation/after_surgery/perplexity",
                                           "evaluation/finetuned_recursive/perplexity"],
              "evaluation/.*/reasoning_accuracy": ["evaluation/baseline/reasoning_accuracy",
                                                   "evaluation/finetuned_vanilla/reasoning_accuracy"]}


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def parse_event_file(path) -> list:
    """Every Event in a TFRecord file (length, masked CRC, payload, masked CRC), via tensorboardX's protobufs."""
    from tensorboardX.proto import event_pb2

    events = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        payload = data[pos + 12:pos + 12 + length]
        assert len(payload) == length, "truncated record"
        event = event_pb2.Event()
        event.ParseFromString(payload)
        events.append(event)
        pos += 12 + length + 4
    assert pos == len(data)
    return events


def layout_of(path) -> dict[str, dict[str, list[str]]]:
    """{category: {chart title: [tag regexes]}} from the one custom-scalars layout event of `path`."""
    from tensorboardX.proto import layout_pb2

    values = [v for e in parse_event_file(path) for v in e.summary.value]
    layouts = [v for v in values if v.tag == "custom_scalars__config__"]
    assert len(layouts) == 1, values
    assert layouts[0].metadata.plugin_data.plugin_name == "custom_scalars"
    layout = layout_pb2.Layout()
    layout.ParseFromString(layouts[0].tensor.string_val[0])
    out = {}
    for category in layout.category:
        assert category.title not in out
        out[category.title] = {}
        for chart in category.chart:
            assert chart.WhichOneof("content") == "multiline"
            out[category.title][chart.title] = list(chart.multiline.tag)
    return out


def layout_files(log_dir) -> list[str]:
    return sorted(os.path.join(log_dir, n) for n in os.listdir(log_dir) if n.startswith("events.out.tfevents."))


def test_creates_folders_and_a_readable_layout_naming_every_tag(tmp_path):
    log_dir, eval_dir = tmp_path / "logs", tmp_path / "eval_results"
    rc, out, err = cli("--log_dir", log_dir, "--eval_dir", eval_dir)
    assert rc == 0 and err == ""
    for sub in ("vanilla_finetune", "recursive_finetune", "evaluation"):
        assert (log_dir / sub).is_dir()
        assert f"created  {log_dir / sub}{os.sep}" in out
    assert eval_dir.is_dir() and f"created  {eval_dir}{os.sep}" in out
    assert f"tensorboard --logdir={log_dir}" in out
    (path,) = layout_files(log_dir)
    assert path.endswith(".kimi_layout") and f"wrote layout: {path}" in out

    layout = layout_of(path)
    assert list(layout) == ["Losses", "Generation", "Performance", "Evaluation"]
    # Every plan tag is caught (TensorBoard: re.match) by exactly one chart, in its own category, and named in it.
    charts = [(cat, title, regex) for cat, cs in layout.items() for title, regexes in cs.items() for regex in regexes]
    all_tags = [(cat, t) for cat, ts in PLAN.items() for t in ts] + [
        ("Evaluation", t) for ts in STAGE_TAGS.values() for t in ts]
    for cat, tag in all_tags:
        hits = [(c, title, r) for c, title, r in charts if re.match(r, tag)]
        assert len(hits) == 1 and hits[0][0] == cat, (tag, hits)
    for cat, tags in PLAN.items():
        named = [r for c, _, r in charts if c == cat]
        assert all(any(tag in r for r in named) for tag in tags), (cat, named)
        assert len(named) == len(tags)
    eval_regexes = [r for c, _, r in charts if c == "Evaluation"]
    assert len(eval_regexes) == 2 and all(any(pat in r for r in eval_regexes) for pat in STAGE_TAGS)
    # Plain tags are exact: no chart catches near misses.
    for near in ("train/loss/halting", "train/loss/total_tokens", "xtrain/loss/total", "evaluation/perplexity",
                 "evaluation/baseline/perplexity_sd"):
        assert not [r for _, _, r in charts if re.match(r, near)], near


def test_rerunning_is_idempotent(tmp_path):
    log_dir, eval_dir = tmp_path / "logs", tmp_path / "eval"
    assert cli("--log_dir", log_dir, "--eval_dir", eval_dir)[0] == 0
    (first,) = layout_files(log_dir)
    stat = os.stat(first)
    snapshot = sorted(os.path.relpath(os.path.join(d, n), tmp_path) for d, ds, fs in os.walk(tmp_path)
                      for n in ds + fs)
    rc, out, _ = cli("--log_dir", log_dir, "--eval_dir", eval_dir)
    assert rc == 0
    assert layout_files(log_dir) == [first] and os.stat(first).st_mtime_ns == stat.st_mtime_ns
    assert f"layout up to date: {first}" in out and "created" not in out
    assert sorted(os.path.relpath(os.path.join(d, n), tmp_path) for d, ds, fs in os.walk(tmp_path)
                  for n in ds + fs) == snapshot
    # Existing user files in the run folders are untouched.
    (log_dir / "vanilla_finetune" / "events.out.tfevents.1.host").write_bytes(b"training data")
    assert cli("--log_dir", log_dir, "--eval_dir", eval_dir)[0] == 0
    assert (log_dir / "vanilla_finetune" / "events.out.tfevents.1.host").read_bytes() == b"training data"


def test_outdated_or_damaged_layouts_are_replaced(tmp_path):
    from tensorboardX import SummaryWriter

    log_dir = tmp_path / "logs"
    os.makedirs(log_dir)
    old = SummaryWriter(logdir=str(log_dir), filename_suffix=".kimi_layout")
    old.add_custom_scalars({"Losses": {"total": ["Multiline", ["^train/loss/total$"]]}})  # an older, smaller layout
    old.close()
    (outdated,) = layout_files(log_dir)
    damaged = log_dir / "events.out.tfevents.0000000001.host.kimi_layout"
    damaged.write_bytes(open(outdated, "rb").read()[:-3])  # truncated
    rc, out, _ = cli("--log_dir", log_dir, "--eval_dir", tmp_path / "eval")
    assert rc == 0
    (new,) = layout_files(log_dir)
    assert "Evaluation" in layout_of(new) and len(layout_of(new)["Losses"]) == 7
    assert "removed outdated layout" in out and not os.path.exists(damaged)
    assert not [n for n in os.listdir(log_dir) if n.startswith(".layout-tmp")]

    # The module's own reader checks CRCs: a flipped payload byte is damage, not a layout.
    data = bytearray(open(new, "rb").read())
    data[-6] ^= 0xFF
    with open(new, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match="checksum"):
        setup_metrics.read_layouts(new)
    rc, out, _ = cli("--log_dir", log_dir, "--eval_dir", tmp_path / "eval")
    assert rc == 0 and len(layout_files(log_dir)) == 1
    assert setup_metrics.read_layouts(layout_files(log_dir)[0]) == [setup_metrics.layout_proto()]


def test_bad_paths_are_one_error_line(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["--log_dir", a_file], f"error: --log_dir {a_file}: exists and is not a folder"),
        (["--log_dir", tmp_path / "logs", "--eval_dir", a_file], f"error: --eval_dir {a_file}: exists and is not a "
                                                                   f"folder"),
        (["--log_dir", a_file / "sub"], f"error: --log_dir {a_file / 'sub'}: cannot create it"),
        (["--bogus"], "error: unrecognized arguments: --bogus"),
    ]
    for args, expected in cases:
        rc, out, err = cli(*args)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(expected), (args, err)
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "locked"
        os.makedirs(locked)
        os.chmod(locked, 0o500)
        try:
            rc, _, err = cli("--log_dir", locked)
            assert rc == 2 and "is not writable" in err
        finally:
            os.chmod(locked, 0o700)


def test_command_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "experiments.setup_metrics", "--log_dir", str(tmp_path / "logs"),
                           "--eval_dir", str(tmp_path / "eval")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tensorboard --logdir=" in proc.stdout and len(layout_files(tmp_path / "logs")) == 1

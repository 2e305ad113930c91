"""Prepare the TensorBoard log layout of the evaluation plan (../shared/docs/EVALUATION_PLAN.md).

    python -m experiments.setup_metrics [--log_dir ./logs] [--eval_dir ./eval_results]

Creates `{log_dir}/vanilla_finetune/`, `{log_dir}/recursive_finetune/`, `{log_dir}/evaluation/` and `--eval_dir`,
and writes a custom-scalars layout (the "Custom Scalars" tab) into `{log_dir}` itself, grouping the plan's tags:

    Losses       train/loss/{total,final_ce,masked_ce,halt,ponder,length,stability}
    Generation   train/generation/{avg_refine_steps,commit_rate,avg_chunk_length}
    Performance  train/performance/{tokens_per_sec,memory_mb,steps_per_sec}
    Evaluation   evaluation/.*/perplexity, evaluation/.*/reasoning_accuracy (one line per stage)

Every chart is a multiline chart whose tags are regular expressions (TensorBoard matches them with `re.match`), so
each run under `{log_dir}` (vanilla_finetune, recursive_finetune, evaluation) is one line of the same chart. The
layout lives in one event file, `{log_dir}/events.out.tfevents.*.kimi_layout`. Re-running is idempotent: existing
folders are kept, an up-to-date layout file is left alone, and an outdated or damaged one is replaced (the new file
is written in a hidden folder and moved into place before the old one is removed, so TensorBoard never sees two
layouts). Prints what it created and the `tensorboard --logdir` command. Expected failures (a path that is a file,
a folder that cannot be created or written) are one `error:` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import struct
import sys

from kimi_jax.errors import KimiJaxError, report

RUN_DIRS = ("vanilla_finetune", "recursive_finetune", "evaluation")
LAYOUT_SUFFIX = ".kimi_layout"
LAYOUT_TAG = "custom_scalars__config__"  # the summary tag TensorBoard's custom-scalars plugin reads
PLUGIN_NAME = "custom_scalars"

# category -> tags (plain tags are matched exactly; entries with ".*" are regexes over every stage)
CATEGORIES: dict[str, tuple[str, ...]] = {
    "Losses": ("train/loss/total", "train/loss/final_ce", "train/loss/masked_ce", "train/loss/halt",
               "train/loss/ponder", "train/loss/length", "train/loss/stability"),
    "Generation": ("train/generation/avg_refine_steps", "train/generation/commit_rate",
                   "train/generation/avg_chunk_length"),
    "Performance": ("train/performance/tokens_per_sec", "train/performance/memory_mb",
                    "train/performance/steps_per_sec"),
    "Evaluation": ("evaluation/.*/perplexity", "evaluation/.*/reasoning_accuracy"),
}


class SetupError(KimiJaxError):
    """A path that cannot be used: one `error:` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise SetupError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m experiments.setup_metrics", description=__doc__.split("\n\n")[0])
    p.add_argument("--log_dir", default="./logs", help="TensorBoard log root (default: ./logs)")
    p.add_argument("--eval_dir", default="./eval_results", help="evaluation JSON folder (default: ./eval_results)")
    return p


# ------------------------------------------------------------------------------------------------------- layout
def tag_regex(tag: str) -> str:
    """The chart regex for a plan tag: anchored at both ends, so `train/loss/halt` does not catch `.../halting`."""
    return f"^{tag}$"


def chart_title(tag: str) -> str:
    return tag.replace("/.*/", "/<stage>/")


def layout_dict() -> dict[str, dict[str, list]]:
    """The layout in tensorboardX's `add_custom_scalars` form: {category: {chart title: ["Multiline", [regex]]}}."""
    return {category: {chart_title(tag): ["Multiline", [tag_regex(tag)]] for tag in tags}
            for category, tags in CATEGORIES.items()}


def layout_proto():
    """The Layout protobuf TensorBoard will read (the same bytes `add_custom_scalars` writes)."""
    from tensorboardX.proto import layout_pb2
    from tensorboardX.summary import custom_scalars

    summary = custom_scalars(layout_dict())
    layout = layout_pb2.Layout()
    layout.ParseFromString(summary.value[0].tensor.string_val[0])
    return layout


# ----------------------------------------------------------------------------------------------- event files
def read_records(path: str) -> list[bytes]:
    """The records of a TFRecord file, CRCs checked; ValueError for a truncated or corrupted file."""
    from tensorboardX.record_writer import masked_crc32c

    records = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        if len(data) - pos < 12:
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if masked_crc32c(header) != header_crc:
            raise ValueError(f"{path}: bad header checksum at byte {pos}")
        end = pos + 12 + length
        if end + 4 > len(data):
            raise ValueError(f"{path}: truncated record at byte {pos}")
        payload = data[pos + 12:end]
        (payload_crc,) = struct.unpack("<I", data[end:end + 4])
        if masked_crc32c(payload) != payload_crc:
            raise ValueError(f"{path}: bad record checksum at byte {pos}")
        records.append(payload)
        pos = end + 4
    return records


def read_layouts(path: str) -> list:
    """Every custom-scalars Layout in an event file, in file order (ValueError if the file is damaged)."""
    from google.protobuf.message import DecodeError
    from tensorboardX.proto import event_pb2, layout_pb2

    layouts = []
    for record in read_records(path):
        event = event_pb2.Event()
        try:
            event.ParseFromString(record)
        except DecodeError as e:
            raise ValueError(f"{path}: not an Event record ({e})") from None
        for value in event.summary.value:
            if value.tag == LAYOUT_TAG and value.metadata.plugin_data.plugin_name == PLUGIN_NAME:
                layout = layout_pb2.Layout()
                try:
                    layout.ParseFromString(value.tensor.string_val[0])
                except (DecodeError, IndexError) as e:
                    raise ValueError(f"{path}: unreadable layout ({e})") from None
                layouts.append(layout)
    return layouts


def layout_files(log_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(log_dir), f"events.out.tfevents.*{LAYOUT_SUFFIX}")))


def _is_current(path: str, want) -> bool:
    try:
        return read_layouts(path) == [want]
    except (OSError, ValueError):
        return False


def write_layout(log_dir: str) -> tuple[str, str, list[str]]:
    """Make `{log_dir}` hold exactly one up-to-date layout file -> (status, path, removed files).

    status: "current" (left alone), "written" (there was none) or "replaced" (outdated/damaged ones removed).
    """
    from tensorboardX import SummaryWriter

    want = layout_proto()
    existing = layout_files(log_dir)
    current = [p for p in existing if _is_current(p, want)]
    if current:
        stale = [p for p in existing if p != current[0]]
        for p in stale:
            os.remove(p)
        return ("current" if not stale else "replaced"), current[0], stale
    tmp = os.path.join(log_dir, f".layout-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        writer = SummaryWriter(logdir=tmp, filename_suffix=LAYOUT_SUFFIX)
        writer.add_custom_scalars(layout_dict())
        writer.close()
        (name,) = [n for n in os.listdir(tmp) if n.endswith(LAYOUT_SUFFIX)]
        if read_layouts(os.path.join(tmp, name)) != [want]:
            raise SetupError(f"{log_dir}: the layout written by tensorboardX does not read back")
        final = os.path.join(log_dir, name)
        if os.path.exists(final):  # same second and host as an outdated file: it goes first
            os.remove(final)
        os.replace(os.path.join(tmp, name), final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stale = [p for p in existing if os.path.abspath(p) != os.path.abspath(final)]
    for p in stale:
        os.remove(p)
    return ("replaced" if existing else "written"), final, stale


# -------------------------------------------------------------------------------------------------------- main
def _make_dir(path: str, flag: str) -> bool:
    """Create `path` (and parents) -> whether it was created."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SetupError(f"{flag} {path}: exists and is not a folder")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise SetupError(f"{flag} {path}: folder is not writable")
        return False
    try:
        os.makedirs(path)
    except OSError as e:
        raise SetupError(f"{flag} {path}: cannot create it ({e.strerror})") from None
    return True


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    log_dir, eval_dir = args.log_dir, args.eval_dir
    folders = [(log_dir, "--log_dir")] + [(os.path.join(log_dir, d), "--log_dir") for d in RUN_DIRS] + [
        (eval_dir, "--eval_dir")]
    for path, flag in folders:
        created = _make_dir(path, flag)
        print(f"{'created' if created else 'exists '}  {os.path.join(path, '')}")
    try:
        status, path, removed = write_layout(log_dir)
    except OSError as e:
        raise SetupError(f"--log_dir {log_dir}: cannot write the layout ({e.strerror or e})") from None
    n_charts = sum(len(tags) for tags in CATEGORIES.values())
    what = f"{len(CATEGORIES)} categories ({', '.join(CATEGORIES)}), {n_charts} charts"
    if status == "current":
        print(f"layout up to date: {path} ({what})")
    else:
        print(f"{'wrote' if status == 'written' else 'replaced'} layout: {path} ({what})")
        for p in removed:
            print(f"removed outdated layout: {p}")
    print(f"start TensorBoard with: tensorboard --logdir={log_dir} --port=6006")
    return 0


def main(argv=None) -> int:
    try:
        return run(argv)
    except KimiJaxError as e:
        return report(e)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The checkpoint converter commands: HF -> orbax -> HF round trips, storage dtypes (the source's by default),
self-contained output folders, and one-line errors that leave nothing behind: bad input, an output overlapping its
input, Ctrl-C, SIGTERM, SIGKILL (cleaned up by the next run), a full disk.

Most runs go through `convert.cli.run_main(main, argv)` in-process (exit codes and stderr without a fresh interpreter
per call); subprocesses only where the point is the real command line, a real signal or a small private file system.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import kimi_jax
from convert import check_logits, hf_to_orbax, orbax_to_hf
from convert.cli import run_main
from kimi_jax import orbax_model
from kimi_jax.hf import mapping
from kimi_jax.hf.safetensors_io import (PlannedSafetensorsWriter, SafetensorsReader, read_safetensors_header,
                                        write_safetensors)
from kimi_jax.config import tiny
from kimi_jax.safe_io import Terminated

from conftest import REFERENCE_CONFIGS, copy_checkpoint, max_abs_diff, run_on_small_disk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32_TOL = 1e-4  # kimi_jax vs transformers, fp32
EXPORT_TOL = 1e-6  # transformers on an exported folder vs the original torch reference (observed: exactly 0)
KEEP_FP32_KEYS = ("ffn.router", "ffn.correction_bias", "mixer.dt_bias", "mixer.A_log")  # orbax keys kept in fp32
KEEP_FP32_HF = re.compile(r"\.(gate\.weight|gate\.e_score_correction_bias|dt_bias|A_log)$")  # HF names kept in fp32


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def small(reference_factory):
    return reference_factory("small")


@pytest.fixture(scope="module")
def small_f32(small, tmp_path_factory) -> str:
    """The `small` hub reference converted to a float32 orbax checkpoint (shared: do not modify)."""
    out = str(tmp_path_factory.mktemp("small-f32") / "ckpt")
    to_orbax(small.folder("hub"), out, "--dtype", "float32")
    return out


@pytest.fixture(scope="module")
def small_bf16(small, tmp_path_factory) -> str:
    """The `small` native-layout reference (float32) stored --dtype bfloat16 (shared: do not modify)."""
    out = str(tmp_path_factory.mktemp("small-bf16") / "ckpt")
    to_orbax(small.folder("native"), out, "--dtype", "bfloat16")
    return out


def cli(main, argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = run_main(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def to_orbax(hf, out, *flags) -> None:
    rc = run_main(hf_to_orbax.main, ["--hf_path", str(hf), "--output", str(out), "--quiet", *flags])
    assert rc == 0, f"hf_to_orbax {hf} -> {out} exited {rc}"


def to_hf(ckpt, out, *flags) -> None:
    rc = run_main(orbax_to_hf.main, ["--ckpt", str(ckpt), "--output", str(out), "--quiet", *flags])
    assert rc == 0, f"orbax_to_hf {ckpt} -> {out} exited {rc}"


def all_arrays(folder) -> tuple[dict, dict]:
    """(stored {key: ShapeDtypeStruct}, {key: numpy array in the stored dtype})."""
    stored = orbax_model.stored_arrays(str(folder))
    return stored, orbax_model.restore_arrays(str(folder), stored)


def assert_same_arrays(a_folder, b_folder) -> None:
    """Bit-identical orbax checkpoints: same keys, shapes, dtypes and every value."""
    stored_a, arrays_a = all_arrays(a_folder)
    stored_b, arrays_b = all_arrays(b_folder)
    assert sorted(stored_a) == sorted(stored_b)
    for key in stored_a:
        assert stored_a[key].shape == stored_b[key].shape, key
        assert stored_a[key].dtype == stored_b[key].dtype, key
        assert arrays_a[key].dtype == arrays_b[key].dtype, key
        assert np.array_equal(arrays_a[key], arrays_b[key]), key


def shard_headers(folder) -> dict[str, dict]:
    """{tensor name: header entry (+ "file")} over every safetensors file of an HF folder."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            header = read_safetensors_header(os.path.join(folder, f))
            header.pop("__data_start__")
            header.pop("__metadata__", None)
            for name, info in header.items():
                assert name not in out, f"{name} is in two shards"
                out[name] = {**info, "file": f}
    return out


def torch_model(folder, **kwargs):
    from transformers import KimiLinearForCausalLM

    return KimiLinearForCausalLM.from_pretrained(str(folder), **kwargs).eval()


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def jax_logits(model, ids) -> np.ndarray:
    return np.asarray(kimi_jax.forward(model, ids), np.float32)


def leftovers(output) -> list[str]:
    """The output folder itself and any `.NAME.tmp-*` / `.NAME.old-*` sibling still in its parent."""
    output = os.path.abspath(str(output))
    parent, name = os.path.dirname(output), os.path.basename(output)
    if not os.path.isdir(parent):
        return []
    return sorted(f for f in os.listdir(parent) if f == name or f.startswith(f".{name}."))


def assert_one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def snapshot(folder) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def run_subprocess(module: str, *args, timeout=240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------- round trips
# (reference, source layout, source shards, exports as (layout, max_shard_size)); together every source layout and
# sharding is converted, and every export layout is written both as one file and as several shards + index.
ROUND_TRIPS = [
    ("irregular", "hub", 1, [("hub", "5GB"), ("native", "150KB")]),
    ("irregular", "native", 3, [("native", "5GB"), ("hub", "150KB")]),
    ("dense2", "native", 1, [("hub", "5GB"), ("native", "128KB")]),  # 128 KiB: exactly the largest tensor
    ("dense2", "hub", 2, [("native", "5GB"), ("hub", "128KB")]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, layout, shards, exports", ROUND_TRIPS,
                         ids=[f"{n}-{l}-{s}" for n, l, s, _ in ROUND_TRIPS])
def test_round_trip(reference_factory, tmp_path, name, layout, shards, exports):
    case = reference_factory(name)
    src = case.folder(layout, shards)
    first = tmp_path / "orbax"
    to_orbax(src, first, "--dtype", "float32")
    meta = orbax_model.read_meta(str(first))
    assert meta["source_layout"] == layout and meta["dtype"] == "float32"
    assert {str(s.dtype) for s in orbax_model.stored_arrays(str(first)).values()} == {"float32"}

    # HF -> orbax -> kimi_jax matches transformers on the original.
    ids = case.random_ids(2, 12)
    want = case.ref_logits(ids)
    model = orbax_model.load_model(str(first))
    diff = max_abs_diff(jax_logits(model, ids), want)
    print(f"\n{name} {layout}x{shards}: orbax -> kimi_jax vs transformers max |diff| {diff:.3e}")
    assert diff <= FP32_TOL

    ref_state = case.ref.state_dict()
    for export_layout, max_shard in exports:
        hf = tmp_path / f"hf-{export_layout}-{max_shard}"
        to_hf(first, hf, "--layout", export_layout, "--max_shard_size", max_shard)
        files = sorted(os.listdir(hf))
        headers = shard_headers(hf)
        # Names are exactly the requested layout's, every one written once, all float32 as stored.
        assert set(headers) == set(mapping.expected_hf_tensors(case.cfg, export_layout))
        assert {h["dtype"] for h in headers.values()} == {"F32"}
        if max_shard == "5GB":
            assert "model.safetensors" in files and "model.safetensors.index.json" not in files
        else:
            shard_files = [f for f in files if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)]
            assert len(shard_files) > 2 and "model.safetensors" not in files
            with open(hf / "model.safetensors.index.json") as f:
                index = json.load(f)
            assert index["weight_map"] == {n: h["file"] for n, h in headers.items()}
            assert set(index["weight_map"].values()) == set(shard_files)
            limit = orbax_to_hf.parse_size(max_shard)
            for f in shard_files:  # no shard's data exceeds the limit (a limit below the largest tensor is refused)
                data = sum(h["data_offsets"][1] - h["data_offsets"][0] for n, h in headers.items() if h["file"] == f)
                assert data <= limit, (f, data, limit)
        with open(hf / "config.json") as f:
            assert json.load(f)["dtype"] == "float32"

        # transformers loads the export bit-for-bit: same parameters, same logits as the original reference.
        loaded = torch_model(hf)
        state = loaded.state_dict()
        assert sorted(state) == sorted(ref_state)
        for key, value in ref_state.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
        export_diff = max_abs_diff(torch_logits(loaded, ids), want)
        print(f"{name}: export --layout {export_layout} --max_shard_size {max_shard} -> transformers max |diff| "
              f"{export_diff:.3e}")
        assert export_diff <= EXPORT_TOL

        # HF -> orbax of the export is bit-identical to the first conversion.
        second = tmp_path / f"orbax-again-{export_layout}-{max_shard}"
        to_orbax(hf, second, "--dtype", "float32")
        assert orbax_model.read_meta(str(second))["source_layout"] == export_layout
        assert_same_arrays(first, second)


# ---------------------------------------------------------------------------------------------------- bf16
def test_bfloat16_storage_and_export(small, small_f32, small_bf16, tmp_path):
    ckpt = small_bf16
    assert orbax_model.read_meta(str(ckpt))["dtype"] == "bfloat16"
    stored, arrays = all_arrays(ckpt)
    _, arrays_f32 = all_arrays(small_f32)
    kept = [k for k in stored if k.endswith(KEEP_FP32_KEYS)]
    assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in kept} == set(KEEP_FP32_KEYS)
    for key, s in stored.items():
        if key.endswith(KEEP_FP32_KEYS):
            assert s.dtype == np.float32 and arrays[key].dtype == np.float32, key
            assert np.array_equal(arrays[key], arrays_f32[key]), key
        else:
            assert s.dtype == ml_dtypes.bfloat16 and arrays[key].dtype == ml_dtypes.bfloat16, key
            assert np.array_equal(arrays[key], arrays_f32[key].astype(ml_dtypes.bfloat16)), key

    # Export as stored: BF16 everywhere except the router / correction bias / dt_bias / A_log, which stay F32.
    hf = tmp_path / "hf-bf16"
    to_hf(ckpt, hf)
    headers = shard_headers(hf)
    f32_names = sorted(n for n, h in headers.items() if h["dtype"] == "F32")
    assert f32_names == sorted(n for n in headers if KEEP_FP32_HF.search(n))
    assert {n.rsplit(".", 1)[-1] for n in f32_names} >= {"dt_bias", "A_log", "e_score_correction_bias"}
    assert any(n.endswith("gate.weight") for n in f32_names)
    assert {h["dtype"] for n, h in headers.items() if n not in f32_names} == {"BF16"}
    with open(hf / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    # The values are the original float32 weights rounded to bf16 (the kept ones untouched).
    original = SafetensorsReader(small.folder("hub"))  # `small` has no dense layer: hub names match one to one
    exported = SafetensorsReader(str(hf))
    assert sorted(exported.names()) == sorted(original.names())
    for name in exported.names():
        want, got = original.get(name), exported.get(name)
        assert np.array_equal(got, want if KEEP_FP32_HF.search(name) else want.astype(ml_dtypes.bfloat16)), name

    # transformers loads it, and its logits are those of the reference up to bf16 rounding.
    loaded = torch_model(hf, dtype=torch.float32)
    ids = small.random_ids(1, 16)
    bf16_diff = max_abs_diff(torch_logits(loaded, ids), small.ref_logits(ids))
    print(f"\nbf16 export -> transformers (fp32 compute) vs fp32 reference: max |diff| {bf16_diff:.3e}")
    assert 0 < bf16_diff < 0.05
    loaded_bf16 = torch_model(hf)
    assert loaded_bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert np.isfinite(torch_logits(loaded_bf16, ids)).all()

    # Export dtype overrides: an fp32 checkpoint exported --dtype bfloat16 is the same file as the bf16 one, and
    # the bf16 checkpoint exported --dtype float32 holds the bf16 values upcast.
    hf_cast = tmp_path / "hf-cast"
    to_hf(small_f32, hf_cast, "--dtype", "bfloat16")
    assert shard_headers(hf_cast) == headers
    with open(hf / "model.safetensors", "rb") as a, open(hf_cast / "model.safetensors", "rb") as b:
        assert a.read() == b.read()
    hf_up = tmp_path / "hf-up"
    to_hf(ckpt, hf_up, "--dtype", "float32")
    up = SafetensorsReader(str(hf_up))
    assert {up.entries[n][1] for n in up.names()} == {"F32"}
    for name in up.names():
        assert np.array_equal(up.get(name), exported.get(name).astype(np.float32)), name


# ---------------------------------------------------------------------------------------------------- default dtype
def _rewrite_source(src_folder, dst, change) -> str:
    """A copy of the one-file HF folder `src_folder` with every tensor replaced by `change(name, array)`."""
    dst = copy_checkpoint(src_folder, dst)
    reader = SafetensorsReader(dst)
    tensors = {name: change(name, reader.get(name)) for name in reader.names()}
    write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    return dst


def test_default_dtype_is_the_sources(small, small_f32, small_bf16, tmp_path, capsys):
    """Without --dtype the checkpoint stores what the source holds: float32 bit for bit, bfloat16 as bfloat16."""
    out = tmp_path / "from-f32"
    rc, stdout, err = cli(hf_to_orbax.main, ["--hf_path", small.folder("hub"), "--output", out, "--quiet"], capsys)
    assert rc == 0 and err == "" and "stored in float32" in stdout
    assert orbax_model.read_meta(str(out))["dtype"] == "float32"
    assert_same_arrays(out, small_f32)

    # Every tensor bfloat16 (the float32-kept ones too, which are widened exactly: no notice for those).
    src = _rewrite_source(small.folder("hub"), tmp_path / "bf16-src", lambda n, a: a.astype(ml_dtypes.bfloat16))
    out = tmp_path / "from-bf16"
    rc, stdout, err = cli(hf_to_orbax.main, ["--hf_path", src, "--output", out, "--quiet"], capsys)
    assert rc == 0 and err == "" and "stored in bfloat16" in stdout
    assert orbax_model.read_meta(str(out))["dtype"] == "bfloat16"
    stored, arrays = all_arrays(out)
    _, want = all_arrays(small_bf16)  # the same float32 weights rounded to bfloat16 by --dtype bfloat16
    for key, s in stored.items():
        if key.endswith(KEEP_FP32_KEYS):
            assert s.dtype == np.float32 and np.array_equal(arrays[key], want[key].astype(ml_dtypes.bfloat16)), key
        else:
            assert s.dtype == ml_dtypes.bfloat16 and np.array_equal(arrays[key], want[key]), key


def test_mixed_source_dtypes_are_stored_losslessly_and_named(small, small_f32, tmp_path, capsys):
    """A float32 checkpoint with a float16 and a float64 tensor: stored as float32, one notice per cast."""
    f16, f64 = "model.norm.weight", "lm_head.weight"
    widen = {f16: np.float16, f64: np.float64}
    src = _rewrite_source(small.folder("hub"), tmp_path / "src", lambda n, a: a.astype(widen.get(n, a.dtype)))
    out = tmp_path / "ckpt"
    rc, stdout, err = cli(hf_to_orbax.main, ["--hf_path", src, "--output", out, "--quiet"], capsys)
    assert rc == 0 and "stored in float32" in stdout
    assert sorted(err.strip().splitlines()) == [
        f"notice: 1 tensor(s) are float16 in the source and stored as float32, which holds them exactly: {f16}",
        f"notice: 1 tensor(s) are float64 in the source and rounded to float32 (up to 6e-08 relative): {f64}"]
    stored, arrays = all_arrays(out)
    assert {np.dtype(s.dtype) for s in stored.values()} == {np.dtype(np.float32)}
    _, want = all_arrays(small_f32)
    keys = {n: orbax_model.param_key(spec.path) for spec in mapping.plan(small.cfg, mapping.HUB)
            for group in spec.hf_names for n in group}
    for key in stored:
        expected = want[key].astype(np.float16).astype(np.float32) if key == keys[f16] else want[key]
        assert np.array_equal(arrays[key], expected), key


# ---------------------------------------------------------------------------------------------------- self-contained
@pytest.mark.slow
def test_output_folders_are_self_contained(small, tmp_path):
    """Real command lines (subprocess): tokenizer files travel HF -> orbax -> HF; neither output needs its source."""
    src = copy_checkpoint(small.folder("hub"), tmp_path / "src")
    sidecars = {"tokenizer_config.json": b'{"model_max_length": 128, "note": "dummy"}\n',
                "tiktoken.model": b"ZHVtbXk= 0\nIHRpa3Rva2Vu 1\n"}
    for name, data in sidecars.items():
        with open(os.path.join(src, name), "wb") as f:
            f.write(data)
    with open(os.path.join(src, "config.json"), "rb") as f:
        src_config = json.loads(f.read())

    ckpt = tmp_path / "ckpt"
    proc = run_subprocess("convert.hf_to_orbax", "--hf_path", src, "--output", ckpt, "--dtype", "float32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "converted" in proc.stdout and str(ckpt) in proc.stdout
    files = set(os.listdir(ckpt))
    assert {"config.json", "kimi_jax.json", "params", *sidecars} <= files
    assert os.path.isdir(ckpt / "params")
    for name, data in sidecars.items():
        assert (ckpt / name).read_bytes() == data
    with open(ckpt / "config.json") as f:
        assert json.load(f) == src_config
    meta = orbax_model.read_meta(str(ckpt))
    assert meta["dtype"] == "float32" and set(sidecars) <= set(meta["copied_files"])
    assert meta["num_params"] == sum(s.size for s in orbax_model.stored_arrays(str(ckpt)).values())
    assert leftovers(ckpt) == ["ckpt"]

    shutil.rmtree(src)  # the checkpoint must not refer back to its source
    hf = tmp_path / "hf"
    proc = run_subprocess("convert.orbax_to_hf", "--ckpt", ckpt, "--output", hf,
                          "--max_shard_size", "200KB", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "exported" in proc.stdout
    files = set(os.listdir(hf))
    assert {"config.json", "model.safetensors.index.json", *sidecars} <= files
    for name, data in sidecars.items():
        assert (hf / name).read_bytes() == data
    shutil.rmtree(ckpt)
    loaded = torch_model(hf)
    for key, value in small.ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert leftovers(hf) == ["hf"]


# ---------------------------------------------------------------------------------------------------- bad input
def _edit(folder, fn, file="model.safetensors"):
    path = os.path.join(folder, file)
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def _set_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        d = json.load(f)
    d.update(changes)
    with open(path, "w") as f:
        json.dump(d, f)


def _truncate(folder):
    path = os.path.join(folder, "model.safetensors")
    header = read_safetensors_header(path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    base = header.pop("__data_start__")
    header.pop("__metadata__", None)
    cut = [n for n, i in header.items() if base + i["data_offsets"][1] > size // 2]
    return [path, "truncated"], cut


def _garbage_header(folder):
    path = os.path.join(folder, "model.safetensors")
    rng = np.random.default_rng(0)
    with open(path, "r+b") as f:
        f.write(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return [path, "not a readable safetensors file"], None


def _garbage_json(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        f.write(b"\xff\x00{garbage" * (size // 10))
    return [path, "not a readable safetensors file"], None


def _bad_offsets(folder):
    """A well-formed header whose byte range for one tensor does not match its shape (still inside the file)."""
    path = os.path.join(folder, "model.safetensors")
    name = "model.layers.0.self_attn.b_proj.weight"
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data = f.read()
    start, stop = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, stop - 4]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return [path, name, "bytes"], None


def _missing_shard(folder):
    os.remove(os.path.join(folder, "model-00002-of-00003.safetensors"))
    return [os.path.join(folder, "model.safetensors.index.json"), "model-00002-of-00003.safetensors", "missing"], None


def _missing_tensor(folder):
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    _edit(folder, lambda t: t.pop(name))
    return [folder, name, "missing"], None


def _wrong_shape(folder):
    name = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    _edit(folder, lambda t: t.__setitem__(name, np.zeros((31, 64), np.float32)))
    return [folder, name, "(31, 64)", "(32, 64)"], None


def _int32_weight(folder):
    name = "model.layers.0.self_attn.q_proj.weight"
    _edit(folder, lambda t: t.__setitem__(name, t[name].astype(np.int32)))
    return [os.path.join(folder, "model.safetensors"), name, "I32"], None


def _unknown_tensor(folder):
    name = "model.layers.0.self_attn.bogus.weight"
    _edit(folder, lambda t: t.__setitem__(name, np.zeros((4, 4), np.float32)))
    return [folder, name], None


def _narrow_config(folder):
    _set_config(folder, hidden_size=48)
    return [folder, "model.embed_tokens.weight", "(512, 64)", "(512, 48)"], None


def _extra_layer_config(folder):
    cfg = REFERENCE_CONFIGS["small"]()
    bigger = tiny(num_hidden_layers=cfg.num_hidden_layers + 1, mla_layers=(1,), first_k_dense=0)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(bigger.to_hf_dict(), f)
    return [folder, "model.layers.2.", "missing"], None


BAD_INPUTS = {
    "missing-shard": (3, _missing_shard),
    "truncated": (1, _truncate),
    "garbage-bytes": (1, _garbage_header),
    "garbage-header-json": (1, _garbage_json),
    "inconsistent-offsets": (1, _bad_offsets),
    "missing-tensor": (1, _missing_tensor),
    "wrong-shape": (1, _wrong_shape),
    "int32-weights": (1, _int32_weight),
    "unknown-tensor": (1, _unknown_tensor),
    "config-hidden-size": (1, _narrow_config),
    "config-extra-layer": (1, _extra_layer_config),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_nothing(small, tmp_path, capsys, kind):
    shards, damage = BAD_INPUTS[kind]
    src = copy_checkpoint(small.folder("hub", shards), tmp_path / "src")
    expected, tensors = damage(src)
    out = tmp_path / "out" / "ckpt"  # the parent does not exist either: it must not be left behind half-made
    rc, stdout, err = cli(hf_to_orbax.main, ["--hf_path", src, "--output", out, "--dtype", "float32", "--quiet"],
                          capsys)
    line = assert_one_line_error(err)
    assert rc == 2, (rc, line)
    for part in expected:
        assert part in line, (part, line)
    if tensors is not None:  # the truncated file: the message names one of the tensors that were cut off
        named = re.search(r"tensor '([^']+)'", line)
        assert named and named.group(1) in tensors, line
    assert leftovers(out) == [] and not (tmp_path / "out").exists()
    assert not stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing-shard", "inconsistent-offsets"])
def test_subprocess_error_exit_code(small, tmp_path, kind):
    """The real command line: exit 2 (bad input) and exactly one stderr line. In-process runs cannot see what orbax's
    writer threads log through absl (pytest captures logging), so an error raised mid-write shows up only here."""
    shards, damage = BAD_INPUTS[kind]
    src = copy_checkpoint(small.folder("hub", shards), tmp_path / "src")
    expected, _ = damage(src)
    out = tmp_path / "out"
    proc = run_subprocess("convert.hf_to_orbax", "--hf_path", src, "--output", out, "--quiet")
    assert proc.returncode == 2
    line = assert_one_line_error(proc.stderr)
    for part in expected:
        assert part in line, (part, line)
    assert not proc.stdout and leftovers(out) == []


@pytest.mark.parametrize("command", ["hf_to_orbax", "orbax_to_hf"])
def test_existing_output_needs_overwrite(small, small_f32, tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("do not touch")
    before = snapshot(out)
    if command == "hf_to_orbax":
        main, argv = hf_to_orbax.main, ["--hf_path", small.folder("hub"), "--output", out, "--dtype", "float32",
                                         "--quiet"]
    else:
        main, argv = orbax_to_hf.main, ["--ckpt", small_f32, "--output", out, "--quiet"]
    rc, _, err = cli(main, argv, capsys)
    line = assert_one_line_error(err)
    assert rc == 2 and str(out) in line and "--overwrite" in line
    assert snapshot(out) == before and leftovers(out) == ["out"]

    rc, _, err = cli(main, argv + ["--overwrite"], capsys)
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and leftovers(out) == ["out"]
    if command == "hf_to_orbax":
        assert_same_arrays(out, small_f32)
    else:
        assert torch.equal(torch_model(out).lm_head.weight, small.ref.lm_head.weight)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_output_parent(small, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    os.chmod(parent, 0o555)
    try:
        rc, _, err = cli(hf_to_orbax.main, ["--hf_path", small.folder("hub"), "--output", parent / "ckpt", "--quiet"],
                         capsys)
        line = assert_one_line_error(err)
        assert rc == 2 and str(parent) in line
        assert os.listdir(parent) == []
    finally:
        os.chmod(parent, 0o755)


def test_output_parent_is_a_file(small, tmp_path, capsys):
    """Runs as root too (unlike the permission test): the output's parent cannot be created."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    out = blocker / "ckpt"
    rc, _, err = cli(hf_to_orbax.main, ["--hf_path", small.folder("hub"), "--output", out, "--quiet"], capsys)
    line = assert_one_line_error(err)
    assert rc == 2 and str(out) in line
    assert blocker.read_text() == "not a folder" and sorted(os.listdir(tmp_path)) == ["afile"]


def _options_help(text: str) -> dict[str, tuple[bool, bool, str]]:
    """{--flag: (takes a value, required, its help joined on one line)} from argparse's --help output."""
    usage, options = text.split("options:", 1)
    usage = " ".join(usage.split())
    out = {}
    for block in re.split(r"\n  (?=-)", "\n" + options):
        words = block.split()
        if not words or not words[0].startswith("--"):
            continue
        flag = words[0]
        takes_value = len(words) > 1 and (words[1].isupper() or words[1][0] in "{[")
        required = re.search(r"(?<!\[)" + re.escape(flag) + r"\b", usage) is not None
        out[flag] = (takes_value, required, " ".join(words))
    return out


@pytest.mark.parametrize("module", [hf_to_orbax, orbax_to_hf, check_logits], ids=lambda m: m.__name__)
def test_help_shows_every_default(module, capsys):
    with pytest.raises(SystemExit) as info:
        module.parse_args(["--help"])
    assert info.value.code == 0
    options = _options_help(capsys.readouterr().out)
    assert "--output" in options or "--tolerance" in options  # the help was parsed
    for flag, (takes_value, required, text) in options.items():
        if takes_value and not required:
            assert "default" in text, (flag, text)
        assert len(text.split()) > 2, f"{flag} has no help"


@pytest.mark.parametrize("module, argv, expected", [
    (hf_to_orbax, ["--output", "x"], "the following arguments are required: --hf_path"),
    (orbax_to_hf, ["--ckpt", "x", "--output", "y", "--layout", "bogus"], "argument --layout: invalid choice: 'bogus'"),
    (check_logits, ["--hf_path", "x", "--ckpt", "y", "--seed", "one"], "argument --seed: invalid int value: 'one'"),
], ids=["missing-flag", "bad-choice", "bad-int"])
def test_bad_flags_are_one_line(module, argv, expected, capsys):
    rc, stdout, err = cli(module.main, argv, capsys)
    line = assert_one_line_error(err)
    assert rc == 2 and line.startswith(f"error: {expected}") and line.endswith(f"(see python -m {module.__name__} "
                                                                              "--help)") and not stdout, line


@pytest.mark.parametrize("size, expected", [
    ("0", "--max_shard_size '0': must be at least one byte"),
    ("0.5B", "--max_shard_size '0.5B': must be at least one byte"),
    ("-1", "--max_shard_size '-1': expected a size"),
    ("64KB", "--max_shard_size 64.0 KiB is smaller than the largest tensor"),  # small's largest: 128 KiB
], ids=["zero", "half-a-byte", "negative", "below-largest-tensor"])
def test_too_small_max_shard_size_is_refused(small_f32, tmp_path, capsys, size, expected):
    out = tmp_path / "hf"
    rc, stdout, err = cli(orbax_to_hf.main, ["--ckpt", small_f32, "--output", out, "--quiet", "--max_shard_size",
                                             size], capsys)
    line = assert_one_line_error(err)
    assert rc == 2 and line.startswith(f"error: {expected}") and not stdout, line
    assert leftovers(out) == []


def _interrupt_after(monkeypatch, owner, attr, calls: int, exc: BaseException | None = None):
    """Make `owner.attr` raise `exc` (KeyboardInterrupt) on its `calls`-th call (the earlier calls go through)."""
    original = getattr(owner, attr)
    seen = []

    def wrapper(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            raise exc or KeyboardInterrupt()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)
    return seen


@pytest.mark.parametrize("where", ["reader-get", "after-save-params", "export-write"])
@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwrite"])
def test_interrupted_run_leaves_nothing(small, small_f32, tmp_path, capsys, monkeypatch, where, existing):
    out = tmp_path / "out"
    if existing:  # --overwrite must not lose the old folder when the new one is never finished
        out.mkdir()
        (out / "keep.txt").write_text("old")
    if where == "reader-get":
        seen = _interrupt_after(monkeypatch, SafetensorsReader, "get", 20)  # mid-stream, inside the orbax write
    elif where == "after-save-params":
        real = orbax_model.save_params
        seen = []

        def save_then_interrupt(directory, params):
            real(directory, params)
            seen.append(1)
            raise KeyboardInterrupt

        monkeypatch.setattr(orbax_model, "save_params", save_then_interrupt)
    else:
        seen = _interrupt_after(monkeypatch, PlannedSafetensorsWriter, "write", 10)
    if where == "export-write":
        argv = ["--ckpt", small_f32, "--output", out, "--quiet", "--max_shard_size", "128KB"]
        main = orbax_to_hf.main
    else:
        argv = ["--hf_path", small.folder("hub"), "--output", out, "--dtype", "float32", "--quiet"]
        main = hf_to_orbax.main
    rc, _, err = cli(main, argv + (["--overwrite"] if existing else []), capsys)
    assert seen, "the interruption was never reached"
    assert rc == 130
    if where == "reader-get":  # raised inside orbax's writer thread, which also logs it (to pytest's log capture)
        assert err.strip().splitlines()[-1].startswith("error: interrupted"), err
    else:
        assert assert_one_line_error(err).startswith("error: interrupted")
    if existing:
        assert leftovers(out) == ["out"] and os.listdir(out) == ["keep.txt"]
    else:
        assert leftovers(out) == []


SIGNAL_SCRIPT = r"""
import os, signal, sys, threading, time
from convert import hf_to_orbax
from convert.cli import run_main
from kimi_jax.hf.safetensors_io import SafetensorsReader

signum = getattr(signal, sys.argv[1])
read = SafetensorsReader.get
calls = []

def slow_get(self, name):  # a slow disk: the signal arrives while the converter is half way through writing
    calls.append(name)
    if len(calls) == 10:
        os.kill(os.getpid(), signum)
    time.sleep(0.02)
    return read(self, name)

SafetensorsReader.get = slow_get
rc = run_main(hf_to_orbax.main, sys.argv[2:])
for thread in threading.enumerate():  # let any writer thread still running finish before the folder is checked
    if thread is not threading.main_thread() and not thread.daemon and thread.is_alive():
        try:
            thread.join(timeout=10)
        except Exception:  # orbax's signalling threads re-raise their own failure from join()
            pass
print(f"calls={len(calls)}", flush=True)
sys.exit(rc)
"""


def run_signalled(small, out, signame: str) -> subprocess.CompletedProcess:
    """hf_to_orbax in a subprocess that sends itself `signame` at the 10th tensor read, mid-conversion."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_SCRIPT, signame, "--hf_path", small.folder("hub"),
                             "--output", out, "--dtype", "float32", "--quiet", "--overwrite"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=240)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    done.pid = proc.pid  # names the temporary a killed run leaves
    return done


INTERRUPTS = {"SIGINT": (130, "interrupted"), "SIGTERM": (143, "terminated (SIGTERM)")}


@pytest.fixture(scope="module", params=list(INTERRUPTS))
def signal_run(small, tmp_path_factory, request):
    """A real SIGINT or SIGTERM mid-conversion, with an --output that exists."""
    out = tmp_path_factory.mktemp(request.param) / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    return request.param, run_signalled(small, out, request.param), out


@pytest.mark.slow
def test_signal_exit_code_and_nothing_left(small, signal_run):
    signame, proc, out = signal_run
    calls = re.search(r"calls=(\d+)", proc.stdout)
    assert calls, proc.stdout + proc.stderr
    # Interrupted at the 10th tensor read; orbax's writer thread may read a few more before it fails, never all.
    assert 10 <= int(calls.group(1)) < len(SafetensorsReader(small.folder("hub")).names())
    assert proc.returncode == INTERRUPTS[signame][0], proc.stderr
    assert leftovers(out) == ["ckpt"] and os.listdir(out) == ["keep.txt"]  # the old folder survives, no tmp left


def test_signal_error_is_one_line(signal_run):
    signame, proc, out = signal_run
    assert assert_one_line_error(proc.stderr) == (f"error: {INTERRUPTS[signame][1]}; no output was left behind (the "
                                                  f"existing --output {out} is untouched)")


def test_a_killed_run_is_cleaned_up_by_the_next(small, small_f32, tmp_path, capsys):
    """SIGKILL leaves the hidden temporary folder behind (nothing can run); the next run into the same output removes
    it, says so, and leaves nothing but its output."""
    out = tmp_path / "ckpt"
    proc = run_signalled(small, out, "SIGKILL")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = [f for f in leftovers(out) if f.startswith(".ckpt.tmp-")]
    assert len(left) == 1 and left[0].endswith(f"-{proc.pid}") and os.listdir(tmp_path / left[0]), leftovers(out)

    rc, _, err = cli(hf_to_orbax.main, ["--hf_path", small.folder("hub"), "--output", out, "--quiet"], capsys)
    assert rc == 0, err
    assert err.strip().splitlines() == [f"notice: removed {tmp_path / left[0]}, a temporary left by process "
                                        f"{proc.pid}, which no longer runs"]
    assert leftovers(out) == ["ckpt"]
    assert_same_arrays(out, small_f32)


def test_overwrite_onto_a_symlink_replaces_the_link_only(small, small_f32, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("not ours")
    out = tmp_path / "out"
    os.symlink(target, out)
    rc, _, err = cli(hf_to_orbax.main, ["--hf_path", small.folder("hub"), "--output", out, "--quiet", "--overwrite"],
                     capsys)
    assert rc == 0, err
    assert err.strip().splitlines() == [f"notice: replaced the symbolic link {out} (what it pointed to, {target}, is "
                                        "untouched)"]
    assert not os.path.islink(out) and orbax_model.is_checkpoint(str(out))
    assert os.listdir(target) == ["keep.txt"] and (target / "keep.txt").read_text() == "not ours"
    assert leftovers(out) == ["out"]  # no .out.old-* link left behind
    assert_same_arrays(out, small_f32)


def test_interrupt_messages_say_what_is_on_disk(small, small_f32, tmp_path, capsys, monkeypatch):
    # SIGTERM (as kimi_jax.safe_io raises it) mid-export: exit 143, nothing left.
    out = tmp_path / "hf"
    with monkeypatch.context() as m:
        seen = _interrupt_after(m, PlannedSafetensorsWriter, "write", 10, Terminated())
        rc, _, err = cli(orbax_to_hf.main, ["--ckpt", small_f32, "--output", out, "--quiet"], capsys)
    assert seen and rc == 143
    assert assert_one_line_error(err) == "error: terminated (SIGTERM); no output was left behind"
    assert leftovers(out) == []
    # Ctrl-C after the output is complete (while the summary is printed): the message says it was written.
    out = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        seen = _interrupt_after(m, hf_to_orbax, "human_bytes", 1)
        rc, stdout, err = cli(hf_to_orbax.main, ["--hf_path", small.folder("hub"), "--output", out, "--quiet"],
                              capsys)
    assert seen and rc == 130
    assert assert_one_line_error(err) == f"error: interrupted; --output {out} had already been written completely"
    assert leftovers(out) == ["ckpt"]
    assert_same_arrays(out, small_f32)


def test_ctrl_c_between_the_final_renames_waits_for_them(small_f32, tmp_path, capsys, monkeypatch):
    """--overwrite moves the old output aside, then renames the new one into place. Ctrl-C between the two would
    leave neither in place: it is held until both are done, then reported with what is on disk."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    rename = os.rename
    moved_aside = []

    def rename_then_ctrl_c(src, dst):
        rename(src, dst)
        if os.path.abspath(src) == str(out) and not moved_aside:  # the old output just moved aside
            moved_aside.append(dst)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "rename", rename_then_ctrl_c)
    rc, _, err = cli(orbax_to_hf.main, ["--ckpt", small_f32, "--output", out, "--quiet", "--overwrite"], capsys)
    monkeypatch.undo()
    assert moved_aside and rc == 130
    assert assert_one_line_error(err) == f"error: interrupted; --output {out} had already been written completely"
    assert leftovers(out) == ["hf"] and "model.safetensors" in os.listdir(out)


def test_failed_final_rename_puts_the_old_output_back(small_f32, tmp_path, capsys, monkeypatch):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    rename = os.rename

    def failing_rename(src, dst):
        if os.path.basename(src).startswith(".hf.tmp-"):  # the new folder into place, after the old moved aside
            raise OSError(errno.EIO, os.strerror(errno.EIO), dst)
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    rc, _, err = cli(orbax_to_hf.main, ["--ckpt", small_f32, "--output", out, "--quiet", "--overwrite"], capsys)
    monkeypatch.undo()
    assert rc == 1
    assert assert_one_line_error(err) == (f"error: input/output error writing {out}; nothing was written; the existing "
                                          f"--output {out} is untouched")
    assert leftovers(out) == ["hf"] and os.listdir(out) == ["keep.txt"]


OVERLAPS = {"is": lambda src: src, "lies inside": lambda src: os.path.join(src, "sub"),
            "contains": lambda src: os.path.dirname(src)}


@pytest.mark.parametrize("command", ["hf_to_orbax", "orbax_to_hf"])
@pytest.mark.parametrize("how", list(OVERLAPS))
def test_output_overlapping_the_input_is_refused(small, small_f32, tmp_path, capsys, command, how):
    """--output is, lies inside or contains the input: refused even with --overwrite, and the input is untouched."""
    if command == "hf_to_orbax":
        main, flag, src = hf_to_orbax.main, "--hf_path", copy_checkpoint(small.folder("hub"), tmp_path / "in" / "src")
    else:
        main, flag, src = orbax_to_hf.main, "--ckpt", copy_checkpoint(small_f32, tmp_path / "in" / "src")
    out = OVERLAPS[how](src)
    before = snapshot(tmp_path / "in")
    rc, stdout, err = cli(main, [flag, src, "--output", out, "--quiet", "--overwrite"], capsys)
    line = assert_one_line_error(err)
    assert rc == 2 and not stdout
    assert line == (f"error: --output {out} {how} the input {flag} {src}; choose an output outside the inputs "
                    "(nothing was written)")
    assert snapshot(tmp_path / "in") == before and sorted(os.listdir(tmp_path)) == ["in"]


FULL_DISK_SCRIPT = r"""
mkdir "$DISK/out" && echo old > "$DISK/out/keep.txt" || exit 98
cd "$REPO" && "$PYTHON" -m convert.$COMMAND $ARGS --output "$DISK/out" --quiet --overwrite 2> "$STDERR_FILE"
echo "rc=$?"
echo "disk: $(ls -A "$DISK")"
echo "out: $(ls -A "$DISK/out")"
echo "keep: $(cat "$DISK/out/keep.txt")"
"""


@pytest.mark.slow
@pytest.mark.parametrize("command", ["hf_to_orbax", "orbax_to_hf"])
def test_full_disk_is_one_line_and_keeps_the_old_output(small, small_f32, tmp_path, command):
    """--output on a 512 KiB file system (the float32 output needs ~1 MB, so the write fails part way): one error
    line naming the path, exit 1, no partial files, the existing output (replaced with --overwrite) intact."""
    args = f"--hf_path {small.folder('hub')}" if command == "hf_to_orbax" else f"--ckpt {small_f32}"
    stderr_file = tmp_path / "stderr.txt"
    disk = tmp_path / "disk"
    env = dict(os.environ, REPO=REPO, PYTHON=sys.executable, COMMAND=command, ARGS=args, STDERR_FILE=str(stderr_file),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = run_on_small_disk(FULL_DISK_SCRIPT, size="512k", mount_point=disk, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["rc=1", "disk: out", "out: keep.txt", "keep: old"], proc.stdout
    line = assert_one_line_error(stderr_file.read_text())
    assert re.fullmatch(rf"error: no space left on device writing {re.escape(str(disk))}/\.out\.tmp-[^ ]+; nothing "
                        rf"was written; the existing --output {re.escape(str(disk))}/out is untouched", line), line


def test_missing_folders_and_not_a_checkpoint(small, small_f32, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nowhere"
    for main, flag, argv in [
        (hf_to_orbax.main, "--hf_path", ["--hf_path", missing, "--output", out]),
        (orbax_to_hf.main, "--ckpt", ["--ckpt", missing, "--output", out]),
        (check_logits.main, "--hf_path", ["--hf_path", missing, "--ckpt", small_f32]),
        (check_logits.main, "--ckpt", ["--hf_path", small.folder("hub"), "--ckpt", missing]),
    ]:
        rc, _, err = cli(main, argv, capsys)
        line = assert_one_line_error(err)
        assert rc == 2 and flag in line and str(missing) in line, line
        assert leftovers(out) == []

    # An HF folder is not a kimi_jax checkpoint.
    rc, _, err = cli(orbax_to_hf.main, ["--ckpt", small.folder("hub"), "--output", out], capsys)
    line = assert_one_line_error(err)
    assert rc == 2 and small.folder("hub") in line and orbax_model.META_FILE in line
    assert leftovers(out) == []
    # kimi_jax.json without params/, and a foreign kimi_jax.json format.
    fake = tmp_path / "fake"
    shutil.copytree(small.folder("hub"), fake)
    shutil.copy(os.path.join(small_f32, orbax_model.META_FILE), fake)
    rc, _, err = cli(orbax_to_hf.main, ["--ckpt", fake, "--output", out], capsys)
    line = assert_one_line_error(err)
    assert rc == 2 and str(fake) in line and "params/" in line
    (fake / orbax_model.META_FILE).write_text(json.dumps({"format": "something.else"}))
    rc, _, err = cli(orbax_to_hf.main, ["--ckpt", fake, "--output", out], capsys)
    line = assert_one_line_error(err)
    assert rc == 2 and str(fake / orbax_model.META_FILE) in line and "something.else" in line
    assert leftovers(out) == []


def test_export_of_mismatched_checkpoint(small_f32, tmp_path, capsys):
    ckpt = copy_checkpoint(small_f32, tmp_path / "ckpt")
    bigger = tiny(num_hidden_layers=3, mla_layers=(1,), first_k_dense=0)
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(bigger.to_hf_dict(), f)
    out = tmp_path / "out"
    rc, _, err = cli(orbax_to_hf.main, ["--ckpt", ckpt, "--output", out], capsys)
    line = assert_one_line_error(err)
    assert rc == 2 and ckpt in line and "segments" in line
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------------- check_logits
def _max_diff(stdout: str) -> float:
    m = re.search(r"(PASSED|FAILED): max \|logit diff\| (\S+) vs tolerance", stdout)
    assert m, stdout
    return float(m.group(2))


@pytest.mark.slow
def test_check_logits_subprocess_passes(small, small_f32):
    proc = run_subprocess("convert.check_logits", "--hf_path", small.folder("hub"), "--ckpt", small_f32,
                          "--num_tokens", 16, "--seed", 3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED" in proc.stdout
    diff = _max_diff(proc.stdout)
    print(f"\ncheck_logits (subprocess) orbax fp32 vs transformers: {diff:.3e}")
    assert diff <= FP32_TOL


def test_check_logits_exit_codes(small, small_f32, tmp_path, capsys):
    argv = ["--num_tokens", 16, "--seed", 3]
    # Within tolerance: the orbax checkpoint and the HF folder itself (in-memory loader), against the original.
    for ckpt in (small_f32, small.folder("native")):
        rc, out, _ = cli(check_logits.main, ["--hf_path", small.folder("hub"), "--ckpt", ckpt, *argv], capsys)
        assert rc == 0 and "PASSED" in out, out
        assert "note:" not in out  # float32 against float32: nothing rounded
        assert _max_diff(out) <= FP32_TOL
    # A reference whose final norm was perturbed by 1%: far outside the tolerance, exit 1.
    perturbed = copy_checkpoint(small.folder("hub"), tmp_path / "perturbed")
    _edit(perturbed, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"] * 1.01))
    rc, out, _ = cli(check_logits.main, ["--hf_path", perturbed, "--ckpt", small_f32, *argv], capsys)
    assert rc == 1 and "FAILED" in out, out
    diff = _max_diff(out)
    print(f"\ncheck_logits vs a reference with a 1% norm perturbation: {diff:.3e}")
    assert diff > 1e-3
    # The same comparison passes once the tolerance admits it; and a tolerance of 0 fails a nonzero diff.
    rc, out, _ = cli(check_logits.main, ["--hf_path", perturbed, "--ckpt", small_f32, "--tolerance", 10, *argv],
                     capsys)
    assert rc == 0 and "PASSED" in out
    rc, out, _ = cli(check_logits.main, ["--hf_path", perturbed, "--ckpt", small_f32, "--tolerance", 0, *argv],
                     capsys)
    assert rc == 1


def test_check_logits_notes_a_lossy_checkpoint(small, small_bf16, capsys):
    """A bfloat16 checkpoint of a float32 source fails a 1e-4 tolerance by rounding alone: still FAILED (exit 1), and
    a note says the storage rounds the source."""
    rc, out, _ = cli(check_logits.main, ["--hf_path", small.folder("hub"), "--ckpt", small_bf16, "--num_tokens", 16,
                                         "--seed", 3], capsys)
    assert rc == 1 and "FAILED" in out, out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, out
    assert notes[0].startswith("note: --ckpt stores bfloat16 where the source has float32 (")
    assert "rounding each weight by up to 4e-03 relative" in notes[0] and "not a conversion error" in notes[0]
    assert not any(k in notes[0] for k in KEEP_FP32_KEYS)  # those stay float32: not rounded

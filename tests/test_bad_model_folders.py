"""`evaluate`, `generate` and `train` on damaged model folders: one `error:` line naming the file or tensor, exit
status 2, never a traceback.

The damage is generic, not tailored to one file name: the largest weights file is truncated or its header zeroed, a
tensor is dropped, added or reshaped, a shard goes missing, an orbax `params/` is emptied. Each test damages a
private copy of one tiny HF folder (single file and three shards) or of its orbax conversion, and runs the command
in-process: every failure here happens before any device work.
"""

from __future__ import annotations

import contextlib
import io as std_io
import os
import shutil

import numpy as np
import pytest

# ------------------------------------------------------------------------------------------------------- damage
def largest_file(folder: str, suffix: str = "") -> str:
    """The largest file under `folder` whose name ends with `suffix`."""
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
             if name.endswith(suffix) and not name.startswith(".")]
    return max(files, key=lambda p: (os.path.getsize(p), p))


def truncate_largest(folder: str, suffix: str = "") -> str:
    path = largest_file(folder, suffix)
    os.truncate(path, os.path.getsize(path) // 2)
    return path


def zero_header_of_largest(folder: str, suffix: str = "") -> str:
    path = largest_file(folder, suffix)
    with open(path, "r+b") as f:
        f.write(bytes(min(64, os.path.getsize(path))))
    return path


def empty_folder(folder: str) -> str:
    shutil.rmtree(folder)
    os.makedirs(folder)
    return folder


def _edit_largest_safetensors(folder: str, edit) -> str:
    """Rewrite the largest safetensors file of an HF folder with `edit(tensors)` applied; returns what to name."""
    from kimi_jax.hf.safetensors_io import SafetensorsReader, write_safetensors

    path = largest_file(folder, ".safetensors")
    reader = SafetensorsReader(folder)
    tensors = {name: reader.get(name) for name, entry in reader.entries.items() if entry[0] == path}
    named = edit(tensors)
    write_safetensors(path, tensors)
    return named


def _largest_tensor(tensors: dict) -> str:
    return max(tensors, key=lambda n: (tensors[n].size, n))


def drop_largest_tensor(folder: str) -> str:
    def edit(tensors):
        name = _largest_tensor(tensors)
        del tensors[name]
        return name

    return _edit_largest_safetensors(folder, edit)


def reshape_largest_tensor(folder: str) -> str:
    def edit(tensors):
        name = _largest_tensor(tensors)
        tensors[name] = tensors[name][:-1]  # one row short
        return name

    return _edit_largest_safetensors(folder, edit)


EXTRA_TENSOR = "model.layers.0.unexpected_proj.weight"


def add_unknown_tensor(folder: str) -> str:
    def edit(tensors):
        tensors[EXTRA_TENSOR] = np.zeros((4, 4), np.float32)
        return EXTRA_TENSOR

    return _edit_largest_safetensors(folder, edit)


def remove_largest_shard(folder: str) -> str:
    path = largest_file(folder, ".safetensors")
    os.remove(path)
    return os.path.basename(path)


# name -> (source folder key, damage(folder) -> the file, tensor or folder the error line must name)
HF_DAMAGE = {
    "truncated weights file": ("hf", lambda f: truncate_largest(f, ".safetensors")),
    "zeroed safetensors header": ("hf", lambda f: zero_header_of_largest(f, ".safetensors")),
    "tensor with the wrong shape": ("hf", reshape_largest_tensor),
    "missing tensor": ("hf", drop_largest_tensor),
    "unknown tensor": ("hf", add_unknown_tensor),
    "missing shard": ("hf_shards", remove_largest_shard),
    "truncated shard": ("hf_shards", lambda f: truncate_largest(f, ".safetensors")),
}


def in_params(damage):
    """`damage` applied to an orbax folder's params/, which the error line must name (orbax's data files have
    hashed names; the array is named too where tensorstore says which)."""
    def apply(folder: str) -> str:
        params = os.path.join(folder, "params")
        damage(params)
        return params

    return apply


ORBAX_DAMAGE = {
    "truncated params file": ("orbax", in_params(truncate_largest)),
    "zeroed params file": ("orbax", in_params(zero_header_of_largest)),
    "empty params folder": ("orbax", in_params(empty_folder)),
}
DAMAGE = {**HF_DAMAGE, **ORBAX_DAMAGE}


# ------------------------------------------------------------------------------------------------------ folders
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny HF model with a Kimi-format tokenizer (one file and three shards), its orbax conversion, and a data
    folder."""
    pytest.importorskip("torch")
    from kimi_jax import orbax_model
    from kimi_jax import tokenizer as tokenizer_mod
    from kimi_jax.config import tiny
    from kimi_jax.hf.loading import from_pretrained
    from kimi_jax.reference import build_reference, save_reference
    from kimi_jax.tokenizer_fixtures import build_kimi_format_tokenizer, local_corpus

    root = tmp_path_factory.mktemp("bad_model_folders")
    text = " ".join(local_corpus())[:40_000]
    tokenizer = str(root / "tokenizer")
    build_kimi_format_tokenizer([text], tokenizer, vocab_size=300)
    tok = tokenizer_mod.load(tokenizer)
    cfg = tiny(num_hidden_layers=2, mla_layers=(1,), first_k_dense=0, vocab_size=tok.vocab_size,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ref = build_reference(cfg, 0)
    out = {"hf": save_reference(ref, str(root / "hf")),
           "hf_shards": save_reference(ref, str(root / "hf_shards"), num_shards=3)}
    out["orbax"] = str(root / "orbax")
    orbax_model.save_model(out["orbax"], from_pretrained(out["hf"]), source=out["hf"])
    for folder in out.values():
        for name in os.listdir(tokenizer):
            shutil.copy(os.path.join(tokenizer, name), os.path.join(folder, name))
    out["data"] = str(root / "data")  # a training file and a held-out file, for train and evaluate
    os.makedirs(out["data"])
    for name, part in (("doc.txt", text[:30_000]), ("validation.txt", text[30_000:])):
        with open(os.path.join(out["data"], name), "w") as f:
            f.write(part)
    return out


def damaged(folders, tmp_path, name: str) -> tuple[str, str]:
    """(a damaged private copy of the folder `name` applies to, what the error line must name)."""
    source, damage = DAMAGE[name]
    folder = str(tmp_path / "model")
    shutil.copytree(folders[source], folder)
    named = damage(folder)
    return folder, os.path.relpath(named, folder) if os.path.isabs(named) else named


# ------------------------------------------------------------------------------------------------------ commands
def run_main(main, args) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of an in-process `main(argv)`."""
    err = std_io.StringIO()
    with contextlib.redirect_stdout(std_io.StringIO()), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, err.getvalue().strip().splitlines()


def generate_cli(model, folders, tmp_path):
    from experiments import generate

    return run_main(generate.main, ["--model_path", model, "--prompt", "The value of", "--max_new_tokens", 2,
                                    "--quiet"])


def evaluate_cli(model, folders, tmp_path):
    from experiments import evaluate

    return run_main(evaluate.main, ["--model_path", model, "--stage", "baseline", "--eval_data", folders["data"],
                                    "--output_dir", tmp_path / "eval", "--no_tensorboard", "--skip_reasoning",
                                    "--seq_len", 64, "--quiet"])


def train_cli(model, folders, tmp_path):
    from experiments import train

    return run_main(train.main, ["--model_path", model, "--data", folders["data"], "--seq_len", 64, "--batch_size",
                                 8, "--num_steps", 1, "--eval_interval", 0, "--output_dir", tmp_path / "run",
                                 "--quiet"])


COMMANDS = {"generate": generate_cli, "evaluate": evaluate_cli, "train": train_cli}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_model_folder_is_one_error_line(folders, tmp_path, damage, command):
    model, named = damaged(folders, tmp_path, damage)
    rc, lines = COMMANDS[command](model, folders, tmp_path)
    errors = [line for line in lines if not line.startswith("notice:")]
    assert rc == 2 and len(errors) == 1 and errors[0].startswith("error: "), (rc, lines)
    assert model in errors[0] and named in errors[0], errors[0]
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")  # train stopped before writing anything

"""Benchmarks that print figures measured in one run, each against a reference measured in the same run.

    python -m experiments.bench convert [--size_gb 3] [--workdir DIR] [--keep]

`convert`: writes a synthetic Kimi-Linear checkpoint of about --size_gb GB (hub names, bf16, 1 GB shards, random
weights of realistic scale, a real layer schedule and MoE shapes), then measures in fresh processes:
  * `convert.hf_to_orbax` (streaming): peak RSS and MB/s;
  * `convert.orbax_to_hf` (export): peak RSS and MB/s;
  * the reference: `kimi_jax.from_pretrained` of the same folder (everything in host memory at once): peak RSS.
Peak RSS is each process's own maximum resident set (getrusage), so it includes the ~0.5 GB of Python, JAX and
orbax themselves; the idle baseline is measured too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

_CHILD = """
import atexit, resource, runpy, sys
atexit.register(lambda: print(f"PEAK_RSS_KB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr))
mode, rest = sys.argv[1], sys.argv[2:]
if mode == "module":
    sys.argv = [rest[0]] + rest[1:]
    runpy.run_module(rest[0], run_name="__main__")
elif mode == "load":
    import kimi_jax, jax.numpy as jnp
    model = kimi_jax.from_pretrained(rest[0], dtype=jnp.bfloat16)
elif mode == "idle":
    import kimi_jax, kimi_jax.checkpoint, convert.hf_to_orbax
"""


def measure(args: list[str]) -> tuple[float, float]:
    """Run the child helper; return (seconds, peak RSS in bytes)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    seconds = time.time() - t0
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB=")]
    if proc.returncode != 0 or not peak:
        tail = "\n".join(proc.stderr.splitlines()[-5:])
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return seconds, int(peak[-1].split("=")[1]) * 1024


def synthetic_config(size_gb: float) -> dict:
    """A Kimi-Linear-shaped config (hidden 1024, 8 layers, MLA at 3 and 7, dense layer 0) with experts sized to
    reach about `size_gb` GB in bf16."""
    hidden, layers, moe_f = 1024, 8, 512
    per_expert = 3 * hidden * moe_f * 2  # bytes in bf16
    moe_layers = layers - 1
    experts = max(8, int(size_gb * 1e9 / (per_expert * moe_layers)) // 8 * 8)
    return {
        "model_type": "kimi_linear", "architectures": ["KimiLinearForCausalLM"], "vocab_size": 32768,
        "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": 4096,
        "num_attention_heads": 8, "num_key_value_heads": 8, "kv_lora_rank": 256, "q_lora_rank": None,
        "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "mla_use_nope": True,
        "linear_attn_config": {"num_heads": 8, "head_dim": 64, "short_conv_kernel_size": 4,
                               "kda_layers": [1, 2, 3, 5, 6, 7], "full_attn_layers": [4, 8]},
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_experts": experts, "num_experts_per_token": 8,
        "num_shared_experts": 1, "moe_intermediate_size": moe_f, "routed_scaling_factor": 2.446,
        "moe_renormalize": True, "num_expert_group": 1, "topk_group": 1, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "dtype": "bfloat16",
    }


def write_synthetic_checkpoint(folder: str, config: dict, shard_bytes: int = 1 << 30) -> int:
    """Stream random weights into hub-named bf16 shards (never more than one shard in memory). Returns bytes."""
    import ml_dtypes

    from convert import mapping
    from convert.safetensors_io import write_safetensors
    from kimi_jax.config import KimiLinearConfig

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    cfg = KimiLinearConfig.from_hf_dict(config)
    rng = np.random.default_rng(0)
    shards, pending, size, total = [], {}, 0, 0

    def flush():
        nonlocal pending, size, total
        name = f"model-{len(shards) + 1:05d}.safetensors"
        total += write_safetensors(os.path.join(folder, name), pending)
        shards.append((name, list(pending)))
        pending, size = {}, 0

    for name, shape in mapping.expected_hf_tensors(cfg, mapping.HUB).items():
        if name.endswith(("A_log", "dt_bias", "e_score_correction_bias")):
            t = rng.uniform(0.0, 2.0, shape).astype(np.float32)
        elif "norm" in name:
            t = np.ones(shape, ml_dtypes.bfloat16)
        else:
            t = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        if pending and size + t.nbytes > shard_bytes:
            flush()
        pending[name] = t
        size += t.nbytes
    flush()
    weight_map = {}
    for i, (name, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(os.path.join(folder, name), os.path.join(folder, final))
        weight_map.update({n: final for n in names})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def bench_convert(args) -> None:
    from kimi_jax.config import KimiLinearConfig

    root = args.workdir or tempfile.mkdtemp(prefix="kimi_bench_convert_")
    hf, ckpt, back = (os.path.join(root, d) for d in ("hf", "orbax", "hf_export"))
    for d in (hf, ckpt, back):
        shutil.rmtree(d, ignore_errors=True)
    config = synthetic_config(args.size_gb)
    print(f"writing a synthetic {args.size_gb:g} GB checkpoint ({config['num_experts']} experts x "
          f"{config['num_hidden_layers'] - 1} MoE layers, bf16, hub names) to {hf} ...", flush=True)
    nbytes = write_synthetic_checkpoint(hf, config)
    cfg = KimiLinearConfig.from_hf_dict(config)
    largest_layer = cfg.num_experts * cfg.hidden_size * cfg.moe_intermediate_size * 2
    idle_s, idle = measure(["idle"])
    conv_s, conv = measure(["module", "convert.hf_to_orbax", "--hf_path", hf, "--output", ckpt, "--quiet"])
    exp_s, exp = measure(["module", "convert.orbax_to_hf", "--ckpt", ckpt, "--output", back, "--quiet"])
    load_s, load = measure(["load", hf])
    gib = 1 << 30
    mb = 1e6
    print(f"\ncheckpoint {nbytes / gib:.2f} GiB; largest per-layer parameter (one layer's expert stack) "
          f"{largest_layer / gib:.2f} GiB; {os.cpu_count()} CPUs")
    print(f"{'step':<44} {'peak RSS':>10} {'RSS - idle':>11} {'time':>8} {'MB/s':>8}")
    print(f"{'idle (python + jax + orbax imported)':<44} {idle / gib:>8.2f} G {'-':>11} {idle_s:>7.1f}s {'-':>8}")
    rows = [("hf_to_orbax (streaming)", conv, conv_s), ("orbax_to_hf (export)", exp, exp_s),
            ("reference: from_pretrained (all in memory)", load, load_s)]
    for label, peak, secs in rows:
        print(f"{label:<44} {peak / gib:>8.2f} G {(peak - idle) / gib:>9.2f} G {secs:>7.1f}s "
              f"{nbytes / mb / secs:>8.0f}")
    print(f"streaming converter uses {(conv - idle) / max(load - idle, 1):.2f}x the extra memory of loading "
          f"everything (ratio of RSS above idle)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("convert", help="conversion memory and throughput vs loading everything in memory")
    c.add_argument("--size_gb", type=float, default=3.0, help="synthetic checkpoint size (default 3)")
    c.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed afterwards)")
    c.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = p.parse_args(argv)
    if args.what == "convert":
        if args.size_gb <= 0:
            p.error("--size_gb must be positive")
        bench_convert(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks that print figures measured in one run, each against a reference measured in the same run.

    python -m experiments.bench kda [--lengths 1024,4096,16384] [--heads 4] [--head_dim 128] [--tiny]
    python -m experiments.bench kda --impl pallas_gpu,xla --lengths 8192,32768 --heads 32   # on an accelerator
    python -m experiments.bench train [--tiny]      # ~44M-parameter Kimi-Linear, batch 4 x 512, vs transformers
    python -m experiments.bench decode [--contexts 1024,4096,16384] [--tiny]
    python -m experiments.bench convert [--size_gb 3] [--workdir DIR] [--keep]
    python -m experiments.bench all [--tiny]

`kda`: our chunked KDA forward (and forward + backward) vs transformers' PyTorch chunked KDA
(`chunk_kimi_delta_attention`, what a user without fla's Triton kernels runs) and vs our own token-recurrent form,
fp32, with the analytic FLOPs and the fraction of this machine's measured jitted fp32 matmul peak.
`kda --impl I1,I2`: our implementations (xla, pallas_tpu, pallas_gpu) on JAX's device (TPU / GPU; on CPU the Pallas
kernels run in interpret mode), forward and forward + backward, median after warm-up, beside fla's Triton `chunk_kda`
on the same GPU when flash-linear-attention is installed; then each one's error on the 48B's gates (A_log up to 6.5)
against a float64 recurrence.
`train`: train-step tokens/s of the same random model in JAX (our train step, AdamW) and in transformers + torch
(AdamW), with analytic MFU against the measured matmul peak; then a breakdown: each kind of layer, the KDA mixer,
the KDA kernel and the MoE under each dispatch, jitted alone at the step's shape (forward and forward + backward).
`decode`: greedy decode tokens/s (batch 1) vs transformers `generate`, and the per-token cost of one KDA layer and
one MLA layer as the context grows (KDA state is constant-size; MLA attends over the compressed latent cache).
`--tiny` shrinks every shape so the harness runs in seconds (for CI: correctness of the harness, not timings).

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
import functools
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
    import kimi_jax, kimi_jax.orbax_model, convert.hf_to_orbax
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

    from kimi_jax.hf import mapping
    from kimi_jax.hf.safetensors_io import write_safetensors
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


# ---------------------------------------------------------------------------------------------------------- timing
def timings(fn, repeats: int, warmup: int) -> list[float]:
    """Wall times of `repeats` runs of `fn()` (which must block until done) after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def best_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of `fn()` over `repeats` runs after `warmup` runs (fn must block until done)."""
    return min(timings(fn, repeats, warmup))


def matmul_peak_gflops(n: int = 2048) -> float:
    """This machine's jitted fp32 matmul throughput (the denominator of every MFU figure here)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    seconds = best_time(lambda: f(a).block_until_ready(), repeats=5)
    return 2 * n ** 3 / seconds / 1e9


def memory_bandwidth_gbs(mib: int = 256) -> float:
    """This device's streaming bandwidth under jit, GB/s: x <- 2x over `mib` MiB of fp32, read + written, with the
    buffer donated so no fresh allocation (and no page faulting) is timed. The roofline of every decode figure."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: x * 2.0, donate_argnums=0)
    holder = {"x": jnp.ones((mib * 2 ** 18,), jnp.float32)}

    def once():
        holder["x"] = f(holder["x"])
        holder["x"].block_until_ready()

    return 2 * mib * 2 ** 20 / best_time(once, repeats=5) / 1e9


def decode_bytes_per_token(model, cfg, context: int) -> float:
    """Bytes a greedy decode step must read at `context`: every weight except the embedding table (one row) and
    the unrouted experts (k of E are used), plus the caches (KDA states are read and written; MLA latents read)."""
    import jax
    from flax import nnx

    total = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        keys = "/".join(str(getattr(p, "key", p)) for p in path)
        nbytes = leaf.size * leaf.dtype.itemsize
        if "embed_tokens" in keys:
            nbytes = leaf.shape[-1] * leaf.dtype.itemsize
        elif any(name in keys for name in ("w_gate", "w_up", "w_down")):
            nbytes *= cfg.num_experts_per_token / cfg.num_experts
        total += nbytes
    n_mla = sum(k == "mla" for k in cfg.mixer_types)
    n_kda = cfg.num_hidden_layers - n_mla
    total += n_kda * 2 * cfg.kda_num_heads * cfg.kda_head_dim ** 2 * 4
    total += n_mla * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    return total


def kda_flops_per_token_head(chunk: int, k: int) -> float:
    """Forward FLOPs per token per head of the chunked delta rule (d_k = d_v = k, chunk C): intra-chunk QK^T and
    KK^T, the WY products U = T V and W = T K, P v_new (10 C k), the state terms S^T q, W S, K^T v_new (6 k^2) and the
    unit-triangular inverse (2/3 C^2). About 176-183k at C = 64, k = 128."""
    return 10 * chunk * k + 6 * k * k + 2 / 3 * chunk * chunk


def random_kda_inputs(rng, B: int, T: int, H: int, K: int):
    """Random fp32 numpy inputs of the KDA core: q, k, v [B, T, H, K], log decay g < 0, beta in (0, 1)."""
    q, k, v = (rng.standard_normal((B, T, H, K), dtype=np.float32) for _ in range(3))
    g = -np.exp(rng.standard_normal((B, T, H, K), dtype=np.float32)) * 0.1
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, H), dtype=np.float32)))
    return q, k, v, g, beta


def bench_kda(args) -> None:
    import jax
    import jax.numpy as jnp
    import torch
    from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention

    from kimi_jax.ops.kda import kda_chunked, kda_recurrent

    torch.set_num_threads(os.cpu_count() or 1)
    H, K = args.heads, args.head_dim
    lengths = [int(x) for x in args.lengths.split(",")]
    peak = matmul_peak_gflops(256 if args.tiny else 2048)
    per_token = kda_flops_per_token_head(64, K)
    print(f"KDA core, fp32, batch 1, {H} heads of {K}; jitted fp32 matmul peak here: {peak:.1f} GFLOP/s; analytic "
          f"forward {per_token / 1e3:.0f}k FLOPs per token per head (chunk 64); {os.cpu_count()} CPUs")
    print(f"{'T':>6} {'ours fwd':>10} {'torch fwd':>10} {'ratio':>7} {'% peak':>7} {'ours f+b':>10} "
          f"{'torch f+b':>10} {'ratio':>7} {'ours recurrent':>15}")
    rng = np.random.default_rng(0)
    chunked = jax.jit(kda_chunked)
    recurrent = jax.jit(kda_recurrent)

    def loss(q, k, v, g, beta):
        return jnp.sum(kda_chunked(q, k, v, g, beta)[0])

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    for T in lengths:
        q, k, v, g, beta = random_kda_inputs(rng, 1, T, H, K)
        jx = [jnp.asarray(a) for a in (q, k, v, g, beta)]
        ours = best_time(lambda: jax.block_until_ready(chunked(*jx)))
        ours_fb = best_time(lambda: jax.block_until_ready(grad(*jx)))
        reps = 1 if T > 4096 else 3
        rec = best_time(lambda: jax.block_until_ready(recurrent(*jx)), repeats=reps)
        tt = [torch.from_numpy(a) for a in (q, k, v, g, beta)]

        def torch_fwd():
            with torch.no_grad():
                chunk_kimi_delta_attention(tt[0], tt[1], tt[2], g=tt[3], beta=tt[4], use_qk_l2norm_in_kernel=True)

        def torch_fb():
            leaves = [a.clone().requires_grad_(True) for a in tt]
            o, _ = chunk_kimi_delta_attention(leaves[0], leaves[1], leaves[2], g=leaves[3], beta=leaves[4],
                                              use_qk_l2norm_in_kernel=True)
            o.sum().backward()

        # torch has nothing to compile: past 4k a warm-up run would only double minutes of waiting.
        tf = best_time(torch_fwd, repeats=reps, warmup=0 if T > 4096 else 1)
        tfb = best_time(torch_fb, repeats=1, warmup=0 if T > 4096 else 1)
        frac = per_token * T * H / ours / 1e9 / peak
        print(f"{T:>6} {ours * 1e3:>8.1f}ms {tf * 1e3:>8.1f}ms {tf / ours:>6.1f}x {frac:>6.1%} "
              f"{ours_fb * 1e3:>8.1f}ms {tfb * 1e3:>8.1f}ms {tfb / ours_fb:>6.1f}x {rec * 1e3:>13.1f}ms", flush=True)


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    return float(np.median(timings(fn, repeats, warmup))) * 1e3


def kda_float64(q, k, v, g, beta):
    """The spec's token recurrence in float64 numpy (l2-normalised q, k; q scaled by K^-0.5): o [B, T, H, V]."""
    q, k, v, g, beta = (np.asarray(a, np.float64) for a in (q, k, v, g, beta))
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) * q.shape[-1] ** -0.5
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    B, T, H, K = q.shape
    S = np.zeros((B, H, K, v.shape[-1]))
    o = np.zeros(v.shape)
    for t in range(T):
        S = S * np.exp(g[:, t])[..., None]
        delta = (v[:, t] - np.einsum("bhk,bhkv->bhv", k[:, t], S)) * beta[:, t, :, None]
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o


def layer_like_gates(rng, B, T, H, K):
    """The 48B's gate regime: -exp(A_log) softplus(f + dt_bias) with A_log up to 6.5 (single tokens reach -2000)."""
    a_log = rng.uniform(0.0, 6.5, H)
    a_log[0] = 6.5
    z = rng.standard_normal((B, T, H, K)) * 3.0 + rng.standard_normal((H, K))
    return (-np.exp(a_log)[:, None] * np.logaddexp(0.0, z)).astype(np.float32)


def _fla_chunk_kda():
    """fla's Triton `chunk_kda` (flash-linear-attention) on a CUDA device, or None with the reason."""
    try:
        import torch
        from fla.ops.kda import chunk_kda
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        return None, f"fla not importable ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    return chunk_kda, ""


def bench_kda_impls(args) -> None:
    """Our KDA implementations (`--impl`) on whatever device JAX runs on, median wall times after warm-up, and fla's
    Triton `chunk_kda` on the same GPU when it is importable; then every implementation's error on the 48B's gates
    against a float64 recurrence."""
    import jax
    import jax.numpy as jnp

    from kimi_jax.ops.kda import kda_chunked, resolve_kda_impl

    impls = [resolve_kda_impl(i) for i in args.impl.split(",")]
    B, H, K = args.batch, args.heads, args.head_dim
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    device = jax.devices()[0]
    fla, why = _fla_chunk_kda() if args.reference == "fla" else (None, "--reference none")
    print(f"KDA core on {device.platform} ({device.device_kind}), jax {jax.__version__}: batch {B}, {H} heads of "
          f"{K}, {args.dtype} q/k/v, fp32 gates and beta, median of {args.repeats} runs after 2 warm-ups")
    if device.platform == "cpu" and any(i.startswith("pallas") for i in impls):
        print("note: on CPU the Pallas kernels run in interpret mode (a correctness path, not a speed one)")
    if fla is None and args.reference == "fla":
        print(f"fla: not run, {why}")
    rng = np.random.default_rng(0)
    head = f"{'T':>6} {'impl':<11} {'fwd ms':>9} {'fwd+bwd ms':>11}"
    print(head + ("   fla fwd ms  fla f+b ms  fla/ours fwd  fla/ours f+b" if fla else ""))
    for T in [int(x) for x in args.lengths.split(",")]:
        q, k, v = (rng.standard_normal((B, T, H, K), dtype=np.float32) for _ in range(3))
        g = layer_like_gates(rng, B, T, H, K)
        beta = (1 / (1 + np.exp(-rng.standard_normal((B, T, H))))).astype(np.float32)
        xs = [jnp.asarray(a, dtype) for a in (q, k, v)] + [jnp.asarray(g), jnp.asarray(beta)]
        fla_times = None
        if fla is not None:
            import torch

            tq, tk, tv = (torch.from_numpy(a).to("cuda", torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32)
                          for a in (q, k, v))
            tg, tb = torch.from_numpy(g).cuda(), torch.from_numpy(beta).cuda()

            def fla_fwd():
                with torch.no_grad():
                    fla(q=tq, k=tk, v=tv, g=tg, beta=tb, use_qk_l2norm_in_kernel=True)
                torch.cuda.synchronize()

            def fla_fb():
                leaves = [a.detach().clone().requires_grad_(True) for a in (tq, tk, tv, tg, tb)]
                o, _ = fla(q=leaves[0], k=leaves[1], v=leaves[2], g=leaves[3], beta=leaves[4],
                           use_qk_l2norm_in_kernel=True)
                o.float().sum().backward()
                torch.cuda.synchronize()

            fla_times = (_median_ms(fla_fwd, args.repeats), _median_ms(fla_fb, args.repeats))
        for impl in impls:
            fwd = jax.jit(lambda *a, impl=impl: kda_chunked(*a, impl=impl)[0])
            grad = jax.jit(jax.grad(lambda *a, impl=impl: jnp.sum(kda_chunked(*a, impl=impl)[0]),
                                    argnums=(0, 1, 2, 3, 4)))
            t_f = _median_ms(lambda: jax.block_until_ready(fwd(*xs)), args.repeats)
            t_fb = _median_ms(lambda: jax.block_until_ready(grad(*xs)), args.repeats)
            row = f"{T:>6} {impl:<11} {t_f:>9.3f} {t_fb:>11.3f}"
            if fla_times:
                row += (f"   {fla_times[0]:>10.3f}  {fla_times[1]:>10.3f}  {fla_times[0] / t_f:>11.2f}x "
                        f"{fla_times[1] / t_fb:>11.2f}x")
            print(row, flush=True)
    # Accuracy on the 48B's gate regime: output error relative to the largest |o| of a float64 recurrence.
    T = args.check_len
    q, k, v = (rng.standard_normal((1, T, 2, K), dtype=np.float32) for _ in range(3))
    g = layer_like_gates(rng, 1, T, 2, K)
    beta = (1 / (1 + np.exp(-rng.standard_normal((1, T, 2))))).astype(np.float32)
    # The truth takes the inputs as the kernels receive them (rounded to --dtype): the figure is the kernels' own error.
    q, k, v = (np.asarray(jnp.asarray(a, dtype).astype(jnp.float32)) for a in (q, k, v))
    truth = kda_float64(q, k, v, g, beta)
    errs = {}
    for impl in impls:
        o = jax.jit(lambda *a, impl=impl: kda_chunked(*a, impl=impl)[0])(
            *[jnp.asarray(a, dtype) for a in (q, k, v)], jnp.asarray(g), jnp.asarray(beta))
        errs[impl] = float(np.abs(np.asarray(o, np.float64) - truth).max() / np.abs(truth).max())
    if fla is not None:
        import torch

        tdt = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
        with torch.no_grad():
            o, _ = fla(q=torch.from_numpy(q).to("cuda", tdt), k=torch.from_numpy(k).to("cuda", tdt),
                       v=torch.from_numpy(v).to("cuda", tdt), g=torch.from_numpy(g).cuda(),
                       beta=torch.from_numpy(beta).cuda(), use_qk_l2norm_in_kernel=True)
        errs["fla chunk_kda"] = float(np.abs(o.float().cpu().numpy().astype(np.float64) - truth).max()
                                      / np.abs(truth).max())
    print(f"error vs float64 on the 48B's gates (A_log up to 6.5, min g {g.min():.0f}), T={T}, 2 heads, "
          f"{args.dtype} inputs, the truth on the same rounded inputs (max |diff| / max |o|): " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))


def bench_model_config(tiny: bool):
    """The benchmark model: ~44M parameters (8 layers, hidden 512, 8 experts top-2, vocab 8k), or a tiny one."""
    from kimi_jax.config import MLA, KDA, DENSE, MOE, KimiLinearConfig, tiny as tiny_cfg

    if tiny:
        return tiny_cfg(num_hidden_layers=4, mla_layers=(3,))
    layers, mla = 8, (3, 7)
    return KimiLinearConfig(
        vocab_size=8192, hidden_size=512, num_hidden_layers=layers, intermediate_size=1024,
        num_attention_heads=4, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        q_lora_rank=None, kda_num_heads=4, kda_head_dim=128, conv_kernel_size=4,
        mixer_types=tuple(MLA if i in mla else KDA for i in range(layers)),
        ffn_types=tuple(DENSE if i == 0 else MOE for i in range(layers)),
        num_experts=8, num_experts_per_token=2, num_shared_experts=1, moe_intermediate_size=256,
        routed_scaling_factor=2.446, moe_renormalize=True, num_expert_group=1, topk_group=1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _paired_models(cfg, workdir: str):
    """The same random weights in transformers (torch, fp32) and in our model."""
    import kimi_jax
    from kimi_jax.reference import build_reference, save_reference

    ref = build_reference(cfg, seed=0)
    folder = save_reference(ref, os.path.join(workdir, "model"))
    return ref, kimi_jax.from_pretrained(folder)


def bench_train(args) -> None:
    import jax
    import jax.numpy as jnp
    import torch

    from kimi_jax.flops import analytic_flops_per_token
    from kimi_jax import RunOptions, sharding
    from kimi_jax.training.vanilla import build_trainer, make_optimizer

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = bench_model_config(args.tiny)
    B, T = (2, 64) if args.tiny else (4, 512)
    with tempfile.TemporaryDirectory() as workdir:
        ref, model = _paired_models(cfg, workdir)
    n_params = model.num_params()
    peak = matmul_peak_gflops(256 if args.tiny else 2048)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (B, T + 1))
    batch = {"input_ids": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
             "weights": np.ones((B, T), np.float32)}
    mesh = sharding.make_mesh("fsdp=1", jax.devices()[:1])
    ours = {}
    # The layer scans as the 48B runs them, and unrolled (`--unroll_layers`), the better choice at this depth.
    for label, opts in (("ours (jax, AdamW)", RunOptions()),
                        ("ours, unrolled layers", RunOptions(unroll_layers=True))):
        trainer, params, opt = build_trainer(model, make_optimizer(1e-4), mesh, B, opts=opts)
        # The step donates its state; copies keep the model's own arrays alive for the next variant.
        state = {"p": jax.tree.map(jnp.copy, params), "o": jax.tree.map(jnp.copy, opt)}

        def ours_step():
            state["p"], state["o"], m = trainer.step_fn(state["p"], state["o"], batch)
            jax.block_until_ready(m["loss"])

        ours[label] = best_time(ours_step, repeats=3, warmup=2)
        del trainer, params, opt, state
    ref.train()
    optim = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    tids = torch.as_tensor(ids, dtype=torch.long)

    def torch_step():
        optim.zero_grad()
        out = ref(tids[:, :-1], labels=tids[:, :-1])
        # transformers shifts labels inside; score the same next-token targets as ours
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tids[:, 1:].reshape(-1))
        loss.backward()
        optim.step()

    try:
        theirs = best_time(torch_step, repeats=2, warmup=1)
    except Exception as e:  # transformers' MoE refuses train mode in some versions
        theirs = float("nan")
        print(f"(transformers train step failed: {type(e).__name__}: {str(e)[:160]})")
    flops = analytic_flops_per_token(cfg, T)["train"] * B * T
    print(f"train step, fp32, {n_params / 1e6:.1f}M parameters ({cfg.num_hidden_layers} layers, hidden "
          f"{cfg.hidden_size}, {cfg.num_experts} experts top-{cfg.num_experts_per_token}, vocab {cfg.vocab_size}), "
          f"batch {B} x {T}; matmul peak {peak:.1f} GFLOP/s; {os.cpu_count()} CPUs")
    print(f"{'':<26} {'step':>9} {'tokens/s':>10} {'analytic MFU':>13}")
    for label, sec in (*ours.items(), ("transformers + torch", theirs)):
        print(f"{label:<26} {sec * 1e3:>7.0f}ms {B * T / sec:>10.0f} {flops / sec / 1e9 / peak:>12.1%}")
    scanned, unrolled = ours.values()
    print(f"ratio (ours / transformers tokens/s): {theirs / scanned:.1f}x scanned layers, "
          f"{theirs / unrolled:.1f}x unrolled")
    train_breakdown(cfg, B, T, peak)


def train_breakdown(cfg, B: int, T: int, peak: float) -> None:
    """Where a train step's time goes: each kind of layer, its mixer and FFN, and the KDA kernel, each jitted alone
    at the step's shape (forward, and forward + backward of a sum of squares)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kimi_jax.layers.kda import KimiDeltaAttention
    from kimi_jax.layers.moe import MoE
    from kimi_jax.model import DecoderLayer, LayerContext, RunOptions
    from kimi_jax.ops.kda import kda_chunked

    D = cfg.hidden_size
    h_BTD = jax.random.normal(jax.random.PRNGKey(0), (B, T, D), jnp.float32)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool))[None], (B, T, T))
    ctx = LayerContext(visible_BTS=causal)

    def fwd_and_grad(fn, *args):
        f = jax.jit(fn)
        g = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=tuple(range(len(args)))))
        return (best_time(lambda: jax.block_until_ready(f(*args)), repeats=3),
                best_time(lambda: jax.block_until_ready(g(*args)), repeats=3))

    def module_times(module, call):
        gd, st = nnx.split(module)
        return fwd_and_grad(lambda st, h: call(nnx.merge(gd, st), h), st, h_BTD)

    rows = []
    for kind in sorted(set(zip(cfg.mixer_types, cfg.ffn_types))):
        layer = list(zip(cfg.mixer_types, cfg.ffn_types)).index(kind)
        block = DecoderLayer(cfg, layer, rngs=nnx.Rngs(0))
        count = sum(k == kind for k in zip(cfg.mixer_types, cfg.ffn_types))
        rows.append((f"{kind[0]}+{kind[1]} layer (x{count})",
                     module_times(block, lambda m, h: m(h, None, ctx, RunOptions())[0])))
    if "kda" in cfg.mixer_types:
        rows.append(("  KDA mixer", module_times(KimiDeltaAttention(cfg, rngs=nnx.Rngs(0)), lambda m, h: m(h)[0])))
        inputs = map(jnp.asarray, random_kda_inputs(np.random.default_rng(1), B, T, cfg.kda_num_heads,
                                                    cfg.kda_head_dim))
        kernel = functools.partial(kda_chunked, chunk_size=cfg.kda_chunk_size)
        rows.append(("    of which the KDA kernel", fwd_and_grad(lambda *a: kernel(*a)[0], *inputs)))
    if "moe" in cfg.ffn_types:
        for dispatch in ("tiled", "dense", "ragged"):
            rows.append((f"  MoE ({dispatch} dispatch)",
                         module_times(MoE(cfg, rngs=nnx.Rngs(0)), lambda m, h, d=dispatch: m(h, d, None))))
    print(f"step breakdown, each piece jitted alone at batch {B} x {T} (matmul peak {peak:.1f} GFLOP/s):")
    print(f"{'':<30} {'fwd':>9} {'fwd+bwd':>9}")
    for label, (t_fwd, t_both) in rows:
        print(f"{label:<30} {t_fwd * 1e3:>7.1f}ms {t_both * 1e3:>7.1f}ms")


def bench_decode(args) -> None:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from kimi_jax.decoding import generate_greedy
    from kimi_jax.model import DecoderLayer, LayerContext

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = bench_model_config(args.tiny)
    n_new = 16 if args.tiny else 64
    prompt_len = 16 if args.tiny else 128
    with tempfile.TemporaryDirectory() as workdir:
        ref, model = _paired_models(cfg, workdir)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, prompt_len))
    n_long = 4 * n_new
    ours, ours_long = (best_time(lambda: generate_greedy(model, ids, n, eos_token_id=[]), repeats=2)
                       for n in (n_new, n_long))
    with torch.no_grad():
        tids = torch.as_tensor(ids, dtype=torch.long)
        theirs, theirs_long = (best_time(lambda: ref.generate(tids, max_new_tokens=n, min_new_tokens=n,
                                                              do_sample=False), repeats=1)
                               for n in (n_new, n_long))
    bandwidth = memory_bandwidth_gbs(32 if args.tiny else 256)
    print(f"greedy decode, batch 1, prompt {prompt_len}, fp32 ({model.num_params() / 1e6:.1f}M parameters), "
          f"backend {jax.default_backend()}, {os.cpu_count()} CPUs; measured streaming bandwidth {bandwidth:.1f} GB/s")
    print(f"  {n_new} new tokens, prefill included: ours {n_new / ours:.1f} tokens/s, transformers generate "
          f"{n_new / theirs:.1f} tokens/s, ratio {theirs / ours:.1f}x")
    per_ours, per_theirs = (ours_long - ours) / (n_long - n_new), (theirs_long - theirs) / (n_long - n_new)
    read = decode_bytes_per_token(model, cfg, prompt_len + n_long)
    print(f"  per decode token (tokens {n_new}-{n_long}): ours {per_ours * 1e3:.2f} ms, transformers "
          f"{per_theirs * 1e3:.2f} ms, ratio {per_theirs / per_ours:.1f}x; ours reads {read / 2 ** 20:.0f} MiB per token "
          f"(active weights + caches) = {read / per_ours / 1e9:.1f} GB/s, {read / per_ours / 1e9 / bandwidth:.0%} of "
          f"the measured bandwidth (a bandwidth-bound step takes >= {read / bandwidth / 1e6:.2f} ms)")

    contexts = [int(x) for x in args.contexts.split(",")]
    kda_layer = cfg.mixer_types.index("kda")
    mla_layer = cfg.mixer_types.index("mla")
    print(f"per-token decode cost of one layer (mixer + FFN) at context L:")
    print(f"{'L':>7} {'KDA layer':>11} {'MLA layer':>11} {'MLA attention analytic':>24}")
    H, R, E = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    for L in contexts:
        row = []
        for layer in (kda_layer, mla_layer):
            block = DecoderLayer(cfg, layer, rngs=nnx.Rngs(0))
            cache = block.init_cache(1, L + 1, jnp.float32)
            gd, st = nnx.split(block)
            S = L + 1
            ctx = LayerContext(visible_BTS=jnp.ones((1, 1, S), bool), cache_index_B=jnp.int32(L))

            # The cache is donated and carried, as in a decode loop (a non-donated call would also copy the whole
            # cache every token and time that copy instead of the step).
            @functools.partial(jax.jit, donate_argnums=2)
            def one(st, h, cache):
                return nnx.merge(gd, st)(h, cache, ctx, __import__("kimi_jax").RunOptions())

            h = jnp.ones((1, 1, cfg.hidden_size), jnp.float32)
            carried = {"cache": cache}

            def decode_once():
                out, carried["cache"] = one(st, h, carried["cache"])
                jax.block_until_ready(out)

            row.append(best_time(decode_once, repeats=5))
        # Absorbed MLA attention per token: scores over R + E and the R-wide context, per head, over L keys.
        analytic = 2 * H * (2 * R + E) * L
        print(f"{L:>7} {row[0] * 1e6:>9.0f}us {row[1] * 1e6:>9.0f}us {analytic / 1e6:>18.2f} MFLOP", flush=True)


def median_time(fn, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of `fn()` (which must block until done) over `repeats` runs after `warmup` runs."""
    return float(np.median(timings(fn, repeats, warmup)))


def bench_moe(args) -> None:
    """One MoE layer at a config's shape (default the 48B's), every dispatch, forward and forward + backward (input
    and every weight's gradient), on whatever device JAX has; each dispatch's output checked against dense."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kimi_jax.config import get_preset
    from kimi_jax.layers.moe import MoE
    from kimi_jax.ops.grouped_matmul import gmm_backend

    cfg = get_preset(args.config)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    T, D, E, F, k = args.tokens, cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.num_experts_per_token
    layer = MoE(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    graphdef, params = nnx.split(layer)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, T, D)), dtype)
    ct = jnp.asarray(rng.standard_normal((1, T, D)), dtype)
    device = jax.devices()[0]
    routed = 2 * T * k * D * F * 3 + 2 * T * D * F * cfg.num_shared_experts * 3  # routed + shared experts, forward
    print(f"MoE layer of {args.config}: T {T}, D {D}, E {E}, F {F}, top-{k}, {cfg.num_shared_experts} shared; "
          f"{args.dtype}; {device.platform} ({getattr(device, 'device_kind', '?')}); gmm runs {gmm_backend()}")
    print(f"{'dispatch':<8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd TFLOP/s':>12} {'max|out - dense| / max|dense|':>31}")

    def fwd(d):
        return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, d, None))

    def fwd_bwd(d):
        return jax.jit(jax.grad(lambda p, x: jnp.sum((nnx.merge(graphdef, p)(x, d, None) * ct).astype(jnp.float32)),
                                argnums=(0, 1)))

    dense = fwd("dense")(params, x).astype(jnp.float32)
    scale = float(jnp.abs(dense).max())
    for d in args.dispatches.split(","):
        f, g = fwd(d), fwd_bwd(d)
        try:
            err = float(jnp.abs(f(params, x).astype(jnp.float32) - dense).max()) / scale
            t_f = median_time(lambda: jax.block_until_ready(f(params, x)), args.repeats)
            t_fb = median_time(lambda: jax.block_until_ready(g(params, x)), args.repeats)
        except Exception as e:  # one dispatch failing on this device should not hide the others' figures
            print(f"{d:<8} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        print(f"{d:<8} {t_f * 1e3:>9.3f} {t_fb * 1e3:>11.3f} {routed / t_f / 1e12:>12.1f} {err:>31.2e}")
    print("TFLOP/s counts the routed work only (top-k experts per token + shared), whatever the dispatch computes")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kda", help="chunked KDA vs transformers' torch chunk kernel and our recurrent form")
    k.add_argument("--lengths", default="1024,4096,16384")
    k.add_argument("--heads", type=int, default=4)
    k.add_argument("--head_dim", type=int, default=128)
    k.add_argument("--tiny", action="store_true")
    k.add_argument("--impl", default=None, metavar="IMPL[,IMPL]",
                   help="time these KDA implementations (auto, xla, pallas_tpu, pallas_gpu) on JAX's device, with fla's "
                        "chunk_kda on the same GPU when importable, in place of the CPU comparison with transformers")
    k.add_argument("--batch", type=int, default=1)
    k.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="q/k/v dtype with --impl")
    k.add_argument("--repeats", type=int, default=10, help="timed runs per figure with --impl, median (default 10)")
    k.add_argument("--reference", choices=("fla", "none"), default="fla", help="with --impl: fla's chunk_kda or none")
    k.add_argument("--check_len", type=int, default=1024, help="with --impl: T of the float64 accuracy check")
    t = sub.add_parser("train", help="train-step tokens/s vs transformers + torch")
    t.add_argument("--tiny", action="store_true")
    d = sub.add_parser("decode", help="greedy decode tokens/s vs transformers generate; per-layer cost vs context")
    d.add_argument("--contexts", default="1024,4096,16384")
    d.add_argument("--tiny", action="store_true")
    m = sub.add_parser("moe", help="one MoE layer, every dispatch, forward and forward + backward")
    m.add_argument("--config", default="kimi-linear-48b-a3b", help="preset whose MoE shape to use")
    m.add_argument("--tokens", type=int, default=4096, help="tokens per call (default 4096)")
    m.add_argument("--dispatches", default="gmm,ragged,tiled,dense")
    m.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    m.add_argument("--repeats", type=int, default=10, help="timed runs per figure, median (default 10)")
    a = sub.add_parser("all", help="kda, train, decode and convert")
    a.add_argument("--tiny", action="store_true")
    c = sub.add_parser("convert", help="conversion memory and throughput vs loading everything in memory")
    c.add_argument("--size_gb", type=float, default=3.0, help="synthetic checkpoint size (default 3)")
    c.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed afterwards)")
    c.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = p.parse_args(argv)
    if args.what == "kda" and args.impl:
        for flag in ("batch", "heads", "head_dim", "repeats", "check_len"):
            if getattr(args, flag) < 1:
                p.error(f"--{flag} must be positive")
        if args.tiny:
            args.heads, args.head_dim, args.lengths, args.repeats, args.check_len = 2, 32, "128", 1, 96
        bench_kda_impls(args)
    elif args.what in ("kda", "all"):
        if args.what == "all" or args.tiny:
            args.heads, args.head_dim = (2, 32) if args.tiny else (4, 128)
            args.lengths = "128,256" if args.tiny else "1024,4096,16384"
        bench_kda(args)
    if args.what in ("train", "all"):
        bench_train(args)
    if args.what in ("decode", "all"):
        if args.what == "all" or args.tiny:
            args.contexts = "64,128" if args.tiny else "1024,4096,16384"
        bench_decode(args)
    if args.what == "moe":
        bench_moe(args)
    if args.what in ("convert", "all"):
        if args.what == "all":
            args.size_gb, args.workdir, args.keep = (0.05 if args.tiny else 3.0), None, False
        if args.size_gb <= 0:
            p.error("--size_gb must be positive")
        bench_convert(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

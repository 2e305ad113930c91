"""End-to-end faithfulness check of kimi_jax against transformers on a tiny Kimi-Linear (CPU, minutes at most).

    python -m experiments.parity_check [--workdir DIR] [--config PRESET_OR_CONFIG_JSON] [--tolerance 1e-4]

Builds a random transformers KimiLinearForCausalLM of the given config (default: the `tiny` preset with an
irregular KDA/MLA schedule, a dense first layer and a top-2 MoE with a shared expert), with non-default A_log,
dt_bias and router bias; writes it as checkpoint folders in both namings (hub, and transformers-native in 2 shards);
loads each with `kimi_jax.from_pretrained`; and reports, for several sequence lengths, max |logit diff| and top-1
agreement, prefill+decode vs full forward, greedy generation vs transformers' `generate`, and bf16 vs fp32.
Exits 1 if any fp32 figure exceeds the tolerance. Needs the `test` extra (torch, CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.parity_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="where to write the tiny checkpoints (default: a temp dir)")
    p.add_argument("--config", default="parity",
                   help="'parity' (default tiny schedule), a preset name ('tiny'), or a path to an HF config.json")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |logit diff| allowed in fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lengths", default="1,63,64,65,150", help="comma-separated prompt lengths to compare")
    return p.parse_args(argv)


def load_config(name: str):
    from kimi_jax.config import KimiLinearConfig, get_preset, tiny

    if name == "parity":
        # MLA at 0-indexed 2 and 5 (irregular), a dense layer 0, top-2 of 8 experts + a shared expert.
        return tiny(num_hidden_layers=6, mla_layers=(2, 5))
    if os.path.exists(name):
        return KimiLinearConfig.from_pretrained(name)
    return get_preset(name)


def main(argv=None) -> int:
    from kimi_jax.errors import KimiJaxError, report

    try:
        return run(parse_args(argv))
    except KimiJaxError as e:
        return report(e)


def run(args) -> int:
    from kimi_jax.errors import UsageError

    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        raise UsageError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
    try:
        import torch
    except ImportError:
        raise UsageError("the parity check needs torch (pip install -e '.[test]')") from None
    import jax.numpy as jnp
    from tqdm import tqdm

    import kimi_jax
    from kimi_jax.decoding import generate_greedy
    from kimi_jax.reference import build_reference, reference_logits, save_reference

    cfg = load_config(args.config)
    if cfg.vocab_size > 4096 or cfg.hidden_size > 512:
        raise UsageError(f"--config {args.config} is too large for a CPU parity check (vocab {cfg.vocab_size}, "
                         f"hidden {cfg.hidden_size}); use convert.check_logits for real checkpoints")
    workdir = args.workdir or tempfile.mkdtemp(prefix="kimi_parity_")
    rng = np.random.default_rng(args.seed)
    rows, failures = [], []
    t0 = time.time()
    steps = tqdm(total=4 + len(lengths), desc="parity check", unit="step")

    ref = build_reference(cfg, seed=args.seed)
    folders = {"hub": save_reference(ref, os.path.join(workdir, "hub"), "hub"),
               "native/2 shards": save_reference(ref, os.path.join(workdir, "native"), "native", num_shards=2)}
    steps.update()
    models = {name: kimi_jax.from_pretrained(path) for name, path in folders.items()}
    steps.update()

    def record(what, diff, agree=None, limit=args.tolerance):
        rows.append((what, diff, agree))
        if diff > limit:
            failures.append(f"{what}: {diff:.2e} > {limit:.0e}")

    for T in lengths:
        ids = rng.integers(0, cfg.vocab_size, (2, T))
        want = reference_logits(ref, ids)
        for name, model in models.items():
            got = np.asarray(kimi_jax.forward(model, ids))
            record(f"logits  T={T:<4d} {name}", float(np.abs(got - want).max()),
                   float(np.mean(got.argmax(-1) == want.argmax(-1))))
        steps.update()

    model = models["hub"]
    T = 70
    ids = rng.integers(0, cfg.vocab_size, (2, T))
    full = np.asarray(kimi_jax.forward(model, ids))
    cache = model.init_cache(2, T)
    pre, cache = kimi_jax.forward(model, ids[:, :60], cache=cache)
    outs = [np.asarray(pre)]
    for t in range(60, T):
        step_logits, cache = kimi_jax.forward(model, ids[:, t:t + 1], cache=cache)
        outs.append(np.asarray(step_logits))
    record("prefill 60 + decode 10 vs full forward", float(np.abs(np.concatenate(outs, 1) - full).max()))
    steps.update()

    prompt = rng.integers(0, cfg.vocab_size, (2, 24))
    ours = generate_greedy(model, prompt, 16, eos_token_id=[])
    with torch.no_grad():
        theirs = ref.generate(torch.as_tensor(prompt), max_new_tokens=16, do_sample=False, eos_token_id=None,
                              pad_token_id=cfg.pad_token_id or 0)[:, prompt.shape[1]:].numpy()
    same = float(np.mean(ours == theirs))
    rows.append(("greedy generate 2x16 tokens == transformers", None, same))
    if same < 1.0:
        failures.append(f"greedy generation differs from transformers in {int((ours != theirs).sum())} tokens")
    bf16 = kimi_jax.from_pretrained(folders["hub"], dtype=jnp.bfloat16)
    ids = rng.integers(0, cfg.vocab_size, (2, 65))
    fp32_logits = np.asarray(kimi_jax.forward(model, ids))
    bf16_logits = np.asarray(kimi_jax.forward(bf16, ids))
    rows.append(("bf16 params vs fp32 (informational)", float(np.abs(bf16_logits - fp32_logits).max()),
                 float(np.mean(bf16_logits.argmax(-1) == fp32_logits.argmax(-1)))))
    steps.update()
    steps.close()

    print(f"\nkimi_jax vs transformers {_versions()} on a tiny Kimi-Linear: {cfg.num_hidden_layers} layers "
          f"(attention {''.join('K' if k == 'kda' else 'M' for k in cfg.mixer_types)}, FFN "
          f"{''.join('d' if k == 'dense' else 'e' for k in cfg.ffn_types)}), {cfg.num_experts} experts top-"
          f"{cfg.num_experts_per_token}, fp32, batch 2")
    print(f"{'check':<46} {'max |diff|':>11} {'top-1 agree':>12}")
    for what, diff, agree in rows:
        d = f"{diff:.2e}" if diff is not None else "-"
        a = f"{agree * 100:.1f}%" if agree is not None else "-"
        print(f"{what:<46} {d:>11} {a:>12}")
    print(f"checkpoints in {workdir}; {time.time() - t0:.1f} s")
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    print(f"PASSED: every fp32 difference <= {args.tolerance:.0e}")
    return 0


def _versions() -> str:
    import jax
    import torch
    import transformers

    return f"{transformers.__version__} (torch {torch.__version__}, jax {jax.__version__})"


if __name__ == "__main__":
    sys.exit(main())

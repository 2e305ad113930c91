"""The evaluation plan end to end on a laptop-sized Kimi-Linear, with real data the project obtains itself.

    python -m experiments.demo [--workdir ./workdir] [--quick | --study] [--fresh]

Every stage runs the plan's own command (EVALUATION_PLAN.md, translated to `python -m experiments.*`) in a child
process, exactly as a user with the real 48B would, on a tiny model of the same architecture (KDA + MLA + MoE):
  0. build a Kimi-format tokenizer on the real Shakespeare corpus, pretrain a tiny base with our trainer and export
     it as an HF checkpoint folder with its tokenizer (`models/tiny-kimi`): where a user of the 48B starts;
  1. convert it to orbax (`python -m convert.hf_to_orbax`), set up the metrics layout, evaluate `baseline`;
  2. vanilla fine-tune (`experiments.train`), evaluate `finetuned_vanilla`;
  3. surgery: evaluate `after_surgery` (zero-init sidecar, verified commits: must match the baseline);
  4. recursive fine-tune (phase a), evaluate `finetuned_recursive` at an intermediate `step_N` (not with --quick or
     --study) and at the end;
  5. compare the four stages: table, verdicts, report and plots.
Finished steps are reused on a re-run (a marker per step under `{workdir}/.done/`); `--fresh` starts clean.
`--quick` shrinks every step (the CI test runs it). Measured on 2 cores from an empty workdir: 3 min 27 s quick (at
an older commit), 14 min 20 s default, 31 min 48 s --study (aims: 5, 20 and 30 minutes).

`--study` (default workdir ./study) is the recursion study, about half an hour on 2 cores: the same plan on a model
pretrained longer, which must come out clearly better than unigram statistics of its training data (a paired
verdict over held-out windows, `kimi_jax.evaluation.unigram`; the study stops if it does not), then recursive phase
a for long enough that its training metrics move, against a vanilla fine-tune given the same analytic FLOPs
(`kimi_jax.flops`), every stage scored on the same 512 held-out chunks. It ends with
`eval_results/recursion_study.md` (+ .json): the unigram verdict, the recursive training metrics at the start and end
of training, chunk accuracy@k for k = 1..K against the vanilla model's and its own greedy chunks, and the fine-tune's
perplexity, each difference with its paired 95% interval (`kimi_jax.evaluation.recursion_study`).
XLA compilations are cached on disk under `{workdir}/jax_cache`, shared by every step's process; --quick compiles
with LLVM's cheap pipeline (`FAST_COMPILE_FLAGS`: its tiny programs take longer to compile than to run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time


@dataclasses.dataclass(frozen=True)
class Sizes:
    vocab: int  # BPE vocabulary of the tokenizer (plus 256 Kimi specials)
    layers: int
    hidden: int
    seq_len: int
    batch: int
    pretrain_steps: int
    vanilla_steps: int
    recursive_steps: int
    chunk_width: int
    inner_steps: int
    eval_samples: int  # GSM8K items / generation samples
    max_new_tokens: int
    eval_batches: int  # held-out batches for periodic evaluation during training
    eval_tokens: int  # held-out tokens scored by experiments.evaluate (0 = all)
    num_chunks: int  # held-out chunks for chunk accuracy@k and the greedy chunk accuracy
    vanilla_lr: float = 1e-5  # experiments.train's default
    study: bool = False  # the recursion study: vanilla_steps from equal FLOPs, the unigram check, the study report


FULL = Sizes(vocab=2048, layers=4, hidden=128, seq_len=256, batch=8, pretrain_steps=400, vanilla_steps=120,
             recursive_steps=120, chunk_width=64, inner_steps=2, eval_samples=12, max_new_tokens=48, eval_batches=8,
             eval_tokens=0, num_chunks=64)
QUICK = Sizes(vocab=1024, layers=4, hidden=64, seq_len=192, batch=4, pretrain_steps=40, vanilla_steps=12,
              recursive_steps=12, chunk_width=64, inner_steps=2, eval_samples=2, max_new_tokens=16, eval_batches=2,
              eval_tokens=4000, num_chunks=2)
# vanilla_steps 0: set from the recursive run's FLOPs (recursion_study.equal_compute_steps). The vanilla fine-tune
# continues at a tenth of the pretraining rate (experiments.train's 1e-5 barely moves a model this small).
STUDY = Sizes(vocab=2048, layers=4, hidden=128, seq_len=256, batch=8, pretrain_steps=1600, vanilla_steps=0,
              recursive_steps=300, chunk_width=64, inner_steps=2, eval_samples=4, max_new_tokens=32, eval_batches=8,
              eval_tokens=0, num_chunks=512, vanilla_lr=3e-4, study=True)
PRETRAIN_LR = 3e-3


def tiny_config(tok, s: Sizes):
    from kimi_jax.config import tiny

    return tiny(num_hidden_layers=s.layers, mla_layers=(s.layers - 1,), first_k_dense=1, hidden_size=s.hidden,
                intermediate_size=2 * s.hidden, kda_num_heads=max(1, s.hidden // 32), kda_head_dim=32,
                num_attention_heads=max(1, s.hidden // 32), qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                kv_lora_rank=32, moe_intermediate_size=s.hidden // 2, vocab_size=tok.vocab_size,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


# --quick's programs are tiny and short-lived: XLA spends far longer compiling them than running them, so its steps
# compile with LLVM's cheap pipeline (same maths, less optimised machine code; 2 cores, --quick: 375 s -> 251 s).
# Longer runs must not: the study's pretraining step takes 1.04 s with these flags and 0.33 s without (2 cores,
# median of 50 steps). Flags the user set win.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def fast_compile_flags(user_flags: str) -> str:
    named = {f.split("=")[0] for f in user_flags.split()}
    return " ".join(user_flags.split() + [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in named])


class Demo:
    def __init__(self, workdir: str, sizes: Sizes, quick: bool):
        self.w = os.path.abspath(workdir)
        self.s = sizes
        self.quick = quick
        self.env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(self.w, "jax_cache"),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", PYTHONUNBUFFERED="1",
                        XLA_FLAGS=(fast_compile_flags(os.environ.get("XLA_FLAGS", "")) if quick
                                   else os.environ.get("XLA_FLAGS", "")))
        self.timings: list[tuple[str, float]] = []

    def path(self, *parts) -> str:
        return os.path.join(self.w, *parts)

    def done(self, name: str) -> bool:
        return os.path.exists(self.path(".done", name))

    def mark(self, name: str, seconds: float) -> None:
        os.makedirs(self.path(".done"), exist_ok=True)
        with open(self.path(".done", name), "w") as f:
            json.dump({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(seconds, 1)}, f)

    def seconds(self, name: str) -> float | None:
        """How long a finished step took (None for markers written before the time was kept)."""
        try:
            with open(self.path(".done", name)) as f:
                return float(json.load(f)["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def step(self, name: str, title: str, fn) -> None:
        if self.done(name):
            print(f"[demo] {title}: done earlier, reused", flush=True)
            return
        print(f"\n[demo] {title}", flush=True)
        t0 = time.time()
        fn()
        self.timings.append((title, time.time() - t0))
        self.mark(name, time.time() - t0)

    def run(self, *args) -> None:
        cmd = [sys.executable, "-m", *map(str, args)]
        print("  $ python -m " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
        proc = subprocess.run(cmd, env=self.env, cwd=self.w)
        if proc.returncode != 0:
            raise SystemExit(f"error: demo step failed (exit {proc.returncode}): {' '.join(map(str, args))}")

    # ------------------------------------------------------------------ steps
    def build_initial_model(self) -> None:
        """A real Kimi-format tokenizer trained on the train split, and a randomly initialised tiny Kimi-Linear."""
        from flax import nnx

        from kimi_jax import orbax_model, tokenizer as tokenizer_mod
        from kimi_jax.data import demo_corpus
        from kimi_jax.model import KimiLinearForCausalLM
        from kimi_jax.tokenizer_fixtures import build_kimi_format_tokenizer

        corpus = demo_corpus(progress=True)
        print(f"  corpus: {corpus.source}, {len(corpus['train'])} train / {len(corpus['validation'])} held-out "
              f"documents", flush=True)
        folder = self.path("models", "tiny-kimi-init")
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_kimi_format_tokenizer([d.text for d in corpus["train"]], tmp, vocab_size=self.s.vocab)
        tok = tokenizer_mod.load(tmp)
        cfg = tiny_config(tok, self.s)
        model = KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(0))
        orbax_model.save_model(tmp, model, source="experiments.demo random init")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        print(f"  tiny Kimi-Linear: {model.num_params() / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers "
              f"({', '.join(cfg.mixer_types)}), vocab {cfg.vocab_size}", flush=True)

    def pretrain(self) -> None:
        s = self.s
        self.run("experiments.train", "--stage", "vanilla", "--model_path", self.path("models", "tiny-kimi-init"),
                 "--data", "demo", "--seq_len", s.seq_len, "--batch_size", s.batch, "--num_steps", s.pretrain_steps,
                 "--lr", PRETRAIN_LR, "--warmup_steps", max(1, s.pretrain_steps // 10),
                 "--output_dir", self.path("pretrain"),
                 "--log_dir", self.path("logs", "pretrain"), "--save_interval", s.pretrain_steps,
                 "--eval_interval", s.pretrain_steps, "--max_eval_batches", s.eval_batches, "--no-resume")
        self.run("convert.orbax_to_hf", "--ckpt", self.path("pretrain", f"step_{s.pretrain_steps}"),
                 "--output", self.path("models", "tiny-kimi"), "--overwrite", "--quiet")

    def convert(self) -> None:
        self.run("convert.hf_to_orbax", "--hf_path", self.path("models", "tiny-kimi"),
                 "--output", self.path("ckpt", "tiny-kimi"), "--dtype", "float32", "--overwrite", "--quiet")
        self.run("experiments.setup_metrics", "--log_dir", self.path("logs"),
                 "--eval_dir", self.path("eval_results"))

    def evaluate(self, model_path: str, stage: str, *extra) -> None:
        s = self.s
        self.run("experiments.evaluate", "--model_path", model_path, "--stage", stage,
                 "--output_dir", self.path("eval_results"), "--log_dir", self.path("logs"),
                 "--eval_data", "demo", "--max_samples", s.eval_samples, "--max_new_tokens", s.max_new_tokens,
                 "--seq_len", s.seq_len, "--num_fewshot", 1 if self.quick else 3, "--batch_size", 4,
                 "--chunk_width", s.chunk_width,  # every stage scores greedy chunk accuracy on the same chunks
                 "--num_chunks", s.num_chunks,
                 *(["--max_eval_tokens", s.eval_tokens] if s.eval_tokens else []), *extra)

    def recursive_flags(self) -> list:
        return ["--use_recursive", "--max_inner_steps", self.s.inner_steps]

    def train(self, name: str, steps: int, *extra) -> None:
        s = self.s
        self.run("experiments.train", "--model_name", self.path("ckpt", "tiny-kimi"), "--chunk_width",
                 s.chunk_width, "--batch_size", s.batch, "--num_steps", steps, "--phase", "a", "--trust_remote_code",
                 "--output_dir", self.path("checkpoints", name), "--log_dir", self.path("logs", name),
                 "--data", "demo", "--seq_len", s.seq_len, "--save_interval", max(1, steps // 2),
                 "--eval_interval", max(1, steps // 2), "--max_eval_batches", s.eval_batches, *extra)

    # ------------------------------------------------------------------ the recursion study's parts
    def stage_json(self, stage: str) -> dict:
        with open(self.path("eval_results", f"{stage}_results.json")) as f:
            return json.load(f)

    def compute(self) -> dict:
        """The equal-compute budget: the vanilla steps of the recursive run's analytic FLOPs (study only)."""
        from kimi_jax.config import KimiLinearConfig
        from kimi_jax.evaluation.recursion_study import equal_compute_steps
        from kimi_jax.recursive.config import load_preset

        s = self.s
        cfg = KimiLinearConfig.from_pretrained(self.path("ckpt", "tiny-kimi"))
        rcfg = load_preset("phase_a").replace(recursive_enabled=True, phase="a", chunk_width=s.chunk_width,
                                              max_inner_steps=s.inner_steps)
        return equal_compute_steps(cfg, rcfg, batch_size=s.batch, seq_len=s.seq_len,
                                   recursive_steps=s.recursive_steps, remat=True)  # experiments.train's default

    def vanilla_steps(self) -> int:
        return self.compute()["vanilla_steps"] if self.s.study else self.s.vanilla_steps

    def unigram_check(self) -> None:
        """The pretrained baseline against unigram statistics, paired by held-out window; stops the study unless
        the baseline is clearly better."""
        from kimi_jax.evaluation.recursion_study import unigram_reference
        from kimi_jax.evaluation.verdicts import compare_perplexity
        from kimi_jax.safe_io import write_json_atomic

        base = self.stage_json("baseline")
        core = base["core"]
        unigram = unigram_reference(self.path("ckpt", "tiny-kimi"), "demo", seq_len=core["seq_len"],
                                    stride=core["stride"], max_eval_tokens=self.s.eval_tokens or None)
        write_json_atomic(self.path("eval_results", "unigram_reference.json"), unigram)
        cmp = compare_perplexity(unigram, base)
        print(f"  unigram -> pretrained baseline: {cmp.describe()}", flush=True)
        if cmp.verdict != "yes":
            raise SystemExit(f"error: the pretrained model is not clearly better than unigram statistics "
                             f"({cmp.describe()}); pretrain longer (Sizes.pretrain_steps in experiments/demo.py)")

    def study_report(self) -> None:
        from flax import nnx

        from kimi_jax.config import KimiLinearConfig
        from kimi_jax.evaluation import recursion_study as rs
        from kimi_jax.evaluation.verdicts import compare_perplexity
        from kimi_jax.model import KimiLinearForCausalLM
        from kimi_jax.safe_io import write_json_atomic, write_text_atomic

        s = self.s
        cfg = KimiLinearConfig.from_pretrained(self.path("ckpt", "tiny-kimi"))
        with open(self.path("eval_results", "unigram_reference.json")) as f:
            unigram = json.load(f)
        base, vanilla, rec = (self.stage_json(n) for n in ("baseline", "finetuned_vanilla", "finetuned_recursive"))
        params = nnx.eval_shape(lambda: KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(0))).num_params()
        sizes = dict(dataclasses.asdict(s), params_m=params / 1e6, vocab_size=cfg.vocab_size)
        timings = {label: self.seconds(name) or 0.0 for name, label in (
            ("pretrain", "pretrain + export"), ("train_vanilla", "vanilla fine-tune"),
            ("train_recursive", "recursive fine-tune"))}
        md, data = rs.study_report(
            sizes=sizes, compute=self.compute(), timings=timings, unigram=compare_perplexity(unigram, base),
            baseline=base, unigram_result=unigram, vanilla_vs_baseline=compare_perplexity(base, vanilla),
            chunks=rs.chunk_accuracy_by_step(rec, vanilla),
            trajectory=rs.training_trajectory(self.path("checkpoints", "recursive_finetune", "metrics.jsonl")),
            command="python -m experiments.demo --study" + (f" --workdir {self.w}" if self.w != os.path.abspath(
                "./study") else ""))
        write_json_atomic(self.path("eval_results", "recursion_study.json"), data)
        write_text_atomic(self.path("eval_results", "recursion_study.md"), md)
        print(md, flush=True)

    def main(self) -> None:
        s = self.s
        ckpt = self.path("ckpt", "tiny-kimi")
        self.step("init", "0a. tokenizer on the real corpus + a random tiny Kimi-Linear", self.build_initial_model)
        self.step("pretrain", "0b. pretrain the tiny base with our trainer, export it as an HF folder", self.pretrain)
        self.step("convert", "1a. convert the HF checkpoint once (HF -> orbax), set up the metrics", self.convert)
        self.step("eval_baseline", "1b. evaluate: baseline", lambda: self.evaluate(ckpt, "baseline"))
        if s.study:
            self.step("unigram", "1c. study: is the baseline clearly better than unigram statistics?",
                      self.unigram_check)
        vanilla_extra = ["--lr", s.vanilla_lr] if s.study else []
        self.step("train_vanilla", "2a. vanilla fine-tune" + (" (the recursive run's FLOPs)" if s.study else ""),
                  lambda: self.train("vanilla_finetune", self.vanilla_steps(), *vanilla_extra))
        self.step("eval_vanilla", "2b. evaluate: finetuned_vanilla",
                  lambda: self.evaluate(self.path("checkpoints", "vanilla_finetune"), "finetuned_vanilla"))
        self.step("eval_surgery", "3. surgery: evaluate after_surgery (must match the baseline)",
                  lambda: self.evaluate(ckpt, "after_surgery", *self.recursive_flags()))
        self.step("train_recursive", "4a. recursive fine-tune (phase a)",
                  lambda: self.train("recursive_finetune", s.recursive_steps, "--use_recursive",
                                     "--max_inner_steps", s.inner_steps))
        middle = max(1, s.recursive_steps // 2)
        if not (s.study or self.quick):  # the study and --quick evaluate the end of training only
            self.step("eval_recursive_mid", f"4b. evaluate: finetuned_recursive at step_{middle}",
                      lambda: self.evaluate(self.path("checkpoints", "recursive_finetune", f"step_{middle}"),
                                            "finetuned_recursive", "--use_recursive"))
        self.step("eval_recursive", "4c. evaluate: finetuned_recursive (final)",
                  lambda: self.evaluate(self.path("checkpoints", "recursive_finetune"), "finetuned_recursive",
                                        "--use_recursive"))
        # Always re-run the comparison: it is cheap and reflects whatever stages exist now.
        print("\n[demo] 5. compare the four stages", flush=True)
        self.run("experiments.compare", "baseline", "after_surgery", "finetuned_vanilla", "finetuned_recursive",
                 "--eval_dir", self.path("eval_results"), "--output", self.path("eval_results", "comparison.md"))
        if s.study:
            print("\n[demo] 6. the recursion study's report", flush=True)
            self.study_report()
        print("\n[demo] done.")
        for title, seconds in self.timings:
            print(f"  {seconds:7.1f} s  {title}")
        print(f"  report and plots: {self.path('eval_results')}/comparison.md (+ *.png)")
        print(f"  stage JSONs:      {self.path('eval_results')}/*_results.json")
        print(f"  checkpoints:      {self.path('checkpoints')}/vanilla_finetune, .../recursive_finetune")
        print(f"  base model:       {self.path('models', 'tiny-kimi')} (HF), {ckpt} (orbax)")
        print(f"  TensorBoard:      tensorboard --logdir {self.path('logs')} --port 6006")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="where everything is written (default ./workdir; ./study with "
                                                   "--study)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smaller run (what CI runs)")
    size.add_argument("--study", action="store_true",
                      help="the recursion study (about 30 min on 2 cores; default workdir ./study)")
    p.add_argument("--fresh", action="store_true", help="delete the workdir first instead of reusing finished steps")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else STUDY if args.study else FULL
    workdir = os.path.abspath(args.workdir or ("./study" if args.study else "./workdir"))
    marker = os.path.join(workdir, ".done", "sizes.json")
    if args.fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    elif os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) != dataclasses.asdict(sizes):
                from kimi_jax.errors import UsageError, report

                return report(UsageError(f"{workdir} holds a demo run of another size (--quick, --study or default); "
                                         f"pass --fresh or another --workdir"))
    os.makedirs(os.path.join(workdir, ".done"), exist_ok=True)
    with open(marker, "w") as f:
        json.dump(dataclasses.asdict(sizes), f)
    t0 = time.time()
    Demo(workdir, sizes, args.quick).main()
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

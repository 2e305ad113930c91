"""Fine-tune Kimi-Linear: the vanilla causal-LM stage, or the recursive-refinement stage in phase a, b or c.

    python -m experiments.train --model_path DIR [--stage vanilla|recursive | --use_recursive] [--phase a|b|c]
        [--data demo|FILE|FOLDER|GLOB|HF_NAME] [--eval_data SPEC] [--chat] [--seq_len T] [--batch_size B]
        [--grad_accum G] [--num_steps N] [--lr LR] [--warmup_steps S] [--schedule cosine|linear]
        [--weight_decay WD] [--clip_norm C] [--train_groups G1,G2,...] [--recursive_config PRESET_OR_JSON]
        [--chunk_width W] [--max_inner_steps K] [--mesh data=2,fsdp=-1] [--dtype float32|bfloat16]
        [--remat | --no-remat] [--unroll_layers] [--seed S] [--output_dir DIR] [--log_dir DIR] [--eval_interval N]
        [--max_eval_batches N] [--save_interval N] [--max_to_keep N] [--resume | --no-resume] [--quiet]

Model. --model_path (alias --model_name) is an HF folder (config.json + safetensors, converted in memory; fine for
small models: the whole model is loaded on one device before it is sharded) or a kimi_jax orbax folder
(`python -m convert.hf_to_orbax`, or a training checkpoint), restored straight into the mesh: use one for the 48B.
Its tokenizer files are used for the data and copied into every checkpoint. --trust_remote_code is accepted and
ignored (kimi_jax is its own implementation).

Stages. `vanilla` (default) trains the causal-LM cross-entropy with AdamW (`kimi_jax.training.vanilla`);
--train_groups restricts it to parameter groups (embeddings, lm_head, mixers, ffn, routers, norms; default all).
`recursive` (--use_recursive is the same) trains the recursive-refinement sidecar (RECURSIVE_DESIGN.md §3.9) with
the recursive config --recursive_config (a preset or JSON file; default the preset phase_{--phase}, --phase default
a), whose chunk_width / max_inner_steps --chunk_width / --max_inner_steps override. Phase a: sidecar only (base
frozen); b: + LoRA in the noisy stream; c: + the config's unfrozen blocks, with L2-SP. The flags of the other stage
are accepted and ignored with a one-line notice (the evaluation plan's vanilla command passes --phase a and
--chunk_width 128), except --train_groups with --stage recursive, which is an error.

Learning rates. Vanilla: --lr (default 1e-5), --weight_decay (default 0), --clip_norm (default 1; 0 = no clipping)
and --schedule (default cosine: linear warmup over --warmup_steps, cosine decay to 10% at --num_steps; linear:
warmup, then linear decay to 0). Recursive: the config's per-group learning rates (lr_sidecar, lr_heads, lora_lr,
lr_unfrozen) with warmup + cosine decay to 10%; --lr LR multiplies every group's rate by LR / lr_sidecar, so the
sidecar group trains at exactly LR and the groups keep the config's ratios. --weight_decay replaces the config's
weight_decay; --clip_norm must be > 0; --schedule linear and --grad_accum > 1 are errors (the recursive trainer has
neither). --warmup_steps defaults to min(100, num_steps // 10) (on resume: the checkpoint's). train/lr logs the
vanilla rate / the sidecar group's rate.

Data. --data (default demo: the built-in Shakespeare corpus, downloaded once, Python's own docs prose offline; local
.txt/.jsonl/.json/.parquet files, folders and globs; HF dataset names) is packed into rows of --seq_len tokens
(`kimi_jax.data`). --eval_data (default: the validation split of --data) is held-out data. A local file is validation
data when its name has a `validation`/`val`/`dev`/`eval`/`test` word; without such files a fixed 5% of the records (a
.txt file is one record, a .jsonl line one record) is held out, chosen by a hash of their index (at least one record,
never all), and a single text (e.g. `--data corpus.txt`) is split instead: its last 5% of characters, from a line
(else word) boundary, is validation. Train and validation never overlap. Held-out data is evaluated every
--eval_interval steps, at step 0 and at the end (0 = never): `evaluation/perplexity` (token-weighted exp of the mean
NLL over every held-out row, or the first --max_eval_batches batches; for the recursive stage the clean path, i.e.
the base with the phase-C blocks merged in) and `evaluation/token_accuracy`; for the recursive stage also
`evaluation/loss/total`, `evaluation/final_ce` and `evaluation/step_accuracy/k{1..K}` (the recursive objective with a
fixed RNG key and the end-of-training corruption rate, token-weighted over the batches; without the phase-C L2-SP
term).

Checkpoints (`kimi_jax.training.checkpoints`). Every --save_interval steps (0 = only at the end) and at the end,
`{output_dir}/step_N` is written asynchronously and renamed into place when complete; each is a complete model
folder (`python -m experiments.generate --model_path DIR/step_N` loads it, with its sidecar in the recursive stage)
plus the training state (train_state/: optimizer state, trainable tree, RNG key; train_state.json: step, data
iterator position, run settings); `{output_dir}/latest` names the newest. While the base is unchanged (recursive
phases a, b) params/ is hard-linked from the orbax model folder or the previous checkpoint instead of rewritten.
--max_to_keep keeps the newest N (0 = all, the default). --output_dir defaults to ./checkpoints/<basename of
--log_dir>, else ./checkpoints/<stage>_finetune (the evaluation plan's layout); neither it nor --log_dir may be or lie
inside --model_path (a model folder inside --output_dir, e.g. one of its checkpoints, is fine).

Resume. By default a run whose --output_dir holds a checkpoint continues from the newest one exactly (same data
order, RNG, optimizer state: the losses equal an uninterrupted run's); settings that change the trajectory must be
the same (an error names the first that differs; --num_steps may change, with a notice; the mesh and the number of
processes may change too). --no-resume starts from --model_path and, once the model is built, deletes the output
folder's checkpoints (step_N, latest) and metrics.jsonl; --resume requires a checkpoint. Nothing else deletes them:
an --output_dir holding an earlier run's outputs but no complete checkpoint (metrics.jsonl, TensorBoard files, a
step_N that is not a complete checkpoint) is an error without --no-resume, and a checkpoint is never replaced. A
killed run's logs past its last checkpoint are dropped (metrics.jsonl) or hidden (TensorBoard purge_step), so the
logs read as one run; its half-written `.step_N.tmp` folder is removed (with a notice).

One run per output folder: process 0 holds an exclusive lock on --output_dir ({output_dir}/.lock, "host H pid P")
from before it looks for a checkpoint until it exits; a second run with the same --output_dir is refused and names
the holder. A lock left by a process that no longer runs (a crash, SIGKILL) is reported and taken over.

Logs (process 0). A tqdm bar (step, loss, tokens/s, ETA); `{output_dir}/metrics.jsonl`, one JSON object per train
step (every metric of the step, lr, tokens/s = batch_size x seq_len / step time, memory) and per evaluation;
TensorBoard scalars under --log_dir (default {output_dir}/logs): train/loss/{total, final_ce, masked_ce, halt, ponder,
length, stability} (vanilla: its CE as total and final_ce; phase c adds l2sp), train/lr, train/grad_norm,
train/generation/{avg_refine_steps (the expected steps under the halting distribution), commit_rate,
avg_chunk_length}, train/performance/{tokens_per_sec, steps_per_sec, memory_mb (peak device memory where the
backend reports it, else host RSS)}, evaluation/... as above.

Multi-host: run the same command on every host (`kimi_jax.distributed`); each process loads its rows of every
batch, orbax writes each process's shards, process 0 writes the logs and JSON files. Set JAX_COMPILATION_CACHE_DIR
to reuse compiled programs across runs.

Exit status: 0 done; 1 a checkpoint or log could not be written (a full disk: one `error:` line naming the path;
the earlier checkpoints and `latest` stay intact and nothing partial is left); 2 bad flags, paths, configs, data,
damaged model or checkpoint files, a checkpoint that does not fit or an output folder in use (one `error:` line);
3 a non-finite loss or gradient norm (the step is named; nothing is saved for it, the previous checkpoints stay
intact); 130 / 143 after Ctrl-C / SIGTERM, once a checkpoint of the last finished step is written (a second Ctrl-C
aborts at once).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from experiments.flags import add_kda_impl_flag
from kimi_jax.errors import KimiJaxError, UsageError, report
from kimi_jax.training.run import DEFAULT_VANILLA_LR, DTYPES, PHASES, SCHEDULES, STAGES, TrainOptions, run

EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m experiments.train", description=__doc__.split("\n\n")[0],
                epilog="\n\n".join(__doc__.split("\n\n")[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and stage")
    g.add_argument("--model_path",
                   help="HF folder (config.json + safetensors) or kimi_jax orbax folder, with its tokenizer "
                        "(required)")
    g.add_argument("--model_name", help="the same as --model_path (the evaluation plan's name)")
    g.add_argument("--stage", choices=STAGES, help="vanilla (default) or recursive")
    g.add_argument("--use_recursive", action="store_true", help="the same as --stage recursive")
    g.add_argument("--phase", choices=PHASES, help="recursive training phase (default a)")
    g.add_argument("--recursive_config", metavar="PRESET_OR_JSON",
                   help="recursive config: a preset (phase_a, phase_b, phase_c, ...) or JSON file; "
                        "default the preset phase_{--phase}")
    g.add_argument("--chunk_width", type=int, metavar="W",
                   help="recursive window width, a multiple of 64 (default: the recursive config's)")
    g.add_argument("--max_inner_steps", type=int, metavar="K",
                   help="recursive inner steps (default: the recursive config's)")
    g.add_argument("--train_groups", metavar="G1,G2",
                   help="vanilla: train only these parameter groups (embeddings, lm_head, mixers, ffn, routers, "
                        "norms); default all")
    g.add_argument("--dtype", choices=DTYPES,
                   help="parameter dtype (default: the stored one for orbax folders, float32 for HF folders)")
    g.add_argument("--remat", action=argparse.BooleanOptionalAction,
                   help="rematerialise each layer cycle in the backward pass (default on)")
    g.add_argument("--unroll_layers", action="store_true",
                   help="unroll the scans over layers (faster steps for small models; compile time grows with depth)")
    add_kda_impl_flag(g)
    g.add_argument("--mesh", help="mesh spec, e.g. data=2,fsdp=-1 (default: fsdp over every device)")
    g.add_argument("--trust_remote_code", action="store_true", help="accepted and ignored")
    d = p.add_argument_group("data")
    d.add_argument("--data",
                   help="training data: demo, a .txt/.jsonl/.json/.parquet file, folder or glob, or an HF dataset "
                        "name; its train split (see Data. below; default demo)")
    d.add_argument("--eval_data",
                   help="held-out data, a spec like --data; its validation split: validation-named files, else 5%% "
                        "of the records, or the last 5%% of a single text (default: the validation split of --data)")
    d.add_argument("--chat", action="store_true", help="render prompt/response records with the chat template")
    d.add_argument("--seq_len", type=int, metavar="T", help="tokens per row (default 2048)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch_size", type=int, metavar="B", help="global batch in rows (default 4)")
    o.add_argument("--grad_accum", type=int, metavar="G",
                   help="micro-batches per step (vanilla; B must divide by G x processes; default 1)")
    o.add_argument("--num_steps", type=int, metavar="N", help="optimizer steps (default 1000)")
    o.add_argument("--lr", type=float, metavar="LR",
                   help=f"peak learning rate (vanilla default {DEFAULT_VANILLA_LR:g}; recursive: the sidecar "
                        f"group's, the other groups keep the config's ratios; default the config's lr_sidecar; see "
                        f"Learning rates below)")
    o.add_argument("--warmup_steps", type=int, metavar="S",
                   help="linear warmup (default min(100, num_steps // 10); on resume the checkpoint's)")
    o.add_argument("--schedule", choices=SCHEDULES, help="decay after warmup (default cosine)")
    o.add_argument("--weight_decay", type=float, metavar="WD",
                   help="AdamW weight decay (vanilla default 0; recursive default the config's weight_decay)")
    o.add_argument("--clip_norm", type=float, metavar="C", help="global-norm clip (default 1)")
    o.add_argument("--seed", type=int, help="data order and recursive RNG (default 0)")
    r = p.add_argument_group("outputs")
    r.add_argument("--output_dir",
                   help="checkpoints and metrics.jsonl (default ./checkpoints/<basename of --log_dir>, else "
                        "./checkpoints/<stage>_finetune)")
    r.add_argument("--log_dir", help="TensorBoard logs (default {output_dir}/logs)")
    r.add_argument("--eval_interval", type=int, metavar="N",
                   help="evaluate every N steps, at step 0 and at the end (0 = never; default 1000)")
    r.add_argument("--max_eval_batches", type=int, metavar="N", help="evaluate at most N batches (default all)")
    r.add_argument("--save_interval", type=int, metavar="N",
                   help="checkpoint every N steps and at the end (0 = only at the end; default 5000)")
    r.add_argument("--max_to_keep", type=int, metavar="N",
                   help="keep the newest N checkpoints (0 = all; default 0)")
    r.add_argument("--resume", action=argparse.BooleanOptionalAction,
                   help="continue from --output_dir's newest checkpoint (default: when there is one)")
    r.add_argument("--quiet", action="store_true", help="no progress bars or start/end summaries")
    p.set_defaults(**dataclasses.asdict(TrainOptions()))  # one place for the defaults: the library's options
    return p


def main(argv=None) -> int:
    """Parse the flags and train; -> the exit status (see the module docstring)."""
    try:
        return run(TrainOptions(**vars(build_parser().parse_args(argv))))
    except KimiJaxError as e:  # bad flags, paths, data or files (2), a failed write (1), a non-finite step (3)
        return report(e)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

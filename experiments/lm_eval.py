"""lm-eval's command line with the `kimi_jax` model registered.

    python -m experiments.lm_eval --model kimi_jax \\
        --model_args path=./models/Kimi-Linear-48B-A3B-Instruct,dtype=bfloat16 \\
        --tasks hellaswag --batch_size 8 --output_path ./eval_results/lm_eval
    python -m experiments.lm_eval run --model kimi_jax \\
        --model_args path=./checkpoints/recursive_finetune,use_recursive=True,chunk_width=128,max_inner_steps=4 \\
        --tasks my_task --include_path ./my_tasks
    python -m experiments.lm_eval ls tasks

lm-eval 0.4.13 discovers models only through its own registry (there is no plugin entry point), so the plain
`lm_eval` command does not know `kimi_jax`; this wrapper imports kimi_jax.evaluation.lm_eval_adapter (which
registers it) and then hands every argument to lm-eval's own CLI, so all of lm-eval's flags and subcommands work.
`--include_path` adds local task YAMLs. Bad model_args, a missing or unreadable model folder or an invalid recursive
config are one `error:` line on stderr and exit status 2.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from kimi_jax.evaluation import lm_eval_adapter  # noqa: F401  (registers the kimi_jax model with lm-eval)
    except ImportError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    from kimi_jax.errors import KimiJaxError, report

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv (and inserts `run` when no subcommand is given)
    try:
        cli_evaluate()
    except KimiJaxError as e:
        return report(e)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())

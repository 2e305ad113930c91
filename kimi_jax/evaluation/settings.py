"""The settings of one evaluation run (`EvalSettings`): which stage, which data, how much of it, and how to run.

These are the knobs of `python -m experiments.evaluate` without its paths (the model folder, --output_dir,
--log_dir), with the same names and defaults as its flags, so the command and an in-process caller (a test, a
notebook) describe a run alike. `EvalSettings.check` refuses values no run can use, with the flag in the message.
"""

from __future__ import annotations

import dataclasses

from kimi_jax.errors import UsageError

STAGES = ("baseline", "finetuned_vanilla", "after_surgery", "finetuned_recursive")
RECURSIVE_STAGES = ("after_surgery", "finetuned_recursive")
DTYPES = ("float32", "bfloat16")
COMMIT_MODES = ("verified", "learned", "baseline_verified")
SEED_MODES = ("ar", "leftover", "mask")

DEFAULT_EVAL_DATA = "demo"
DEFAULT_NUM_CHUNKS = 64
DEFAULT_SEED = 1234  # lm-eval's few-shot seed
DEFAULT_MAX_NEW_TOKENS = 256  # lm-eval's max_gen_toks
DEFAULT_NUM_FEWSHOT = 5
DEFAULT_SEQ_LEN = 2048
DEFAULT_BATCH_SIZE = 8
DEFAULT_KDA_IMPL = "auto"

# settings that must be >= 1 when given
_POSITIVE = ("max_samples", "max_eval_tokens", "num_chunks", "max_new_tokens", "seq_len", "batch_size", "chunk_width",
             "max_inner_steps")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """One stage's evaluation settings; the field names are the flags of `python -m experiments.evaluate`."""

    stage: str
    use_recursive: bool = False  # implied by the recursive stages; a contradiction at the others
    recursive_config: str | None = None  # preset or JSON file; None: the folder's, else after_surgery
    chunk_width: int | None = None
    max_inner_steps: int | None = None
    commit_mode: str | None = None
    draft_seed: str | None = None  # the recursive config field `seed`
    eval_data: str = DEFAULT_EVAL_DATA
    max_samples: int | None = None
    max_eval_tokens: int | None = None
    num_chunks: int = DEFAULT_NUM_CHUNKS
    skip_perplexity: bool = False
    skip_reasoning: bool = False
    seed: int = DEFAULT_SEED
    dtype: str | None = None  # None: the stored one
    kda_impl: str = DEFAULT_KDA_IMPL
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    num_fewshot: int = DEFAULT_NUM_FEWSHOT
    seq_len: int = DEFAULT_SEQ_LEN
    stride: int | None = None  # None: seq_len // 2
    batch_size: int = DEFAULT_BATCH_SIZE
    progress: bool = True

    @property
    def recursive(self) -> bool:
        """Whether this stage evaluates recursive refinement (the stage decides, not --use_recursive)."""
        return self.stage in RECURSIVE_STAGES

    @property
    def effective_stride(self) -> int:
        """New tokens scored per later perplexity window: --stride, else seq_len // 2."""
        return self.stride if self.stride is not None else max(1, self.seq_len // 2)

    def check(self) -> None:
        """UsageError naming the flag of the first value no run can use."""
        from kimi_jax.evaluation.gsm8k import NUM_PROBLEMS

        if self.stage not in STAGES:
            raise UsageError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in _POSITIVE:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be >= 1, got {value}")
        if self.num_fewshot < 0:
            raise UsageError(f"--num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.num_fewshot >= NUM_PROBLEMS:
            raise UsageError(f"--num_fewshot must be < {NUM_PROBLEMS} (the number of GSM8K problems), got "
                             f"{self.num_fewshot}")
        if self.seed < 0:
            raise UsageError(f"--seed must be >= 0, got {self.seed}")
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise UsageError(f"--stride must be in 1..--seq_len ({self.seq_len}), got {self.stride}")
        if self.use_recursive and not self.recursive:
            raise UsageError(f"--use_recursive contradicts --stage {self.stage} (it evaluates the model without "
                             f"recursion); use --stage after_surgery or finetuned_recursive")
        if not self.eval_data:
            raise UsageError("--eval_data must be 'demo' or a path")


__all__ = ["COMMIT_MODES", "DEFAULT_BATCH_SIZE", "DEFAULT_EVAL_DATA", "DEFAULT_KDA_IMPL", "DEFAULT_MAX_NEW_TOKENS",
           "DEFAULT_NUM_CHUNKS", "DEFAULT_NUM_FEWSHOT", "DEFAULT_SEED", "DEFAULT_SEQ_LEN", "DTYPES", "EvalSettings",
           "RECURSIVE_STAGES", "SEED_MODES", "STAGES"]

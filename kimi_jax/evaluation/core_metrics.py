"""The `core` section of a stage's results: perplexity, NLL per token, bits per byte and teacher-forced token
accuracy on the held-out documents (`kimi_jax.evaluation.perplexity`, rolling windows of --seq_len with --stride).

Always the clean causal forward (`kimi_jax.scoring.make_scorer`, the one blocked scorer): for the recursive stages
this is the baseline/commit path of the recursive generator, which phases A/B leave unchanged, so a stage's core
metrics must equal the baseline's on the same weights.
"""

from __future__ import annotations

from kimi_jax.evaluation.inputs import HeldOut
from kimi_jax.evaluation.perplexity import evaluate_perplexity, tokens_fingerprint
from kimi_jax.evaluation.settings import EvalSettings
from kimi_jax.scoring import make_scorer

CLEAN_PATH_NOTE = ("the model's clean causal forward without the sidecar: the commit path of the recursive generator "
                   "(unchanged by phases A/B, so it must equal the baseline's)")
BASELINE_PATH_NOTE = "the model's causal forward"


def core_metrics(loaded, held_out: HeldOut, settings: EvalSettings) -> dict:
    """The `core` section for the stage's model (`kimi_jax.evaluation.stage.LoadedStage`) on `held_out`."""
    if settings.skip_perplexity:
        return {"status": "skipped", "reason": "--skip_perplexity"}
    core = {"status": "ok", "path": "clean" if loaded.use_recursive else "baseline",
            "path_note": CLEAN_PATH_NOTE if loaded.use_recursive else BASELINE_PATH_NOTE}
    core.update(evaluate_perplexity(held_out.docs, make_scorer(loaded.model, loaded.opts), seq_len=settings.seq_len,
                                    stride=settings.effective_stride, batch_size=settings.batch_size,
                                    pad_id=loaded.pad_id, progress=settings.progress))
    core.update(prefix_token_id=held_out.prefix_id, tokens_fingerprint=tokens_fingerprint(held_out.docs),
                truncated=held_out.truncated)
    return core


__all__ = ["core_metrics"]

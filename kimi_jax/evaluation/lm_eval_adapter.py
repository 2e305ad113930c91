"""lm-evaluation-harness (lm-eval 0.4.13) model adapter: `--model kimi_jax`.

    python -m experiments.lm_eval --model kimi_jax \\
        --model_args path=DIR[,use_recursive=True][,recursive_config=PRESET_OR_JSON][,chunk_width=W]
                     [,max_inner_steps=K][,commit_mode=...][,draft_seed=...][,dtype=bfloat16][,batch_size=B]
                     [,max_length=L][,max_gen_toks=N][,length_multiple=M][,diagnostic=True] \\
        --tasks hellaswag,gsm8k [--include_path DIR_OF_TASK_YAMLS] [--output_path out/] [--log_samples]

lm-eval 0.4.13 finds models only in its own registry (no plugin entry points), so the model name "kimi_jax" exists
once this module is imported: `python -m experiments.lm_eval` imports it and then runs lm-eval's own
command line (every lm-eval flag works); in Python, import this module and pass `model="kimi_jax"` or a
:class:`KimiJaxLM` instance to `lm_eval.simple_evaluate`.

`path` (alias `pretrained`) is an HF folder (config.json + safetensors) or a kimi_jax orbax folder with the tokenizer
files; model, sidecar, recursive config and tokenizer come from `kimi_jax.recursive.io.load_for_generation`, with the
same rules as `python -m experiments.generate`: recursion is off unless `use_recursive=True` or a
`recursive_config` that enables it is given; `chunk_width`, `max_inner_steps`, `commit_mode`, `draft_seed` override
single fields; the folder's saved sidecar is used when it fits, else a fresh zero-init one (the surgery).

Request types:

* `loglikelihood` (context, continuation): trailing whitespace of the context moves into the continuation, the pair
  is tokenized as a whole and split at the context's token count (lm-eval's convention), an empty context is the
  BOS token (else EOS); the last `max_length + 1` tokens are kept and the continuation's tokens are scored. Returns
  (sum of the continuation's token log-probabilities, whether greedy decoding would produce every one of them).
* `loglikelihood_rolling` (text,): the document after a BOS prefix is cut into windows of `max_length` inputs; the
  first predicts its first `max_length` tokens, every later window predicts the next `max_length` (or the rest) with
  a full `max_length`-token context; every token is scored exactly once. Returns the sum.
* `generate_until` (context, gen_kwargs): greedy decoding through `kimi_jax.recursive.chunked_generation.generate_recursive`
  (chunked recursive refinement when enabled, plain greedy otherwise) for `max_gen_toks` tokens or until EOS, then
  cut before the first of the `until` strings. The context keeps its last `max_length - max_gen_toks` tokens.
  `do_sample=True` is rejected (this adapter only decodes greedily); other sampling keys are ignored with a warning.

Scores come from the base model's fp32 logits, one block of positions at a time (`kimi_jax.scoring`); the sidecar
acts only in generation (a fine-tuned checkpoint's base weights are the ones loaded from `path`). Requests are
sorted by length and run in batches of exactly `batch_size` rows (the last one topped up with copies) left-padded with an attention mask to a
multiple of `length_multiple` tokens, so XLA compiles once per length bucket, not once per request. After each
`generate_until` call `generation_stats` holds the throughput and, with recursion, the recursive metrics
(avg_refine_steps, commit_rate, avg_chunk_length, ...).

Sizing: scoring never holds the [batch, length, vocab] logits (10.7 GB for the 48B's 163,840-token vocabulary at
batch_size 8 and 2048 tokens), only blocks of about 1,024 tokens (671 MB); `max_length` (default 2048) bounds contexts and
rolling windows. `batch_size` may come from model_args or from lm-eval's `--batch_size` (model_args win; "auto" is
refused: the shapes are static). lm-eval's `--device` is accepted and ignored: JAX places the model on its default
backend (choose it with JAX_PLATFORMS). One process only (no lm-eval data parallelism).
"""

from __future__ import annotations

try:
    import lm_eval.models  # noqa: F401  (registers lm-eval's own lazy model names, so they stay usable next to ours)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import simple_parse_args_string
except ImportError as _e:  # lm-eval is an optional dependency of kimi-jax
    raise ImportError(f"kimi_jax.evaluation.lm_eval_adapter needs lm-evaluation-harness ({_e}); install it with: "
                      f"pip install 'kimi-jax[lmeval]'") from None

import dataclasses
import logging
import os
from typing import Any, Iterable, Sequence

import numpy as np

from kimi_jax.decoding import left_pad
from kimi_jax.errors import KimiJaxError
from kimi_jax.model_folder import special_tokens
from kimi_jax.scoring import make_scorer

MODEL_NAME = "kimi_jax"
DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_LENGTH_MULTIPLE = 64  # the KDA chunk size; padded lengths are rounded up to it
DTYPES = ("float32", "bfloat16")
COMMIT_MODES = ("verified", "learned", "baseline_verified")
SEED_MODES = ("ar", "leftover", "mask")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "num_beams", "seed")

eval_logger = logging.getLogger(__name__)


class AdapterError(KimiJaxError, ValueError):
    """Bad model_args or a request this adapter cannot serve; always one line."""


# ------------------------------------------------------------------------------------------ pure request handling
@dataclasses.dataclass(frozen=True)
class ScoreRow:
    """One forward row: `inputs[t]` predicts `targets[t]`; the last `n_scored` targets are scored."""

    inputs: tuple[int, ...]
    targets: tuple[int, ...]
    n_scored: int

    def __post_init__(self):
        if len(self.inputs) != len(self.targets) or not 0 <= self.n_scored <= len(self.inputs) or not self.inputs:
            raise AdapterError(f"invalid score row: {len(self.inputs)} inputs, {len(self.targets)} targets, "
                               f"{self.n_scored} scored")


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the continuation (a word's leading space belongs to the word)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def continuation_row(context_ids: Sequence[int], continuation_ids: Sequence[int], max_length: int) -> ScoreRow:
    """The row scoring `continuation_ids` after `context_ids`, keeping the last `max_length + 1` tokens."""
    if not context_ids:
        raise AdapterError("loglikelihood: the context has no tokens (an empty context is the BOS/EOS prefix)")
    if len(continuation_ids) > max_length:
        raise AdapterError(f"loglikelihood: the continuation has {len(continuation_ids)} tokens, more than "
                           f"max_length {max_length}")
    window = (list(context_ids) + list(continuation_ids))[-(max_length + 1):]
    return ScoreRow(tuple(window[:-1]), tuple(window[1:]), len(continuation_ids))


def rolling_rows(token_ids: Sequence[int], prefix_id: int, max_length: int) -> list[ScoreRow]:
    """Disjoint windows scoring every token of `token_ids` exactly once, each with as much context as fits.

    The sequence is [prefix] + tokens. Window j predicts tokens[s:e] (e - s <= max_length) from the
    min(e, max_length) inputs ending at position e - 1, so every window after the first has a full context.
    """
    if max_length < 1:
        raise AdapterError(f"max_length must be >= 1, got {max_length}")
    seq = [prefix_id] + list(token_ids)
    n = len(token_ids)
    rows, s = [], 0
    while s < n:
        e = min(s + max_length, n)
        start = max(0, e - max_length)
        rows.append(ScoreRow(tuple(seq[start:e]), tuple(seq[start + 1:e + 1]), e - s))
        s = e
    return rows


def truncate_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


@dataclasses.dataclass(frozen=True)
class GenSettings:
    until: tuple[str, ...]
    max_gen_toks: int
    ignored: tuple[str, ...]


def parse_gen_kwargs(gen_kwargs: Any, default_max_gen_toks: int) -> GenSettings:
    """`until` (a string or a list of strings) and `max_gen_toks` from a request's generation kwargs."""
    if gen_kwargs is None:
        gen_kwargs = {}
    if not isinstance(gen_kwargs, dict):
        raise AdapterError(f"generate_until: expected the generation kwargs as a dict, got "
                           f"{type(gen_kwargs).__name__}")
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise AdapterError(f"generate_until: `until` must be a string or a list of strings, got {until!r}")
    max_gen_toks = kwargs.pop("max_gen_toks", default_max_gen_toks)
    if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, (int, np.integer)) or max_gen_toks < 1:
        raise AdapterError(f"generate_until: max_gen_toks must be a positive integer, got {max_gen_toks!r}")
    do_sample = kwargs.pop("do_sample", False)
    if do_sample not in (False, None, 0):
        raise AdapterError("generate_until: do_sample=True is not supported (the kimi_jax adapter decodes greedily)")
    return GenSettings(tuple(until), int(max_gen_toks), tuple(sorted(kwargs)))


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length, longest first (a memory failure shows up at once), cut into batches."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------------------------- argument parsing
def _as_bool(name: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise AdapterError(f"model_args {name}={value!r}: expected True or False")


def _as_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        hint = (" (the kimi_jax adapter uses one static batch size: give an integer)"
                if name == "batch_size" and isinstance(value, str) and value.startswith("auto") else "")
        raise AdapterError(f"model_args {name}={value!r}: expected an integer >= {minimum}{hint}")
    return int(value)


def _as_choice(name: str, value: Any, choices: Sequence[str]) -> str | None:
    if value is None:
        return None
    if value not in choices:
        raise AdapterError(f"model_args {name}={value!r}: choose one of {', '.join(choices)}")
    return value


# ----------------------------------------------------------------------------------------------------- the model
@register_model(MODEL_NAME)
class KimiJaxLM(LM):
    """lm-eval `LM` over a kimi_jax Kimi-Linear model (+ optional recursive-refinement sidecar)."""

    def __init__(self, path: str | None = None, *, pretrained: str | None = None, use_recursive=None,
                 recursive_config: str | None = None, chunk_width=None, max_inner_steps=None, commit_mode=None,
                 draft_seed=None, dtype: str | None = None, batch_size=1, max_length=DEFAULT_MAX_LENGTH,
                 max_gen_toks=DEFAULT_MAX_GEN_TOKS, length_multiple=DEFAULT_LENGTH_MULTIPLE, diagnostic=False,
                 device: str | None = None, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise AdapterError(f"model_args: unknown argument {sorted(unknown)[0]!r} (known: path, use_recursive, "
                               f"recursive_config, chunk_width, max_inner_steps, commit_mode, draft_seed, dtype, "
                               f"batch_size, max_length, max_gen_toks, length_multiple, diagnostic)")
        if path is not None and pretrained is not None and os.fspath(path) != os.fspath(pretrained):
            raise AdapterError("model_args: give the model folder once (path= or pretrained=, not both)")
        path = path if path is not None else pretrained
        if path is None:
            raise AdapterError("model_args: path=DIR is required (an HF or kimi_jax orbax model folder)")
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise AdapterError(f"model_args path={path}: no such folder")
        use_recursive = _as_bool("use_recursive", use_recursive)
        overrides = {"chunk_width": _as_int("chunk_width", chunk_width, allow_none=True),
                     "max_inner_steps": _as_int("max_inner_steps", max_inner_steps, allow_none=True),
                     "commit_mode": _as_choice("commit_mode", commit_mode, COMMIT_MODES),
                     "seed": _as_choice("draft_seed", draft_seed, SEED_MODES)}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if use_recursive:
            overrides["recursive_enabled"] = True
        elif use_recursive is False or recursive_config is None:  # the default config would enable recursion
            overrides["recursive_enabled"] = False
        if dtype in ("auto", None):
            dtype = None
        else:
            dtype = _as_choice("dtype", dtype, DTYPES)
        settings = self._check_settings(batch_size, max_length, max_gen_toks, length_multiple, diagnostic)

        from kimi_jax import model_folder
        from kimi_jax.recursive import io

        def notice(message: str) -> None:
            eval_logger.info("kimi_jax: %s", message)

        path, _ = model_folder.resolve(path)  # no model folder at all: one line before anything is loaded
        rcfg, _ = io.resolve_generation_config(path, recursive_config, overrides)  # validate before loading
        if not rcfg.recursive_enabled:
            unused = [k for k in ("chunk_width", "max_inner_steps", "commit_mode", "seed") if k in overrides]
            if unused:
                eval_logger.warning("kimi_jax: %s ha%s no effect without recursion (use_recursive=True)",
                                    ", ".join("draft_seed" if k == "seed" else k for k in unused),
                                    "s" if len(unused) == 1 else "ve")
        info: dict = {}
        model, sidecar, rcfg, tok = io.load_for_generation(path, recursive_config=recursive_config,
                                                           overrides=overrides, dtype=dtype, notice=notice,
                                                           info=info)
        self._setup(model, tok, sidecar, rcfg, path=path, load_info=info, **settings)

    @staticmethod
    def _check_settings(batch_size, max_length, max_gen_toks, length_multiple, diagnostic) -> dict:
        return {"batch_size": _as_int("batch_size", batch_size),
                "max_length": _as_int("max_length", max_length, minimum=2),
                "max_gen_toks": _as_int("max_gen_toks", max_gen_toks),
                "length_multiple": _as_int("length_multiple", length_multiple),
                "diagnostic": bool(_as_bool("diagnostic", diagnostic))}

    @classmethod
    def from_loaded(cls, model, tokenizer, sidecar=None, rcfg=None, *, batch_size=1, max_length=DEFAULT_MAX_LENGTH,
                    max_gen_toks=DEFAULT_MAX_GEN_TOKS, length_multiple=DEFAULT_LENGTH_MULTIPLE,
                    diagnostic=False) -> "KimiJaxLM":
        """An adapter over objects already in memory (e.g. a training loop's model); `rcfg` None = no recursion."""
        from kimi_jax.recursive.config import load_preset

        if rcfg is None:
            rcfg = load_preset("baseline")
        if rcfg.recursive_enabled and sidecar is None:
            raise AdapterError("from_loaded: the recursive config enables recursion but no sidecar was given")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise AdapterError(f"from_loaded: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                               f"vocab_size is {model.config.vocab_size}")
        self = cls.__new__(cls)
        LM.__init__(self)
        self._setup(model, tokenizer, sidecar if rcfg.recursive_enabled else None, rcfg, path=None, load_info={},
                    **cls._check_settings(batch_size, max_length, max_gen_toks, length_multiple, diagnostic))
        return self

    def _setup(self, model, tok, sidecar, rcfg, *, path, load_info, batch_size, max_length, max_gen_toks,
               length_multiple, diagnostic) -> None:
        self.model, self.tokenizer, self.sidecar, self.rcfg = model, tok, sidecar, rcfg
        self.scorer = make_scorer(model)
        self.path = path
        self.load_info = dict(load_info)
        self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
        self.length_multiple = length_multiple
        self.diagnostic = diagnostic and rcfg.recursive_enabled
        cfg = model.config
        self.eos_token_ids, self.pad_token_id = special_tokens(cfg, tok)
        prefix = tok.bos_token_id if tok.bos_token_id is not None else (
            self.eos_token_ids[0] if self.eos_token_ids else None)
        if prefix is None:
            raise AdapterError("the tokenizer has neither a BOS nor an EOS token to condition empty contexts on")
        self.prefix_token_id = int(prefix)
        self.generation_stats: dict = {}
        self._warned_keys: set[str] = set()

    # ------------------------------------------------------------------------------------- lm-eval construction
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "KimiJaxLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "KimiJaxLM":
        """model_args win over the CLI's --batch_size/--device (the CLI always sends batch_size, default 1)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**dict(arg_dict), **extra)

    # ------------------------------------------------------------------------------------------- lm-eval hooks
    @property
    def tokenizer_name(self) -> str:
        """Fingerprint of the tokenizer (lm-eval keys its request caches on it when a chat template is applied)."""
        folder = self.path or getattr(self.tokenizer, "folder", "") or ""
        return "kimi_jax" + (os.path.abspath(folder).replace("/", "__") if folder else "")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return self.tokenizer.chat_template or "kimi-k2 builtin chat format (kimi_jax.tokenizer)"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    @property
    def eot_token_id(self) -> int:
        return self.eos_token_ids[0] if self.eos_token_ids else self.prefix_token_id

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def tok_decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------------------------------------ scoring
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) the way lm-eval's causal models split them."""
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise AdapterError(f"loglikelihood: expected (context, continuation) strings, got "
                               f"({type(context).__name__}, {type(continuation).__name__})")
        if context == "":
            return [self.prefix_token_id], self.tok_encode(continuation)
        context, continuation = split_trailing_space(context, continuation)
        if context == "":  # the context was only whitespace: it now leads the continuation
            return [self.prefix_token_id], self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        n_context = len(self.tok_encode(context))
        return whole[:n_context], whole[n_context:]

    def score_rows(self, rows: Sequence[ScoreRow], *, desc: str = "scoring",
                   disable_tqdm: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row: (float64 log-probabilities of the scored targets, bool greedy matches), in the rows' order."""
        from tqdm import tqdm

        vocab = self.model.config.vocab_size
        for row in rows:
            bad = [t for t in row.inputs + row.targets if not 0 <= t < vocab]
            if bad:
                raise AdapterError(f"{desc}: token id {bad[0]} is outside the model's vocabulary ({vocab})")
        out: list = [None] * len(rows)
        B = self.batch_size
        for idx in tqdm(length_batches([len(r.inputs) for r in rows], B), desc=desc, disable=disable_tqdm):
            batch = [rows[i] for i in idx] + [rows[idx[-1]]] * (B - len(idx))  # fixed B: one compile per T bucket
            T = round_up(len(batch[0].inputs), self.length_multiple)
            ids, mask = left_pad([r.inputs for r in batch], T, self.pad_token_id)
            targets, _ = left_pad([r.targets for r in batch], T, 0)
            nll, greedy = self.scorer(ids, targets, mask)
            logp = -nll
            for b, i in enumerate(idx):
                n = rows[i].n_scored
                out[i] = (np.asarray(logp[b, T - n:], np.float64), np.asarray(greedy[b, T - n:], bool))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._args(req, 2, "loglikelihood") for req in requests]
        rows, slots = [], []
        for context, continuation in pairs:
            ctx_ids, cont_ids = self.encode_pair(context, continuation)
            if cont_ids:
                slots.append(len(rows))
                rows.append(continuation_row(ctx_ids, cont_ids, self.max_length))
            else:  # the empty string has probability one
                slots.append(None)
        scored = self.score_rows(rows, desc="loglikelihood", disable_tqdm=disable_tqdm)
        results = []
        for (context, continuation), slot in zip(pairs, slots):
            if slot is None:
                res = (0.0, True)
            else:
                logp, greedy = scored[slot]
                res = (float(np.sum(logp)), bool(np.all(greedy)))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), res)
            results.append(res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [self._args(req, 1, "loglikelihood_rolling")[0] for req in requests]
        rows, owners = [], []
        for d, text in enumerate(texts):
            if not isinstance(text, str):
                raise AdapterError(f"loglikelihood_rolling: expected a string, got {type(text).__name__}")
            windows = rolling_rows(self.tok_encode(text), self.prefix_token_id, self.max_length)
            rows.extend(windows)
            owners.extend([d] * len(windows))
        scored = self.score_rows(rows, desc="loglikelihood_rolling", disable_tqdm=disable_tqdm)
        totals = [0.0] * len(texts)
        for d, (logp, _) in zip(owners, scored):
            totals[d] += float(np.sum(logp))
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # ----------------------------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        from kimi_jax.recursive.chunked_generation import generate_recursive
        from kimi_jax.recursive.metrics import recursive_metrics

        items = []
        for req in requests:
            context, gen_kwargs = self._args(req, 2, "generate_until")
            if not isinstance(context, str):
                raise AdapterError(f"generate_until: expected a string context, got {type(context).__name__}")
            settings = parse_gen_kwargs(gen_kwargs, self.max_gen_toks)
            fresh = [k for k in settings.ignored if k not in self._warned_keys]
            if fresh:
                self._warned_keys.update(fresh)
                eval_logger.warning("kimi_jax: ignoring generation kwargs %s (greedy decoding)", ", ".join(fresh))
            if settings.max_gen_toks >= self.max_length:
                raise AdapterError(f"generate_until: max_gen_toks {settings.max_gen_toks} leaves no room for the "
                                   f"context within max_length {self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - settings.max_gen_toks):] or [self.prefix_token_id]
            items.append((context, gen_kwargs, settings, ids))

        results: list = [None] * len(items)
        traces, generated, seconds = [], 0, 0.0
        B = self.batch_size
        groups: dict[int, list[int]] = {}
        for i, (_, _, settings, _) in enumerate(items):  # max_new_tokens is static in the generator
            groups.setdefault(settings.max_gen_toks, []).append(i)
        batches = [(n, [members[j] for j in batch]) for n, members in groups.items()
                   for batch in length_batches([len(items[i][3]) for i in members], B)]
        for n_new, idx in tqdm(batches, desc="generate_until", disable=disable_tqdm):
            rows = [items[i][3] for i in idx] + [items[idx[-1]][3]] * (B - len(idx))
            ids, mask = left_pad(rows, round_up(len(rows[0]), self.length_multiple), self.pad_token_id)
            res = generate_recursive(self.model, self.sidecar, self.rcfg, ids, n_new, attention_mask=mask,
                                     eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id,
                                     diagnostic=self.diagnostic)
            seconds += res.seconds
            for b, i in enumerate(idx):
                n = int(res.num_tokens[b])
                new = [int(t) for t in np.asarray(res.tokens[b, :n])]
                generated += n
                if new and new[-1] in self.eos_token_ids:
                    new = new[:-1]
                context, gen_kwargs, settings, _ = items[i]
                text = truncate_at_stop(self.tok_decode(new), settings.until)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                results[i] = text
                traces.extend(res.traces[b])
        stats = {"requests": len(items), "generated_tokens": generated, "seconds": seconds,
                 "tokens_per_sec": generated / seconds if seconds > 0 else None,
                 "use_recursive": bool(self.rcfg.recursive_enabled)}
        if self.rcfg.recursive_enabled and traces:
            stats.update(recursive_metrics(traces, self.rcfg.chunk_width, self.rcfg.max_inner_steps))
            eval_logger.info("kimi_jax recursive generation: avg_refine_steps %s, commit_rate %s, avg_chunk_length %s",
                             stats["avg_refine_steps"], stats["commit_rate"], stats["avg_chunk_length"])
        self.generation_stats = stats
        return results

    # ----------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _args(req, n: int, kind: str) -> tuple:
        args = req.args if hasattr(req, "args") else req
        if not isinstance(args, tuple) or len(args) < n:
            raise AdapterError(f"{kind}: expected a request with {n} argument{'s' if n > 1 else ''}, got {args!r}")
        return args[:n]


__all__ = ["AdapterError", "DEFAULT_LENGTH_MULTIPLE", "DEFAULT_MAX_GEN_TOKS", "DEFAULT_MAX_LENGTH", "GenSettings",
           "KimiJaxLM", "MODEL_NAME", "ScoreRow", "continuation_row", "length_batches",
           "parse_gen_kwargs", "rolling_rows", "round_up", "split_trailing_space", "truncate_at_stop"]

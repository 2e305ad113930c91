"""Flags shared by the experiment CLIs (one definition each, so every CLI spells and documents them alike)."""

from __future__ import annotations

# kimi_jax.ops.kda.KDA_IMPLS, repeated so that building a parser does not import jax (a test checks they agree)
KDA_IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")


def add_kda_impl_flag(parser) -> None:
    parser.add_argument("--kda_impl", choices=KDA_IMPLS, default="auto",
                        help="KDA's chunked core: auto (the Pallas kernel of the platform on TPU / GPU, the XLA scan "
                             "on CPU), xla, pallas_tpu or pallas_gpu (Pallas interpret mode on CPU: slow, for checks)"
                             " (default auto)")

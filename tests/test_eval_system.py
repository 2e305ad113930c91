"""kimi_jax.evaluation.system, and its scalars through kimi_jax.tb_events."""

from __future__ import annotations

import re

from kimi_jax.evaluation.system import code_version, hardware, peak_memory, timed, utc_timestamp
from kimi_jax.tb_events import read_scalars, write_scalars


def test_code_version_and_hardware():
    v = code_version()
    from importlib.metadata import version

    assert v["package_version"] == version("kimi-jax")  # the installed package's, not a copy of it
    assert v["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", v["git_commit"])
    hw = hardware()
    assert hw["backend"] == "cpu" and hw["device_count"] >= 1 and hw["process_count"] == 1 and hw["host"]
    assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00$", utc_timestamp())


def test_peak_memory_on_cpu_is_the_host_rss():
    m = peak_memory()
    assert m["source"] == "host_peak_rss" and m["peak_bytes"] > 50 * 2**20  # python + jax are far above 50 MiB


def test_timed_waits_for_the_result():
    import jax.numpy as jnp

    out, seconds = timed(lambda: jnp.ones((4, 4)) @ jnp.ones((4, 4)))
    assert float(out[0, 0]) == 4.0 and seconds >= 0


def test_scalars_round_trip(tmp_path):
    logdir = str(tmp_path / "evaluation" / "baseline")
    write_scalars(logdir, {"evaluation/baseline/perplexity": 12.5, "evaluation/baseline/none": None,
                           "evaluation/baseline/nan": float("nan")}, step=7)
    write_scalars(logdir, {"evaluation/baseline/perplexity": 11.0}, step=9)
    assert read_scalars(logdir) == {"evaluation/baseline/perplexity": [(7, 12.5), (9, 11.0)]}

"""The recursive train step per phase: what trains and what stays bit-identical (RECURSIVE_DESIGN.md §3.9)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kimi_jax import sharding
from kimi_jax.config import tiny
from kimi_jax.model import KimiLinearForCausalLM, RunOptions
from kimi_jax.recursive.config import load_preset
from kimi_jax.recursive.sidecar import build_sidecar
from kimi_jax.training.recursive import (build_recursive_trainer, make_recursive_optimizer, param_key,
                                         recursive_lr, trainable_group, unfrozen_rows)

# Layers: 0 KDA + dense FFN, 1 MLA, 2 KDA, 3 KDA, 4 MLA, 5 KDA, 6 KDA (MoE from layer 1). The tests read the
# scanned rows of each layer from the layout plan.
CFG = tiny(num_hidden_layers=7, mla_layers=(1, 4), first_k_dense=1)


def flat(tree) -> dict:
    return {param_key(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def run_phase(phase: str, steps: int = 2, mesh_spec: str = "fsdp=1", batch_size: int = 2, optimizer=None,
              opts: RunOptions = RunOptions(), **changes):
    rcfg = load_preset(f"phase_{phase}").replace(chunk_width=64, max_inner_steps=2, d_state=32, refine_rank=16,
                                                 gate_hidden=32, lr_sidecar=1e-2, lr_heads=1e-2, lora_lr=1e-2,
                                                 lr_unfrozen=1e-2, **changes)
    model = KimiLinearForCausalLM(CFG, rngs=nnx.Rngs(0))
    sidecar = build_sidecar(CFG, rcfg)
    mesh = (sharding.make_mesh("fsdp=1", jax.devices()[:1]) if mesh_spec == "fsdp=1"
            else sharding.make_mesh(mesh_spec))
    optimizer = make_recursive_optimizer(rcfg) if optimizer is None else optimizer
    trainer, base, trainable, opt = build_recursive_trainer(model, sidecar, rcfg, optimizer, mesh, batch_size,
                                                            opts=opts)
    base0, side0 = flat(base), flat(trainable["sidecar"])
    ids = np.random.default_rng(1).integers(3, CFG.vocab_size, (batch_size, 140)).astype(np.int32)
    batch = {"input_ids": ids, "weights": np.ones(ids.shape, np.float32)}
    history = []
    for i in range(steps):
        trainable, opt, metrics = trainer.step_fn(trainable, opt, base, batch, jax.random.PRNGKey(i),
                                                  jnp.float32(i / steps))
        history.append({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
    model1, sidecar1 = trainer.materialize(trainable, base)
    return rcfg, trainer, base0, side0, flat(nnx.state(model1)), flat(nnx.state(sidecar1)), history


def changed(before: dict, after: dict) -> set:
    return {k for k in before if not np.array_equal(before[k], after[k])}


@pytest.mark.slow
def test_phase_a_trains_the_sidecar_only():
    _, _, base0, side0, base1, side1, history = run_phase("a")
    assert not changed(base0, base1)  # the base is bit-identical
    assert "cells.b" in changed(side0, side1)
    assert all(np.isfinite(v) for step in history for v in step.values())
    assert not any(k.startswith("lora") for k in side0)


@pytest.mark.slow
def test_phase_b_trains_lora_and_sidecar_only():
    rcfg, _, base0, side0, base1, side1, _ = run_phase("b")
    assert not changed(base0, base1)
    lora = {k for k in changed(side0, side1) if k.startswith("lora")}
    assert any("_b" in k for k in lora), "LoRA b matrices receive no update"
    # "top_third" of 7 layers = layers 4, 5, 6: one MLA (4) and two KDA (5, 6) adapters.
    assert side1["lora.kda.qkv_b"].shape[0] == 2 and side1["lora.mla.q_b"].shape[0] == 1


@pytest.mark.slow
def test_phase_c_trains_exactly_the_chosen_rows():
    rcfg, trainer, base0, side0, base1, side1, history = run_phase("c", unfreeze_layers=[2, 5])
    rows = trainer.rows
    assert rows and all(m.any() for m in rows.values())
    moved = changed(base0, base1)
    assert moved, "no base parameter trained in phase c"
    for key in moved:
        plain = key
        assert plain in rows, f"{plain} trained but is not an unfrozen block leaf"
        assert not plain.endswith(("ffn.router", "ffn.correction_bias")), "the router must stay frozen"
        frozen_rows = ~rows[plain]
        np.testing.assert_array_equal(base0[key][frozen_rows], base1[key][frozen_rows])
    assert history[-1]["l2sp"] > 0 and np.isfinite(history[-1]["l2sp"])
    assert changed(side0, side1)


def test_unfrozen_rows_follow_the_layer_plan():
    rcfg = load_preset("phase_c").replace(unfreeze_layers=[2, 5])
    model = KimiLinearForCausalLM(CFG, rngs=nnx.Rngs(0))
    rows = unfrozen_rows(CFG, rcfg, nnx.state(model))
    from kimi_jax.layout import plan_segments

    segments = plan_segments(CFG.layer_kinds)
    covered = set()
    for key, mask in rows.items():
        names = key.split(".")
        seg, position = segments[int(names[1])], int(names[3])
        covered |= {seg.layer(position, r) for r in np.flatnonzero(mask)}
    assert covered == {2, 5}


def test_optimizer_groups():
    path = lambda *names: tuple(jax.tree_util.DictKey(n) for n in names)
    assert trainable_group(path("sidecar", "halt_head", "w1")) == "heads"
    assert trainable_group(path("sidecar", "lora", "kda", "qkv_b")) == "lora"
    assert trainable_group(path("sidecar", "cells", "b")) == "sidecar"
    assert trainable_group(path("base", "segments.1.blocks.0.mixer.q_proj")) == "base"


def test_phase_b_needs_lora_in_the_sidecar():
    rcfg_a = load_preset("phase_a").replace(chunk_width=64, d_state=32, refine_rank=8, gate_hidden=16)
    rcfg_b = rcfg_a.replace(phase="b")
    model = KimiLinearForCausalLM(CFG, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh("fsdp=1", jax.devices()[:1])
    with pytest.raises(ValueError, match="no LoRA"):
        build_recursive_trainer(model, build_sidecar(CFG, rcfg_a), rcfg_b, make_recursive_optimizer(rcfg_b), mesh, 2)


@pytest.mark.slow
def test_phase_c_on_an_expert_parallel_mesh_gives_the_single_device_gradients():
    """Phase c (LoRA + sidecar, as phase b trains them, and unfrozen base rows too) on data=2,expert=4 with plain SGD
    at lr 1, so the change of every parameter is its gradient: metrics equal one device's, and every gradient entry
    is within 1e-5 of the largest gradient entry (AdamW's first step would amplify summation-order noise in
    near-zero gradients: phase c's unfrozen rows after one AdamW step at lr 1e-2 differ from one device by up to
    2.7e-4 here, as they do on data=8 without expert parallelism, 1.8e-4). Phases a and b train subsets of phase c's
    trainable tree (the sidecar; the sidecar and LoRA), so this covers their gradients on the expert mesh too."""
    import optax

    phase = "c"

    one = run_phase(phase, steps=1, batch_size=8, optimizer=optax.sgd(1.0))
    ep = run_phase(phase, steps=1, mesh_spec="data=2,expert=4", batch_size=8, optimizer=optax.sgd(1.0))
    for key in ("total", "grad_norm"):
        assert abs(ep[6][0][key] - one[6][0][key]) <= 1e-5 * max(1.0, abs(one[6][0][key])), key
    grads_one = {**{k: one[4][k] - one[2][k] for k in one[2]}, **{"sidecar." + k: one[5][k] - one[3][k] for k in one[3]}}
    grads_ep = {**{k: ep[4][k] - ep[2][k] for k in ep[2]}, **{"sidecar." + k: ep[5][k] - ep[3][k] for k in ep[3]}}
    scale = max(float(np.abs(g).max()) for g in grads_one.values())
    trained = {k for k, g in grads_one.items() if np.abs(g).max() > 0}
    assert any(k.startswith("sidecar.lora") for k in trained)
    assert (phase == "c") == any(not k.startswith("sidecar.") for k in trained)
    worst = max(float(np.abs(grads_ep[k] - grads_one[k]).max()) for k in grads_one)
    assert worst <= 1e-5 * scale, (worst, scale)


@pytest.mark.slow
def test_phase_a_step_on_the_pallas_kda_kernel():
    """Phase a with `kda_impl="pallas_tpu"` (interpret mode; the windows' states come from the kernel's per-chunk
    states) on data=4,tensor=2 (the kernel per shard): metrics and every parameter after the step equal one device's
    XLA path."""
    one = run_phase("a", steps=1, batch_size=8)
    kernel = run_phase("a", steps=1, mesh_spec="data=4,tensor=2", batch_size=8, opts=RunOptions(kda_impl="pallas_tpu"))
    for key in ("total", "grad_norm"):
        assert abs(kernel[6][0][key] - one[6][0][key]) <= 1e-5 * max(1.0, abs(one[6][0][key])), key
    for before, after in ((one[4], kernel[4]), (one[5], kernel[5])):
        worst = max(float(np.abs(after[k] - before[k]).max()) for k in before)
        assert worst <= 1e-5, worst


def test_logged_recursive_learning_rate_is_the_sidecar_groups():
    rcfg = load_preset("phase_a").replace(weight_decay=0.0)
    tx = make_recursive_optimizer(rcfg, warmup_steps=2, total_steps=9, clip_norm=1e9, lr_scale=3.0)
    params = {"sidecar": {"cells": {"b": jnp.zeros((2,))}, "halt_head": {"w1": jnp.zeros((2,))}}}
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for count in range(9):
        updates, state = tx.update(grads, state, params)
        got = -float(updates["sidecar"]["cells"]["b"][0]) * (1 + 1e-8)
        heads = -float(updates["sidecar"]["halt_head"]["w1"][0]) * (1 + 1e-8)
        assert got == pytest.approx(recursive_lr(3.0 * rcfg.lr_sidecar, 2, 9, count), rel=1e-5, abs=1e-9)
        assert heads == pytest.approx(recursive_lr(3.0 * rcfg.lr_heads, 2, 9, count), rel=1e-5, abs=1e-9)

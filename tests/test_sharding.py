"""Sharding rules and multi-device equivalence on 8 fake CPU devices (tests/conftest.py asks XLA for 8)."""

import chex
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import kimi_jax
import kimi_jax.config
from kimi_jax import sharding
from kimi_jax.model import KimiLinearForCausalLM
from kimi_jax.training.vanilla import build_trainer, make_optimizer, shard_batch
from conftest import flat_params
from sharding_cases import BATCH, LR, make_batch, make_config

# The last four split the experts over the `expert` axis (expert parallelism: tokens travel by all-to-all).
MESHES = ["data=8", "fsdp=8", "fsdp=4,tensor=2", "data=2,expert=2,tensor=2", "expert=8", "data=2,expert=4",
          "fsdp=2,expert=4"]
# The forward and the step run on the meshes that combine axes (each axis appears in one; every compile costs ~20 s
# on 2 cores); the single-axis meshes get the sharding check alone.
NUMERIC_MESHES = ["fsdp=4,tensor=2", "data=2,expert=2,tensor=2", "data=2,expert=4", "fsdp=2,expert=4"]

# Expected specs of a few parameters per mesh (leading None: the stacked layer axis of a scanned segment).
EXPECTED = {
    "data=8": {"qkv": P(None, None, None, None, None), "w_gate": P(None, None, None, None), "embed": P(None, None)},
    "fsdp=8": {"qkv": P(None, "fsdp", None, None, None), "w_gate": P(None, None, "fsdp", None),
               "embed": P(None, "fsdp")},
    "fsdp=4,tensor=2": {"qkv": P(None, "fsdp", None, "tensor", None), "w_gate": P(None, None, "fsdp", "tensor"),
                        "embed": P("tensor", "fsdp")},
    "data=2,expert=2,tensor=2": {"qkv": P(None, None, None, "tensor", None),
                                 "w_gate": P(None, "expert", None, "tensor"), "embed": P("tensor", None)},
    "expert=8": {"qkv": P(None, None, None, None, None), "w_gate": P(None, "expert", None, None),
                 "embed": P(None, None)},
    "data=2,expert=4": {"qkv": P(None, None, None, None, None), "w_gate": P(None, "expert", None, None),
                        "embed": P(None, None)},
    "fsdp=2,expert=4": {"qkv": P(None, "fsdp", None, None, None), "w_gate": P(None, "expert", "fsdp", None),
                        "embed": P(None, "fsdp")},
}


def by_name(flat: dict) -> dict:
    """{path tuple: array} -> {"a/0/b": array} (a pytree chex can compare)."""
    return {"/".join(map(str, k)): v for k, v in flat.items()}


def param_specs(params) -> dict:
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(params)}
    pick = {"qkv": "segments.0.blocks.0.mixer.qkv_proj", "w_gate": "segments.1.blocks.0.ffn.w_gate",
            "embed": "embed_tokens"}
    return {name: flat[key][...].sharding.spec for name, key in pick.items()}


@pytest.fixture(scope="module")
def reference():
    """Single-device forward logits, and the loss/params after one AdamW step."""
    assert jax.device_count() == 8, "conftest.py should give this process 8 CPU devices"
    model = KimiLinearForCausalLM(make_config(), rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh("fsdp=1", jax.devices()[:1])
    trainer, params, opt_state = build_trainer(model, make_optimizer(LR), mesh, BATCH)
    batch = make_batch()
    logits = np.asarray(kimi_jax.forward(nnx.merge(trainer.graphdef, params), batch["input_ids"]))
    params, opt_state, metrics = trainer.step_fn(params, opt_state, shard_batch(batch, trainer.batch_sharding))
    stepped = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}
    return logits, {k: float(v) for k, v in metrics.items()}, stepped


@pytest.mark.parametrize("mesh_spec", [m for m in MESHES if m not in NUMERIC_MESHES])
def test_parameter_shardings_of_single_axis_meshes(mesh_spec):
    model = KimiLinearForCausalLM(make_config(), rngs=nnx.Rngs(0))
    trainer, params, opt_state = build_trainer(model, make_optimizer(LR), sharding.make_mesh(mesh_spec), BATCH)
    assert param_specs(params) == EXPECTED[mesh_spec]
    mu = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
          if "qkv_proj" in jax.tree_util.keystr(path) and "mu" in jax.tree_util.keystr(path)]
    assert mu and all(m.sharding.spec == EXPECTED[mesh_spec]["qkv"] for m in mu)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", NUMERIC_MESHES)
def test_forward_step_and_shardings_match_single_device(reference, mesh_spec):
    ref_logits, ref_metrics, ref_params = reference
    model = KimiLinearForCausalLM(make_config(), rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh(mesh_spec)
    trainer, params, opt_state = build_trainer(model, make_optimizer(LR), mesh, BATCH)
    assert param_specs(params) == EXPECTED[mesh_spec]
    batch = make_batch()
    logits = np.asarray(kimi_jax.forward(nnx.merge(trainer.graphdef, params), batch["input_ids"]))
    forward_diff = float(np.abs(logits - ref_logits).max())
    chex.assert_trees_all_close(logits, ref_logits, rtol=0, atol=1e-5)
    params, opt_state, metrics = trainer.step_fn(params, opt_state, shard_batch(batch, trainer.batch_sharding))
    # Shardings survive the step, for the parameters and for Adam's moments alike.
    assert param_specs(params) == EXPECTED[mesh_spec]
    mu = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
          if "qkv_proj" in jax.tree_util.keystr(path) and "mu" in jax.tree_util.keystr(path)]
    assert mu and all(m.sharding.spec == EXPECTED[mesh_spec]["qkv"] for m in mu)
    stepped = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}
    step_diff = max(float(np.abs(v - ref_params[k]).max()) for k, v in stepped.items())
    print(f"\n  {mesh_spec}: forward max|diff| {forward_diff:.2e}, loss {float(metrics['loss']):.6f} vs "
          f"{ref_metrics['loss']:.6f}, params after one AdamW step max|diff| {step_diff:.2e}")
    assert abs(float(metrics["loss"]) - ref_metrics["loss"]) <= 1e-5
    assert abs(float(metrics["grad_norm"]) - ref_metrics["grad_norm"]) <= 1e-5 * max(1.0, ref_metrics["grad_norm"])
    chex.assert_trees_all_close(by_name(stepped), by_name(ref_params), rtol=0, atol=1e-5)


def test_resolver_replicates_dimensions_that_do_not_divide():
    mesh = sharding.make_mesh("tensor=8")
    resolver = sharding.Resolver(mesh)
    # 4 heads cannot be split 8 ways: replicated, and the drop is recorded, never mis-sharded.
    assert resolver.spec(("embed", "heads", None), (64, 4, 24), "q_proj") == P(None, None, None)
    assert resolver.dropped and "not divisible" in sharding.explain(resolver)[0]
    assert resolver.spec(("vocab", "embed"), (512, 64), "embed_tokens") == P("tensor", None)


def test_resolver_falls_back_and_never_reuses_an_axis():
    mesh = sharding.make_mesh("data=2,fsdp=2,expert=2")
    resolver = sharding.Resolver(mesh)
    assert resolver.spec(("batch", None), (8, 1)) == P(("data", "fsdp", "expert"), None)
    assert resolver.spec(("batch", None), (4, 1)) == P(("data", "fsdp"), None)  # 8-way does not divide 4
    # Two dimensions asking for fsdp: the second one gets nothing rather than a duplicate axis.
    rules = dict(sharding.DEFAULT_RULES, mlp=(("fsdp",),))
    assert sharding.Resolver(mesh, rules).spec(("embed", "mlp"), (64, 128)) == P("fsdp", None)


@pytest.mark.parametrize("spec, message", [
    ("data=3", "has 3 devices, but 8 are present"), ("model=8", "unknown axis"), ("data=x", "integer"), ("data=-1,fsdp=-1", "only one"),
    ("data=0", ">= 1"), ("data=3,fsdp=-1", "not divisible"),
])
def test_bad_mesh_specs(spec, message):
    with pytest.raises(sharding.ShardingError, match=message):
        sharding.parse_mesh_spec(spec, 8)


def test_mesh_spec_fill_axis():
    assert sharding.parse_mesh_spec("data=2,fsdp=-1", 8) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    assert sharding.parse_mesh_spec(None, 8)["fsdp"] == 8


def test_every_parameter_has_logical_axes():
    model = nnx.eval_shape(lambda: KimiLinearForCausalLM(make_config().replace(q_lora_rank=12),
                                                         rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = sharding.param_logical_axes(path, len(var.shape))
        assert len(axes) == len(var.shape)


def _abstract_model(cfg):
    return nnx.eval_shape(lambda: KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jax.numpy.bfloat16))


@pytest.mark.parametrize("config", ["tiny", "48b"])
def test_real_model_and_optimizer_state_shard_without_error(config):
    """Every leaf of the model's state and of its AdamW state has a rule (no error), and the moments follow."""
    cfg = make_config() if config == "tiny" else kimi_jax.config.kimi_linear_48b_a3b()
    state = nnx.state(_abstract_model(cfg))
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    param_sh = sharding.state_shardings(state, mesh)
    opt_sh = sharding.state_shardings(jax.eval_shape(make_optimizer(LR).init, state), mesh)
    qkv = dict(nnx.to_flat_state(param_sh))[("segments", 0, "blocks", 0, "mixer", "qkv_proj")]
    assert qkv.spec == P(None, "fsdp", None, "tensor", None)
    mu = [(jax.tree_util.keystr(p), s) for p, s in jax.tree_util.tree_leaves_with_path(opt_sh)
          if "qkv_proj" in jax.tree_util.keystr(p)]
    assert mu and all(s.spec == qkv.spec for _, s in mu)
    counts = [s for p, s in jax.tree_util.tree_leaves_with_path(opt_sh) if "count" in jax.tree_util.keystr(p)]
    assert counts and all(s.spec == P() for s in counts)


def test_a_parameter_without_logical_axes_raises_with_its_name():
    state = {"embed_tokens": jax.ShapeDtypeStruct((512, 64), np.float32),
             "brand_new_proj": jax.ShapeDtypeStruct((64, 64), np.float32)}
    mesh = sharding.make_mesh("fsdp=8")
    with pytest.raises(sharding.ShardingError, match=r"brand_new_proj \(2 dims\) has no logical axes"):
        sharding.state_shardings(state, mesh)
    # Its optimizer moments too (the path is nested under the optimizer's keys).
    with pytest.raises(sharding.ShardingError, match=r"mu\.brand_new_proj"):
        sharding.state_shardings(jax.eval_shape(make_optimizer(LR).init, state), mesh)
    # A rule whose dims do not fit is no rule either, and the message says so.
    with pytest.raises(sharding.ShardingError, match="the rule for embed_tokens gives 2 dims"):
        sharding.state_shardings({"embed_tokens": jax.ShapeDtypeStruct((2, 2, 512, 64), np.float32)}, mesh)


def test_explicit_replication_of_the_sidecar():
    """The recursive sidecar is replicated on purpose: its prefix is named, in the state and the optimizer alike;
    the base keeps its rules, and nothing else is let through."""
    from kimi_jax.recursive.config import load_preset
    from kimi_jax.recursive.sidecar import build_sidecar

    cfg = make_config()
    rcfg = load_preset("phase_b").replace(chunk_width=64, d_state=32, refine_rank=8, gate_hidden=16)
    side = nnx.state(nnx.eval_shape(lambda: build_sidecar(cfg, rcfg)))
    tree = {"sidecar": side, "base": nnx.state(_abstract_model(cfg))}
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    with pytest.raises(sharding.ShardingError, match=r"sidecar\.cells\.a_h"):
        sharding.state_shardings(tree, mesh)
    for t in (tree, jax.eval_shape(make_optimizer(LR).init, tree)):
        shardings = sharding.state_shardings(t, mesh, replicated=("sidecar",))
        specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
        side_specs = [s for k, s in specs.items() if "'sidecar'" in k]
        assert len(side_specs) >= len(jax.tree.leaves(side)) and all(s == P() for s in side_specs)
        assert any(s == P(None, "fsdp", None, "tensor", None) for k, s in specs.items() if "qkv_proj" in k)
    # A prefix is a whole path component, not any string start.
    with pytest.raises(sharding.ShardingError, match="sidecar"):
        sharding.state_shardings(tree, mesh, replicated=("side",))


def test_restore_directly_into_a_mesh(tmp_path):
    from kimi_jax import orbax_model

    model = KimiLinearForCausalLM(make_config(), rngs=nnx.Rngs(1))
    orbax_model.save_model(str(tmp_path / "ckpt"), model)
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    restored = orbax_model.load_model(str(tmp_path / "ckpt"), mesh=mesh)
    assert param_specs(nnx.state(restored, nnx.Param)) == EXPECTED["fsdp=4,tensor=2"]
    chex.assert_trees_all_equal(by_name(flat_params(restored)), by_name(flat_params(model)))


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", ["fsdp=2,expert=4", "data=2,fsdp=4", "data=2,expert=4"])
def test_no_involuntary_rematerialization(mesh_spec, capfd):
    """GSPMD's "Involuntary full rematerialization" (a tensor replicated whole to reach a sharding) must not occur
    on meshes that split the batch over more axes than the weights; it did for the embedding's cotangents."""
    model = nnx.eval_shape(lambda: KimiLinearForCausalLM(make_config(), rngs=nnx.Rngs(0)))
    trainer, params, opt_state = build_trainer(model, make_optimizer(LR), sharding.make_mesh(mesh_spec), BATCH)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
             for k, v in make_batch().items()}
    capfd.readouterr()
    # The partitioner only speaks when it runs: bypass the persistent compilation cache for this compile.
    from jax._src import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        trainer.step_fn.lower(params, opt_state, batch).compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()
    err = capfd.readouterr().err
    assert "Involuntary full rematerialization" not in err, err[-2000:]


@pytest.fixture(scope="module")
def reference_gradients():
    """Single-device gradients: the parameter change of one plain SGD step at learning rate 1."""
    import optax

    model = KimiLinearForCausalLM(make_config(), rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh("fsdp=1", jax.devices()[:1])
    trainer, params, opt_state = build_trainer(model, optax.sgd(1.0), mesh, BATCH)
    before = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}
    params, _, _ = trainer.step_fn(params, opt_state, shard_batch(make_batch(), trainer.batch_sharding))
    return {k: before[k] - np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", ["expert=8", "data=2,expert=4", "fsdp=2,expert=4"])
def test_every_gradient_matches_single_device_with_experts_split(reference_gradients, mesh_spec):
    """Every parameter's gradient on the expert meshes (routed rows by all-to-all) equals one device's: the largest
    difference is <= 1e-5 of the largest gradient entry of the model."""
    import optax

    model = KimiLinearForCausalLM(make_config(), rngs=nnx.Rngs(0))
    trainer, params, opt_state = build_trainer(model, optax.sgd(1.0), sharding.make_mesh(mesh_spec), BATCH)
    before = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}
    params, _, _ = trainer.step_fn(params, opt_state, shard_batch(make_batch(), trainer.batch_sharding))
    grads = {k: before[k] - np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}
    assert grads.keys() == reference_gradients.keys()
    scale = max(float(np.abs(g).max()) for g in reference_gradients.values())
    diffs = {k: float(np.abs(grads[k] - g).max()) for k, g in reference_gradients.items()}
    worst = max(diffs, key=diffs.get)
    print(f"\n  {mesh_spec}: largest gradient difference {diffs[worst]:.2e} ({worst}), largest gradient {scale:.2e}")
    assert any("w_gate" in k and np.abs(g).max() > 0 for k, g in reference_gradients.items())
    chex.assert_trees_all_close(by_name(grads), by_name(reference_gradients), rtol=0, atol=1e-5 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec, kda_impl", [("fsdp=2,tensor=4", "pallas_tpu"), ("data=4,tensor=2", "pallas_gpu")])
def test_kda_kernels_inside_the_sharded_model(reference, reference_gradients, mesh_spec, kda_impl):
    """The Pallas KDA kernels (interpret mode here) run per shard inside `shard_map` (batch over data/fsdp, heads over
    tensor): logits and every gradient equal one device's XLA path."""
    import optax

    from kimi_jax.model import RunOptions

    model = KimiLinearForCausalLM(make_config(), rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh(mesh_spec)
    opts = RunOptions(kda_impl=kda_impl)
    trainer, params, opt_state = build_trainer(model, optax.sgd(1.0), mesh, BATCH, opts=opts)
    acts = jax.sharding.NamedSharding(mesh, P(trainer.batch_sharding.spec[0], None, None))
    logits = np.asarray(kimi_jax.forward(nnx.merge(trainer.graphdef, params), make_batch()["input_ids"],
                                         opts=RunOptions(kda_impl=kda_impl, activation_sharding=acts)))
    forward_diff = float(np.abs(logits - reference[0]).max())
    before = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}
    params, _, _ = trainer.step_fn(params, opt_state, shard_batch(make_batch(), trainer.batch_sharding))
    grads = {k: before[k] - np.asarray(v[...]) for k, v in nnx.to_flat_state(params)}
    scale = max(float(np.abs(g).max()) for g in reference_gradients.values())
    worst = max(float(np.abs(grads[k] - g).max()) for k, g in reference_gradients.items())
    print(f"\n  {mesh_spec} {kda_impl}: logits max|diff| {forward_diff:.1e}, largest gradient difference {worst:.1e} "
          f"(largest gradient {scale:.2e})")
    chex.assert_trees_all_close(logits, reference[0], rtol=0, atol=1e-5)
    chex.assert_trees_all_close(by_name(grads), by_name(reference_gradients), rtol=0, atol=1e-5 * scale)

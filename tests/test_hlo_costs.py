"""kimi_jax.hlo_costs: collective bytes and matmul / kernel FLOPs per device from HLO text, loop bodies times their
trip counts."""

import re

import numpy as np

import pytest

from kimi_jax import hlo_costs as hc

LOOP = """\
HloModule loop, is_scheduled=true, num_partitions=8

%cond (p: (s32[], f32[16])) -> pred[] {
  %p = (s32[], f32[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %limit = s32[] constant({limit})
  ROOT %lt = pred[] compare(%i, %limit), direction={direction}
}

%body (p.1: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p.1 = (s32[], f32[16]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %x = f32[16]{0} get-tuple-element(%p.1), index=1
  %step = s32[] constant({step})
  %next = s32[] add(%i.1, %step)
  %shard = f32[2]{0} slice(%x), slice={[0:2]}
  %ag = f32[16]{0} all-gather(%shard), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %t = (s32[], f32[16]{0}) tuple(%next, %ag)
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %a = f32[16]{0} parameter(0)
  %start = s32[] constant({start})
  %start.copy = s32[] copy(%start)
  %init = (s32[], f32[16]{0}) tuple(%start.copy, %a)
  %w = (s32[], f32[16]{0}) while(%init), condition=%cond, body=%body, metadata={op_name="f/while body=%x"}{config}
  ROOT %out = f32[16]{0} get-tuple-element(%w), index=1
}
"""
AG_BODY = 7 * 2 * 4  # all-gather of an f32[2] shard over 8 devices: 7 shards of 8 bytes arrive


def loop(limit=5, start=0, step=1, direction="LT", config=""):
    return (LOOP.replace("{limit}", str(limit)).replace("{start}", str(start)).replace("{step}", str(step))
            .replace("{direction}", direction).replace("{config}", config))


def test_a_known_trip_count_multiplies_the_body():
    stats = hc.analyze(loop(limit=99, config=', backend_config={"known_trip_count":{"n":"5"}}'))
    assert stats.bytes["all-gather"] == 5 * AG_BODY and stats.ops["all-gather"] == 5
    assert [(l.name, l.trips, l.source) for l in stats.loops] == [("w", 5, "xla")]
    assert hc.analyze(loop(limit=99, config=', backend_config={"known_trip_count":{"n":"5"}}'),
                      multiply_loops=False).bytes["all-gather"] == AG_BODY
    assert set(stats.bytes) == set(hc.KINDS) and stats.total_bytes == 5 * AG_BODY


@pytest.mark.parametrize("limit, start, step, direction, trips", [
    (5, 0, 1, "LT", 5), (5, 0, 1, "LE", 6), (7, 1, 2, "LT", 3), (0, 5, -1, "GT", 5), (0, 4, -2, "GE", 3),
    (6, 0, 2, "NE", 3), (0, 3, 1, "LT", 0)])
def test_trip_counts_are_derived_from_the_loop_when_xla_does_not_annotate_them(limit, start, step, direction,
                                                                                trips):
    stats = hc.analyze(loop(limit, start, step, direction))
    assert [(l.trips, l.source) for l in stats.loops] == [(trips, "derived")]
    assert stats.bytes["all-gather"] == trips * AG_BODY


def test_an_unknown_trip_count_counts_once_and_is_reported():
    text = loop().replace("%limit = s32[] constant(5)", "%limit = s32[] get-tuple-element(%p), index=0")
    stats = hc.analyze(text)
    assert [(l.trips, l.source) for l in stats.loops] == [(1, "unknown")]
    assert stats.unknown_loops == stats.loops and stats.bytes["all-gather"] == AG_BODY


NESTED = """\
HloModule nested, num_partitions=8

%inner_cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %v = f32[8]{0} get-tuple-element(%p), index=1
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  %ar = f32[8]{0} all-reduce(%v), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(%n, %ar)
}

%outer_body (q: (s32[], f32[8])) -> (s32[], f32[8]) {
  %q = (s32[], f32[8]{0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %w = f32[8]{0} get-tuple-element(%q), index=1
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %w)
  %loop = (s32[], f32[8]{0}) while(%init), condition=%inner_cond, body=%inner_body
  %r = f32[8]{0} get-tuple-element(%loop), index=1
  %perm = f32[8]{0} collective-permute(%r), channel_id=3, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %one = s32[] constant(1)
  %k = s32[] add(%j, %one)
  ROOT %t = (s32[], f32[8]{0}) tuple(%k, %perm)
}

%outer_cond (q: (s32[], f32[8])) -> pred[] {
  %q = (s32[], f32[8]{0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %c = s32[] constant(3)
  ROOT %lt = pred[] compare(%c, %j), direction=GT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %a)
  %w = (s32[], f32[8]{0}) while(%init), condition=%outer_cond, body=%outer_body
  ROOT %out = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_nested_loops_multiply():
    stats = hc.analyze(NESTED)
    all_reduce = 2 * 3 / 4 * 32  # ring all-reduce of f32[8] in groups of 4
    assert stats.bytes["all-reduce"] == 3 * 4 * all_reduce and stats.ops["all-reduce"] == 12
    assert stats.bytes["collective-permute"] == 3 * 32 and stats.ops["collective-permute"] == 3
    assert sorted((l.name, l.trips, l.source) for l in stats.loops) == [("loop", 4, "derived"),
                                                                        ("w", 3, "derived")]
    once = hc.analyze(NESTED, multiply_loops=False)
    assert once.bytes["all-reduce"] == all_reduce and once.bytes["collective-permute"] == 32


ASYNC = """\
HloModule async, num_partitions=8

%wrapped_reduce_scatter (x: f32[64]) -> f32[8] {
  %x = f32[64]{0} parameter(0)
  ROOT %rs = f32[8]{0} reduce-scatter(%x), channel_id=5, replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%sum
}

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (p0: f32[4], p1: f32[64], p2: f32[10]) -> f32[32] {
  %p0 = f32[4]{0} parameter(0)
  %p1 = f32[64]{0} parameter(1)
  %p2 = f32[10]{0} parameter(2)
  %ags = (f32[4]{0}, f32[32]{0}) all-gather-start(%p0), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %agd = f32[32]{0} all-gather-done(%ags)
  %ars = f32[64]{0} all-reduce-start(%p1), channel_id=2, replica_groups={}, to_apply=%sum
  %ard = f32[64]{0} all-reduce-done(%ars)
  %cps = (f32[10]{0}, f32[10]{0}, u32[], u32[]) collective-permute-start(%p2), channel_id=3, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[10]{0} collective-permute-done(%cps)
  %self = f32[10]{0} collective-permute(%p2), channel_id=4, source_target_pairs={{0,0},{1,1}}
  %rss = ((f32[64]{0}), f32[8]{0}, s32[]) async-start(%p1), calls=%wrapped_reduce_scatter
  %rsu = ((f32[64]{0}), f32[8]{0}, s32[]) async-update(%rss), calls=%wrapped_reduce_scatter
  %rsd = f32[8]{0} async-done(%rsu), calls=%wrapped_reduce_scatter
  ROOT %r = f32[32]{0} add(%agd, %agd)
}
"""


def test_start_done_pairs_and_async_wrappers_count_once():
    stats = hc.analyze(ASYNC)
    assert stats.ops == {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 1, "all-to-all": 0,
                         "collective-permute": 2}
    assert stats.bytes["all-gather"] == 7 * 16  # 7 of the 8 f32[4] shards arrive
    assert stats.bytes["all-reduce"] == 2 * 7 / 8 * 256  # `{}`: every device of the module (8)
    assert stats.bytes["reduce-scatter"] == 7 / 8 * 256
    assert stats.bytes["collective-permute"] == 40  # the permute to itself moves nothing
    assert hc.analyze(ASYNC, num_devices=4).bytes["all-reduce"] == 2 * 3 / 4 * 256


@pytest.mark.parametrize("groups, n", [
    ("[2,4]<=[8]", 4), ("[4,2]<=[2,4]T(1,0)", 2), ("[1,8]<=[8]", 8), ("{{0,1},{2,3},{4,5},{6,7}}", 2),
    ("{{0,1,2,3,4,5,6,7}}", 8), ("{{0},{1},{2},{3},{4},{5},{6},{7}}", 1), ("{}", 8),
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", 4), ("mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}", 8),
    ("mesh[x=8] {x:(2)4}", 4), ("mesh['a'=2,'b'=4], device_ids=([1,0,2,3,4,5,6,7]) {'a'}", 2)])
def test_replica_group_forms(groups, n):
    attrs = f", channel_id=1, replica_groups={groups}, dimensions={{0}}, use_global_device_ids=true"
    assert hc.group_size(attrs, 8) == n
    text = ("HloModule g, num_partitions=8\n\nENTRY %main (p: bf16[3,5]) -> bf16[3,5] {\n"
            "  %p = bf16[3,5]{1,0} parameter(0)\n"
            f"  ROOT %a2a = bf16[3,5]{{1,0}} all-to-all(%p){attrs}\n}}\n")
    assert hc.analyze(text).bytes["all-to-all"] == pytest.approx((n - 1) / n * 30)


def test_tuple_all_to_all_ragged_and_conditionals():
    text = """\
HloModule t, num_partitions=4

%small (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %ag = f32[4]{0} all-gather(%p), replica_groups={{0,1},{2,3}}, dimensions={0}
}

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%big (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %ar = f32[4]{0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%sum
}

ENTRY %main (x: f32[2,3], i: s32[], in: bf16[64], out: bf16[512], o: s64[4]) -> f32[4] {
  %x = f32[2,3]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %in = bf16[64]{0} parameter(2)
  %out = bf16[512]{0} parameter(3)
  %o = s64[4]{0} parameter(4)
  %t = (f32[2,3]{1,0}, f32[2,3]{1,0}, f32[2,3]{1,0}, f32[2,3]{1,0}) all-to-all(%x, %x, %x, %x), replica_groups={{0,1,2,3}}
  %r = bf16[512]{0} ragged-all-to-all(%in, %out, %o, %o, %o, %o), replica_groups={{0,1,2,3}}
  %v = f32[4]{0} broadcast(%x), dimensions={}
  ROOT %c = f32[4]{0} conditional(%i, %v, %v), branch_computations={%small, %big}
}
"""
    stats = hc.analyze(text)
    # tuple form + ragged: sends 128 B, may receive up to 1024 B; balanced, it receives what it sends.
    assert stats.bytes["all-to-all"] == 3 / 4 * 4 * 24 + 3 / 4 * 128
    assert (stats.ragged_bytes, stats.ragged_bound_bytes) == (3 / 4 * 128, 3 / 4 * 1024)
    assert stats.ops["all-to-all"] == 2
    # The conditional counts its costliest branch only: the all-reduce (2 x 3/4 x 16 = 24 B > all-gather 16 B).
    assert stats.bytes["all-reduce"] == 24 and stats.bytes["all-gather"] == 0


def test_shapes_and_dtypes():
    assert hc.shape_bytes("bf16[8,128]{1,0:T(8,128)(2,1)S(1)}") == 2048
    assert hc.shape_bytes("(f32[], /*index=1*/s8[3]{0}, pred[2])") == 4 + 3 + 2
    assert hc.shape_bytes("f8e4m3fn[16]") == 16 and hc.shape_bytes("s4[8]") == 4 and hc.shape_bytes("token[]") == 0
    assert hc.shape_bytes("f32[<=10,2]") == 80


def test_text_without_entry_is_an_error():
    with pytest.raises(hc.HloParseError, match="ENTRY"):
        hc.analyze("HloModule empty\n")


def test_a_compiled_scan_of_a_shard_map_psum_counts_five_bodies():
    """A real XLA:CPU program on the test suite's 8 fake devices: psum of a [1,16] f32 shard inside a 5-step
    lax.scan. The all-reduce moves 2 x 7/8 x 64 B per step; the scan makes it 5 times that; without XLA's trip count
    annotation the loop's own condition gives the same 5."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("x",), devices=jax.devices("cpu")[:8])
    step = jax.shard_map(lambda v: v * 0.5 + jax.lax.psum(v, "x"), mesh=mesh, in_specs=P("x"), out_specs=P("x"))

    def f(c):
        return jax.lax.scan(lambda c, _: (step(c), None), c, None, length=5)[0]

    x = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    text = jax.jit(f).lower(x).compile().as_text()
    body = 2 * 7 / 8 * 64
    stats = hc.analyze(text)
    assert stats.bytes["all-reduce"] == pytest.approx(5 * body) and stats.ops["all-reduce"] == 5
    assert hc.analyze(text, multiply_loops=False).bytes["all-reduce"] == pytest.approx(body)
    assert [(l.trips, l.source) for l in stats.loops] == [(5, "xla")]
    stripped = re.sub(r',?"known_trip_count":\{"n":"5"\}', "", text)
    derived = hc.analyze(stripped)
    assert [(l.trips, l.source) for l in derived.loops] == [(5, "derived")]
    assert derived.bytes == stats.bytes


CPU_PROGRAMS = {  # (function, argument shapes): matmuls and a padded convolution as XLA:CPU compiles them
    "matmul": (lambda a, b: a @ b, [(64, 96), (96, 48)]),
    "batched": (lambda a, b: jnp_einsum("bhtd,bhsd->bhts", a, b), [(2, 3, 32, 16), (2, 3, 24, 16)]),
    "grouped": (lambda a, b: jnp_einsum("gmk,gkn->gmn", a, b), [(4, 16, 32), (4, 32, 8)]),
    "weight gradient": (lambda a, b: jnp_einsum("btd,btf->df", a, b), [(3, 40, 24), (3, 40, 16)]),
    "causal convolution": (lambda a, b: conv1d(a, b, padding=[(3, 0)]), [(2, 20, 6), (4, 6, 10)]),
    "strided dilated convolution": (lambda a, b: conv1d(a, b, padding=[(2, 1)], stride=2, lhs_dilation=2,
                                                        rhs_dilation=2), [(2, 11, 4), (3, 4, 5)]),
}


def jnp_einsum(*args):
    import jax.numpy as jnp

    return jnp.einsum(*args)


def conv1d(a, b, *, padding, stride=1, lhs_dilation=1, rhs_dilation=1):
    import jax

    return jax.lax.conv_general_dilated(a, b, (stride,), padding, lhs_dilation=(lhs_dilation,),
                                        rhs_dilation=(rhs_dilation,), dimension_numbers=("NWC", "WIO", "NWC"))


@pytest.mark.parametrize("name", sorted(CPU_PROGRAMS))
def test_matmul_and_convolution_flops_equal_xla_cost_analysis(name):
    """Programs made only of one dot or convolution: the count from the HLO text equals XLA's own cost analysis
    (which counts a convolution's taps over padding and dilation holes as nothing, as ours does)."""
    import jax
    import jax.numpy as jnp

    fn, shapes = CPU_PROGRAMS[name]
    compiled = jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    stats = hc.analyze(compiled.as_text())
    assert stats.total_flops == cost["flops"] > 0
    assert stats.kernel_flops == {}


def test_tpu_convolutions_count_only_taps_inside_the_input():
    """XLA:TPU prints dots as convolutions (these two from the tiny model's step on v5p): a free dimension of the
    weight becomes a window over a size-1 input padded on both sides (`size=4 pad=3_3`), where each output position
    meets the input at one tap of four. `btr,rhk->bthk` (r = 16) and `btd,dshk->btshk` (d = 64) are then exactly
    2 x output elements x the contracted size; a window at full size without padding would count 4x and 12x that."""
    text = """\
HloModule conv, num_partitions=1

ENTRY %main (a: bf16[256,16,1], b: bf16[16,4,16], c: bf16[256,64,1,1], d: bf16[64,3,4,16]) -> f32[256,4,16] {
  %a = bf16[256,16,1]{0,1,2:T(8,128)(2,1)} parameter(0)
  %b = bf16[16,4,16]{2,0,1:T(8,128)(2,1)} parameter(1)
  %c = bf16[256,64,1,1]{0,1,3,2:T(8,128)(2,1)} parameter(2)
  %d = bf16[64,3,4,16]{0,3,2,1:T(8,128)(2,1)} parameter(3)
  %batch = f32[256,4,16]{0,2,1:T(8,128)} convolution(%a, %b), window={size=4 pad=3_3 rhs_reversal=1}, dim_labels=bf0_i0o->b0f
  %two = bf16[256,3,4,16]{0,3,2,1:T(8,128)(2,1)} convolution(%c, %d), window={size=3x4 pad=2_2x3_3 rhs_reversal=1x1}, dim_labels=bf01_i01o->b01f
  ROOT %r = f32[256,4,16]{2,1,0} copy(%batch)
}
"""
    stats = hc.analyze(text)
    assert stats.flops["convolution"] == 2 * (256 * 4 * 16) * 16 + 2 * (256 * 3 * 4 * 16) * 64


GMM = ('  %gmm.16 = bf16[2048,32]{1,0:T(8,128)(2,1)} custom-call(%lhs, %rhs), custom_call_target="tpu_custom_call", '
       'metadata={op_name="jit(step)/shard_map/jit(gmm)/pallas_call"}, backend_config={"flag_configs":[],'
       '"custom_call_config":{"body":"TUzvUgFNTElSMjMuMC4wZ2l0","cost_estimate":{"flops":"8388608",'
       '"transcendentals":"0","bytes_accessed":"401408","remote_bytes_transferred":"0"}}}')


def test_kernels_count_their_own_cost_estimates_per_call_and_per_trip():
    """A Pallas kernel's FLOPs are its `cost_estimate` (as XLA:TPU prints it in the custom call's backend config),
    named by the kernel, inside a 5-step loop 5 times; a custom call without an estimate counts nothing."""
    body = (GMM.replace("%gmm.16", "%gmm.3").replace("custom-call(%lhs, %rhs)", "custom-call(%lhsb, %rhsb)")
            + '\n  %noted = f32[16]{0} custom-call(%x), custom_call_target="AssumeGatherIndicesInBound"')
    text = loop(limit=5).replace("  ROOT %t = (s32[], f32[16]{0}) tuple(%next, %ag)",
                                 "  %lhsb = bf16[2048,64]{1,0} broadcast(%x), dimensions={}\n"
                                 "  %rhsb = bf16[2,64,32]{2,1,0} broadcast(%x), dimensions={}\n"
                                 + body + "\n  ROOT %t = (s32[], f32[16]{0}) tuple(%next, %ag)")
    text = text.replace("  ROOT %out", "  %lhs = bf16[2048,64]{1,0} broadcast(%a), dimensions={}\n"
                        "  %rhs = bf16[2,64,32]{2,1,0} broadcast(%a), dimensions={}\n" + GMM + "\n  ROOT %out")
    stats = hc.analyze(text)
    assert stats.kernel_flops == {"gmm": 6 * 8388608}
    assert hc.analyze(text, multiply_loops=False).kernel_flops == {"gmm": 2 * 8388608}
    assert stats.total_flops == 6 * 8388608 and stats.flops == {"dot": 0.0, "convolution": 0.0}


def test_a_compiled_scan_of_matmuls_counts_every_step():
    import jax
    import jax.numpy as jnp

    def f(x, w):
        return jax.lax.scan(lambda c, w_i: (jnp.tanh(c @ w_i), None), x, w)[0]

    compiled = jax.jit(f).lower(jax.ShapeDtypeStruct((8, 32), jnp.float32),
                                jax.ShapeDtypeStruct((7, 32, 32), jnp.float32)).compile()
    assert hc.analyze(compiled.as_text()).flops["dot"] == 7 * 2 * 8 * 32 * 32
    assert hc.analyze(compiled.as_text(), multiply_loops=False).flops["dot"] == 2 * 8 * 32 * 32


def test_valid_taps_in_closed_form_equal_counting_them():
    rng = np.random.default_rng(0)
    for _ in range(400):
        out, size, taps = (int(x) for x in rng.integers(1, 12, 3))
        stride, ld, rd = (int(x) for x in rng.integers(1, 5, 3))
        pad = int(rng.integers(0, 8))
        last = (size - 1) * ld
        brute = sum(1 for o in range(out) for k in range(taps)
                    if 0 <= o * stride + k * rd - pad <= last and (o * stride + k * rd - pad) % ld == 0)
        assert hc._valid_taps(out, size, taps, stride, pad, ld, rd) == brute, (out, size, taps, stride, pad, ld, rd)

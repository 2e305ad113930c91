"""Ahead-of-time plan of a train step: compile the full-size program from shapes alone and report what it needs.

    python -m experiments.plan --config kimi-linear-48b-a3b --mesh fsdp=-1 --devices 64 --batch_size 64 --seq_len 4096
    python -m experiments.plan --config kimi-linear-48b-a3b --mesh fsdp=16,expert=4 --topology v5p:4x4x4 ...

Nothing is allocated: the model and optimizer are abstract (`nnx.eval_shape`), the train step
(kimi_jax.training.vanilla, AdamW, the same code that trains) is lowered with the shardings kimi_jax.sharding gives
every array, and compiled for fake CPU devices (`--devices N`) or for a real TPU topology (`--topology`, needs
`libtpu`; install it into a separate folder on PYTHONPATH as JAX_NOTES §5 describes). Printed per device:
  * parameter + optimizer-state bytes, exact from the shardings (what every backend must hold between steps);
  * the compiler's argument / output / temporary / peak figures (TPU-accurate with --topology; the CPU compiler's
    buffer assignment and fusion differ from TPU/GPU, so on CPU read them as shape/sharding checks, not budgets);
  * the analytic model FLOPs per token (matmuls + MLA attention + KDA) and the step time implied at a given MFU on
    a given chip;
  * compiled FLOPs per step per device: XLA's cost analysis (each `while` body once) and kimi_jax.hlo_costs' count of
    the compiled HLO's matmuls / convolutions plus Pallas kernels' own cost estimates, loop bodies x trip counts,
    as a ratio to the analytic step (and to the analytic step plus the forward that remat recomputes). megablox's
    estimates cover its whole row buffer; behind the expert all-to-all that buffer is the dropless worst case, so
    the total is also given with those kernels at the rows a balanced routing fills;
  * the bytes each collective kind moves per device per step, read from the compiled HLO (kimi_jax.hlo_costs:
    `while` bodies times their trip counts, so the layer scans and the recursive stage's K-step scan count in full,
    unlike cost analysis), and two lines scripts read (figures per device per step):
      collectives: all-gather X GiB, reduce-scatter X GiB, all-reduce X GiB, all-to-all X GiB, collective-permute X GiB
      step time bound: compute X s at M% MFU, communication X s (B GB/s per chip), bound X s
    compute is the implied step time above; communication = collective bytes / the chip's interconnect bandwidth
    (ICI_GB_PER_S, one direction): a lower bound that assumes every link busy and nothing else in the way; bound =
    max(compute, communication), i.e. perfect overlap. Without a chip (--devices and no --chip) the time line says
    it cannot be bounded. XLA:CPU runs bf16 collectives in f32 and partitions its own way: for TPU figures compile
    with --topology.
The recursive stage plans phases a, b (LoRA on the noisy stream) and c (unfrozen blocks, L2-SP) with the step that
experiments.train builds for them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from experiments.flags import add_kda_impl_flag
from kimi_jax.flops import analytic_flops_per_token, recursive_flops_per_token

PEAK_TFLOPS = {"v5p": 459.0, "v5e": 197.0, "v6e": 918.0, "v4": 275.0, "h100": 989.0, "h200": 989.0, "a100": 312.0}
# Interconnect bandwidth per chip in GB/s (1e9 bytes/s), ONE direction: what a chip can send (and at the same time
# receive) per second over all its links, the rate at which the collective bytes of kimi_jax.hlo_costs (bytes
# one device receives) can arrive. Vendors quote the bidirectional sum; each figure below is half of it.
#   v5p: 600. Google Cloud TPU docs, "TPU v5p" page: "Bidirectional inter-chip interconnect (ICI) bandwidth (per
#        chip) 1200 GBps"; the page's older table gives "Interchip Interconnect BW 4800 Gbps" (= 600 GB/s).
#   v5e: 200. Google Cloud TPU docs, "TPU v5e": bidirectional ICI per chip 400 GBps (older table: 1600 Gbps).
#   v6e: 400. Google Cloud TPU docs, "TPU v6e": bidirectional ICI per chip 800 GBps (4 ICI ports).
#   v4:  300. The Cloud TPU v4 page gives no per-chip figure; 6 ICI links x 400 Gbps per direction = 2400 Gbps
#        (TPU v4 paper, Jouppi et al., ISCA 2023, as summarised at glennklockwood.com/garden/processors/TPUv4): the
#        least certain figure here.
#   h100, h200: 450. NVIDIA H100 / H200 SXM datasheets: NVLink 900 GB/s (bidirectional; 18 NVLink 4 links).
#   a100: 300. NVIDIA A100 SXM datasheet: NVLink 600 GB/s (bidirectional; 12 NVLink 3 links).
# Only within one ICI slice / NVLink domain: data-center network (DCN / InfiniBand) hops are far slower.
ICI_GB_PER_S = {"v5p": 600.0, "v5e": 200.0, "v6e": 400.0, "v4": 300.0, "h100": 450.0, "h200": 450.0, "a100": 300.0}
KIND_ORDER = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def parse_args(argv=None):
    from kimi_jax.config import PRESETS
    from kimi_jax.layers.moe import DISPATCHES

    p = argparse.ArgumentParser(prog="python -m experiments.plan", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help=f"a preset ({', '.join(sorted(PRESETS))}), a config.json file or a model folder")
    p.add_argument("--mesh", default=None, help="mesh spec, e.g. data=2,fsdp=-1 (default: fsdp over all devices)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--devices", type=int, help="compile for this many fake CPU devices")
    where.add_argument("--topology", help="compile for a TPU topology, e.g. v5p:4x4x4 (needs libtpu)")
    p.add_argument("--batch_size", type=int, required=True, help="global batch (sequences)")
    p.add_argument("--seq_len", type=int, required=True, help="tokens per sequence")
    p.add_argument("--stage", choices=("vanilla", "recursive"), default="vanilla",
                   help="which train step: vanilla (the causal-LM step, default) or recursive (the sidecar's)")
    p.add_argument("--phase", choices=("a", "b", "c"), default="a", help="recursive training phase (default a)")
    p.add_argument("--recursive_config", default=None,
                   help="recursive stage: a preset or JSON file (default: the preset phase_{phase})")
    p.add_argument("--chunk_width", type=int, default=None,
                   help="recursive stage: window width W (default: the recursive config's)")
    p.add_argument("--max_inner_steps", type=int, default=None,
                   help="recursive stage: inner steps K (default: the recursive config's)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="parameter dtype (default bfloat16)")
    p.add_argument("--moe_dispatch", choices=DISPATCHES, default="auto",
                   help="MoE expert dispatch (default auto: grouped-matmul kernels on TPU/GPU, see kimi_jax/layers/moe.py)")
    add_kda_impl_flag(p)
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True,
                   help="remat each layer cycle (default on)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="model FLOPs utilisation for the implied step time (default 0.4)")
    p.add_argument("--save_hlo", default=None, metavar="FILE",
                   help="also write the compiled per-device HLO text there (.gz: gzip), to re-read without compiling")
    p.add_argument("--chip", default=None,
                   help=f"chip for the step time (peak FLOPs, interconnect bandwidth): {sorted(PEAK_TFLOPS)} "
                        f"(default: the --topology's chip; none with --devices)")
    return p.parse_args(argv)


def load_config(spec: str):
    """The model config of --config: a preset name, else a config.json file or a model folder holding one."""
    from kimi_jax.config import PRESETS, ConfigError, KimiLinearConfig, get_preset

    if spec in PRESETS:
        return get_preset(spec)
    if os.path.exists(spec):
        return KimiLinearConfig.from_pretrained(spec)
    if os.sep in spec or "/" in spec or spec.lower().endswith(".json"):
        raise ConfigError(f"--config {spec}: no such file or folder")
    raise ConfigError(f"--config {spec}: neither a preset ({', '.join(sorted(PRESETS))}) nor an existing "
                      f"config.json file or model folder")


def sharded_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (exact: size / shards per array)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shards = 1
        spec = getattr(leaf.sharding, "spec", ())
        mesh = leaf.sharding.mesh
        for entry in spec:
            for axis in (entry if isinstance(entry, tuple) else (entry,)):
                if axis is not None:
                    shards *= mesh.shape[axis]
        total += math.ceil(leaf.size / shards) * leaf.dtype.itemsize
    return total


def main(argv=None) -> int:
    """Expected failures (bad flags, configs, meshes, topologies) become one `error:` line and exit status 2."""
    from kimi_jax.errors import KimiJaxError, report

    try:
        return run(parse_args(argv))
    except KimiJaxError as e:
        return report(e)


def run(args) -> int:
    from kimi_jax.errors import KimiJaxError, UsageError

    cfg = load_config(args.config)  # checked before JAX and its devices are set up
    if args.save_hlo:  # checked before the compile, which can take many minutes
        from kimi_jax.safe_io import OutputError, check_writable_location, refuse_overlap

        refuse_overlap(args.save_hlo, "--save_hlo", {"--config": args.config if os.path.exists(args.config) else None})
        if os.path.isdir(args.save_hlo):
            raise OutputError(f"--save_hlo {args.save_hlo} is a folder; give a file name")
        check_writable_location(os.path.dirname(os.path.abspath(args.save_hlo)), "--save_hlo", shown=args.save_hlo)
    rcfg = None
    if args.stage == "recursive":
        from kimi_jax.recursive.config import resolve

        rcfg = resolve(args.recursive_config or f"phase_{args.phase}")
        changes = {k: v for k, v in (("chunk_width", args.chunk_width), ("max_inner_steps", args.max_inner_steps))
                   if v is not None}
        rcfg = rcfg.replace(recursive_enabled=True, phase=args.phase, **changes)
    for name, value in (("--batch_size", args.batch_size), ("--seq_len", args.seq_len)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    import jax

    if args.devices is not None:
        if args.devices < 1:
            raise UsageError(f"--devices must be >= 1, got {args.devices}")
        try:
            jax.config.update("jax_num_cpu_devices", args.devices)
        except Exception:  # backend already initialised (e.g. inside tests): use what exists
            pass
        cpu = jax.devices("cpu")
        if len(cpu) < args.devices:
            raise UsageError(f"--devices {args.devices}: only {len(cpu)} CPU devices exist in this process (JAX was "
                             "initialised before the planner could ask for more)")
        devices, platform = cpu[:args.devices], "cpu"
    else:
        try:
            from jax.experimental import topologies

            devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
        except Exception as e:
            raise UsageError(f"--topology {args.topology}: cannot build it ({type(e).__name__}: {str(e)[:200]}); "
                             "compiling for TPU topologies needs libtpu (see JAX_NOTES §5)") from None
        platform = "tpu"

    import jax.numpy as jnp
    from flax import nnx

    from kimi_jax import hlo_costs, sharding
    from kimi_jax.model import KimiLinearForCausalLM, RunOptions
    from kimi_jax.training.vanilla import build_trainer, make_optimizer

    mesh = sharding.make_mesh(args.mesh, devices)
    n = len(devices)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    t0 = time.time()
    model = nnx.eval_shape(lambda: KimiLinearForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    opts = RunOptions(remat=args.remat, moe_dispatch=args.moe_dispatch, kda_impl=args.kda_impl)
    flops = analytic_flops_per_token(cfg, args.seq_len)
    if rcfg is None:
        trainer, params, opt_state = build_trainer(model, make_optimizer(1e-5), mesh, args.batch_size, opts=opts)
        batch = {k: jax.ShapeDtypeStruct((args.batch_size, args.seq_len), dt, sharding=trainer.batch_sharding)
                 for k, dt in (("input_ids", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32))}
        step_args = (params, opt_state, batch)
        frozen = None
    else:
        from kimi_jax.recursive.objective import num_windows
        from kimi_jax.recursive.sidecar import build_sidecar
        from kimi_jax.training.recursive import build_recursive_trainer, make_recursive_optimizer

        try:  # what experiments.train checks before it builds the step (one error line each)
            windows = num_windows(args.seq_len, rcfg.chunk_width, cfg.kda_chunk_size)
            rcfg.refined_layers(cfg.num_hidden_layers)
            if rcfg.uses_lora:
                rcfg.lora_layer_indices(cfg.num_hidden_layers)
            if rcfg.phase == "c" and not rcfg.unfrozen_layer_indices(cfg.mixer_types):
                raise UsageError(f"recursive phase c: unfreeze_layers {rcfg.to_dict()['unfreeze_layers']} selects no "
                                 f"layer of this {cfg.num_hidden_layers}-layer model; set unfreeze_layers in the "
                                 f"recursive config (a list of layer indices, every_4th or mla)")
            sidecar = nnx.eval_shape(lambda: build_sidecar(cfg, rcfg))
            # The step experiments.train runs for this phase: LoRA in the sidecar from phase b, the unfrozen blocks
            # of phase c in the trainable tree (sharded like the base, their AdamW state too).
            trainer, frozen, params, opt_state = build_recursive_trainer(
                model, sidecar, rcfg, make_recursive_optimizer(rcfg), mesh, args.batch_size, opts=opts)
        except ValueError as e:  # num_windows: a sequence too short for one window
            if isinstance(e, KimiJaxError):
                raise
            raise UsageError(str(e)) from None
        batch = {k: jax.ShapeDtypeStruct((args.batch_size, args.seq_len), dt, sharding=trainer.batch_sharding)
                 for k, dt in (("input_ids", jnp.int32), ("weights", jnp.float32))}
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        step_args = (params, opt_state, frozen, batch, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
                     jax.ShapeDtypeStruct((), jnp.float32, sharding=rep))
        flops = recursive_flops_per_token(flops, rcfg, windows, args.seq_len, args.remat)
    tokens = args.batch_size * args.seq_len
    gib = 1 << 30

    def size(n_bytes: float) -> str:
        return f"{n_bytes / gib:.2f} GiB" if n_bytes >= 0.1 * gib else f"{n_bytes / (1 << 20):.2f} MiB"

    state_bytes = sharded_bytes(params) + sharded_bytes(opt_state) + (0 if frozen is None else sharded_bytes(frozen))
    num_params = sum(x.size for x in jax.tree.leaves(params if frozen is None else frozen))
    chip = args.chip or (args.topology.split(":")[0] if args.topology else None)
    print(f"plan: {args.config} ({num_params / 1e9:.4g} B params, {args.dtype}), stage {args.stage}, mesh "
          f"{dict(mesh.shape)} on {n} {platform} devices{' (' + args.topology + ')' if args.topology else ''}, "
          f"batch {args.batch_size} x {args.seq_len} tokens, remat {args.remat}")
    if rcfg is None:
        print(f"per device: parameters + AdamW state {size(state_bytes)} (exact, from the shardings)")
    else:
        side_params = sum(x.size for x in jax.tree.leaves(params["sidecar"]))
        lora = ", LoRA on the noisy stream included" if rcfg.uses_lora else ""
        if "base" in params:
            base_note = (f"base blocks of layers {list(rcfg.unfrozen_layer_indices(cfg.mixer_types))} trained: "
                         f"{sum(x.size for x in jax.tree.leaves(params['base'])) / 1e6:.4g} M params in stacked "
                         f"leaves (sharded, AdamW, other rows masked), the rest frozen")
        else:
            base_note = "base frozen"
        print(f"recursive phase {rcfg.phase}: W {rcfg.chunk_width}, K {rcfg.max_inner_steps}, {windows} windows per "
              f"sequence; sidecar {side_params / 1e6:.4g} M params (replicated, AdamW{lora}), {base_note}")
        print(f"per device: base + trainable + AdamW state {size(state_bytes)} (exact, from the shardings)")
    if rcfg is not None:
        clean = "clean forward + backward" if rcfg.phase == "c" else "clean forward"
        print(f"analytic recursive FLOPs per token: {clean} + K x (window forward + activation backward"
              f"{' + remat' if args.remat else ''}) over {flops['window_tokens_per_token']:.3f} window tokens per "
              f"token = {flops['recursive_factor']:.3g} x the forward")
    print(f"analytic training FLOPs per token: {flops['train'] / 1e9:.4g} GFLOP (matmuls over "
          f"{flops['matmul_weights'] / 1e9:.4g} B active weights; MLA attention {flops['mla_attention'] / 1e9:.3g}, "
          f"KDA core {flops['kda_core'] / 1e9:.3g} GFLOP); per step {flops['train'] * tokens / 1e15:.4g} PFLOP")
    key = chip.lower() if chip else None
    compute_seconds = None
    if chip:
        if key not in PEAK_TFLOPS:
            print(f"(no peak FLOPs known for chip {chip!r}; pass --chip one of {sorted(PEAK_TFLOPS)})")
        else:
            compute_seconds = flops["train"] * tokens / (n * PEAK_TFLOPS[key] * 1e12 * args.mfu)
            print(f"implied step time at {args.mfu:.0%} MFU on {n} x {key} ({PEAK_TFLOPS[key]:.0f} TFLOP/s bf16): "
                  f"{compute_seconds:.2f} s ({tokens / compute_seconds:,.0f} tokens/s)")
    lowered = trainer.step_fn.lower(*step_args)
    t_lower = time.time() - t0
    try:
        compiled = lowered.compile()
    except Exception as e:  # the compiler's own verdict that the program does not fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"DOES NOT FIT: {args.config}, mesh {dict(mesh.shape)} on {n} {platform} devices, batch "
              f"{args.batch_size} x {args.seq_len}: {str(e).splitlines()[0][:300]}")
        return 3
    t_compile = time.time() - t0 - t_lower
    print(f"lowered in {t_lower:.1f} s, compiled in {t_compile:.1f} s")
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if mem is not None:
        print(f"per device (compiler): arguments {size(mem.argument_size_in_bytes)}, outputs "
              f"{size(mem.output_size_in_bytes)}, aliased {size(mem.alias_size_in_bytes)}, temporaries "
              f"{size(mem.temp_size_in_bytes)}, peak {size(getattr(mem, 'peak_memory_in_bytes', 0))}"
              + ("  [CPU compiler: shape/sharding check, not a TPU/GPU budget]" if platform == "cpu" else ""))
    hlo_text = compiled.as_text()
    if args.save_hlo:
        save_text(args.save_hlo, hlo_text)
        print(f"compiled HLO written to {args.save_hlo}")
    stats = hlo_costs.analyze(hlo_text, num_devices=n)
    fill = kernel_fill(cfg, mesh, trainer.batch_sharding)
    # The analytic step counts forward x 3 (the 6ND convention); remat runs the forward a fourth time. The recursive
    # factor already counts its remat forwards.
    executed = flops["train"] if rcfg is not None or not args.remat else flops["forward"] * 4
    print_flops(stats, cost, flops["train"] * tokens / n, fill, executed * tokens / n)
    print_communication(stats, platform, compute_seconds, key, args.mfu)
    return 0


def save_text(path: str, text: str) -> None:
    """Write text (gzip when the name ends in .gz) through a temporary sibling renamed into place."""
    import gzip

    from kimi_jax.safe_io import write_bytes_atomic

    data = text.encode()
    write_bytes_atomic(path, gzip.compress(data) if path.endswith(".gz") else data)


def human_bytes(n_bytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes:.0f} B"


def kernel_fill(cfg, mesh, batch_sharding) -> float:
    """The fraction of the grouped-matmul kernels' row buffers that a balanced routing fills: 1 unless routed rows
    arrive by the expert all-to-all, whose receive buffer is sized for the dropless worst case."""
    from kimi_jax.layers.expert_parallel import balanced_fill
    from kimi_jax.layers.moe import EXPERT_AXIS, expert_parallel_size
    from kimi_jax.sharding import batch_axes

    ep = expert_parallel_size(mesh, cfg.num_experts)
    if ep == 1 or EXPERT_AXIS not in batch_axes(batch_sharding):
        return 1.0
    return balanced_fill(cfg.num_experts_per_token, ep, cfg.num_experts // ep)


def print_flops(stats, cost, analytic: float, fill: float, executed: float | None = None) -> None:
    """Compiled FLOPs per device per step: cost analysis (loop bodies once) and the HLO's own matmuls and kernel
    estimates with loop bodies x trip counts, against the analytic figure (and against what the program must run
    when remat recomputes the forward: `executed`)."""
    from kimi_jax.ops.grouped_matmul import MEGABLOX_KERNELS

    tflop = 1e12
    executed = analytic if executed is None else executed
    counted = stats.total_flops
    xla = (f"{cost['flops'] / tflop:.4g} TFLOP by XLA's cost analysis (loop bodies once); "
           if cost and "flops" in cost else "")
    kernels = sum(stats.kernel_flops.values())
    print(f"compiled FLOPs per step per device: {xla}{counted / tflop:.4g} TFLOP with loop bodies x trip counts "
          f"(matmuls and convolutions {sum(stats.flops.values()) / tflop:.4g}, kernels' own estimates "
          f"{kernels / tflop:.4g}) = {counted / analytic:.2f} x the analytic {analytic / tflop:.4g} TFLOP")
    if executed != analytic:
        print(f"  with the forward that remat recomputes, the analytic step is {executed / tflop:.4g} TFLOP: "
              f"compiled = {counted / executed:.2f} x that")
    grouped = sum(v for k, v in stats.kernel_flops.items() if k in MEGABLOX_KERNELS)
    if grouped and fill < 1:
        at_fill = counted - grouped * (1 - fill)
        print(f"  grouped-matmul kernels: {grouped / tflop:.4g} TFLOP estimated over their whole receive buffers "
              f"(sized for the dropless worst case); they compute only filled rows, {fill:.3g} of the buffer under "
              f"balanced routing: {at_fill / tflop:.4g} TFLOP = {at_fill / analytic:.2f} x analytic"
              + (f", {at_fill / executed:.2f} x with the remat forward" if executed != analytic else ""))


def print_communication(stats, platform: str, compute_seconds, chip, mfu: float) -> None:
    """The collectives of the compiled step (kimi_jax.hlo_costs) and the step time bound they imply."""
    gib = 1 << 30
    print("collectives: " + ", ".join(f"{kind} {stats.bytes[kind] / gib:.2f} GiB" for kind in KIND_ORDER))
    sources = {s: sum(loop.source == s for loop in stats.loops) for s in ("xla", "derived", "unknown")}
    print("collective ops per step per device: "
          + ", ".join(f"{kind} {stats.ops[kind]:,} ({human_bytes(stats.bytes[kind])})" for kind in KIND_ORDER)
          + f"; {len(stats.loops)} while loops, trip counts: {sources['xla']} from XLA, {sources['derived']} from "
            f"the loop condition, {sources['unknown']} unknown (counted once)"
          + ("  [CPU compiler: bf16 collectives run in f32, partitioned XLA:CPU's way; --topology for TPU's]"
             if platform == "cpu" else ""))
    if stats.unknown_loops:
        print("  loops counted once (trip count unknown): "
              + ", ".join(f"{loop.name} in {loop.computation}" for loop in stats.unknown_loops[:8])
              + (" ..." if len(stats.unknown_loops) > 8 else ""))
    if stats.ragged_bytes:
        worst = stats.total_bytes - stats.ragged_bytes + stats.ragged_bound_bytes
        at = f" (communication {worst / (ICI_GB_PER_S[chip] * 1e9):.3f} s)" if chip in ICI_GB_PER_S else ""
        print(f"  ragged all-to-alls (the expert exchange): {stats.ragged_bytes / gib:.2f} GiB above, the rows balanced "
              f"routing moves; if every one moved its larger buffer (the dropless worst case), "
              f"{stats.ragged_bound_bytes / gib:.2f} GiB, all collectives {worst / gib:.2f} GiB{at}")
    if compute_seconds is None or chip not in ICI_GB_PER_S:
        which = "without a chip" if chip is None else f"for chip {chip!r}"
        print(f"step time bound: cannot be bounded {which} (pass --chip one of {sorted(ICI_GB_PER_S)} for its peak "
              f"FLOPs and interconnect bandwidth)")
        return
    bandwidth = ICI_GB_PER_S[chip]
    communication = stats.total_bytes / (bandwidth * 1e9)
    print(f"step time bound: compute {compute_seconds:.3f} s at {mfu:.0%} MFU, communication {communication:.3f} s "
          f"({bandwidth:.0f} GB/s per chip), bound {max(compute_seconds, communication):.3f} s")


if __name__ == "__main__":
    sys.exit(main())

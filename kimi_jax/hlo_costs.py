"""What a compiled XLA program costs per device per execution, read from its HLO text: the bytes its collectives
move and the FLOPs of its matmuls, convolutions and kernels, loop bodies times their trip counts.

    costs = analyze(compiled.as_text())   # jax.stages.Compiled: the SPMD-partitioned, per-device program
    costs.bytes["all-gather"], costs.ops["all-gather"], costs.total_flops, costs.kernel_flops["gmm"], costs.loops

Pure Python over the text of the HLO module (no XLA bindings). It finds every computation, every collective
instruction and the call graph from the entry computation: a `while` body counts `trip count` times (nested loops
multiply), `call` / `fusion` / `async-start` / `call-start` / `custom-call` computations once per call, a
`conditional` as its costliest branch. Cost analysis (`compiled.cost_analysis()`) counts each loop body once;
the layer scans and the recursive stage's K-step scan make that a large undercount.

Trip counts: XLA's `backend_config={"known_trip_count":{"n":"N"}}` on the while op where present (XLA:CPU annotates
it), else derived from the loop itself (XLA:TPU does not annotate): the condition's ROOT `compare(i, c)` of a tuple
element `i` with a constant `c`, the body's update of that element `i + s` (constant `s`) and its initial value `k`
(a constant in the tuple fed to the while); looking through copy / bitcast / convert / reshape. A loop whose count
cannot be found counts once and is listed in `HloCosts.loops` as unknown.

Bytes convention (per device, n = the replica group's size; the program is the per-device SPMD program, so every
shape below is one device's buffer). Each figure is what one device receives (equivalently sends) over its links
under the textbook ring / pairwise algorithms, the volume a bandwidth bound needs:
  * all-gather (also all-gather-start): (n - 1) x the operand = (n - 1) / n of the gathered output: every shard but
    its own arrives;
  * reduce-scatter: (n - 1) / n of the operand (the full-size input): a ring passes n - 1 partial shards;
  * all-reduce (also all-reduce-start): 2 (n - 1) / n of the buffer: a ring reduce-scatter then all-gather;
  * all-to-all: (n - 1) / n of the operands (every block but its own leaves); ragged-all-to-all counts here too, as
    (n - 1) / n of the smaller of its send and receive buffers: what it moves under balanced routing, where each
    device receives as many rows as it sends (the MoE's send buffer holds exactly its routed rows; the receive
    buffer of the way out, and so the send buffer of the way back, is sized for the dropless worst case). The
    sizes actually sent are data-dependent: `HloCosts.ragged_bound_bytes` adds them up at the larger buffer;
  * collective-permute (also collective-permute-start): the whole buffer (operand), when any source differs from
    its target.
A group of size 1 moves nothing. The *-done halves of async pairs (and async-update / async-done) are neither
counted nor followed, so a start/done pair counts once. n comes from `replica_groups` in any of XLA's printed forms:
explicit `{{0,1},{2,3}}`, iota `[G,S]<=[N]` (optionally with `T(...)`), mesh axes
`mesh['x'=2,'y'=4] {'y'}` (sub-axes `'y':(1)2` count their own size), or empty `{}` (all devices of the module:
num_partitions x replica_count from the HloModule line, or `num_devices` when given).

FLOPs: a `dot` is 2 x its output elements x the product of the lhs contracting dimensions; a `convolution` (how
XLA:TPU prints every dot) 2 x output batch x output features x kernel input features x, per spatial dimension, the
(output position, tap) pairs that land inside the input (not in padding or dilation holes), as XLA's cost analysis
counts them; a custom call carries its own `cost_estimate` (Pallas kernels on TPU), named by the kernel. Elementwise
work is left out.
"""

from __future__ import annotations

import dataclasses
import math
import re
from kimi_jax.errors import KimiJaxError

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
COLLECTIVE_OPCODES = {
    "all-gather": "all-gather", "all-gather-start": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce",
    "all-to-all": "all-to-all", "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute", "collective-permute-start": "collective-permute",
}
# Bits per element; a name not listed is read from its digits (f8e4m3fn: 8, s4: 4), else taken as 0 (token, opaque).
DTYPE_BITS = {"pred": 8, "bf16": 16, "f16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128, "token": 0}
PASS_THROUGH = ("copy", "bitcast", "convert", "reshape", "copy-done")
CALL_ATTRS = ("to_apply", "calls", "condition", "body", "true_computation", "false_computation",
              "branch_computations")


class HloParseError(KimiJaxError, ValueError):
    """HLO text the analysis cannot read (no ENTRY computation, a call to an unknown computation)."""


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list  # [(name, inline shape or None)]
    attrs: str  # everything after the operand list, as printed
    root: bool = False


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list
    by_name: dict
    entry: bool = False

    @property
    def root(self) -> Instruction | None:
        for inst in self.instructions:
            if inst.root:
                return inst
        return self.instructions[-1] if self.instructions else None


@dataclasses.dataclass
class Loop:
    """One `while` instruction: its trip count and where it came from ("xla", "derived" or "unknown")."""
    computation: str
    name: str
    trips: int
    source: str


@dataclasses.dataclass
class HloCosts:
    bytes: dict  # kind -> bytes per device per execution of the program
    ops: dict  # kind -> collective executions per execution of the program
    loops: list  # [Loop] for every while reachable from the entry computation (each listed once)
    flops: dict = dataclasses.field(default_factory=dict)  # "dot" / "convolution" -> FLOPs per execution
    kernel_flops: dict = dataclasses.field(default_factory=dict)  # custom-call kernel name -> its own estimates
    ragged_bytes: float = 0.0  # the ragged all-to-alls' share of bytes["all-to-all"] (balanced routing)
    ragged_bound_bytes: float = 0.0  # the same all-to-alls at their larger buffers (what no routing exceeds)

    @property
    def total_flops(self) -> float:
        """Matmul / convolution FLOPs plus the kernels' own estimates (elementwise work is left out)."""
        return sum(self.flops.values()) + sum(self.kernel_flops.values())

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    @property
    def unknown_loops(self) -> list:
        return [loop for loop in self.loops if loop.source == "unknown"]


# ------------------------------------------------------------------------------------------------------- parsing
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_COMMENT = re.compile(r"/\*.*?\*/")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")


def _outside_strings(text: str, start: int = 0):
    """(index, character) of text[start:], quoted strings skipped."""
    i = start
    while i < len(text):
        if text[i] == '"':
            m = _STRING.match(text, i)
            i = m.end() if m else len(text)
            continue
        yield i, text[i]
        i += 1


def _closing(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start], skipping quoted strings."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i, ch in _outside_strings(text, start):
        if ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return len(text)


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets and strings."""
    parts, depth, start = [], 0, 0
    for i, ch in _outside_strings(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _closing(rest, 0)
    else:
        end = rest.find(" ")
        end = len(rest) if end < 0 else end
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([a-z][\w\-]*)\(", rest)
    if not op:
        return None
    close = _closing(rest, op.end() - 1)
    operands = []
    for part in _split_top(_COMMENT.sub("", rest[op.end():close - 1])):
        tokens = part.split()
        name = tokens[-1].lstrip("%")
        operands.append((name, " ".join(tokens[:-1]) or None))
    return Instruction(m.group(2), shape, op.group(1), operands, rest[close:], root=bool(m.group(1)))


def parse_module(text: str) -> tuple[dict, str | None, int | None]:
    """HLO module text -> ({computation name: Computation}, entry name, devices from the HloModule line)."""
    comps: dict[str, Computation] = {}
    entry = None
    devices = None
    current = None
    for line in text.splitlines():
        if line.startswith("HloModule"):
            parts = dict(re.findall(r"\b(num_partitions|replica_count)=(\d+)", line))
            devices = int(parts.get("num_partitions", 1)) * int(parts.get("replica_count", 1))
            continue
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = Computation(m.group(2), [], {}, entry=bool(m.group(1)))
                if current.entry:
                    entry = current.name
            continue
        if line.startswith("}"):  # `}` or `}, execution_thread="sparsecore"`
            comps[current.name] = current
            current = None
            continue
        inst = _parse_instruction(line)
        if inst is not None:
            current.instructions.append(inst)
            current.by_name[inst.name] = inst
    return comps, entry, devices


# ------------------------------------------------------------------------------------------------ shapes, groups
def dtype_bytes(dtype: str) -> float:
    if dtype in DTYPE_BITS:
        return DTYPE_BITS[dtype] / 8
    digits = re.match(r"[a-z]+(\d+)", dtype)
    return int(digits.group(1)) / 8 if digits else 0.0


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape: an array `bf16[8,128]{1,0:T(8,128)}` or a (nested) tuple of them."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(_COMMENT.sub("", shape)):
        size = 1
        for d in dims.split(","):
            d = d.strip().lstrip("<=")
            if d:
                size *= int(d) if d.isdigit() else 1
        total += size * dtype_bytes(dtype)
    return total


def group_size(attrs: str, num_devices: int | None) -> int | None:
    """Participants per replica group of a collective, from its `replica_groups=` attribute."""
    m = re.search(r"replica_groups=", attrs)
    if not m:
        return num_devices
    value = attrs[m.end():]
    mesh = re.match(r"mesh\[([^\]]*)\][^{]*\{([^{}]*)\}", value)
    if mesh:
        sizes = {name: int(size) for name, size in re.findall(r"'?([^'=,\s]+)'?\s*=\s*(\d+)", mesh.group(1))}
        n = 1
        for axis in _split_top(mesh.group(2)):
            sub = re.match(r"'?([^':]+)'?:\((\d+)\)(\d+)$", axis)
            n *= int(sub.group(3)) if sub else sizes[axis.strip("'")]
        return n
    if value.startswith("maximal_mesh"):
        return 1
    iota = re.match(r"\[([\d,\s]+)\]<=", value)
    if iota:
        return int(iota.group(1).split(",")[-1])
    if value.startswith("{"):
        groups = value[:_closing(value, 0)]
        first = re.match(r"\{\s*\{([^}]*)\}", groups)
        if first is None:  # `{}`: one group of every device
            return num_devices
        return len([x for x in first.group(1).split(",") if x.strip()])
    return num_devices


def _operand_bytes(comp: Computation, inst: Instruction, which=None) -> float | None:
    total = 0.0
    for i, (name, inline) in enumerate(inst.operands):
        if which is not None and i not in which:
            continue
        if inline:
            total += shape_bytes(inline)
        elif name in comp.by_name:
            total += shape_bytes(comp.by_name[name].shape)
        else:
            return None
    return total


def _ragged_buffers(comp: Computation, inst: Instruction) -> tuple[float, float]:
    """(send buffer, receive buffer) bytes of a ragged-all-to-all: its operand 0 and its result."""
    sent = _operand_bytes(comp, inst, which=(0,))
    received = shape_bytes(inst.shape)
    return (received if sent is None else sent), received


def collective_bytes(comp: Computation, inst: Instruction, num_devices: int | None) -> float:
    """Bytes one device moves for one execution of a collective instruction (the convention above)."""
    kind = COLLECTIVE_OPCODES[inst.opcode]
    if kind == "collective-permute":
        at = inst.attrs.find("source_target_pairs=")
        if at >= 0:
            start = at + len("source_target_pairs=")
            pairs = re.findall(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}", inst.attrs[start:_closing(inst.attrs, start)])
            if all(a == b for a, b in pairs):
                return 0.0
        sent = _operand_bytes(comp, inst, which=None if "slice_sizes" not in inst.attrs else (0,))
        return shape_bytes(inst.shape) if sent is None else sent
    n = group_size(inst.attrs, num_devices)
    if n is None:
        raise HloParseError(f"{inst.name}: no replica groups and no device count to size its group")
    if n <= 1:
        return 0.0
    if inst.opcode == "ragged-all-to-all":
        return (n - 1) / n * min(_ragged_buffers(comp, inst))
    operands = _operand_bytes(comp, inst)
    if kind == "all-gather":
        return (n - 1) * operands if operands is not None else (n - 1) / n * shape_bytes(inst.shape)
    if kind == "reduce-scatter":
        return (n - 1) / n * operands if operands is not None else (n - 1) * shape_bytes(inst.shape)
    buffer = operands if operands is not None else shape_bytes(inst.shape)
    if kind == "all-reduce":
        return 2 * (n - 1) / n * buffer
    return (n - 1) / n * buffer  # all-to-all


# --------------------------------------------------------------------------------------------------- trip counts
def _through(comp: Computation, name: str) -> Instruction | None:
    inst = comp.by_name.get(name)
    while inst is not None and inst.opcode in PASS_THROUGH + ("copy-start",) and inst.operands:
        inst = comp.by_name.get(inst.operands[0][0])
    return inst


def _constant(comp: Computation, name: str) -> int | None:
    inst = _through(comp, name)
    if inst is None or inst.opcode != "constant" or len(inst.operands) != 1:
        return None
    try:
        return int(inst.operands[0][0])
    except ValueError:
        return None


def _element(comp: Computation, name: str) -> int | None:
    """k when `name` is get-tuple-element(parameter, index=k) (through pass-through ops)."""
    inst = _through(comp, name)
    if inst is None or inst.opcode != "get-tuple-element" or not inst.operands:
        return None
    source = comp.by_name.get(inst.operands[0][0])
    index = re.search(r"index=(\d+)", inst.attrs)
    if source is None or source.opcode != "parameter" or not index:
        return None
    return int(index.group(1))


def _unwrap(comps: dict, comp: Computation, inst: Instruction | None) -> Instruction | None:
    """A fusion whose computation is one op of its parameters (XLA:CPU's `wrapped_compare`, `wrapped_add`) as that
    op on the fusion's operands; any other instruction as itself."""
    if inst is None or inst.opcode != "fusion":
        return inst
    called = _called(_STRING.sub('""', inst.attrs), "calls")
    fused = comps.get(called[0]) if called else None
    root = fused.root if fused is not None else None
    if root is None:
        return inst
    operands = []
    for name, _ in root.operands:
        param = fused.by_name.get(name)
        if param is None or param.opcode != "parameter" or not param.operands[0][0].isdigit():
            return inst
        k = int(param.operands[0][0])
        if k >= len(inst.operands):
            return inst
        operands.append(inst.operands[k])
    return dataclasses.replace(root, name=inst.name, operands=operands)


def known_trip_count(inst: Instruction) -> int | None:
    m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?', inst.attrs)
    return int(m.group(1)) if m else None


def derive_trip_count(comps: dict, caller: Computation, inst: Instruction) -> int | None:
    """The trip count of a counted loop `for (i = k; i < c; i += s)`, read from its condition, body and init."""
    attrs = _STRING.sub('""', inst.attrs)
    cond, body = (comps.get(_called(attrs, attr)[0]) if _called(attrs, attr) else None
                  for attr in ("condition", "body"))
    if cond is None or body is None or not inst.operands:
        return None
    root = _unwrap(comps, cond, cond.root)
    if root is None or root.opcode != "compare" or len(root.operands) != 2:
        return None
    direction = re.search(r"direction=([A-Z]+)", root.attrs)
    if not direction:
        return None
    direction = direction.group(1)
    a, b = (name for name, _ in root.operands)
    index, limit = _element(cond, a), _constant(cond, b)
    if index is None or limit is None:
        index, limit = _element(cond, b), _constant(cond, a)
        direction = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(direction, direction)
    if index is None or limit is None:
        return None
    body_root, init = body.root, _through(caller, inst.operands[0][0])
    if (body_root is None or body_root.opcode != "tuple" or init is None or init.opcode != "tuple"
            or index >= len(body_root.operands) or index >= len(init.operands)):
        return None
    start = _constant(caller, init.operands[index][0])
    update = _unwrap(comps, body, _through(body, body_root.operands[index][0]))
    if start is None or update is None or update.opcode not in ("add", "subtract") or len(update.operands) != 2:
        return None
    x, y = (name for name, _ in update.operands)
    if _element(body, x) == index and _constant(body, y) is not None:
        step = _constant(body, y)
    elif update.opcode == "add" and _element(body, y) == index and _constant(body, x) is not None:
        step = _constant(body, x)
    else:
        return None
    step = -step if update.opcode == "subtract" else step
    if step == 0:
        return None
    if direction in ("LT", "LE") and step > 0:
        span = limit - start + (1 if direction == "LE" else 0)
        return max(0, math.ceil(span / step))
    if direction in ("GT", "GE") and step < 0:
        span = start - limit + (1 if direction == "GE" else 0)
        return max(0, math.ceil(span / -step))
    if direction == "NE" and (limit - start) % step == 0 and (limit - start) / step >= 0:
        return (limit - start) // step
    return None


# ----------------------------------------------------------------------------------------------------- call graph
def _called(attrs: str, attr: str) -> list[str]:
    m = re.search(rf"\b{attr}=(\{{[^}}]*\}}|%?[\w.\-]+)", attrs)
    if not m:
        return []
    value = m.group(1)
    return [v.strip().lstrip("%") for v in value.strip("{}").split(",") if v.strip()]


def _shape_of(comp: Computation, operand) -> str | None:
    name, inline = operand
    if inline:
        return inline
    inst = comp.by_name.get(name)
    return inst.shape if inst is not None else None


def _dims(shape: str | None) -> list[int] | None:
    """The dimensions of an array shape `bf16[8,128]{1,0:T(8,128)}` (None for a tuple or an unreadable shape)."""
    if shape is None:
        return None
    found = _ARRAY.findall(_COMMENT.sub("", shape))
    if len(found) != 1:
        return None
    dims = [d.strip().lstrip("<=") for d in found[0][1].split(",") if d.strip()]
    return [int(d) for d in dims] if all(d.isdigit() for d in dims) else None


def dot_flops(comp: Computation, inst: Instruction) -> float:
    """2 x output elements x the product of the lhs contracting dimensions."""
    out, lhs = _dims(inst.shape), _dims(_shape_of(comp, inst.operands[0])) if inst.operands else None
    if out is None or lhs is None:
        return 0.0
    m = re.search(r"lhs_contracting_dims=\{([\d,\s]*)\}", inst.attrs)
    contracted = [lhs[int(i)] for i in m.group(1).split(",") if i.strip()] if m else []
    return 2.0 * math.prod(out) * math.prod(contracted)


def _window_field(window: str, field: str, rank: int, default: int) -> list:
    m = re.search(rf"\b{field}=([\w\-]+)", window)
    if not m:
        return [default] * rank
    return m.group(1).split("x")


def _valid_taps(out: int, size: int, taps: int, stride: int, pad_low: int, lhs_dilation: int,
                rhs_dilation: int) -> int:
    """Sum over output positions of the kernel taps that land on a real (not padding, not dilation-hole) input
    element: the multiply-adds one spatial dimension contributes, as XLA's cost analysis counts them. Counted per
    tap in closed form (XLA:TPU writes weight gradients as windows of thousands with equal input dilation)."""
    last = (size - 1) * lhs_dilation  # the dilated input occupies positions 0..last, real ones at multiples
    total = 0
    for k in range(taps):
        offset = k * rhs_dilation - pad_low  # output o reads position o * stride + offset
        lo = max(0, -(offset // stride))  # ceil(-offset / stride)
        hi = min(out - 1, (last - offset) // stride) if last >= offset else -1
        if hi < lo:
            continue
        # o * stride + offset = 0 (mod lhs_dilation): o = o0 (mod m), or no solution
        g = math.gcd(stride, lhs_dilation)
        if offset % g:
            continue
        m = lhs_dilation // g
        o0 = (-offset // g) * pow(stride // g, -1, m) % m if m > 1 else 0
        total += (hi - o0) // m - (lo - 1 - o0) // m
    return total


def convolution_flops(comp: Computation, inst: Instruction) -> float:
    """2 x output batch x output features x kernel input features x the valid taps of every spatial dimension.
    (XLA:TPU prints every dot as a convolution; batch dimensions become windows padded on both sides.)"""
    out = _dims(inst.shape)
    lhs = _dims(_shape_of(comp, inst.operands[0])) if len(inst.operands) > 1 else None
    rhs = _dims(_shape_of(comp, inst.operands[1])) if len(inst.operands) > 1 else None
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs)
    if out is None or lhs is None or rhs is None or not labels:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    if len(lhs_l) != len(lhs) or len(rhs_l) != len(rhs) or len(out_l) != len(out):
        return 0.0
    spatial = sorted(c for c in out_l if c.isdigit())
    window = re.search(r"window=\{([^}]*)\}", inst.attrs)
    window = window.group(1) if window else ""
    rank = len(spatial)
    sizes = _window_field(window, "size", rank, 1)
    strides = _window_field(window, "stride", rank, 1)
    pads = _window_field(window, "pad", rank, "0_0")
    lhs_dil = _window_field(window, "lhs_dilate", rank, 1)
    rhs_dil = _window_field(window, "rhs_dilate", rank, 1)
    macs = out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")]
    for d, c in enumerate(spatial):
        pad_low = int(str(pads[d]).split("_")[0])
        macs *= _valid_taps(out[out_l.index(c)], lhs[lhs_l.index(c)], int(sizes[d]), int(strides[d]), pad_low,
                            int(lhs_dil[d]), int(rhs_dil[d]))
    return 2.0 * macs


_COST_ESTIMATE_FLOPS = re.compile(r'cost_estimate\\?"\s*:\s*\{[^}]*?flops\\?"\s*:\s*\\?"?(\d+)')


def kernel_flops(inst: Instruction) -> float | None:
    """A custom call's own FLOP estimate (Pallas's `cost_estimate`, carried in the backend config), if it has one."""
    m = _COST_ESTIMATE_FLOPS.search(inst.attrs)
    return float(m.group(1)) if m else None


def kernel_name(inst: Instruction) -> str:
    """The kernel a custom-call instruction runs, from its name (`gmm.16` -> `gmm`)."""
    return re.sub(r"(\.\d+)+$", "", inst.name)


def analyze(text: str, *, num_devices: int | None = None, multiply_loops: bool = True) -> HloCosts:
    """Collective bytes and executions, and FLOPs, per device for one execution of the module's entry computation.

    `num_devices` sizes groups printed as `{}` (default: num_partitions x replica_count of the HloModule line).
    `multiply_loops=False` counts every loop body once (what cost analysis does), for comparison.
    """
    comps, entry, devices = parse_module(text)
    if entry is None:
        raise HloParseError("no ENTRY computation in the HLO text")
    num_devices = num_devices or devices
    memo: dict[str, dict] = {}
    loops: dict[tuple[str, str], Loop] = {}

    def add(into: dict, other: dict, times) -> None:
        for key, value in other.items():
            into[key] = into.get(key, 0) + value * times

    def cost(total: dict) -> float:
        return sum(v for k, v in total.items() if k[0] in ("bytes", "flops", "kernel"))

    def visit(name: str) -> dict:
        if name in memo:
            return memo[name]
        if name not in comps:
            raise HloParseError(f"call to computation {name!r}, which the HLO text does not define")
        comp = comps[name]
        total: dict = {}
        for inst in comp.instructions:
            kind = COLLECTIVE_OPCODES.get(inst.opcode)
            if kind is not None:
                moved = collective_bytes(comp, inst, num_devices)
                add(total, {("bytes", kind): moved, ("ops", kind): 1}, 1)
                if inst.opcode == "ragged-all-to-all":
                    n = group_size(inst.attrs, num_devices) or 1
                    bound = (n - 1) / n * max(_ragged_buffers(comp, inst)) if n > 1 else 0.0
                    add(total, {("ragged_bound", "all-to-all"): bound, ("ragged", "all-to-all"): moved}, 1)
            elif inst.opcode == "dot":
                add(total, {("flops", "dot"): dot_flops(comp, inst)}, 1)
            elif inst.opcode == "convolution":
                add(total, {("flops", "convolution"): convolution_flops(comp, inst)}, 1)
            elif inst.opcode == "custom-call":
                flops = kernel_flops(inst)
                if flops is not None:
                    add(total, {("kernel", kernel_name(inst)): flops}, 1)
            if inst.opcode.endswith(("-done", "-update")):
                continue  # the *-start half carries the work and the called computation
            attrs = _STRING.sub('""', inst.attrs)  # no computation names from metadata or backend strings
            if inst.opcode == "while":
                trips, source = known_trip_count(inst), "xla"
                if trips is None:
                    trips, source = derive_trip_count(comps, comp, inst), "derived"
                if trips is None:
                    trips, source = 1, "unknown"
                loops.setdefault((name, inst.name), Loop(name, inst.name, trips, source))
                times = trips if multiply_loops else 1
                for body in _called(attrs, "body"):
                    add(total, visit(body), times)
                for cond in _called(attrs, "condition"):
                    add(total, visit(cond), times + 1 if multiply_loops else 1)
                continue
            if inst.opcode == "conditional":
                branches = [visit(b) for attr in ("branch_computations", "true_computation", "false_computation")
                            for b in _called(attrs, attr)]
                if branches:
                    add(total, max(branches, key=cost), 1)
                continue
            for attr in ("to_apply", "calls"):
                for callee in _called(attrs, attr):
                    add(total, visit(callee), 1)
        memo[name] = total
        return total

    totals = visit(entry)
    return HloCosts(bytes={k: float(totals.get(("bytes", k), 0.0)) for k in KINDS},
                           ops={k: int(totals.get(("ops", k), 0)) for k in KINDS},
                           loops=list(loops.values()),
                           flops={k: float(totals.get(("flops", k), 0.0)) for k in ("dot", "convolution")},
                           kernel_flops={k[1]: float(v) for k, v in totals.items() if k[0] == "kernel"},
                           ragged_bytes=float(totals.get(("ragged", "all-to-all"), 0.0)),
                           ragged_bound_bytes=float(totals.get(("ragged_bound", "all-to-all"), 0.0)))

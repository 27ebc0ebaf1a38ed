"""The collectives one step executes, counted from the compiled HLO text.

Counting the text line by line would be wrong twice over: a scanned layer stack is one `while` whose body
runs `depth` times, and XLA:TPU wraps collectives in fusions and async custom calls. So this walks the
call graph from the entry computation, multiplying by each loop's trip count, and classifies:

* `all-gather`, `all-reduce`, `all-to-all`, `collective-permute` and `reduce-scatter` by opcode (the
  `-start` half of an async pair; `-done` is skipped);
* an `all-reduce` inside a computation XLA:TPU named `all-reduce-scatter...` is that fusion's
  reduce-scatter.

Bytes are the full (unsharded) buffers of each call, the larger of its results and its operands summed
over a combined collective's arrays: the gathered result of an all-gather, the input of a
reduce-scatter, every gradient of a combined all-reduce. Trip counts come
from the loop condition's single integer constant; a loop whose count cannot be read is counted once and
flagged in `uncounted_loops`.
"""
from __future__ import annotations

import collections
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*(.*)\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_CALLEES = re.compile(r"\b(calls|body|condition)=%([\w.\-]+)")  # to_apply: reduction bodies, no collectives
_CALLEE_LISTS = re.compile(r"\b(?:called_computations|branch_computations)=\{([^}]*)\}")
_OPERANDS = re.compile(r"%([\w.\-]+)")


def _array_bytes(shape_text: str) -> list[int]:
    sizes = []
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        sizes.append(n * _DTYPE_BYTES[dtype])
    return sizes


def _buffer_bytes(opcode: str, shape: str, operands: list[str]) -> int:
    """The full buffers one collective moves: the larger of its results and its operands, summed over
    the arrays of a combined (tuple) collective. An async `-start` returns (operands..., results...),
    so its results are what its tuple holds beyond the operands."""
    ins = sum(b for s in operands for b in _array_bytes(s))
    outs = sum(_array_bytes(shape))
    if opcode.endswith("-start"):
        outs -= ins
    return max(ins, outs)


def _parse(text: str):
    """-> (computations: name -> [(name, shape, opcode, rest)], entry name, shapes: value name -> text)."""
    comps: dict[str, list] = {}
    shapes: dict[str, str] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
                for param in m.group(3).split(", "):  # `name: shape` of the computation's parameters
                    pname, _, pshape = param.partition(": ")
                    shapes[pname.strip().lstrip("%")] = pshape
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            name, shape, opcode, rest = m.groups()
            comps[current].append((name, shape, opcode, rest))
            shapes[name] = shape
    return comps, entry, shapes


def _trip_count(condition: list) -> int | None:
    constants = [re.search(r"constant\((-?\d+)\)", opcode + "(" + rest)
                 for _, shape, opcode, rest in condition if opcode == "constant" and shape.startswith("s32[]")]
    values = {int(c.group(1)) for c in constants if c}
    return values.pop() if len(values) == 1 else None


def count(hlo_text: str) -> dict:
    """{kind: {"count": calls per step, "bytes": summed buffer bytes per step}, "uncounted_loops": n}."""
    comps, entry, shapes = _parse(hlo_text)
    totals = {k: collections.Counter() for k in KINDS}
    uncounted = 0

    def visit(comp: str, times: int, depth: int = 0) -> None:
        nonlocal uncounted
        if depth > 64 or comp not in comps:
            return
        in_reduce_scatter = comp.startswith("all-reduce-scatter")
        for name, shape, opcode, rest in comps[comp]:
            kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
            if kind in KINDS:
                if kind == "all-reduce" and in_reduce_scatter:
                    kind = "reduce-scatter"
                operands = [shapes.get(o, "") for o in _OPERANDS.findall(rest.split(")")[0])]
                size = _buffer_bytes(opcode, shape, operands)
                totals[kind]["count"] += times
                totals[kind]["bytes"] += times * size
            callees = dict(_CALLEES.findall(rest))
            if opcode == "while" and "body" in callees:
                trips = _trip_count(comps.get(callees.get("condition", ""), []))
                if trips is None:
                    uncounted += 1
                visit(callees["body"], times * (trips or 1), depth + 1)
                continue
            for key, callee in callees.items():
                if key != "condition":
                    visit(callee, times, depth + 1)
            for group in _CALLEE_LISTS.findall(rest):
                for callee in _OPERANDS.findall(group):
                    visit(callee, times, depth + 1)

    if entry is not None:
        visit(entry, 1)
    out = {k: {"count": int(v["count"]), "bytes": int(v["bytes"])} for k, v in totals.items()}
    out["uncounted_loops"] = uncounted
    return out

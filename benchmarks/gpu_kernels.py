"""Where one traced train step spends its device time: kernels by class, and the idle gaps between them.

    python benchmarks/gpu_kernels.py TRACE.json.gz [more traces]   # tables for traces brought back from a GPU

Reads the perfetto / trace-viewer JSON that `jax.profiler.trace(..., create_perfetto_trace=True)` writes
(`perfetto_trace.json.gz`, or `HOST.trace.json.gz` beside it; same events). benchmarks/gpu_profile.py
calls `kernel_split` on the step it traces.

Which events are device work (`device_events`). Metadata events ("ph": "M") name every pid
("process_name") and every (pid, tid) ("thread_name"):
* GPU: the pids whose process name contains "/device:GPU", and of those only the threads whose name
  contains "Stream" ("Stream #13(Compute)", "Stream #14(MemcpyD2H)"...): CUPTI's kernel and memcpy
  records. The same pid also holds derived lines ("XLA Modules", "XLA Ops", "Steps", "TensorFlow Ops")
  that repeat the kernels' time at other granularities; counting them would double the busy time and
  hide the idle gaps. Host threads ("/host:CPU": Python, the PjRt client, the launch thunks) never count.
* CPU (no GPU pid in the trace, as in `--cpu` dry runs): the host events that carry an `hlo_op` argument,
  i.e. XLA:CPU's thunks (the Python, PjRt and thread-pool spans around them carry none), less the `while`,
  `call` and `conditional` thunks, whose time is that of the thunks nested in them.

Classes (`classify`, first match wins, on the lower-cased kernel name; a name left in "other" gets a
second try on its `hlo_op` argument): attention (cuDNN's `..._sdpa_..._flash_fprop/bprop_...`, fmha,
flash, and the backward's `dot_do_o` / `convert_dq` helpers, which a bare `dot` would call GEMM), GEMM
(cuBLAS / cuBLASLt `nvjet_*`, `sm90_xmma_gemm_*`, CUTLASS, XLA's Triton `gemm_fusion_*`, convolutions;
on CPU YNNPACK/XNNPACK dot fusions and `dot`), gather / scatter (incl. dynamic (update-)slice), copies /
transposes (copy, transpose, memcpy, memset, concatenate, pad, slice), softmax / reductions (softmax,
reduce; LayerNorm's statistics are reductions too), elementwise fusions (any other XLA fusion: `loop_*`,
`input_*`, `wrapped_*`, `fusion*`), other.

Idle = the span from the first device event's start to the last one's end, minus the union of all device
event intervals (streams may overlap, so the union, not the sum, is the busy time).
"""
from __future__ import annotations

import collections
import gzip
import json
import re
import statistics
import sys
from typing import Any, NamedTuple

OTHER = "other"
CONTAINER = re.compile(r"^(while|call|conditional)(\.\d+)?$")  # XLA:CPU thunks that only run nested thunks
# Ordered: attention before GEMM (flash kernels run wgmma), GEMM before reductions (cuBLAS's splitKreduce),
# gather/scatter before copies (dynamic_slice is a slice), everything specific before "any fusion".
CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # cuDNN's flash backward is a chain: dot_do_o (rowsum of dO * O), the main kernel, convert_dq.
    ("attention", re.compile(r"sdpa|flash|fmha|attention|attn|mha_|dot_do_o|convert_dq")),
    ("GEMM", re.compile(r"gemm|cublas|cutlass|nvjet|xmma|matmul|convolution|ynn_fusion|xnn_fusion|onednn"
                        r"|(^|[_.])dot([_.\d]|$)")),
    ("gather / scatter", re.compile(r"gather|scatter|dynamic[-_]?(update[-_]?)?slice")),
    ("copies / transposes", re.compile(r"copy|transpose|memcpy|memset|concatenate|(^|_)pad(_|$)|(^|_)slice(_|$)")),
    ("softmax / reductions", re.compile(r"softmax|reduc|norm")),
    ("elementwise fusions", re.compile(r"fusion|^loop_|^input_|^wrapped_")),
)
CLASS_NAMES = tuple(name for name, _ in CLASSES) + (OTHER,)
SHORT_US = 10.0  # kernels shorter than this are launch-bound on any GPU of this class


class Event(NamedTuple):
    name: str
    start_us: float
    dur_us: float
    hlo_op: str  # the HLO instruction it belongs to, "" when the trace does not say


def classify(name: str, hlo_op: str = "") -> str:
    """The class of one kernel (or XLA:CPU thunk) name; `hlo_op` is the fallback for "other"."""
    for text in (name, hlo_op):
        lowered = text.lower()
        for cls, pattern in CLASSES:
            if pattern.search(lowered):
                return cls
    return OTHER


def load_trace(path: str) -> list[dict[str, Any]]:
    """The event list of a (gzipped) trace-viewer JSON file."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_events(events: list[dict[str, Any]]) -> tuple[list[Event], str]:
    """The device-work events of a trace and which rule picked them (module docstring)."""
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e.get("pid")] = str(e.get("args", {}).get("name", ""))
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    gpu_pids = {pid for pid, name in process.items() if "/device:GPU" in name}
    if gpu_pids:
        picked = [e for e in complete
                  if e.get("pid") in gpu_pids and "Stream" in thread.get((e.get("pid"), e.get("tid")), "")]
        rule = "GPU: /device:GPU pids, Stream threads"
    else:
        picked = [e for e in complete
                  if "hlo_op" in e.get("args", {}) and not CONTAINER.match(str(e.get("name", "")))]
        rule = "CPU: host events with an hlo_op argument (XLA:CPU thunks)"
    return [Event(str(e.get("name", "")), float(e["ts"]), float(e["dur"]), str(e.get("args", {}).get("hlo_op", "")))
            for e in picked], rule


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by [start, end) intervals, overlaps counted once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def kernel_split(events: list[dict[str, Any]], top: int = 15) -> dict[str, Any]:
    """Device time of one traced step: per class, idle between kernels, and the `top` kernels by total time."""
    device, rule = device_events(events)
    if not device:
        return {"rule": rule, "n_events": 0}
    intervals = [(e.start_us, e.start_us + e.dur_us) for e in device]
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    busy = union_us(intervals)
    by_class = {cls: {"ms": 0.0, "count": 0} for cls in CLASS_NAMES}
    by_name: dict[str, dict[str, Any]] = collections.defaultdict(lambda: {"ms": 0.0, "count": 0, "hlo_op": ""})
    for e in device:
        cls = classify(e.name, e.hlo_op)
        by_class[cls]["ms"] += e.dur_us / 1e3
        by_class[cls]["count"] += 1
        row = by_name[e.name]
        row.update(ms=row["ms"] + e.dur_us / 1e3, count=row["count"] + 1, cls=cls, hlo_op=row["hlo_op"] or e.hlo_op)
    kernel_ms = sum(c["ms"] for c in by_class.values())
    for c in by_class.values():
        c["pct_of_kernel_time"] = 100 * c["ms"] / kernel_ms if kernel_ms else 0.0
    durations = [e.dur_us for e in device]
    ranked = sorted(by_name.items(), key=lambda kv: kv[1]["ms"], reverse=True)[:top]
    return {
        "rule": rule, "n_events": len(device),
        "span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_ms": (span - busy) / 1e3,
        "idle_pct_of_span": 100 * (span - busy) / span if span else 0.0,
        "kernel_ms": kernel_ms, "median_kernel_us": statistics.median(durations),
        "short_kernels": {"under_us": SHORT_US, "count": sum(d < SHORT_US for d in durations),
                          "ms": sum(d for d in durations if d < SHORT_US) / 1e3},
        "by_class": by_class,
        "top_kernels": [{"name": name, **row} for name, row in ranked],
    }


def _cell(text: str, width: int = 90) -> str:
    """A kernel name fit for one markdown cell: pipes escaped, long template names cut."""
    text = text.replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def markdown(split: dict[str, Any], title: str) -> str:
    """The class table and the top-kernels table of one `kernel_split`."""
    if not split.get("n_events"):
        return f"**{title}**: no device events found ({split.get('rule', '')})\n"
    lines = [f"**{title}**: {split['n_events']} device events ({split['rule']}); device span "
             f"{split['span_ms']:.2f} ms, busy {split['busy_ms']:.2f} ms, idle between kernels "
             f"{split['idle_ms']:.2f} ms ({split['idle_pct_of_span']:.1f} % of the span); median kernel "
             f"{split['median_kernel_us']:.1f} µs, {split['short_kernels']['count']} kernels under "
             f"{split['short_kernels']['under_us']:.0f} µs ({split['short_kernels']['ms']:.2f} ms)", "",
             "| class | ms | % of kernel time | kernels |", "|---|---:|---:|---:|"]
    for cls, c in sorted(split["by_class"].items(), key=lambda kv: kv[1]["ms"], reverse=True):
        if c["count"]:
            lines.append(f"| {cls} | {c['ms']:.3f} | {c['pct_of_kernel_time']:.1f} | {c['count']} |")
    lines.append(f"| idle between kernels | {split['idle_ms']:.3f} | ({split['idle_pct_of_span']:.1f} % of span) | |")
    lines += ["", "| # | kernel | class | hlo_op | total ms | count |", "|---:|---|---|---|---:|---:|"]
    for i, k in enumerate(split["top_kernels"], 1):
        lines.append(f"| {i} | `{_cell(k['name'])}` | {k['cls']} | {_cell(k['hlo_op'], 40)} | "
                     f"{k['ms']:.3f} | {k['count']} |")
    return "\n".join(lines) + "\n"


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: python benchmarks/gpu_kernels.py TRACE.json[.gz] ...", file=sys.stderr)
        return 2
    for path in paths:
        try:
            events = load_trace(path)
        except (OSError, ValueError, KeyError) as e:
            print(f"{path}: not a readable trace JSON ({e.__class__.__name__}: {e})", file=sys.stderr)
            return 2
        print(markdown(kernel_split(events), path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

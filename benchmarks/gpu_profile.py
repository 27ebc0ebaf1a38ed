"""Why the ViT-B/16 train step runs at ~22 % of the GPU's bf16 matmul peak: one process, ~6 minutes, one folder.

On a lent H100 / H200 (benchmarks/RESULTS.md "On a GPU (H200)": batch 256 gave 1,604 img/s, 22.4 % MFU):

    python benchmarks/gpu_profile.py --out=$OUT
    python benchmarks/gpu_profile.py --cpu --out=/tmp/gpu_profile_cpu    # tiny sizes on this CPU, a few minutes

Through the device tool: the wheels benchmarks/gpu_pipeline.sh takes along in `.whl/` (of them this script
imports only ml_collections; the GPU image has jax, flax, optax, absl-py and PyYAML), `carry=[".whl"]`,
`timeout_s=600`, and as the command:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site:$PWD; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_profile.py --out=$OUT 2>&1 |
    tee $OUT/log.txt

Phases, in order, each under its own time limit and skipped (the summary says so) when less than half of
that limit is left of `--budget_s`; a watchdog writes the summary and exits should the run overrun the
budget by a minute:
1. env: jax / jaxlib / CUDA / cuDNN versions, device kind, `nvidia-smi` clocks and power limit.
2. peak: the bf16 matmul peak of this process (train_step.py's 16384^3 jitted matmul), what MFU divides by.
3. attention: `models/attention_impl.dot_product_attention` alone at the step's three shapes (target
   encoder: all 1 + 196 tokens, no mask; context encoder: 1 + K_ctx tokens, key mask; predictor: context
   + CLS query + targets, key mask), "xla" against "cudnn", forward and forward+backward. A masked odd
   length, which cuDNN's backward refuses, is padded to even inside the cuDNN path; an extra row at the
   even length (one more, masked, key and query, no pad or slice) shows what that padding costs.
4. step_xla, step_auto, step_auto_unrolled: the step train.py runs (train_step.py's JaxRunner and
   make_config: configs/vits.py at ViT-B/16, stripes, batch 256, the recipe of RESULTS.md's rows; its
   predictor is configs/vitb.py's, base_config's default) with model.attention "xla", then "auto",
   then "auto" with the blocks unrolled instead of scanned (the scanned stack is an XLA while loop; the
   unrolled step shows what the loop costs). Median step time, img/s, MFU (analytic FLOPs,
   mefem_jax.tpu.flops), then one step under jax.profiler: kernel time by class, idle between kernels,
   top kernels (gpu_kernels.py).
5. xla_flags: step_auto again in a fresh process per XLA flag set (XLA reads XLA_FLAGS once, at start-up;
   untraced), its step time against a fresh process with no extra flag: an A/B of flags that might help
   (command buffers off, to see what launch overhead costs; Triton GEMM fusions off, cuBLAS instead).
   What helps belongs in the launchers' XLA_FLAGS, not in the code.

Output in --out: summary.md (the tables), gpu_profile.json (every number), traces/STEP.trace.json.gz (one
perfetto trace per profiled step; `python benchmarks/gpu_kernels.py FILE` re-reads one).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import glob
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp

import gpu_kernels
from train_step import JaxRunner, jax_matmul_timer, load_faces, make_config, normalise  # puts the repo on sys.path
from mefem_jax.masking import make_masker
from mefem_jax.models import attention_impl
from mefem_jax.models.predictor import predictor_from_config
from mefem_jax.models.vit import encoder_dims, patch_grid
from mefem_jax.tpu.flops import step_flops

MAX_TRACE_BYTES = 12 * 2 ** 20  # the device tool brings back files of at most 16 MiB
WATCHDOG_GRACE_S = 60


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one mode measures: the model, the batch, and how many samples of each timing."""
    variant: str
    image_size: int
    batch: int
    dtype: str
    peak_n: int
    peak_samples: int
    warmup: int  # untimed steps after compilation
    steps: int  # steps per timed window
    windows: int  # timed windows (median reported)
    attn_calls: int  # attention calls per timed window
    limits: dict[str, int]  # phase -> seconds
    xla_variants: tuple[str, ...]  # XLA flag sets of the xla_flags phase; "" is the control


GPU = Sizes("B", 224, 256, "bfloat16", 16384, 15, warmup=2, steps=5, windows=5, attn_calls=20,
            limits=dict(env=30, peak=45, attention=120, step_xla=100, step_auto=100, step_auto_unrolled=160,
                        xla_flags=200),
            xla_variants=("", "--xla_gpu_enable_command_buffer=", "--xla_gpu_enable_triton_gemm=false"))
CPU = Sizes("Ti", 112, 4, "float32", 512, 3, warmup=1, steps=1, windows=1, attn_calls=2,
            limits=dict(env=30, peak=30, attention=90, step_xla=150, step_auto=150, step_auto_unrolled=200,
                        xla_flags=240),
            xla_variants=("", "--xla_force_host_platform_device_count=1"))  # a flag this CPU accepts
STEPS = {"step_xla": ("xla", True), "step_auto": ("auto", True), "step_auto_unrolled": ("auto", False)}
PHASES = ("env", "peak", "attention", *STEPS, "xla_flags")


# ------------------------------------------------------------------------------------------- 1. env


def _versions_from_plugin() -> dict[str, Any]:
    """CUDA runtime, cuDNN, cuBLAS... versions as jaxlib's CUDA plugin reports them (private API: best effort)."""
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return {}
    out = {}
    for name in dir(cuda_versions or object()):
        if name.endswith("_get_version"):
            try:
                out[name.removesuffix("_get_version")] = getattr(cuda_versions, name)()
            except Exception as e:  # a library the plugin cannot load: say which, keep the rest
                out[name.removesuffix("_get_version")] = f"unavailable ({e.__class__.__name__})"
    return out


def _nvidia_smi() -> str:
    query = ["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit", "--format=csv"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi not run ({e.__class__.__name__})"


def env_facts(deadline: float) -> dict[str, Any]:
    import jaxlib
    device = jax.devices()[0]
    wanted = ("jax", "flax", "optax", "nvidia-cudnn", "nvidia-cublas", "nvidia-cuda-runtime")
    packages = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()
                if d.metadata["Name"] and d.metadata["Name"].lower().startswith(wanted)}
    return {
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
        "platform_version": jax.extend.backend.get_backend().platform_version,
        "device_kind": device.device_kind, "device_count": jax.device_count(),
        "compute_capability": getattr(device, "compute_capability", None),
        "cuda_versions": _versions_from_plugin(), "nvidia_smi": _nvidia_smi(),
        "packages": dict(sorted(packages.items())), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "environment_info": jax.print_environment_info(return_string=True),
    }


# ------------------------------------------------------------------------------------------ 2. peak


def matmul_peak(sizes: Sizes, deadline: float) -> dict[str, Any]:
    sample = jax_matmul_timer(sizes.peak_n, sizes.dtype)
    flops = []
    while len(flops) < sizes.peak_samples and (not flops or time.monotonic() < deadline):
        flops.append(sample())
    return {"n": sizes.peak_n, "dtype": sizes.dtype, "flops": statistics.median(flops), "samples": flops}


# ------------------------------------------------------------------------------------- 3. attention


class AttnShape(NamedTuple):
    part: str
    batch: int
    length: int  # queries = keys: self-attention
    heads: int
    head_dim: int
    masked: bool


def attention_shapes(sizes: Sizes) -> list[AttnShape]:
    """The three attention calls of the step, from the same config and masker the step is built from."""
    config = make_config(sizes.variant, sizes.image_size, sizes.batch, "stripes", sizes.dtype)
    width, _, heads = encoder_dims(config.model)
    pred = predictor_from_config(config.model, config.predictor)
    grid = patch_grid(config.model)
    m = make_masker(config.mask, grid)
    shapes = [AttnShape("target encoder", sizes.batch, 1 + grid[0] * grid[1], heads, width // heads, False),
              AttnShape("context encoder", sizes.batch * m.n_ctx, 1 + m.k_ctx, heads, width // heads, True),
              AttnShape("predictor", sizes.batch * m.n_ctx * m.n_tgt, 2 + m.k_ctx + m.k_tgt, pred.heads,
                        pred.width // pred.heads, True)]
    padded = [s._replace(part=s.part + ", padded to even", length=s.length + 1)
              for s in shapes if s.masked and s.length % 2]
    return shapes + padded


def _inputs(s: AttnShape, dtype: str, padded: bool):
    """q, k, v, the key mask (None when unmasked; the padding key invalid) and a cotangent."""
    kq, kk, kv, km, kg = jax.random.split(jax.random.PRNGKey(0), 5)
    shape = (s.batch, s.length, s.heads, s.head_dim)
    q, k, v, g = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in (kq, kk, kv, kg))
    mask = None
    if s.masked:  # ~10 % of keys hidden, as padding slots and a hidden CLS are; key 1 always valid
        valid = jax.random.bernoulli(km, 0.9, (s.batch, s.length)).at[:, 1].set(True)
        if padded:
            valid = valid.at[:, -1].set(False)
        mask = valid[:, None, None, :]
    return q, k, v, mask, g


def _median_call_s(fn: Callable, args: tuple, calls: int, windows: int, deadline: float) -> float:
    """Median seconds per call over `windows` windows of `calls` back-to-back calls (dispatch overlapped)."""
    jax.block_until_ready(fn(*args))
    per_call = []
    while len(per_call) < windows and (not per_call or time.monotonic() < deadline):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / calls)
    return statistics.median(per_call)


def time_attention(s: AttnShape, impl: str, sizes: Sizes, deadline: float) -> dict[str, Any]:
    """Forward and forward+backward ms and TFLOP/s of one shape under one kernel (model FLOPs: fwd+bwd = 3x)."""
    q, k, v, mask, g = _inputs(s, sizes.dtype, "padded" in s.part)
    attend = lambda q, k, v, m: attention_impl.dot_product_attention(q, k, v, m, impl)  # noqa: E731

    def fwd_bwd(q, k, v, m, g):
        return jax.vjp(lambda q, k, v: attend(q, k, v, m), q, k, v)[1](g)

    flops = 4 * s.batch * s.heads * s.length * s.length * s.head_dim  # QK^T and AV
    row: dict[str, Any] = {}
    for name, fn, args, n_flops in (("fwd", attend, (q, k, v, mask), flops),
                                    ("fwd_bwd", fwd_bwd, (q, k, v, mask, g), 3 * flops)):
        seconds = _median_call_s(jax.jit(fn), args, sizes.attn_calls, sizes.windows, deadline)
        row[f"{name}_ms"] = 1e3 * seconds
        row[f"{name}_tflops"] = n_flops / seconds / 1e12
    return row


def attention_phase(sizes: Sizes, deadline: float) -> dict[str, Any]:
    impls = ["xla", "cudnn"]
    unavailable = ""
    if jax.default_backend() != "gpu":
        impls, unavailable = ["xla"], f"cudnn: not available on {jax.default_backend()}"
    rows = []
    for s in attention_shapes(sizes):
        auto = attention_impl.resolve("auto", jnp.dtype(sizes.dtype), s.head_dim)
        for impl in impls:
            row = {**s._asdict(), "impl": impl, "auto_picks": auto}
            if time.monotonic() > deadline:
                rows.append({**row, "note": "skipped: the phase's time limit was reached"})
                continue
            try:
                row.update(time_attention(s, impl, sizes, deadline))
            except attention_impl.AttentionImplError as e:  # our own refusal (dtype, head dim)
                row["note"] = f"refused: {e}"
            except Exception as e:  # cuDNN itself may reject a shape at compile or run time
                row["note"] = f"failed: {e.__class__.__name__}: {str(e).strip().splitlines()[0][:200]}"
            rows.append(row)
            print(f"  attention, {s.part}, {impl}: fwd {_fmt(row.get('fwd_ms'), '.3f')} ms, fwd+bwd "
                  f"{_fmt(row.get('fwd_bwd_ms'), '.3f')} ms {row.get('note', '')}", flush=True)
    return {"rows": rows, "unavailable": unavailable}


# ------------------------------------------------------------------------------------------ 4. steps


def trace_one_step(runner: JaxRunner, name: str, out: str) -> dict[str, Any]:
    """One step under jax.profiler; its kernel split, and the trace kept in out/traces when small enough."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            runner.run(1)
        found = (glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
                 or glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True))
        if not found:
            return {"n_events": 0, "rule": "the profiler wrote no trace JSON"}
        split = gpu_kernels.kernel_split(gpu_kernels.load_trace(found[0]))
        if jax.default_backend() == "gpu" and not split["rule"].startswith("GPU"):
            # No GPU process in the trace (CUPTI recorded nothing): the CPU rule would count the host's
            # kernel-launch spans as kernel time.
            split = {"n_events": 0, "rule": "the trace holds no /device:GPU process (no CUPTI kernel records)"}
        size = os.path.getsize(found[0])
        if size <= MAX_TRACE_BYTES:
            os.makedirs(os.path.join(out, "traces"), exist_ok=True)
            split["trace_file"] = os.path.join("traces", f"{name}.trace.json.gz")
            shutil.copy(found[0], os.path.join(out, split["trace_file"]))
        else:
            split["trace_file"] = f"not kept: {size / 2 ** 20:.1f} MiB"
    return split


def step_phase(name: str, sizes: Sizes, images, peak_flops: float | None, out: str,
               deadline: float, trace: bool = True) -> dict[str, Any]:
    attention, scan = STEPS[name]
    config = make_config(sizes.variant, sizes.image_size, sizes.batch, "stripes", sizes.dtype, scan_layers=scan)
    config.model.attention = attention
    runner = JaxRunner(config, images)
    flops = step_flops(config, runner.pieces.objective.masker, sizes.batch)
    runner.run(sizes.warmup)
    seconds = []
    while len(seconds) < sizes.windows and (not seconds or time.monotonic() < deadline):
        seconds.append(runner.run(sizes.steps) / sizes.steps)
    step_s = statistics.median(seconds)
    result = {"attention": attention, "scan_layers": scan, "compile_s": runner.compile_s,
              "step_ms": 1e3 * step_s, "step_ms_windows": [1e3 * s for s in seconds],
              "img_s": sizes.batch / step_s, "flops": flops,
              "mfu": flops["total"] / step_s / peak_flops if peak_flops else None}
    print(f"  {name}: {result['step_ms']:.2f} ms/step, {result['img_s']:.0f} img/s, compile "
          f"{runner.compile_s:.0f} s", flush=True)
    result["trace"] = trace_one_step(runner, name, out) if trace else {}
    return result


def xla_flags_phase(sizes: Sizes, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """step_auto in a fresh, untraced process per flag set of `sizes.xla_variants`, the control ("") first.

    The child writes to a temporary folder, so --out keeps its few files (the device tool returns 8)."""
    rows = []
    for flags in sizes.xla_variants:
        left = deadline - time.monotonic()
        row: dict[str, Any] = {"flags": flags or "(none: the control)"}
        if left < 30:
            rows.append({**row, "note": "skipped: the phase's time limit was reached"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, os.path.abspath(__file__), f"--out={tmp}", "--phases=step_auto", "--no_trace",
                   f"--budget_s={left - 5:.0f}", *(["--cpu"] if args.cpu else []),
                   *([f"--batch={args.batch}"] if args.batch else [])]
            env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
            done, child = None, {}
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
                child = json.load(open(os.path.join(tmp, "gpu_profile.json")))
            except (subprocess.TimeoutExpired, OSError, json.JSONDecodeError):
                pass  # no step time: the row's note says why
        if step := child.get("step_auto"):
            row.update(compile_s=step["compile_s"], step_ms=step["step_ms"], img_s=step["img_s"])
        elif status := child.get("phases", {}).get("step_auto", {}).get("status"):
            row["note"] = f"no step time: {status}"
        else:  # a flag this XLA does not know aborts the child before it writes anything: its last line says which
            tail = (done.stderr.strip().splitlines() or ["-"])[-1][:200] if done else "timed out"
            row["note"] = f"no step time ({'exit ' + str(done.returncode) if done else 'killed'}): {tail}"
        rows.append(row)
        print(f"  xla_flags {row['flags']}: {_fmt(row.get('step_ms'))} ms/step {row.get('note', '')}", flush=True)
    control = rows[0].get("step_ms") if rows and not sizes.xla_variants[0] else None
    for row in rows:
        row["vs_control"] = row["step_ms"] / control if control and row.get("step_ms") else None
    return {"rows": rows}


# ----------------------------------------------------------------------------------------- report


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def summary_markdown(r: dict[str, Any]) -> str:
    env, s = r.get("env", {}), r["sizes"]
    lines = [f"# Train-step GPU profile, {r['started']}", "",
             f"ViT-{s['variant']}/16 at {s['image_size']} px, batch {s['batch']}, {s['dtype']}, stripes; "
             f"budget {r['budget_s']} s, ran {r.get('total_s', 0):.0f} s. `{r['command']}`", "",
             "## Machine", "", "| fact | value |", "|---|---|"]
    for key in ("device_kind", "backend", "platform_version", "compute_capability", "jax", "jaxlib",
                "cuda_versions", "packages", "nvidia_smi", "xla_flags"):
        if key in env:
            value = json.dumps(env[key]) if isinstance(env[key], dict) else str(env[key]).replace("\n", "<br>")
            lines.append(f"| {key} | {value} |")
    lines += ["", "## Phases", "", "| phase | status | s |", "|---|---|---:|"]
    lines += [f"| {name} | {p['status']} | {p.get('seconds', 0):.0f} |" for name, p in r["phases"].items()]
    if "peak" in r:
        p = r["peak"]
        lines += ["", "## Matmul peak", "", f"{p['n']}^3 {p['dtype']} jitted matmul: median "
                  f"{p['flops'] / 1e12:.3g} TFLOP/s over {len(p['samples'])} samples (min "
                  f"{min(p['samples']) / 1e12:.3g}, max {max(p['samples']) / 1e12:.3g})."]
    if "attention" in r:
        a = r["attention"]
        lines += ["", "## Attention alone", "", "Model FLOPs (QK^T and AV; forward+backward = 3x forward), median "
                  "per call of back-to-back calls." + (f" {a['unavailable']}." if a["unavailable"] else ""), "",
                  "| part | batch | length | heads x dim | mask | auto picks | kernel | fwd ms | fwd TFLOP/s | "
                  "fwd+bwd ms | fwd+bwd TFLOP/s | note |", "|---|---:|---:|---|---|---|---|---:|---:|---:|---:|---|"]
        for row in a["rows"]:
            lines.append(f"| {row['part']} | {row['batch']} | {row['length']} | {row['heads']} x {row['head_dim']} | "
                         f"{'key mask' if row['masked'] else 'none'} | {row['auto_picks']} | {row['impl']} | "
                         f"{_fmt(row.get('fwd_ms'), '.3f')} | {_fmt(row.get('fwd_tflops'), '.3g')} | "
                         f"{_fmt(row.get('fwd_bwd_ms'), '.3f')} | {_fmt(row.get('fwd_bwd_tflops'), '.3g')} | "
                         f"{row.get('note', '')} |")
    steps = {name: r[name] for name in STEPS if name in r}
    if steps:
        lines += ["", "## Train step", "", "MFU = analytic step FLOPs (matmuls, mefem_jax.tpu.flops) per second "
                  "over the peak above. The traced step may run without XLA's command buffers (CUDA graphs), so "
                  "its device span can exceed the timed step; idle = span minus busy (gpu_kernels.py).", "",
                  "| step | attention | layers | compile s | step ms | img/s | MFU % | traced span ms | busy ms | "
                  "idle % of span |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, st in steps.items():
            t = st["trace"]
            lines.append(f"| {name} | {st['attention']} | {'scan' if st['scan_layers'] else 'unrolled'} | "
                         f"{st['compile_s']:.0f} | {st['step_ms']:.2f} | {st['img_s']:.0f} | "
                         f"{_fmt(st['mfu'] and 100 * st['mfu'], '.1f')} | {_fmt(t.get('span_ms'))} | "
                         f"{_fmt(t.get('busy_ms'))} | {_fmt(t.get('idle_pct_of_span'), '.1f')} |")
        flops = next(iter(steps.values()))["flops"]
        lines += ["", "Step GFLOP: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in flops.items()) + "."]
        lines += ["", "## Kernel time of one traced step", ""]
        for name, st in steps.items():
            if st["trace"]:
                lines += [gpu_kernels.markdown(st["trace"], f"{name} ({st['trace'].get('trace_file', 'no trace')})")]
    if "xla_flags" in r:
        lines += ["", "## XLA flags", "", "step_auto's step in a fresh, untraced process per flag set; the control "
                  "is the same process with no extra flag. Ratio < 1: the flags make the step faster.", "",
                  "| XLA_FLAGS added | compile s | step ms | img/s | step ms / control | note |",
                  "|---|---:|---:|---:|---:|---|"]
        for row in r["xla_flags"]["rows"]:
            lines.append(f"| `{row['flags']}` | {_fmt(row.get('compile_s'), '.0f')} | {_fmt(row.get('step_ms'))} | "
                         f"{_fmt(row.get('img_s'), '.0f')} | {_fmt(row.get('vs_control'), '.3f')} | "
                         f"{row.get('note', '')} |")
    lines += ["", "Which trace events count as device work, and the kernel classes: benchmarks/gpu_kernels.py's "
              "docstring (GPU: the /device:GPU process's Stream threads only; host threads never count)."]
    return "\n".join(lines) + "\n"


class Report:
    """The results so far, rewritten to gpu_profile.json and summary.md after every phase (and by the watchdog)."""

    def __init__(self, out: str, results: dict[str, Any]):
        self.out, self.results, self.lock = out, results, threading.Lock()

    def write(self) -> None:
        with self.lock:
            self.results["total_s"] = time.monotonic() - self.results["_t0"]
            with open(os.path.join(self.out, "gpu_profile.json"), "w") as f:
                json.dump({k: v for k, v in self.results.items() if not k.startswith("_")}, f, indent=1, default=str)
            with open(os.path.join(self.out, "summary.md"), "w") as f:
                f.write(summary_markdown(self.results))

    def watchdog(self, after_s: float) -> None:
        """Past the budget and the grace: note the phase that overran, write what there is, exit."""
        def fire():
            self.results["phases"].setdefault(self.results.get("_current", "?"), {})["status"] = (
                f"killed: the run passed its budget by {WATCHDOG_GRACE_S} s")
            try:
                self.write()
                print(open(os.path.join(self.out, "summary.md")).read(), flush=True)
            finally:  # the main thread may be mid-update: whatever the write does, the run must end here
                os._exit(3)
        timer = threading.Timer(after_s, fire)
        timer.daemon = True
        timer.start()


# ------------------------------------------------------------------------------------------- main


def run_phase(name: str, fn: Callable[[float], Any], limit_s: int, report: Report, t0: float, budget_s: float):
    """Runs fn(deadline) unless the budget is short; records status and seconds; never raises."""
    left = budget_s - (time.monotonic() - t0)
    need = limit_s / 2  # with less, a phase would be cut short before it has measured anything
    phases = report.results["phases"]
    if left < need:
        phases[name] = {"status": f"skipped: {left:.0f} s of the budget left", "seconds": 0}
        report.write()
        return None
    print(f"== {name} (limit {min(limit_s, left):.0f} s)", flush=True)
    start = time.monotonic()
    report.results["_current"] = name
    phases[name] = {"status": "running"}
    value, status = None, "ok"
    try:
        value = fn(start + min(limit_s, left))
        if time.monotonic() - start > limit_s:
            status = f"ok, over its {limit_s} s limit"
    except (Exception, SystemExit) as e:  # one phase's failure (load_faces exits) must not cost the others theirs
        traceback.print_exc()
        status = f"error: {e.__class__.__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    if value is not None:
        report.results[name] = value
    phases[name] = {"status": status, "seconds": time.monotonic() - start}
    report.write()
    return value


def _bad_input(message: str) -> None:
    print(f"gpu_profile.py: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for summary.md, gpu_profile.json and traces/")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (ViT-Ti/16 112 px, batch 4, fp32)")
    p.add_argument("--budget_s", type=float, default=480, help="the whole run's time budget")
    p.add_argument("--batch", type=int, default=0, help="override the mode's batch (256 on a GPU, 4 on --cpu)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--no_trace", action="store_true", help="time the steps without tracing one (xla_flags' children)")
    args = p.parse_args(argv)
    args.phases = [x for x in args.phases.split(",") if x]
    if unknown := sorted(set(args.phases) - set(PHASES)):
        _bad_input(f"--phases: unknown {unknown}; known: {list(PHASES)}")
    if args.budget_s <= 0 or args.batch < 0:
        _bad_input(f"--budget_s must be > 0 and --batch >= 0, got {args.budget_s} and {args.batch}")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        _bad_input(f"--out {args.out}: {e.strerror}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu:
        jax.config.update("jax_platforms", "cpu")
    sizes = CPU if args.cpu else GPU
    if args.batch:
        sizes = dataclasses.replace(sizes, batch=args.batch)
    t0 = time.monotonic()
    results = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "command": " ".join(["python", *sys.argv]), "budget_s": args.budget_s,
               "sizes": dataclasses.asdict(sizes), "phases": {}, "_t0": t0}
    report = Report(args.out, results)
    report.watchdog(args.budget_s + WATCHDOG_GRACE_S)
    faces: list = []  # loaded by the first step phase, shared by the others

    def step(name: str, deadline: float) -> dict[str, Any]:
        if not faces:
            pixels, results["images"] = load_faces(sizes.batch, sizes.image_size)  # noise where UTKFace is absent
            faces.append(normalise(pixels))
        peak = results.get("peak", {}).get("flops")
        return step_phase(name, sizes, faces[0], peak, args.out, deadline, trace=not args.no_trace)

    for name in args.phases:
        fn = {"env": env_facts, "peak": lambda d: matmul_peak(sizes, d),
              "attention": lambda d: attention_phase(sizes, d),
              "xla_flags": lambda d: xla_flags_phase(sizes, args, d)}.get(name, functools.partial(step, name))
        run_phase(name, fn, sizes.limits[name], report, t0, args.budget_s)
        gc.collect()  # a step's state and buffers go before the next step is built
    report.write()
    print(open(os.path.join(args.out, "summary.md")).read(), flush=True)
    return 1 if any(p["status"].startswith("error") for p in results["phases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

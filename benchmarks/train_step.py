"""Train-step throughput and MFU: the JAX MeFEm step next to a PyTorch reference step, in one run.

    python benchmarks/train_step.py --variant=Ti --image_size=224 --batch=32 --strategy=stripes \\
        --steps=3 --repeats=5 --dtype=float32 --json=/tmp/ti_stripes.json
    python benchmarks/train_step.py --report /tmp/ti_stripes.json /tmp/s_stripes.json ...   # markdown table

What is timed, per side, after a warm-up (which includes XLA's compilation on the JAX side):
`--repeats` windows of `--steps` full updates (forward + backward + AdamW + EMA) on one batch of real
UTKFace faces, the JAX windows ending in `block_until_ready` (torch on CPU is synchronous). Each round
runs a JAX window, a torch window and a few samples of each side's matmul peak, so load from other
processes on a shared machine hits all of them alike; the report is the median images/s of each side,
the median of the per-round JAX/torch ratios and the median peaks.

* JAX: the step `train.py` runs, `mefem_jax.training.run_setup.prepare(config).step` (mesh, shardings,
  the jit with the state donated), lowered and compiled once. It draws its masks on device inside the
  step from `fold_in(rng, step)`.
* PyTorch: `mefem_jax/reference/torch_step.py` (timm modules, I-JEPA's step; eager, as I-JEPA runs).
  It gets the very masks and CLS coins the JAX step draws at the same step, sampled by the JAX masker
  and converted to index tensors before the timed region: the benchmark times the step, not masking.
  (The JAX step's own on-device sampling is inside its timed step; its cost is reported separately.)

FLOPs of one step are counted analytically (matmuls only, 2*M*N*K: patch-embed conv, qkv / proj / MLP,
attention's QK^T and AV; backward = 2x forward for the trained context encoder and predictor, forward
only for the EMA target encoder) and checked against XLA's own count of the compiled step
(`cost_analysis()["flops"]`, which also counts element-wise work; `--layers=unrolled` only, since XLA
counts a while loop's body once and the default scanned step is such a loop). MFU = analytic FLOPs per second /
the matmul peak of this machine, measured in the same run with a large jitted matmul in JAX (and, for
the torch column, a large `F.linear`), in each side's compute dtype.

`--profile=DIR` then traces one step per side: the JAX thunks' time by op class (matmuls, layout copies,
element-wise loops) and by fusion kind from a jax.profiler trace, and torch's top aten ops.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import REPO, load_config  # before mefem_jax: puts this checkout first on sys.path
from mefem_jax.tpu.flops import step_flops
from mefem_jax.training.run_setup import prepare
from mefem_jax.weights.timm_import import declare_torchvision_ops

UTKFACE = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "utkface"))
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# --------------------------------------------------------------------------------------------- setup


def make_config(variant: str, image_size: int, batch: int, strategy: str, dtype: str, scan_layers: bool = True):
    """configs/vits.py (I-JEPA recipe, predictor width 384 depth 6) at the requested size and masking."""
    c = load_config("configs/vits.py")
    c.model.update(variant=variant, image_size=image_size, dtype=dtype, scan_layers=scan_layers)
    c.mask.strategy = strategy
    c.data.batch_size = batch
    return c


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> ImageNet-normalised float32, as the step does it on the device."""
    return (pixels.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def load_faces(n: int, size: int) -> tuple[np.ndarray, str]:
    """n UTKFace faces, bicubic-resized, NHWC uint8 (uniform noise if the data is absent)."""
    labels = os.path.join(UTKFACE, "labels.csv")
    if not os.path.isfile(labels):
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), "uniform noise (UTKFace absent)"
    from PIL import Image
    with open(labels, newline="") as f:
        files = [row["file"] for row in csv.DictReader(f) if row["split"] == "train"]
    out, skipped = [], []
    for name in files:
        if len(out) == n:
            break
        try:
            with Image.open(os.path.join(UTKFACE, "images", name)) as im:
                im = im.convert("RGB").resize((size, size), Image.BICUBIC)
        except OSError as e:  # unreadable or missing file: skip it, say so, take the next face
            skipped.append(f"{name} ({e.__class__.__name__})")
            continue
        out.append(np.asarray(im, np.uint8))
    if skipped:
        print(f"skipped {len(skipped)} unreadable face(s): {', '.join(skipped[:5])}", flush=True)
    if len(out) < n:
        raise SystemExit(f"only {len(out)} readable UTKFace faces for a batch of {n}")
    return np.stack(out), f"{n} UTKFace faces" + (f" ({len(skipped)} unreadable skipped)" if skipped else "")


# --------------------------------------------------------------------------------------------- FLOPs


def xla_flops(compiled) -> float:
    """XLA's FLOP count of a compiled executable (a dict in current JAX, a list of dicts in older)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


# ------------------------------------------------------------------------------------ matmul peaks
# Each returns a function that times ONE n x n @ n x n matmul and returns its FLOP/s. The run samples
# them between the step windows, so the peak sees the same background load as the steps it divides.


def jax_matmul_timer(n: int, dtype: str):
    """Jitted matmul in the compute dtype (float32 accumulation for bf16 inputs, as the model's dots)."""
    dt = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    mm(a, b).block_until_ready()

    def sample() -> float:
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        return 2 * n ** 3 / (time.perf_counter() - t0)

    return sample


def torch_matmul_timer(n: int, dtype: str):
    """`F.linear`, the call behind every `nn.Linear` of the reference. (In bf16 on a CPU without native
    bf16 it takes oneDNN's path, ~15x faster than `torch.mm`'s fallback kernel; in fp32 both use BLAS.)"""
    import torch
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dt)
    b = torch.randn(n, n, generator=g).to(dt)
    torch.nn.functional.linear(a, b)

    def sample() -> float:
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, b)
        return 2 * n ** 3 / (time.perf_counter() - t0)

    return sample


# ------------------------------------------------------------------------------------------ runners


class JaxRunner:
    """train.py's step (`prepare(config).step`: sharded, state donated, masks drawn inside from
    fold_in(rng, step)), compiled once so that its compile time and XLA's FLOP count are of what is timed."""

    def __init__(self, config, images: np.ndarray, compiler_options: dict | None = None):
        run = prepare(config)
        self.pieces = run.pieces
        self.state = run.init()
        self.images = jax.device_put(images, run.batch_sharding)
        t0 = time.perf_counter()
        try:
            self.compiled = run.step.lower(self.state, self.images).compile(
                compiler_options=compiler_options or None)
        except jax.errors.JaxRuntimeError as err:
            if compiler_options and "compile option" in str(err):  # an --xla_option XLA does not know
                raise SystemExit(f"--xla_option: {err}") from None
            raise
        self.compile_s = time.perf_counter() - t0

    def masks_for_steps(self, steps: int):
        """[(Masks, cls_target)] as numpy, for steps 0..steps-1: what the step draws at each."""
        obj, batch = self.pieces.objective, self.images.shape[0]
        sample = jax.jit(lambda step: obj.sample(jax.random.fold_in(self.state.rng, step), batch))
        return [jax.tree.map(np.asarray, sample(jnp.int32(t))) for t in range(steps)]

    def mask_sampling_s(self, repeats: int = 10) -> float:
        """Seconds per call of the on-device mask sampling alone (part of every JAX step)."""
        obj, batch = self.pieces.objective, self.images.shape[0]
        # The key is folded inside the jit, as the step does. Folded eagerly, the timing also caught an
        # eager dispatch per call and the eager fold_in's compile: 25 ms a call on a GPU for a sampler
        # that takes 0.3 ms (benchmarks/mask_sampling.py).
        sample = jax.jit(lambda step: obj.sample(jax.random.fold_in(self.state.rng, step), batch))
        jax.block_until_ready(sample(jnp.int32(0)))
        t0 = time.perf_counter()
        for i in range(repeats):
            out = sample(jnp.int32(i))
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / repeats

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.compiled(self.state, self.images)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t0


class TorchRunner:
    """mefem_jax/reference/torch_step.py, fed the JAX step's masks as pre-built index tensors."""

    def __init__(self, config, images: np.ndarray, masks, dtype: str, threads: int):
        import torch
        # Imported here, not at the top: the reference imports torch (the torch extra), which a
        # --skip_torch run does without.
        from mefem_jax.reference import torch_step as ref
        torch.set_num_threads(threads)
        # Flush denormals to zero, as XLA's CPU runtime does: Adam's second moments of tiny gradients go
        # subnormal, and on x86 that made torch's optimizer step 2x (fused) to 6x (foreach) slower here.
        torch.set_flush_denormal(True)
        self.model = ref.TorchMeFEm(config, dtype=dtype).train()
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        self.masks = [self.model.make_masks(m, cls) for m, cls in masks]

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.model.step(self.images, self.masks[self.model.step_count])
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------- the run


def benchmark(args) -> dict:
    config = make_config(args.variant, args.image_size, args.batch, args.strategy, args.dtype,
                         scan_layers=args.layers == "scan")
    if args.input != "normalised":
        config.data.augment_on = args.input
    pixels, image_source = load_faces(args.batch, args.image_size)
    images = normalise(pixels)  # what the torch reference (and --input=normalised) gets
    total_steps = args.warmup + args.repeats * args.steps + 1  # + 1: the profiled step
    load_before = os.getloadavg()

    jx = JaxRunner(config, images if args.input == "normalised" else pixels, args.xla_options)
    masker = jx.pieces.objective.masker
    flops = step_flops(config, masker, args.batch)
    result = {
        "variant": args.variant, "image_size": args.image_size, "batch": args.batch,
        "strategy": args.strategy, "dtype": args.dtype, "steps": args.steps, "repeats": args.repeats,
        "torch_dtype": None if args.skip_torch else args.torch_dtype,
        "xla_options": args.xla_options, "scan_layers": args.layers == "scan",
        "images": image_source, "input": args.input,
        "masks": {"n_ctx": masker.n_ctx, "k_ctx": masker.k_ctx, "n_tgt": masker.n_tgt, "k_tgt": masker.k_tgt},
        "predictor": dict(config.predictor),
        "flops_analytic": flops,
        "flops_xla": xla_flops(jx.compiled),
        "jax_compile_s": jx.compile_s,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "jax": jax.__version__,
                    "jax_devices": [str(d) for d in jax.devices()],
                    "xla_flags": os.environ.get("XLA_FLAGS", "")},
    }

    timers = {"jax": jx.run}
    peaks = {"jax": jax_matmul_timer(args.peak_size, args.dtype)}
    if not args.skip_torch:
        import torch
        tr = TorchRunner(config, images, jx.masks_for_steps(total_steps), args.torch_dtype,
                         args.threads or os.cpu_count())
        timers["torch"] = tr.run
        peaks["torch"] = torch_matmul_timer(args.peak_size, args.torch_dtype)
        result["machine"].update(torch=torch.__version__, torch_threads=torch.get_num_threads())

    # Warm-up: the JAX executable's first runs (allocation) and torch's oneDNN primitive caches.
    for run in timers.values():
        run(args.warmup)
    # Rounds alternate the sides (and the peak matmuls) so drifting background load hits all alike.
    seconds = {side: [] for side in timers}
    peak_samples = {side: [] for side in timers}
    for r in range(args.repeats):
        for side, run in timers.items():
            seconds[side].append(run(args.steps))
        for side, sample in peaks.items():
            peak_samples[side] += [sample() for _ in range(args.peak_per_round)]
        print(f"  round {r + 1}/{args.repeats}: " + ", ".join(
            f"{side} {args.batch * args.steps / seconds[side][-1]:.2f} img/s" for side in timers), flush=True)

    for side in timers:
        img_s = [args.batch * args.steps / t for t in seconds[side]]
        peak = statistics.median(peak_samples[side])
        result[f"{side}_img_s_runs"] = img_s
        result[f"{side}_img_s"] = statistics.median(img_s)
        result[f"peak_{side}_flops"] = peak
        result[f"peak_{side}_flops_runs"] = peak_samples[side]
        result[f"{side}_mfu"] = flops["total"] * result[f"{side}_img_s"] / args.batch / peak
    if "torch" in timers:
        # Ratio within each round (same load), then the median: robust to drifting background load.
        result["ratio_runs"] = [t / j for j, t in zip(seconds["jax"], seconds["torch"])]
        result["ratio"] = statistics.median(result["ratio_runs"])
        result["torch_mfu_vs_xla_peak"] = result["torch_mfu"] * result["peak_torch_flops"] / result["peak_jax_flops"]
    result["jax_mask_sampling_ms"] = 1e3 * jx.mask_sampling_s()
    result["load_avg_1min"] = [load_before[0], os.getloadavg()[0]]
    if args.profile:
        result["jax_profile_ms"] = profile_jax(jx, args.profile)
        if "torch" in timers:
            result["torch_profile_ms"] = profile_torch(tr)
    return result


# ------------------------------------------------------------------------------------------ profiles


def _op_kind(name: str) -> str:
    """Coarse class of an XLA CPU thunk from its fusion name."""
    if name.startswith(("ynn_fusion", "xnn_fusion", "onednn", "dot", "convolution")):
        return "matmul / conv (YNNPACK, Eigen)"
    if "copy" in name or "transpose" in name:
        return "layout copies / transposes"
    if "reduce" in name:
        return "reductions"
    return "element-wise loops"


def profile_jax(jx: JaxRunner, trace_dir: str) -> dict[str, float]:
    """Per-op time of one JAX step from a jax.profiler trace, summed by op class and by fusion kind."""
    import collections
    import glob
    import gzip
    import re
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    jx.run(1)
    jax.profiler.stop_trace()
    path = max(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_kind, by_class = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        # Thunk events only: skip the executor / thread-pool / Python spans that enclose them.
        if e.get("ph") != "X" or name.startswith(("ThunkExecutor", "$", "Slinky", "PjitFunction")):
            continue
        ms = e.get("dur", 0) / 1e3
        by_kind[re.sub(r"\.\d+$", "", name)] += ms
        by_class[_op_kind(name)] += ms
    return {"by_class": dict(by_class.most_common()), "by_fusion_kind": dict(by_kind.most_common(12))}


def profile_torch(tr: "TorchRunner") -> dict[str, float]:
    """Self CPU time of one torch step by aten op (top 12)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tr.run(1)
    rows = sorted(prof.key_averages(), key=lambda r: r.self_cpu_time_total, reverse=True)[:12]
    return {r.key: r.self_cpu_time_total / 1e3 for r in rows}


# -------------------------------------------------------------------------------------------- report

HEADER = ("| variant | image | batch | strategy | dtype | JAX img/s | torch img/s | JAX/torch | JAX MFU | "
          "torch MFU | step GFLOP analytic / XLA | matmul peak JAX / torch (GFLOP/s) | JAX compile s |")


def table_row(r: dict) -> str:
    g = 1e-9
    torch_cols = (f"{r['torch_img_s']:.2f} | {r['ratio']:.2f}x" if "torch_img_s" in r else "- | -")
    torch_mfu = f"{100 * r['torch_mfu']:.1f}%" if "torch_mfu" in r else "-"
    torch_peak = f"{g * r['peak_torch_flops']:.0f}" if "peak_torch_flops" in r else "-"
    short = {"float32": "fp32", "bfloat16": "bf16", None: "-"}
    dtype = short[r["dtype"]]
    if r.get("torch_dtype") not in (None, r["dtype"]):
        dtype += f" / torch {short[r['torch_dtype']]}"
    # Files written before the flag existed ran the then-default unrolled blocks.
    dtype += ", scan" if r.get("scan_layers") else ", unrolled"
    if r.get("input") in ("host", "device"):  # fed the pipeline's uint8 batch
        dtype += f", uint8 in, {r['input']} crop"
    if r.get("xla_options"):
        dtype += " " + " ".join(f"`{k}={v}`" for k, v in r["xla_options"].items())
    # XLA's cost analysis counts a while loop's body once, so a scanned step's count is not comparable.
    xla = "(loop)" if r.get("scan_layers") else f"{g * r['flops_xla']:.0f}"
    return (f"| ViT-{r['variant']}/16 | {r['image_size']} | {r['batch']} | {r['strategy']} | {dtype} | "
            f"{r['jax_img_s']:.2f} | {torch_cols} | {100 * r['jax_mfu']:.1f}% | {torch_mfu} | "
            f"{g * r['flops_analytic']['total']:.0f} / {xla} | "
            f"{g * r['peak_jax_flops']:.0f} / {torch_peak} | {r['jax_compile_s']:.0f} |")


HEADER_RULE = "|" + "---|" * (HEADER.count("|") - 1)


def report(paths: list[str]) -> str:
    rows = []
    for path in paths:
        with open(path) as f:
            rows.append(table_row(json.load(f)))
    return "\n".join([HEADER, HEADER_RULE] + rows)


def parse_xla_option(text: str) -> tuple[str, object]:
    """'key=value' -> (key, bool | int | str), the types XLA's compiler_options accept."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--xla_option expects KEY=VALUE, got {text!r}")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    return key, int(value) if value.lstrip("-").isdigit() else value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="Ti", choices=["Ti", "S", "B", "L"])
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--strategy", default="stripes", choices=["multiblock", "stripes", "quadrant"])
    p.add_argument("--steps", type=int, default=3, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per side (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side after compilation")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--torch_dtype", default="", choices=["", "float32", "bfloat16"],
                   help="the torch side's compute dtype when it should differ from --dtype (bf16 = autocast)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--peak_size", type=int, default=2048, help="side of the square matmul for the peak")
    p.add_argument("--peak_per_round", type=int, default=2, help="peak matmul samples per side per round")
    p.add_argument("--profile", default="", metavar="DIR",
                   help="after timing, trace one step per side (jax.profiler into DIR, torch.profiler)")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--layers", default="scan", choices=["scan", "unrolled"],
                   help="the JAX blocks as one nn.scan (model.scan_layers, the default) or unrolled")
    p.add_argument("--xla_option", action="append", default=[], metavar="KEY=VALUE",
                   help="an XLA debug option for the JAX step's compilation, e.g. xla_cpu_enable_fast_math=true")
    p.add_argument("--input", default="normalised", choices=["normalised", "host", "device"],
                   help="what the JAX step is fed: normalised float32 (as the torch side), or the "
                   "pipeline's uint8 batch with data.augment_on=host (normalised in the step) or "
                   "=device (random crop + flip + normalisation in the step)")
    p.add_argument("--json", default="", help="write the full result here")
    p.add_argument("--report", nargs="+", metavar="JSON", help="print the markdown table of earlier runs and exit")
    args = p.parse_args(argv)
    args.torch_dtype = args.torch_dtype or args.dtype
    args.xla_options = dict(parse_xla_option(o) for o in args.xla_option)

    if args.report:
        print(report(args.report))
        return
    if not args.skip_torch:
        declare_torchvision_ops()  # before timm is imported (docs/PLATFORM_NOTES.md)

    print(f"ViT-{args.variant}/16 {args.image_size}px batch {args.batch} {args.strategy} {args.dtype} "
          f"on {jax.devices()[0].platform} ({os.cpu_count()} cores)", flush=True)
    result = benchmark(args)
    print(HEADER)
    print(HEADER_RULE)
    print(table_row(result))
    print(f"JAX compile {result['jax_compile_s']:.1f} s; on-device mask sampling inside the JAX step "
          f"{result['jax_mask_sampling_ms']:.2f} ms; FLOPs per step: "
          + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in result["flops_analytic"].items()))
    for side in ("jax", "torch"):
        if f"{side}_profile_ms" in result:
            print(f"{side} profile of one step (ms): {json.dumps(result[f'{side}_profile_ms'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Compile the real train step for a Cloud TPU slice on this machine: does it fit, and what does it cost?

    python -m mefem_jax.compile_check --config=configs/vitb.py --topology=v5p-64
    python -m mefem_jax.compile_check --config=configs/vitl.py --topology=v5e-16 --config.mesh.fsdp=16 \
        --config.model.remat=True --find_max_batch --json=vitl_v5e16.json

No TPU is needed, only libtpu (`pip install -e ".[tpu]"`): `tpu_topologies` describes the slice's devices,
and `run_setup.prepare` builds exactly the run `train.py` would start there (state, sharding rules,
jit with the state donated), which is then lowered on abstract arrays and compiled by XLA:TPU. Reported
per device: argument / output / temp / peak bytes against the chip's HBM; the analytic FLOPs of a step;
the collectives the step executes (`hlo_collectives`); the compile time; and the images/s per chip the
step would reach at a stated MFU (the analytic FLOPs over the chip's bf16 peak; measure the real MFU on
the slice). Exit status: 0 when it fits, 1 when it does not (with the levers), 2 on bad input.
"""
from __future__ import annotations

import os

# The compile target is described, not attached: keep jax itself on the CPU (no TPU runtime start-up,
# and libtpu's "no TPU found" warnings never fire). Set before anything imports jax.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mefem_jax import cli  # noqa: E402
from mefem_jax.tpu import collectives, topologies
from mefem_jax.config import validate_config  # noqa: E402
from mefem_jax.tpu.flops import step_flops  # noqa: E402
from mefem_jax.models.vit import encoder_dims  # noqa: E402
from mefem_jax.training.run_setup import prepare  # noqa: E402

LEVERS = ("--config.mesh.fsdp=N (shard parameters and optimizer state over N devices), "
          "--config.model.remat=True (recompute activations in the backward pass), "
          "or a smaller --config.data.batch_size")


def compile_step(run):
    """`run.step` compiled on abstract inputs, or XLA's out-of-memory message when it refuses to."""
    try:
        return run.step.lower(*run.abstract_inputs()).compile()
    except Exception as e:  # noqa: BLE001  XLA raises XlaRuntimeError; only its out-of-memory verdict is ours
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
            raise
        return _first_line_with(str(e), "memory")


def check(config, tpu: topologies.Slice, devices: list | None = None, mfu: float = 0.4) -> dict:
    """Compiles one train step of `config` for `tpu`; the report dict (see module docstring)."""
    return check_with_executable(config, tpu, devices, mfu)[0]


def check_with_executable(config, tpu: topologies.Slice, devices: list | None = None, mfu: float = 0.4):
    """(report, compiled executable or None when XLA refused): for callers that inspect the program."""
    devices = devices if devices is not None else topologies.devices(tpu)
    run = prepare(config, devices)
    gen = tpu.generation
    report = {
        "topology": tpu.name, "xla_topology": tpu.xla_topology, "num_slices": tpu.num_slices,
        "devices": len(devices), "batch": run.batch_size,
        "model": dict(zip(("width", "depth", "heads"), encoder_dims(config.model)),
                      **{k: config.model[k] for k in ("variant", "image_size", "patch_size", "dtype", "remat",
                                                      "scan_layers")}),
        "mesh": dict(run.mesh.shape),
        "hbm_bytes": gen.hbm_bytes, "hbm_source": gen.source,
    }
    t0 = time.perf_counter()
    compiled = compile_step(run)
    report["compile_s"] = time.perf_counter() - t0
    if isinstance(compiled, str):  # XLA refused: the step needs more HBM than the chip has
        report.update(fits=False, compiler_refused=True, compiler_message=compiled, **_refusal_sizes(compiled))
        return report, None
    mem = compiled.memory_analysis()
    per_device = {
        "argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
        "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes,
        "generated_code": mem.generated_code_size_in_bytes, "peak": mem.peak_memory_in_bytes,
    }
    flops = step_flops(config, run.pieces.objective.masker, run.batch_size)["total"]
    chip_rate = gen.peak_bf16_flops * mfu  # FLOP/s one chip sustains at that MFU
    report.update(
        per_device_bytes=per_device,
        fits=per_device["peak"] <= gen.hbm_bytes,
        headroom_bytes=gen.hbm_bytes - per_device["peak"],
        flops_per_step=flops,
        mfu=mfu,
        step_seconds_at_mfu=flops / (len(devices) * chip_rate),
        img_per_sec_per_chip_at_mfu=run.batch_size * chip_rate / flops,
        collectives=collectives.count(compiled.as_text()),
        input_shardings=_shardings_summary(compiled),
    )
    return report, compiled


def find_max_batch(config, tpu: topologies.Slice, devices: list | None = None, max_compiles: int = 6,
                   mfu: float = 0.4, rel_tol: float = 0.05) -> dict:
    """The largest global batch (a multiple of the device count) whose step fits, by a bounded search.

    What compiles cost shapes the search: a step far from the HBM limit compiles in a minute or two, one
    that XLA refuses in seconds, but one just under the limit can take several minutes, because XLA then
    rematerialises to squeeze it in. Away from the limit both measures XLA gives are affine in the batch:
    the peak of a step that fits, and the temporaries its refusal message quotes. So the search starts at
    the config's batch and doubles until something fails (or halves until something fits), then aims
    where the line through two probes of one kind meets its limit (97 % of HBM for peaks, XLA's
    available HBM for refused temporaries), kept inside the bracket [largest fit, smallest failure];
    after a fit the line predicted, it tries `rel_tol` above it. Without two such probes it bisects.
    It stops when the bracket is within `rel_tol` (or one example per device), or after `max_compiles`.
    """
    devices = devices if devices is not None else topologies.devices(tpu)
    g = len(devices)
    target = 0.97 * tpu.generation.hbm_bytes
    probes: dict[int, dict] = {}
    lo, hi = 0, None  # lo fits (0: nothing seen to), hi does not (None: nothing seen to fail)

    def probe(batch: int) -> None:
        nonlocal lo, hi
        c = config.copy_and_resolve_references()
        c.data.batch_size = batch
        probes[batch] = check(c, tpu, devices, mfu)
        logging.info("batch %d: %s", batch, fit_summary(probes[batch]))
        if probes[batch]["fits"]:
            lo = max(lo, batch)
        else:
            hi = batch if hi is None else min(hi, batch)

    def step() -> int:
        return max(g, int(rel_tol * lo) // g * g)

    def closed() -> bool:
        return hi is not None and (hi - lo <= step() or (hi == g and not lo))

    def crossing(kind: str) -> float | None:
        """Where the line through the two probes nearest the boundary of one kind meets its limit: fits
        by their peak against 97 % of HBM, refusals by XLA's temporaries against what XLA offers. (The
        two measures differ, so a line never joins a fit to a refusal.)"""
        if kind == "fit":
            pts = [(b, p["per_device_bytes"]["peak"]) for b, p in probes.items() if "per_device_bytes" in p]
            pts, limit = sorted(pts)[-2:], target
        else:
            pts = [(b, p["temp_required_bytes"]) for b, p in probes.items() if "temp_required_bytes" in p]
            pts = sorted(pts)[:2]
            limit = 0.97 * min((p.get("hbm_available_bytes", target) for p in probes.values()), default=target)
        if len(pts) < 2 or pts[1][1] <= pts[0][1]:
            return None
        (b0, p0), (b1, p1) = pts
        return b0 + (limit - p0) * (b1 - b0) / (p1 - p0)

    def next_batch(predicted_fit: bool) -> tuple[int, bool]:
        """The next batch to compile, and whether it is a line's own (unclamped) prediction."""
        if predicted_fit and (hi is None or lo + step() < hi):
            return lo + step(), False  # the line said lo is about the boundary: check just above it
        guess = crossing("fit") if hi is None else crossing("refusal") or crossing("fit")
        by_line = guess is not None
        if guess is None:
            guess = 2 * lo if hi is None else (lo + hi) / 2 if lo else hi / 2
        top = 16 * lo if hi is None else hi - g
        b = int(guess) // g * g
        clamped = min(max(b, lo + g), top)
        return clamped, by_line and clamped == b

    probe(max(g, int(config.data.batch_size) // g * g))
    predicted = False
    while len(probes) < max_compiles and not closed():
        b, by_line = next_batch(predicted)
        if b in probes or b <= 0:
            break
        probe(b)
        predicted = by_line and probes[b]["fits"]
    return {"max_batch": lo or None, "smallest_failing": hi, "granule": g, "rel_tol": rel_tol,
            "compiles": len(probes), "exact": closed(), "probes": {str(b): probes[b] for b in sorted(probes)}}


def _shardings_summary(compiled) -> dict:
    """How many of the step's state leaves each PartitionSpec got (the rules, as the compiler saw them)."""
    state_shardings = compiled.input_shardings[0][0]
    counts: dict[str, int] = {}
    for s in jax.tree.leaves(state_shardings):
        key = str(getattr(s, "spec", s))
        counts[key] = counts.get(key, 0) + 1
    return counts


_SIZE = r"\(([\d.]+)([KMGT]?)\)"
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _refusal_sizes(message: str) -> dict:
    """The byte counts in XLA:TPU's out-of-memory message: what the temporaries need, what HBM offers."""
    out = {}
    for key, pattern in (("temp_required_bytes", r"required for HLO temporaries " + _SIZE),
                         ("hbm_available_bytes", r"available HBM " + _SIZE)):
        m = re.search(pattern, message)
        if m:
            out[key] = int(float(m.group(1)) * _UNITS[m.group(2)])
    return out


def _first_line_with(text: str, word: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return next((ln for ln in lines if word in ln.lower()), lines[0] if lines else "")[:300]


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def fit_summary(r: dict) -> str:
    if r.get("compiler_refused"):
        return f"does not fit (XLA: {r['compiler_message']})"
    b = r["per_device_bytes"]
    return f"peak {_gib(b['peak'])} of {_gib(r['hbm_bytes'])}, {'fits' if r['fits'] else 'DOES NOT FIT'}"


def format_report(r: dict) -> str:
    lines = [f"{r['topology']} x{r['num_slices']} ({r['xla_topology']}, {r['devices']} devices, mesh {r['mesh']}), "
             f"ViT-{r['model']['variant']} (width {r['model']['width']}, depth {r['model']['depth']}) "
             f"{r['model']['image_size']}px/{r['model']['patch_size']} "
             f"{r['model']['dtype']} remat={r['model']['remat']}, global batch {r['batch']}",
             f"  compile: {r['compile_s']:.1f} s"]
    if r.get("compiler_refused"):
        lines.append(f"  XLA refused: {r['compiler_message']}")
        return "\n".join(lines)
    b = r["per_device_bytes"]
    lines.append("  per device: " + ", ".join(f"{k} {_gib(v)}" for k, v in b.items() if k != "alias")
                 + f"  | HBM {_gib(r['hbm_bytes'])}: {'fits' if r['fits'] else 'DOES NOT FIT'}")
    lines.append(f"  step: {r['flops_per_step'] / 1e12:.1f} TFLOP (analytic); at {r['mfu']:.0%} MFU "
                 f"{r['step_seconds_at_mfu'] * 1e3:.0f} ms, {r['img_per_sec_per_chip_at_mfu']:.0f} img/s per chip")
    coll = r["collectives"]
    lines.append("  collectives per step: " + ", ".join(
        f"{k} {v['count']}x {_gib(v['bytes'])}" for k, v in coll.items() if isinstance(v, dict) and v["count"])
        + (f" ({coll['uncounted_loops']} loops of unknown length counted once)" if coll["uncounted_loops"] else ""))
    return "\n".join(lines)


def _define_flags():
    """Defined when run as a program only: train.py defines `--config` too, and both are imported by
    the tests (absl refuses a flag defined twice in one process)."""
    config = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vitb.py.",
                                             lock_config=True)
    flags.DEFINE_string("topology", None, "Cloud TPU slice, e.g. v5p-64, v5e-16, v6e-16, v4-32.")
    flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-centre network (multi-slice).")
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the images/s estimate.")
    flags.DEFINE_bool("find_max_batch", False, "Also search the largest global batch that fits.")
    flags.DEFINE_integer("max_compiles", 6, "Compiles the batch search may spend.")
    flags.DEFINE_string("json", None, "Write the report here as JSON.")
    flags.DEFINE_bool("debug", False, "On an error, show the traceback instead of one line.")
    return config


def _json_target_problem(path: str) -> str | None:
    """Why --json cannot be written (checked before minutes of compiling), or None. An existing file is
    replaced only when it is an earlier report of ours."""
    if os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return f"--json={path} is a folder, or its folder does not exist"
    if os.path.exists(path):
        try:
            with open(path) as f:
                ours = "xla_topology" in json.load(f)
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            return f"--json={path} exists and is not a compile_check report; not replacing it"
    return None


def main(argv) -> int:
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if f.config is None or f.topology is None:
        raise app.UsageError("--config and --topology are required")
    try:
        tpu = topologies.parse(f.topology, f.num_slices)
    except topologies.UnknownTopologyError as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    config = f.config
    problem = _json_target_problem(f.json) if f.json else None
    if problem is None and importlib.util.find_spec("libtpu") is None:
        problem = 'compiling for TPU needs libtpu: pip install -e ".[tpu]"'
    if problem:
        print(f"compile_check: {problem}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    # An executable compiled for a described slice cannot be reloaded from jax's disk cache (no TPU
    # client here), so a cache the user configured for training would only collect warnings.
    jax.config.update("jax_enable_compilation_cache", False)
    devices = topologies.devices(tpu)
    try:
        validate_config(config)  # the checks train runs at start-up: a bad value is one line here too
        report = check(config, tpu, devices, f.mfu)
        if f.find_max_batch:
            report["max_batch_search"] = find_max_batch(config, tpu, devices, f.max_compiles, f.mfu)
    except ValueError as e:  # the run's own checks: a mesh that does not tile the slice, an odd batch, ...
        if f.debug:
            raise
        print(f"compile_check: {tpu.describe()}: {cli.one_line(str(e))}", file=sys.stderr)
        return cli.EXIT_BAD_INPUT
    print(format_report(report))
    if "max_batch_search" in report:
        s = report["max_batch_search"]
        bound = f"the smallest that does not: {s['smallest_failing']}" if s["smallest_failing"] else "none failed"
        print(f"  largest global batch that fits: {s['max_batch']} ({bound}; {s['compiles']} compiles"
              + ("" if s["exact"] else f", bracket still wider than {s['rel_tol']:.0%}") + ")")
    if f.json:
        with open(f.json, "w") as out:
            json.dump(report, out, indent=2, sort_keys=True)
    if not report["fits"]:
        peak = report.get("per_device_bytes", {}).get("peak")
        temps = report.get("temp_required_bytes")
        need_text = (f"needs {_gib(peak)} per device" if peak else
                     f"its temporaries alone need {_gib(temps)} per device" if temps else "XLA could not place it")
        print(f"compile_check: does not fit {tpu.describe()}: {need_text}, HBM is "
              f"{_gib(report['hbm_bytes'])}. Levers: {LEVERS}", file=sys.stderr)
        return cli.EXIT_FAILED
    return cli.EXIT_FINISHED


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.flags_parser("compile_check", _define_flags()))

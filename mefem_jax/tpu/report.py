"""The reports of `tpu.compile.check` and `tpu.batch_search.find_max_batch` as text for people."""
from __future__ import annotations

LEVERS = ("--config.mesh.fsdp=N (shard parameters and optimizer state over N devices), "
          "--config.model.remat=True (recompute activations in the backward pass), "
          "or a smaller --config.data.batch_size")


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def fit_summary(r: dict) -> str:
    if r.get("compiler_refused"):
        return f"does not fit (XLA: {r['compiler_message']})"
    b = r["per_device_bytes"]
    return f"peak {gib(b['peak'])} of {gib(r['hbm_bytes'])}, {'fits' if r['fits'] else 'DOES NOT FIT'}"


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
    lines.append("  per device: " + ", ".join(f"{k} {gib(v)}" for k, v in b.items() if k != "alias")
                 + f"  | HBM {gib(r['hbm_bytes'])}: {'fits' if r['fits'] else 'DOES NOT FIT'}")
    # The MFU is an input, not a measurement: say so beside every figure derived from it.
    lines.append(f"  step: {r['flops_per_step'] / 1e12:.1f} TFLOP (analytic); at an assumed {r['mfu']:.0%} MFU "
                 f"(--mfu) {r['step_seconds_at_mfu'] * 1e3:.0f} ms, "
                 f"{r['img_per_sec_per_chip_at_mfu']:.0f} img/s per chip")
    coll = r["collectives"]
    lines.append("  collectives per step: " + ", ".join(
        f"{k} {v['count']}x {gib(v['bytes'])}" for k, v in coll.items() if isinstance(v, dict) and v["count"])
        + (f" ({coll['uncounted_loops']} loops of unknown length counted once)" if coll["uncounted_loops"] else ""))
    return "\n".join(lines)


def format_max_batch(s: dict) -> str:
    """The line under the report for a batch search's result."""
    bound = f"the smallest that does not: {s['smallest_failing']}" if s["smallest_failing"] else "none failed"
    return (f"  largest global batch that fits: {s['max_batch']} ({bound}; {s['compiles']} compiles"
            + ("" if s["exact"] else f", bracket still wider than {s['rel_tol']:.0%}") + ")")


def does_not_fit(r: dict, where: str) -> str:
    """Why a step that does not fit on `where` (the slice, described) does not, and what to change."""
    peak = r.get("per_device_bytes", {}).get("peak")
    temps = r.get("temp_required_bytes")
    need = (f"needs {gib(peak)} per device" if peak else
            f"its temporaries alone need {gib(temps)} per device" if temps else "XLA could not place it")
    return f"does not fit {where}: {need}, HBM is {gib(r['hbm_bytes'])}. Levers: {LEVERS}"

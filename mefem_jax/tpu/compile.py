"""One train step compiled for a described TPU slice, and what the compile says about it.

`run_setup.prepare` builds exactly the run `train.py` would start on the slice's devices (state, sharding
rules, jit with the state donated); it is lowered on abstract arrays and compiled by XLA:TPU. The report
holds, per device, argument / output / temp / peak bytes against the chip's HBM; the analytic FLOPs of a
step; the collectives it executes; the compile time; and the images/s per chip the step would reach at a
stated MFU (the analytic FLOPs over the chip's bf16 peak; the real MFU is measured on the slice). When
XLA refuses to compile for lack of HBM, the report carries its message and the sizes the message quotes.
"""
from __future__ import annotations

import re
import time
from typing import Callable

import jax

from mefem_jax.models.vit import encoder_dims
from mefem_jax.tpu import collectives, topologies
from mefem_jax.tpu.flops import step_flops
from mefem_jax.training.run_setup import prepare


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


def batch_checker(config, tpu: topologies.Slice, devices: list, mfu: float = 0.4) -> Callable[[int], dict]:
    """`check` of `config` as a function of the global batch alone: what `batch_search` probes with."""

    def check_batch(batch: int) -> dict:
        c = config.copy_and_resolve_references()
        c.data.batch_size = batch
        return check(c, tpu, devices, mfu)

    return check_batch


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
        report.update(fits=False, compiler_refused=True, compiler_message=compiled, **refusal_sizes(compiled))
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


def refusal_sizes(message: str) -> dict:
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

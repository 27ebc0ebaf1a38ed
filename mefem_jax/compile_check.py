"""Compile the real train step for a Cloud TPU slice on this machine: does it fit, and what does it cost?

    python -m mefem_jax.compile_check --config=configs/vitb.py --topology=v5p-64
    python -m mefem_jax.compile_check --config=configs/vitl.py --topology=v5e-16 --config.mesh.fsdp=16 \
        --config.model.remat=True --find_max_batch --json=vitl_v5e16.json

No TPU is needed, only libtpu (`pip install -e ".[tpu]"`): `tpu/topologies.py` describes the slice's
devices, `tpu/compile.py` compiles the step `train.py` would run there and reports its memory, FLOPs,
collectives and images/s at an MFU, `tpu/batch_search.py` finds the largest batch that fits. This module
is the command line. Exit status: 0 when it fits, 1 when it does not (with the levers), 2 on bad input.
"""
from __future__ import annotations

import os

# The compile target is described, not attached: keep jax itself on the CPU (no TPU runtime start-up,
# and libtpu's "no TPU found" warnings never fire). Set before anything imports jax, the tpu/ modules too.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mefem_jax import cli  # noqa: E402
from mefem_jax.config import validate_config  # noqa: E402
from mefem_jax.tpu import report, topologies  # noqa: E402
from mefem_jax.tpu.batch_search import find_max_batch  # noqa: E402
from mefem_jax.tpu.compile import batch_checker, check  # noqa: E402


def _define_flags():
    """Defined when run as a program only: train.py defines `--config` too, and both are imported by
    the tests (absl refuses a flag defined twice in one process)."""
    config = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vitb.py.",
                                             lock_config=True)
    flags.DEFINE_string("topology", None, "Cloud TPU slice, e.g. v5p-64, v5e-16, v6e-16, v4-32.")
    flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-centre network (multi-slice).")
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the images/s estimate (an assumption: "
                      "the one GPU measurement so far is 22% for ViT-B/16, README 'Measured step throughput').")
    flags.DEFINE_bool("find_max_batch", False, "Also search the largest global batch that fits.")
    flags.DEFINE_integer("max_compiles", 6, "Compiles the batch search may spend.")
    flags.DEFINE_string("json", None, "Write the report here as JSON.")
    flags.DEFINE_bool("debug", False, "On an error, show the traceback instead of one line.")
    return config


def _check_json_target(path: str) -> None:
    """Raises when --json cannot be written (checked before minutes of compiling). An existing file is
    replaced only when it is an earlier report of ours."""
    if os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise app.UsageError(f"--json={path} is a folder, or its folder does not exist")
    if os.path.exists(path):
        try:
            with open(path) as f:
                ours = "xla_topology" in json.load(f)
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise app.UsageError(f"--json={path} exists and is not a compile_check report; not replacing it")


def main(argv) -> int:
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if f.config is None or f.topology is None:
        raise app.UsageError("--config and --topology are required")
    tpu = topologies.parse(f.topology, f.num_slices)  # an unknown slice is a ValueError: one line, status 2
    if f.json:
        _check_json_target(f.json)
    if importlib.util.find_spec("libtpu") is None:
        raise app.UsageError('compiling for TPU needs libtpu: pip install -e ".[tpu]"')
    config = f.config
    # An executable compiled for a described slice cannot be reloaded from jax's disk cache (no TPU
    # client here), so a cache the user configured for training would only collect warnings.
    jax.config.update("jax_enable_compilation_cache", False)
    devices = topologies.devices(tpu)
    try:
        validate_config(config)  # the checks train runs at start-up: a bad value is one line here too
        result = check(config, tpu, devices, f.mfu)
        if f.find_max_batch:
            result["max_batch_search"] = find_max_batch(
                batch_checker(config, tpu, devices, f.mfu), config.data.batch_size, len(devices),
                tpu.generation.hbm_bytes, f.max_compiles)
    except ValueError as e:  # the run's own checks: a mesh that does not tile the slice, an odd batch, ...
        raise ValueError(f"{tpu.describe()}: {e}") from e
    print(report.format_report(result))
    if "max_batch_search" in result:
        print(report.format_max_batch(result["max_batch_search"]))
    if f.json:
        with open(f.json, "w") as out:
            json.dump(result, out, indent=2, sort_keys=True)
    if not result["fits"]:  # an answer, not an error: the levers on one line, and status 1
        print(f"compile_check: {report.does_not_fit(result, tpu.describe())}", file=sys.stderr)
        return cli.EXIT_FAILED
    return cli.EXIT_FINISHED


if __name__ == "__main__":
    cli.run("compile_check", main, _define_flags())

"""A few train steps of a tiny MeFEm model on a device mesh, for test_sharding.py.

Runs as its own process because the simulated device count (XLA_FLAGS) and `jax.distributed` must be set
before jax initialises. Modes:

    meshes    one process, N simulated devices: run each mesh in --meshes and print JSON comparing every
              run with the single-device run (losses, max relative parameter error, parameter specs)
    run       one process of a (possibly multi-process) run: train on mesh --mesh and, on process 0,
              save losses and full parameters to --out (.npz)

`--layers` picks the block layout: scanned (the default config's) or unrolled.
Every process reads the same real faces and contributes its own contiguous slice of the global batch,
as a data pipeline would.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `helpers.*`

GLOBAL_BATCH = 16


def tiny_config(dtype: str = "float32", scan_layers: bool = False):
    """The tests' tiny run at GLOBAL_BATCH, with even its small kernels sharded (FSDP is exercised)."""
    from helpers.tiny_configs import tiny_config as tests_tiny_config

    return tests_tiny_config(**{
        "model.dtype": dtype, "model.scan_layers": scan_layers, "data.batch_size": GLOBAL_BATCH,
        "optim.ref_batch": GLOBAL_BATCH, "optim.warmup_steps": 2, "total_steps": 20, "mesh.min_fsdp_size": 256})


def load_faces(n: int, size: int) -> np.ndarray:
    from helpers.faces import UTKFACE, load_faces as normalised  # the same faces the other tests use

    return normalised(sorted((UTKFACE / "images").glob("*.jpg"))[:n], size)


def train_on_mesh(config, mesh_shape, steps: int, faces: np.ndarray, devices=None):
    """(losses, state, state shardings) after `steps` updates on a (data, fsdp) mesh."""
    import jax

    from mefem_jax.training import sharding
    from mefem_jax.training.run_setup import prepare

    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1])
    run = prepare(config, devices)  # exactly train.py's state, shardings and jitted step
    state, step, batch_sh = run.init(), run.step, run.batch_sharding
    per_process = GLOBAL_BATCH // jax.process_count()
    lo = jax.process_index() * per_process
    losses = []
    for i in range(steps):
        batch = np.roll(faces, -i * 3, axis=0)[:GLOBAL_BATCH]  # a different batch each step
        images = sharding.global_batch(batch[lo:lo + per_process], batch_sh)
        state, metrics = step(state, images)
        losses.append(float(metrics["loss"]))
    return losses, state, run.state_sharding


def gather(tree) -> dict[str, np.ndarray]:
    import jax
    from jax.experimental import multihost_utils

    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        flat[name] = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return flat


def mode_meshes(args) -> None:
    import jax

    faces = load_faces(GLOBAL_BATCH + 3 * args.steps, 112)
    scan = args.layers == "scan"
    ref_losses, ref_state, _ = train_on_mesh(tiny_config(scan_layers=scan), (1, 1), args.steps, faces,
                                             jax.devices()[:1])
    ref = gather(ref_state.params)
    report = {"reference_losses": ref_losses, "meshes": {}}
    for spec in args.meshes.split(";"):
        shape = tuple(int(x) for x in spec.split(","))
        losses, state, state_sh = train_on_mesh(tiny_config(scan_layers=scan), shape, args.steps, faces)
        params = gather(state.params)
        rel = max(float(np.abs(params[k] - ref[k]).max() / (np.abs(ref[k]).max() + 1e-12)) for k in ref)
        specs = {"/".join(str(getattr(k, "key", k)) for k in path): str(s.spec)
                 for path, s in jax.tree_util.tree_leaves_with_path(state_sh.params)}
        actual = {"/".join(str(getattr(k, "key", k)) for k in path): str(x.sharding.spec)
                  for path, x in jax.tree_util.tree_leaves_with_path(state.params)}
        report["meshes"][spec] = {"losses": losses, "max_rel_param_err": rel, "specs": specs, "actual": actual}
    print("RESULT " + json.dumps(report))


def mode_run(args) -> None:
    import jax

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id)
    faces = load_faces(GLOBAL_BATCH + 3 * args.steps, 112)
    shape = tuple(int(x) for x in args.mesh.split(","))
    losses, state, _ = train_on_mesh(tiny_config(scan_layers=args.layers == "scan"), shape, args.steps, faces)
    params = gather(state.params)
    if jax.process_index() == 0:
        np.savez(args.out, losses=np.array(losses), **{"p:" + k: v for k, v in params.items()})
    if args.num_processes > 1:
        jax.distributed.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["meshes", "run"])
    p.add_argument("--meshes", default="8,1;2,4;1,8")
    p.add_argument("--layers", default="scan", choices=["scan", "unrolled"], help="model.scan_layers or not")
    p.add_argument("--mesh", default="1,1")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="")
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    {"meshes": mode_meshes, "run": mode_run}[args.mode](args)


if __name__ == "__main__":
    main()

"""Meshes, parameter sharding rules, and global batches — how one train step spans TPU/GPU devices.

The mesh has two axes: `data` (pure data parallelism: parameters replicated) and `fsdp` (data parallelism
whose parameters, EMA target and optimizer moments are also split across the axis, ZeRO-3 style). The
batch is split over both. Parameters follow an ordered list of (regex, rule) pairs matched against
"/"-joined parameter paths, big_vision style; the first match wins:

    "fsdp"       shard the largest dimension divisible by the fsdp size (leaves under `min_fsdp_size`
                 elements stay replicated: gathering them costs more latency than their memory saves)
    "replicate"  keep a full copy on every device

The step itself is written for one device; `jax.jit` with these in/out shardings lets XLA's SPMD
partitioner insert the all-gathers and reduce-scatters. Axis types are Auto on purpose: with jax's
Explicit default a plain FSDP matmul raises ShardingTypeError (docs/PLATFORM_NOTES.md).
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import jax
import numpy as np
import optax
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mefem_jax.models.activation_sharding import BATCH_AXES

DATA_AXES = BATCH_AXES  # the batch dimension is split over both mesh axes

# Leaves of a scanned block stack (`model.scan_layers`): axis 0 is the layer.
STACKED = re.compile(r"(^|/)blocks/")

DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r".*(kernel|cls_token|mask_token|cls_query|pos_embed)$", "fsdp"),
    (r".*", "replicate"),  # biases and LayerNorm vectors: small, used everywhere
)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, multihost: bool = False) -> None:
    """Joins a multi-process run; a single process on one machine skips this entirely.

    TPU pods (`multihost=True`, which the pod launcher passes) and SLURM jobs describe themselves to jax;
    other clusters pass the coordinator explicitly. `JAX_LOCAL_DEVICE_IDS=0,1,...` lists the accelerators
    this process drives: with one process per node it must name all of the node's GPUs, because jax
    otherwise binds each process to the single GPU numbered by its local rank.
    """
    local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
    local_ids = [int(i) for i in local.split(",")] if local else None
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_ids)
    elif multihost or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize(local_device_ids=local_ids)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices; one size may be -1 for "the rest".

    Over several TPU slices (multi-slice) the `fsdp` axis stays inside a slice, on the fast chip-to-chip
    links, and the `data` axis spans the slices: only the gradient reduction crosses the slower
    data-centre network."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    data, fsdp = int(mesh_cfg.data), int(mesh_cfg.fsdp)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n or data < 1 or fsdp < 1:
        raise ValueError(f"mesh data={mesh_cfg.data} x fsdp={mesh_cfg.fsdp} does not tile the {n} devices")
    axis_types = (AxisType.Auto, AxisType.Auto)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        if data % slices:
            raise ValueError(f"mesh.fsdp={fsdp} must divide the {n // slices} devices of one slice "
                             f"({slices} slices): fsdp does not cross the data-centre network")
        grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp), (slices, 1), devices,
                                                    allow_split_physical_axes=True)
        return Mesh(grid, ("data", "fsdp"), axis_types=axis_types)
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=axis_types, devices=devices)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def spec_for(name: str, shape: tuple[int, ...], fsdp_size: int, rules=DEFAULT_RULES,
             min_fsdp_size: int = 2 ** 14) -> P:
    """The PartitionSpec the rules give one leaf."""
    for pattern, rule in rules:
        if re.fullmatch(pattern, name):
            break
    else:
        raise ValueError(f"no sharding rule matches parameter {name!r}")
    if rule == "replicate" or fsdp_size == 1 or int(np.prod(shape)) < min_fsdp_size:
        return P()
    if rule != "fsdp":
        raise ValueError(f"unknown sharding rule {rule!r} for {name!r}")
    # Largest dimension first; ties go to the later dimension (output features of a kernel). A scanned
    # stack's leading layer axis is never split: the loop slices one layer per iteration, and a layer
    # living on one device would serialise the loop behind it.
    dims = range(1 if STACKED.search(name) else 0, len(shape))
    for dim in sorted(dims, key=lambda d: (shape[d], d), reverse=True):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()  # nothing divides evenly: replicate rather than pad


def param_specs(params, fsdp_size: int, rules=DEFAULT_RULES, min_fsdp_size: int = 2 ** 14):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: spec_for(_path_str(path), tuple(x.shape), fsdp_size, rules, min_fsdp_size), params)


def state_shardings(abstract_state, tx: optax.GradientTransformation, mesh: Mesh, rules=DEFAULT_RULES,
                    min_fsdp_size: int = 2 ** 14):
    """NamedShardings for a train state (pretraining's or a fine-tune's): params and any EMA target by the
    rules, optimizer moments like the params they belong to (otherwise `tx.init` would put all of them on
    one device), counters and rng replicated."""
    fsdp = mesh.shape["fsdp"]
    specs = param_specs(abstract_state.params, fsdp, rules, min_fsdp_size)
    to_sharding = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    replicated = NamedSharding(mesh, P())
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    opt = optax.tree_map_params(tx, lambda _, spec: spec, abstract_state.opt_state, specs,
                                transform_non_params=lambda _: P(), is_leaf=is_spec)
    opt = jax.tree.map(to_sharding, opt, is_leaf=is_spec)
    fields = dict(step=replicated, params=jax.tree.map(to_sharding, specs, is_leaf=is_spec), opt_state=opt,
                  rng=replicated)
    if hasattr(abstract_state, "target_params"):  # pretraining's EMA encoder; a fine-tune has none
        fields["target_params"] = jax.tree.map(to_sharding, specs["encoder"], is_leaf=is_spec)
    return abstract_state.replace(**fields)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXES))


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Assembles each process's slice of the batch into one global array (the per-process data pipeline
    already read only its own 1/process_count of the examples)."""
    return jax.make_array_from_process_local_data(sharding, local)


def log_mesh(mesh: Mesh) -> None:
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

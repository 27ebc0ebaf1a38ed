"""Keeps activations split by example on a data-parallel mesh, whatever the parameters are split by.

With FSDP (`mesh.fsdp > 1`) a kernel is split along its output features. Left to itself, XLA's sharding
propagation carries that split into the activations inside the layer loop: each device then holds every
example's tokens for a slice of the features, and the attention reshapes become all-to-alls (seen in the
compiled step, `compile_check`). FSDP means the opposite: every device runs its own examples through
whole layers and only gathers weights. `batch_sharded` pins the leading axis of the residual stream to
the mesh's data axes, once per block, so the partitioner gathers the weights instead.

The constraint is read from the abstract mesh in context (`run_setup` sets it while tracing the step);
outside one (tests, evaluation, export on one device) it is the identity.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # the mesh axes the batch dimension is split over


def batch_sharded(x: jax.Array) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    if x.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]):
        return x  # a batch the mesh cannot split evenly: leave the choice to XLA
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))

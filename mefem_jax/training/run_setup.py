"""What a training run is before its first step: mesh, state layout, shardings and the jitted update.

`train.py` executes it; `compile_check.py` compiles it ahead of time for a TPU topology this machine does
not have. Both go through `prepare`, so the program checked for HBM fit is the program that trains:
the same train state, the same sharding rules, the same jit with the state donated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mefem_jax.training import sharding
from mefem_jax.training.train_step import Pieces, build, init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """The static parts of a run. Nothing here holds an array: `abstract_state` is shapes and dtypes."""

    pieces: Pieces
    mesh: Mesh
    rng: jax.Array
    abstract_state: Any  # TrainState of jax.ShapeDtypeStruct
    state_sharding: Any  # TrainState of NamedSharding
    batch_sharding: NamedSharding
    init_fn: Callable  # rng -> TrainState, unjitted
    step: Any  # jax.jit(train_step) with shardings and the state donated
    batch_size: int  # global, over all processes

    @property
    def batch_shape(self) -> tuple[int, int, int, int]:
        s = self.pieces.input_size  # the pipeline's uint8 images; the step crops/normalises them
        return (self.batch_size, s, s, 3)

    def init(self):
        """Fresh parameters created directly in their shards: no host ever holds a full copy."""
        return jax.jit(self.init_fn, out_shardings=self.state_sharding)(self.rng)

    def abstract_inputs(self) -> tuple[Any, jax.ShapeDtypeStruct]:
        """(state, images) as sharded ShapeDtypeStructs: what `step.lower` takes to compile without data."""
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             self.abstract_state, self.state_sharding)
        images = jax.ShapeDtypeStruct(self.batch_shape, jnp.uint8, sharding=self.batch_sharding)
        return state, images


def prepare(config, devices: Sequence[jax.Device] | None = None) -> RunSetup:
    """Builds the run described by `config` over `devices` (default: every device of this job)."""
    mesh = sharding.make_mesh(config.mesh, devices)
    batch = int(config.data.batch_size)
    if batch % mesh.size:
        raise ValueError(f"data.batch_size={batch} must be divisible by the {mesh.size} devices")
    pieces = build(config)
    rng = jax.random.PRNGKey(config.seed)
    init_fn = lambda r: init_state(pieces, r)  # noqa: E731
    abstract = jax.eval_shape(init_fn, rng)
    state_sh = sharding.state_shardings(abstract, pieces.tx, mesh, min_fsdp_size=config.mesh.min_fsdp_size)
    batch_sh = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    train_step = make_train_step(pieces)

    def step_on_mesh(state, images):  # traced under the mesh, so models/activation_sharding.py sees it
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return train_step(state, images)

    step = jax.jit(step_on_mesh, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, replicated), donate_argnums=0)
    return RunSetup(pieces=pieces, mesh=mesh, rng=rng, abstract_state=abstract, state_sharding=state_sh,
                    batch_sharding=batch_sh, init_fn=init_fn, step=step, batch_size=batch)

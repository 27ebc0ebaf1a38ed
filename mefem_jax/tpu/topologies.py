"""Cloud TPU slices by the names users rent them under, as compile-only JAX devices.

`jax.experimental.topologies.get_topology_desc` builds the devices of a TPU slice on any machine (it needs
libtpu, the `tpu` extra, but no TPU), so a train step can be compiled for a v5p-64 from a laptop. It
takes XLA's own topology strings (`v5:2x4x4`, `v5e:4x4`), not the accelerator types of `gcloud`
(`v5p-64`, `v5litepod-16`): this module maps one to the other.

The number in a slice name counts chips for v5e and v6e, and TensorCores for v4 and v5p, whose two
cores per chip act as one JAX device ("megacore"). So v5p-64 is 32 chips and 32 devices, v5e-16 is
16 chips and 16 devices. Per-chip figures (`Generation`) come from the Cloud TPU system-architecture
pages named in `source`. Their "GB" of HBM are binary: XLA:TPU itself reports 15.75 GiB available on a
16 GB v5e chip (the rest is the runtime's), and refuses to compile a step that needs more.
"""
from __future__ import annotations

import dataclasses
import os

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # the gcloud prefix: v5p in v5p-64
    xla_name: str  # XLA's topology prefix: v5 in v5:2x4x4
    hbm_bytes: int  # per chip, which is one JAX device for every generation here
    peak_bf16_flops: float  # per chip, dense
    cores_per_chip_in_name: int  # 2 where the slice name counts TensorCores (v4, v5p)
    shapes: dict[int, str]  # chips -> physical shape of the slices Cloud TPU offers
    source: str


_SQUARE_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_CUBES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}

GENERATIONS = {
    g.name: g for g in (
        Generation("v4", "v4", 32 * GiB, 275e12, 2, _CUBES_3D, "https://cloud.google.com/tpu/docs/v4"),
        Generation("v5e", "v5e", 16 * GiB, 197e12, 1, _SQUARE_2D, "https://cloud.google.com/tpu/docs/v5e"),
        Generation("v5p", "v5", 95 * GiB, 459e12, 2, _CUBES_3D, "https://cloud.google.com/tpu/docs/v5p"),
        Generation("v6e", "v6e", 32 * GiB, 918e12, 1, _SQUARE_2D, "https://cloud.google.com/tpu/docs/v6e"),
    )
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


class UnknownTopologyError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as the user typed it, normalised: v5p-64
    generation: Generation
    chips: int  # per slice
    shape: str  # XLA's: 2x4x4
    num_slices: int

    @property
    def xla_topology(self) -> str:
        return f"{self.generation.xla_name}:{self.shape}"

    @property
    def devices_total(self) -> int:
        return self.chips * self.num_slices

    def describe(self) -> str:
        multi = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return f"{self.name}{multi} ({self.xla_topology}, {self.devices_total} chips)"


def known_names() -> list[str]:
    return [f"{g.name}-{chips * g.cores_per_chip_in_name}" for g in GENERATIONS.values() for chips in g.shapes]


def parse(name: str, num_slices: int = 1) -> Slice:
    """`v5p-64` (or `v5litepod-16`) -> Slice; raises UnknownTopologyError listing the known names."""
    prefix, _, count = name.strip().lower().rpartition("-")
    prefix = ALIASES.get(prefix, prefix)
    gen = GENERATIONS.get(prefix)
    chips = int(count) // gen.cores_per_chip_in_name if gen and count.isdigit() else None
    if gen is None or chips not in gen.shapes or int(count) % gen.cores_per_chip_in_name:
        raise UnknownTopologyError(f"unknown TPU slice {name!r}; known: {', '.join(known_names())}")
    if num_slices < 1:
        raise UnknownTopologyError(f"num_slices must be at least 1, got {num_slices}")
    return Slice(f"{gen.name}-{count}", gen, chips, gen.shapes[chips], num_slices)


def devices(tpu: Slice) -> list:
    """The compile-only JAX devices of the slice(s); needs libtpu (`pip install -e ".[tpu]"`)."""
    from jax.experimental import topologies  # imports libtpu's compiler: only when a topology is asked for

    # Off a TPU VM libtpu would look for the host's accelerator and its workers, and log a page of
    # warnings when it finds none; describing the slice being compiled for keeps it quiet. On a TPU VM
    # these are already set and left alone.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu.name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu lets one process per machine load it (a lock file guards the chips). Compiling touches no
    # chip, so a check may run beside training on a TPU VM, or beside another check.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    dims = [int(d) for d in tpu.shape.split("x")]
    kwargs: dict = {"num_slices": tpu.num_slices}
    if tpu.generation.cores_per_chip_in_name == 2:
        # Megacore: one device per chip (two TensorCores). Hosts hold 2x2x1 chips.
        kwargs.update(chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1), wrap=(False, False, False))
    elif tpu.chips < 4:
        kwargs.update(chips_per_host_bounds=(dims[0], dims[1], 1))
    desc = topologies.get_topology_desc(topology_name=tpu.xla_topology, platform="tpu", **kwargs)
    return list(desc.devices)

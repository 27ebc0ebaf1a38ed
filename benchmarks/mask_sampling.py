"""How long the on-device mask sampling of one train step takes, timed three ways.

    python benchmarks/mask_sampling.py [--config=configs/vitb.py] [--batches=64,256]

The step draws its masks from `fold_in(state.rng, step)` inside the jit, so the honest figure is
the sampler jitted with the fold inside ("jit"), or many draws in one compiled loop ("loop", which
leaves out the per-call dispatch). "eager fold_in" folds the key outside the jit, as
`train_step.py` once did: each call then also pays an eager dispatch (and the first, a compile),
which on a GPU inflated the reported time a hundredfold. Results: benchmarks/RESULTS.md.

It also prints how many of the static index slots carry a patch. Masks vary in size while the step's
shapes cannot, so every context and target set is padded to the largest the masker can draw; the step
computes on the padding slots, and the analytic FLOPs (mefem_jax/tpu/flops.py), hence MFU, count them.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from common import load_config  # before mefem_jax: puts this checkout first on sys.path
from mefem_jax.training import train_step

REPEATS = 20


def per_call_ms(fn, args_for) -> float:
    jax.block_until_ready(fn(*args_for(0)))  # compile and warm up outside the timing
    t0 = time.perf_counter()
    for i in range(REPEATS):
        out = fn(*args_for(i))
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / REPEATS * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/vitb.py", help="a recipe, as train.py's --config=FILE[:arg]")
    p.add_argument("--batches", default="64,256")
    args = p.parse_args()
    objective = train_step.build(load_config(args.config)).objective
    key = jax.random.key(0)
    print(f"{jax.devices()[0].device_kind}, {args.config}, masks: {objective.masker}")
    for batch in (int(b) for b in args.batches.split(",")):
        eager = jax.jit(lambda k, b=batch: objective.sample(k, b))
        inside = jax.jit(lambda i, b=batch: objective.sample(jax.random.fold_in(key, i), b))

        def draws(b=batch):
            def body(i, acc):
                return acc + objective.sample(jax.random.fold_in(key, i), b)[0].ctx_idx.sum()
            return jax.lax.fori_loop(0, REPEATS, body, 0)
        loop = jax.jit(draws)
        ms_eager = per_call_ms(eager, lambda i: (jax.random.fold_in(key, i),))
        ms_jit = per_call_ms(inside, lambda i: (jnp.int32(i),))
        jax.block_until_ready(loop())
        t0 = time.perf_counter()
        jax.block_until_ready(loop())
        ms_loop = (time.perf_counter() - t0) / REPEATS * 1e3
        print(f"batch {batch}: eager fold_in + jit {ms_eager:.2f} ms, jit {ms_jit:.2f} ms, "
              f"loop {ms_loop:.3f} ms per draw")
    masks = jax.jit(lambda k: objective.sample(k, 1024)[0])(key)
    for part, valid in (("context", masks.ctx_valid), ("target", masks.tgt_valid)):
        per_set = valid.mean(axis=-1)
        print(f"{part} sets: {float(valid.mean()):.1%} of their {valid.shape[-1]} slots carry a patch "
              f"(1,024 draws; per set {float(per_set.min()):.1%} to {float(per_set.max()):.1%})")


if __name__ == "__main__":
    main()

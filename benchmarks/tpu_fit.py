"""Which recipe fits which Cloud TPU slice: the README's "Scaling out" table, compiled on this CPU.

    python benchmarks/tpu_fit.py --out=benchmarks/tpu_fit.jsonl            # ~1 h on 2 cores; resumable
    python benchmarks/tpu_fit.py --report benchmarks/tpu_fit.jsonl         # the markdown table

For each case (a recipe in configs/, a slice, remat off and on) it runs `tpu.batch_search.find_max_batch`
starting at the recipe's batch: the first compile is the recipe batch itself (per-device peak HBM, fits
or not), the rest bound the largest global batch that fits. One JSON line per case is appended as soon as
it is done, and cases already in the file are skipped, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os

from common import load_config  # before mefem_jax: puts this checkout first on sys.path

# The TPU slices are compiled for, not run on: jax itself stays on this CPU, and an installed libtpu
# does not probe for chips.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

RECIPES = ("vits", "vitb", "vitl")  # configs/<recipe>.py
# (recipe, slice, num_slices): every recipe on one slice of three generations, and one multi-slice run.
CASES = ([(r, "v5e-16", 1) for r in RECIPES] + [("vitb", "v5e-16", 2)]
         + [(r, t, 1) for t in ("v5p-64", "v6e-16") for r in RECIPES])


def case_key(recipe: str, topology: str, num_slices: int, remat: bool) -> str:
    return f"{recipe}|{topology}|{num_slices}|remat={remat}"


def run(out: str, max_compiles: int) -> None:
    # Imported here, after JAX_PLATFORMS is set above: jax must start on the CPU (the slice is described).
    from mefem_jax.tpu import topologies
    from mefem_jax.tpu.batch_search import find_max_batch
    from mefem_jax.tpu.compile import batch_checker
    from mefem_jax.tpu.report import fit_summary

    done = set()
    if os.path.exists(out):
        with open(out) as f:
            done = {json.loads(line)["case"] for line in f if line.strip()}
    for recipe, topology, num_slices in CASES:
        tpu = topologies.parse(topology, num_slices)
        devices = None
        for remat in (False, True):
            key = case_key(recipe, topology, num_slices, remat)
            if key in done:
                continue
            devices = devices or topologies.devices(tpu)
            config = load_config(f"configs/{recipe}.py")
            config.model.remat = remat
            search = find_max_batch(batch_checker(config, tpu, devices), config.data.batch_size, len(devices),
                                    tpu.generation.hbm_bytes, max_compiles=max_compiles)
            at_recipe = search["probes"][str(config.data.batch_size)]
            row = {"case": key, "recipe": recipe, "topology": topology, "num_slices": num_slices,
                   "remat": remat, "recipe_batch": config.data.batch_size, "at_recipe_batch": at_recipe,
                   "search": {k: v for k, v in search.items() if k != "probes"},
                   "probes": {b: _brief(p) for b, p in search["probes"].items()}}
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(key, fit_summary(at_recipe), "| max batch", search["max_batch"], flush=True)


def _brief(p: dict) -> dict:
    keep = ("fits", "compile_s", "per_device_bytes", "temp_required_bytes", "compiler_message", "collectives",
            "img_per_sec_per_chip_at_mfu", "mesh")
    return {k: p[k] for k in keep if k in p}


def _peak_text(p: dict) -> str:
    if "per_device_bytes" in p:
        return f"{p['per_device_bytes']['peak'] / 2 ** 30:.1f}"
    if "temp_required_bytes" in p:
        return f"> {p['temp_required_bytes'] / 2 ** 30:.1f}"
    return "refused"


def _max_text(s: dict) -> str:
    """`2,608` when the bracket closed; `2,608-3,072` (fits at the first, not at the second) when the
    compile budget ran out first; `>= 65,536` when nothing tried failed."""
    if not s["max_batch"]:
        return "none"
    if s["smallest_failing"] is None:
        return f">= {s['max_batch']:,}"
    if s["exact"]:
        return f"{s['max_batch']:,}"
    return f"{s['max_batch']:,}-{s['smallest_failing']:,}"


def report(path: str) -> str:
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[(r["recipe"], r["topology"], r["num_slices"], r["remat"])] = r
    out = ["| recipe | slice | chips | HBM/chip | batch | peak GiB/chip, remat off / on | fits off / on | "
           "largest batch, remat off / on |", "|---|---|---:|---:|---:|---|---|---|"]
    from mefem_jax.tpu import topologies

    for recipe, topology, num_slices in CASES:
        off, on = rows.get((recipe, topology, num_slices, False)), rows.get((recipe, topology, num_slices, True))
        if off is None or on is None:
            continue
        tpu = topologies.parse(topology, num_slices)
        name = topology + (f" x {num_slices}" if num_slices > 1 else "")
        fits = " / ".join("yes" if r["at_recipe_batch"]["fits"] else "**no**" for r in (off, on))
        out.append(f"| {recipe} | {name} | {tpu.devices_total} | {tpu.generation.hbm_bytes / 2 ** 30:.0f} GiB | "
                   f"{off['recipe_batch']:,} | {_peak_text(off['at_recipe_batch'])} / "
                   f"{_peak_text(on['at_recipe_batch'])} | {fits} | {_max_text(off['search'])} / "
                   f"{_max_text(on['search'])} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/tpu_fit.jsonl")
    p.add_argument("--max_compiles", type=int, default=5)
    p.add_argument("--report", metavar="JSONL")
    args = p.parse_args()
    if args.report:
        print(report(args.report))
    else:
        run(args.out, args.max_compiles)


if __name__ == "__main__":
    main()

"""Training img/s with the real input pipeline feeding the real step, host against device augmentation.

    python benchmarks/train_feed.py --shards=DIR --configs=smoke,S --steps=4 --rounds=3 --workers=2

For each model (`smoke`: configs/vitb.py:smoke, 112 px; `S`, `B`: configs/vit{s,b}.py at 224 px) and
each `data.augment_on` it builds the run exactly as train.py does (`run_setup.prepare`: the jitted step
with the state donated and the batch sharded), the training iterator over `--shards`, and times

* step: `--rounds` windows of `--steps` updates on one uint8 batch already on the device, the two
  modes alternating window by window, so load from other processes hits both alike. The ratio
  device/host of each round (median reported) is what device augmentation costs the step.
* end to end: `--steps` x `--rounds` updates, each on the next batch of the pipeline (read, decode,
  host crop or centre square, uint8 batch, hand-off to the device), as the training loop does it.

The peak of a bf16/f32 matmul is not needed here; for MFU see benchmarks/train_step.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

from configs import vitb, vits  # noqa: E402
from mefem_jax import sharding  # noqa: E402
from mefem_jax.data.pipeline import make_train_iterator  # noqa: E402
from mefem_jax.run_setup import prepare  # noqa: E402

MODES = ("host", "device")


def model_config(name: str, batch: int, dtype: str):
    """smoke: the entry point's smoke model (112 px); S / B: the recipes at 224 px."""
    if name == "smoke":
        c = vitb.get_config("smoke")
    elif name in ("S", "B"):
        c = (vits if name == "S" else vitb).get_config()
        c.model.dtype = dtype
    else:
        raise SystemExit(f"--configs: unknown model {name!r}; allowed: smoke, S, B")
    c.data.batch_size = batch
    c.optim.ref_batch = batch
    c.total_steps = 1000
    return c


class Feed:
    """One model in one augmentation mode: its compiled step, its state and its pipeline."""

    def __init__(self, config, shards: str, mode: str, workers: int, read_threads: int):
        self.mode = mode
        config = config.copy_and_resolve_references()
        config.data.update(train=shards, augment_on=mode, workers=workers, read_threads=read_threads)
        self.run = prepare(config)
        self.state = self.run.init()
        self.it = make_train_iterator(config.data, image_size=config.model.image_size,
                                      global_batch_size=self.run.batch_size, seed=0,
                                      process_index=0, process_count=1)
        first = next(self.it)
        self.batch_bytes = int(first["image"].nbytes)
        self.fixed = self._put(first)
        t0 = time.perf_counter()
        self.state, metrics = self.run.step(self.state, self.fixed)
        jax.block_until_ready(metrics)
        self.compile_s = time.perf_counter() - t0

    def _put(self, batch):
        return sharding.global_batch(np.asarray(batch["image"]), self.run.batch_sharding)

    def step_window(self, steps: int) -> float:
        """Seconds for `steps` updates on the fixed device batch."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.run.step(self.state, self.fixed)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t0

    def end_to_end(self, steps: int) -> float:
        """Seconds for `steps` updates, each on the pipeline's next batch (as train.py's loop)."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.run.step(self.state, self._put(next(self.it)))
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t0

    def close(self):
        self.it.close()


def measure(name: str, args) -> dict:
    config = model_config(name, args.batch, args.dtype)
    feeds = {m: Feed(config, args.shards, m, args.workers, args.read_threads) for m in MODES}
    for f in feeds.values():
        f.step_window(args.warmup)
    rounds = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for m in MODES:
            rounds[m].append(feeds[m].step_window(args.steps))
    ratios = [rounds["host"][i] / rounds["device"][i] for i in range(args.rounds)]
    e2e = {}
    for m in MODES:
        feeds[m].end_to_end(args.warmup)  # fills the pipeline's buffers, starts its workers
        e2e[m] = feeds[m].end_to_end(args.steps * args.rounds)
    b = args.batch
    out = {"model": name, "image_size": int(config.model.image_size), "batch": b,
           "dtype": str(config.model.dtype), "workers": args.workers,
           "read_threads": args.read_threads, "device": jax.devices()[0].device_kind,
           "load": os.getloadavg()[0], "device_over_host_step": statistics.median(ratios)}
    for m in MODES:
        out[m] = {"step_img_s": b * args.steps / statistics.median(rounds[m]),
                  "e2e_img_s": b * args.steps * args.rounds / e2e[m],
                  "batch_bytes": feeds[m].batch_bytes, "compile_s": feeds[m].compile_s}
        feeds[m].close()
    return out


def table(results: list[dict]) -> list[str]:
    lines = ["| model | px | batch | dtype | mode | step img/s | end-to-end img/s | end-to-end / step "
             "| bytes per batch | device/host step speed |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for m in MODES:
            x = r[m]
            lines.append(
                f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['dtype']} | {m} | "
                f"{x['step_img_s']:.1f} | {x['e2e_img_s']:.1f} | "
                f"{x['e2e_img_s'] / x['step_img_s']:.2f} | {x['batch_bytes'] / 2**20:.2f} MiB | "
                + (f"{r['device_over_host_step']:.3f}" if m == "device" else "") + " |")
    return lines


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", default="smoke,S", help="models: smoke, S, B (comma-separated)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="float32", help="compute dtype of S / B")
    p.add_argument("--steps", type=int, default=2, help="updates per timed window")
    p.add_argument("--rounds", type=int, default=3, help="windows per mode (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates after compiling")
    p.add_argument("--train_workers", dest="workers", type=int, default=2,
                   help="Grain worker processes feeding the step")
    p.add_argument("--train_read_threads", dest="read_threads", type=int, default=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="ArrayRecord shard folder (build_shards output)")
    p.add_argument("--json", default="", help="also write the results here")
    add_args(p)
    args = p.parse_args()
    results = []
    for name in args.configs.split(","):
        results.append(measure(name.strip(), args))
        print(json.dumps(results[-1]), flush=True)
    print("\n".join(table(results)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

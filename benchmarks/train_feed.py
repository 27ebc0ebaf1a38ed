"""Training img/s with the real input pipeline feeding the real step, host against device augmentation.

    python benchmarks/train_feed.py --shards=DIR --train_configs=smoke,S --train_steps=2 \
        --train_rounds=3 --train_workers=2

For each model (`smoke`: configs/vitb.py:smoke, 112 px; `S`, `B`: configs/vit{s,b}.py at 224 px) and
each `data.augment_on` it builds the run exactly as train.py does (`run_setup.prepare`: the jitted step
with the state donated and the batch sharded), the training iterator over `--shards`, and times

* step: `--train_rounds` windows of `--train_steps` updates on one uint8 batch already on the device, the two
  modes alternating window by window, so load from other processes hits both alike. The ratio
  device/host of each round (median reported) is what device augmentation costs the step.
* end to end: `--train_steps` x `--train_rounds` updates, each on the next batch of the pipeline (read, decode,
  host crop or centre square, uint8 batch, hand-off to the device), as the training loop does it.

The peak of a bf16/f32 matmul is not needed here; for MFU see benchmarks/train_step.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from common import load_config  # before mefem_jax: puts this checkout first on sys.path
from mefem_jax.data.pipeline import make_train_iterator
from mefem_jax.training import sharding
from mefem_jax.training.run_setup import prepare

MODES = ("host", "device")


def model_config(name: str, batch: int, dtype: str):
    """smoke: the entry point's smoke model (112 px); S / B: the recipes at 224 px."""
    if name == "smoke":
        c = load_config("configs/vitb.py:smoke")
    elif name in ("S", "B"):
        c = load_config(f"configs/vit{name.lower()}.py")
        c.model.dtype = dtype
    else:
        raise SystemExit(f"--configs: unknown model {name!r}; allowed: smoke, S, B")
    c.data.batch_size = batch
    c.optim.ref_batch = batch
    c.total_steps = 1000
    return c


class Feed:
    """One model in one augmentation mode: its compiled step, its state and its pipeline."""

    def __init__(self, config, shards: str, mode: str, workers: int, read_threads: int,
                 source_size: int = 0):
        self.mode = mode
        config = config.copy_and_resolve_references()
        config.data.update(train=shards, augment_on=mode, workers=workers, read_threads=read_threads,
                           source_size=source_size)
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
    config = model_config(name, args.train_batch, args.dtype)
    feeds = {m: Feed(config, args.shards, m, args.train_workers, args.train_read_threads,
                     args.train_source_size) for m in MODES}
    steps, n_rounds, warmup = args.train_steps, args.train_rounds, args.train_warmup
    for f in feeds.values():
        f.step_window(warmup)
    rounds = {m: [] for m in MODES}
    for _ in range(n_rounds):
        for m in MODES:
            rounds[m].append(feeds[m].step_window(steps))
    ratios = [rounds["host"][i] / rounds["device"][i] for i in range(n_rounds)]
    e2e = {}
    for m in MODES:
        # Every worker delivers a batch before the clock starts: its start-up is not throughput.
        feeds[m].end_to_end(warmup + args.train_workers)
        e2e[m] = feeds[m].end_to_end(steps * n_rounds)
    b = args.train_batch
    out = {"model": name, "image_size": int(config.model.image_size), "batch": b,
           "dtype": str(config.model.dtype), "workers": args.train_workers,
           "read_threads": args.train_read_threads, "source_size": args.train_source_size,
           "device": jax.devices()[0].device_kind,
           "load": os.getloadavg()[0], "device_over_host_step": statistics.median(ratios)}
    for m in MODES:
        out[m] = {"step_img_s": b * steps / statistics.median(rounds[m]),
                  "e2e_img_s": b * steps * n_rounds / e2e[m],
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
                f"| {r['model']} | {r['image_size']} | {r['batch']} | {r['dtype']} | "
                + (f"device:{r['source_size']}" if m == "device" and r.get("source_size") else m)
                + " | "
                f"{x['step_img_s']:.3g} | {x['e2e_img_s']:.3g} | "
                f"{x['e2e_img_s'] / x['step_img_s']:.2f} | {x['batch_bytes'] / 2**20:.2f} MiB | "
                + (f"{r['device_over_host_step']:.3f}" if m == "device" else "") + " |")
    return lines


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train_configs", default="smoke,S",
                   help="models: smoke, S, B (comma-separated); empty: none")
    p.add_argument("--train_batch", type=int, default=16)
    p.add_argument("--dtype", default="float32", help="compute dtype of S / B")
    p.add_argument("--train_steps", type=int, default=2, help="updates per timed window")
    p.add_argument("--train_rounds", type=int, default=3, help="windows per mode (median)")
    p.add_argument("--train_warmup", type=int, default=1, help="untimed updates after compiling")
    p.add_argument("--train_workers", type=int, default=2,
                   help="Grain worker processes feeding the step")
    p.add_argument("--train_read_threads", type=int, default=1)
    p.add_argument("--train_source_size", type=int, default=0,
                   help="data.source_size of the device mode (0: the model's image size)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="ArrayRecord shard folder (build_shards output)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--markdown", default="", help="also write the table here")
    add_args(p)
    args = p.parse_args()
    results = []
    for name in filter(None, args.train_configs.split(",")):
        results.append(measure(name.strip(), args))
        print(json.dumps(results[-1]), flush=True)
    print("\n".join(table(results)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(table(results)) + "\n")


if __name__ == "__main__":
    main()

"""Input-pipeline throughput from UTKFace shards, host against device augmentation, and what it
means for training: every row of the "Data pipeline" section of benchmarks/RESULTS.md, one command.

    python benchmarks/data_pipeline.py                        # everything, ~15 min on 2 idle cores
    python benchmarks/data_pipeline.py --train_configs= --write=   # host side only, print only

1. Decoders: microseconds per JPEG for PIL, simplejpeg and (when its libturbojpeg loads) PyTurboJPEG,
   full size and DCT-reduced for a 224 px output, on UTKFace faces (200 px) and on larger photos made
   here from them (`--large`: 4x3 grids of faces upscaled to 400 px, 1600x1200, quality 90).
2. Where the time goes: one thread, µs per image of each stage, for each mode and size.
3. Host throughput: for each mode (data.augment_on=host: decode + random-resized crop + flip;
   =device: decode + centre square at the model's size, the crop happens in the step), image size
   and worker count, the real training iterator is timed over `--runs` windows of `--batches`
   batches after a warm-up that absorbs worker start-up. The CPU time of all processes in the
   window gives "img/s per busy core"; bytes per batch are the uint8 batch's (float32, as before
   this change, would be 4x). Each process decodes with `--read_threads` threads.
4. Training: benchmarks/train_feed.py for `--train_configs` (smoke, ViT-S/16 at 224): step img/s
   on a fixed batch and end-to-end img/s with the pipeline feeding the step, both modes.

Results replace the "Data pipeline" section of benchmarks/RESULTS.md (other sections are left
alone); --write= (empty) prints only.
"""
from __future__ import annotations

import argparse
import glob
import io
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from common import REPO  # before mefem_jax: puts this checkout first on sys.path
import train_feed
from mefem_jax.data import augment, decode, pipeline, records, sources
from mefem_jax.data.config import default_data_config
from mefem_jax.data.shards import build as build_shards

UTKFACE = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "utkface"))
BEGIN, END = "<!-- data_pipeline:begin -->", "<!-- data_pipeline:end -->"
MODES = ("host", "device")


def build_utkface_shards(work_dir: str, num_images: int) -> str:
    labels_in = os.path.join(UTKFACE, "labels.csv")
    if not os.path.isfile(labels_in):
        sys.exit(f"UTKFace not found at {UTKFACE}")
    os.makedirs(work_dir, exist_ok=True)
    with open(labels_in) as f:
        lines = f.read().splitlines()
    labels = os.path.join(work_dir, f"labels_{num_images}.csv")
    with open(labels, "w") as f:
        f.write("\n".join([lines[0]] + lines[1:num_images + 1]) + "\n")
    out = os.path.join(work_dir, f"utkface_{num_images}")
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        build_shards.build(build_shards.BuildOptions(
            images=os.path.join(UTKFACE, "images"), labels=labels, out=out, num_shards=16,
            workers=os.cpu_count() or 1))
    return out


# ------------------------------------------------------------------------------------- 1. decoders


def make_large_photos(faces: list[bytes], out_dir: str, n: int) -> list[bytes]:
    """n 1600x1200 JPEGs (q90), each a 4x3 grid of faces upscaled bicubically to 400 px."""
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for i in range(n):
        path = os.path.join(out_dir, f"grid_{i:03d}.jpg")
        if not os.path.isfile(path):
            canvas = Image.new("RGB", (1600, 1200))
            for k in range(12):
                face = Image.open(io.BytesIO(faces[(12 * i + k) % len(faces)])).convert("RGB")
                canvas.paste(face.resize((400, 400), Image.BICUBIC), (400 * (k % 4), 400 * (k // 4)))
            canvas.save(path, quality=90)
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def _need(w: int, h: int, size: int) -> tuple[int, int]:
    """Full-image size at which the centre square still has `size` px."""
    side = min(w, h)
    return math.ceil(w * size / side), math.ceil(h * size / side)


def _pil(data: bytes, size: int | None) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    if size:
        image.draft("RGB", _need(*image.size, size))
    return np.asarray(image.convert("RGB"))


def _simplejpeg(data: bytes, size: int | None) -> np.ndarray:
    import simplejpeg

    if not size:
        return simplejpeg.decode_jpeg(data, "RGB")
    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    need = _need(w, h, size)
    return simplejpeg.decode_jpeg(data, "RGB", min_width=need[0], min_height=need[1], min_factor=2)


def _turbojpeg_decoder(lib: str):
    """PyTurboJPEG's decode, or a reason why it cannot run here."""
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG
        tj = TurboJPEG(lib or None)
    except Exception as err:  # noqa: BLE001 - ImportError, or no libturbojpeg of the right version
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"

    def run(data: bytes, size: int | None) -> np.ndarray:
        k = 1
        if size:
            w, h, _, _ = tj.decode_header(data)
            need = _need(w, h, size)
            while k < 8 and w // (2 * k) >= need[0] and h // (2 * k) >= need[1]:
                k *= 2
        return tj.decode(data, pixel_format=TJPF_RGB, scaling_factor=(1, k))
    return run


def time_decoders(sets: dict[str, list[bytes]], size: int, turbo_lib: str, repeats: int = 3):
    decoders = {"PIL (Pillow " + Image.__version__ + ")": _pil}
    try:
        import simplejpeg
        decoders[f"simplejpeg {simplejpeg.__version__}"] = _simplejpeg
    except ImportError:
        pass
    turbo = _turbojpeg_decoder(turbo_lib)
    notes = []
    if isinstance(turbo, str):
        notes.append(f"PyTurboJPEG not timed ({turbo}).")
    else:
        import turbojpeg
        decoders[f"PyTurboJPEG {getattr(turbojpeg, '__version__', '')}".strip()] = turbo
    rows = []
    for name, fn in decoders.items():
        row = {"decoder": name}
        for set_name, datas in sets.items():
            for scaled in (False, True):
                best = math.inf
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for d in datas:
                        fn(d, size if scaled else None)
                    best = min(best, (time.perf_counter() - t0) / len(datas))
                row[(set_name, scaled)] = best * 1e6
        rows.append(row)
    return rows, notes


# ----------------------------------------------------------------------------------- 2. stages


def parse_mode(spec: str) -> tuple[str, int]:
    """'host' | 'device' | 'device:R' (R: data.source_size) -> (augment_on, source_size)."""
    mode, _, r = spec.partition(":")
    if mode not in MODES or (r and (mode != "device" or not r.isdigit())):
        raise SystemExit(f"--modes: {spec!r}; allowed: host, device, device:PIXELS")
    return mode, int(r or 0)


def profile_stages(shards: str, size: int, spec: str, n: int = 256, batch: int = 64):
    """Microseconds per image of each stage, one thread, the calls the pipeline makes (without
    Grain around them)."""
    mode, source_size = parse_mode(spec)
    size = source_size or size  # device: the host makes the source, the step the crop
    source = sources.open_source(shards)
    rng = np.random.default_rng(0)
    t = dict.fromkeys(["read record", "decode JPEG", "crop+resize", "flip", "to numpy",
                       "stack into uint8 batch"], 0.0)
    pixels = []
    for i in range(n):
        t0 = time.perf_counter()
        _, _, data = records.decode_record(source._source[i % len(source)])  # the raw read
        t1 = time.perf_counter()
        if mode == "host":
            image, box = decode.decode_for_box(
                data, lambda w, h: augment.sample_crop_box(w, h, rng), size)
        else:
            image, box = decode.decode_for_box(data, augment.center_box, size)
        t2 = time.perf_counter()
        if box != (0, 0, size, size) or decode.image_size(image) != (size, size):
            image = decode.as_pil(image).resize((size, size), Image.BILINEAR, box=box)
        t3 = time.perf_counter()
        if mode == "host":  # done for half the images
            image = decode.as_pil(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        t4 = time.perf_counter()
        pixels.append(np.asarray(image))
        t5 = time.perf_counter()
        for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, (t4 - t3) / 2, t5 - t4)):
            t[k] += dt
    batches = [pixels[k:k + batch] for k in range(0, n - batch + 1, batch)]
    t0 = time.perf_counter()
    for b in batches:
        np.stack(b, out=np.empty((batch, size, size, 3), np.uint8))
    t["stack into uint8 batch"] = (time.perf_counter() - t0) * n / (batch * len(batches))
    return {k: v / n * 1e6 for k, v in t.items()}


# ----------------------------------------------------------------------------------- 3. pipeline


def _cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc] + proc.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def time_pipeline(shards: str, size: int, spec: str, workers: int, args) -> dict:
    cfg = default_data_config()
    cfg.train, cfg.workers, cfg.read_threads = shards, workers, args.read_threads
    cfg.augment_on, cfg.source_size = parse_mode(spec)
    it = pipeline.make_train_iterator(cfg, image_size=size, global_batch_size=args.batch_size,
                                      seed=0, process_index=0, process_count=1)
    for _ in range(args.warmup):
        batch = next(it)
    proc = psutil.Process()
    rates, cores = [], []
    for _ in range(args.runs):
        cpu0, t0 = _cpu_seconds(proc), time.perf_counter()
        images = sum(int(next(it)["decoded"]) for _ in range(args.batches))
        wall, cpu = time.perf_counter() - t0, _cpu_seconds(proc) - cpu0
        rates.append(images / wall)
        cores.append(cpu / wall)
    it.close()
    rate, busy = statistics.median(rates), statistics.median(cores)
    return {"size": size, "mode": spec, "workers": workers, "rate": rate, "lo": min(rates),
            "hi": max(rates), "cores": busy, "per_core": rate / busy,
            "bytes": int(batch["image"].nbytes)}


# ------------------------------------------------------------------------------------- report


def report(shards: str, decoders, decode_notes, results, profiles, train_rows, args,
           load: tuple[float, float]) -> str:
    n = len(sources.open_source(shards))
    lines = [
        BEGIN, "## Data pipeline", "",
        "`" + " ".join(["python benchmarks/data_pipeline.py"] + sys.argv[1:]) + "`", "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, Pillow {Image.__version__}. "
        f"1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at the end.", "",
        "### Decoders", "",
        f"µs per JPEG, best of 3 passes, one thread: {args.decode_images} UTKFace faces (200x200, "
        f"~8 kB) and {args.large} larger photos (1600x1200, q90: 4x3 grids of faces upscaled "
        f"bicubically to 400 px, made in `--work_dir`). \"→224\" decodes at the smallest DCT "
        "scale (1/2, 3/8, 1/4, 1/8) whose centre square is still ≥ 224 px.", "",
    ]
    keys = [k for k in decoders[0] if k != "decoder"]
    lines.append("| decoder | " + " | ".join(f"{s} {'→224' if sc else 'full'}" for s, sc in keys)
                 + " |")
    lines.append("|---|" + "---:|" * len(keys))
    for r in decoders:
        lines.append(f"| {r['decoder']} | " + " | ".join(f"{r[k]:.0f}" for k in keys) + " |")
    lines += [""] + decode_notes + [
        "", "### Host side", "",
        f"The training iterator over {n} UTKFace faces in ArrayRecord shards, batch "
        f"{args.batch_size}, {args.read_threads} decode thread(s) per process; median of "
        f"{args.runs} windows of {args.batches} batches after {args.warmup} warm-up batches. "
        "host: decode → random-resized crop 0.3–1 → flip → uint8 batch at the model's size; "
        "device: decode → centre square at the model's size → uint8 batch, the crop, flip and "
        "normalisation run in the step; device:200: the same at data.source_size=200, the size "
        "UTKFace faces are stored at, so the host does not resample at all. Busy cores: CPU "
        "time of the main process and its workers / wall time.", "",
        "| px | augment_on | workers | img/s (median) | min–max | busy cores | img/s per busy core "
        "| bytes per batch |",
        "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['size']} | {r['mode']} | {r['workers']} | {r['rate']:.0f} | "
                     f"{r['lo']:.0f}–{r['hi']:.0f} | {r['cores']:.2f} | {r['per_core']:.0f} | "
                     f"{r['bytes'] / 2**20:.2f} MiB |")
    lines += ["", "Where the time goes (one thread, µs per image, no Grain around it):", "",
              "| stage | " + " | ".join(f"{m} {s} px" for m, s in profiles) + " |",
              "|---|" + "---:|" * len(profiles)]
    for stage in next(iter(profiles.values())):
        lines.append(f"| {stage} | " + " | ".join(f"{p[stage]:.0f}" for p in profiles.values())
                     + " |")
    lines.append("| **total → img/s on one core** | " + " | ".join(
        f"**{sum(p.values()):.0f} → {1e6 / sum(p.values()):.0f}**" for p in profiles.values())
        + " |")
    best = {}
    for r in results:
        if r["size"] == max(x["size"] for x in results):
            best[r["mode"]] = max(best.get(r["mode"], 0), r["per_core"])
    lines += ["", f"Target: ≥ 1,000 img/s per busy core at {max(x['size'] for x in results)} px. "
              "Best per mode: " + ", ".join(f"{m} {v:.0f}" for m, v in best.items()) + "."]
    if train_rows:
        lines += ["", "### Training, fed by the pipeline", "",
                  f"benchmarks/train_feed.py: the run as train.py builds it, batch "
                  f"{args.train_batch}, {args.train_workers} Grain worker(s) with "
                  f"{args.train_read_threads} decode thread(s). Step: {args.train_rounds} windows "
                  f"of {args.train_steps} updates on one batch already on the device, the modes "
                  "alternating; device/host step speed is the median per-window ratio. End to end: "
                  f"{args.train_steps * args.train_rounds} updates each on the pipeline's next "
                  "batch.", ""]
        lines += train_feed.table(train_rows)
        lines += ["", "Target: the step at most 3% slower with device augmentation (speed ratio ≥ "
                  "0.97). Measured: " + ", ".join(f"{r['model']} {r['device_over_host_step']:.3f}"
                                                   for r in train_rows) + "."]
    lines += ["", END]
    return "\n".join(lines)


def write_section(path: str, section: str) -> None:
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="existing shard folder (default: build from UTKFace)")
    p.add_argument("--work_dir", default="/tmp/mefem_data_bench")
    p.add_argument("--num_images", type=int, default=8192)
    p.add_argument("--sizes", default="112,224")
    p.add_argument("--modes", default="host,device,device:200",
                   help="host | device | device:R (data.source_size=R; 200: UTKFace as stored)")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--read_threads", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--decode_images", type=int, default=500, help="UTKFace faces per decoder pass")
    p.add_argument("--large", type=int, default=40, help="larger photos per decoder pass")
    p.add_argument("--turbojpeg_lib", default="", help="path of libturbojpeg for PyTurboJPEG")
    train_feed.add_args(p)  # --train_configs (empty: no training rows), --train_batch, ...
    p.add_argument("--write", default=os.path.join(REPO, "benchmarks", "RESULTS.md"))
    args = p.parse_args()

    shards = args.shards or build_utkface_shards(args.work_dir, args.num_images)
    load_start = os.getloadavg()[0]
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = [m for m in args.modes.split(",") if m]

    faces = [Path(f).read_bytes() for f in
             sorted(glob.glob(os.path.join(UTKFACE, "images", "*")))[:args.decode_images]]
    large = make_large_photos(faces, os.path.join(args.work_dir, "large"), args.large)
    decoders, notes = time_decoders({"UTKFace": faces, "1600x1200": large}, 224,
                                    args.turbojpeg_lib)
    profiles = {(m, s): profile_stages(shards, s, m) for m in modes for s in sizes}
    results = []
    for size in sizes:
        for mode in modes:
            for workers in (int(w) for w in args.workers.split(",")):
                results.append(time_pipeline(shards, size, mode, workers, args))
                r = results[-1]
                print(f"{size}px {mode} workers={workers}: {r['rate']:.0f} img/s, "
                      f"{r['cores']:.2f} busy cores, {r['per_core']:.0f} img/s per core", flush=True)
    train_rows = []
    args.shards = shards
    for name in filter(None, args.train_configs.split(",")):
        train_rows.append(train_feed.measure(name.strip(), args))
        print(train_rows[-1], flush=True)
    section = report(shards, decoders, notes, results, profiles, train_rows, args,
                     (load_start, os.getloadavg()[0]))
    print(section)
    if args.write:
        write_section(args.write, section)


if __name__ == "__main__":
    main()

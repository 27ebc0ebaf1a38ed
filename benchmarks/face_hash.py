"""The perceptual face hash (mefem_jax/data/face_hash.py) on real faces: the threshold, recall on planted
copies, false positives on distinct faces, hashing speed; and what UTKFace itself holds.

    python benchmarks/face_hash.py                         # threshold, planted copies, speed (~1 min, 2 cores)
    python benchmarks/face_hash.py --utkface_duplicates    # + exact and near duplicates of all of UTKFace
    python benchmarks/face_hash.py --speed_only --against=HEAD  # speed only, beside (and equal to) HEAD's hash

1. Threshold: Hamming distances of re-encoded copies (`--twins` random faces, each resized 0.8-1.25x,
   JPEG quality 60-95, shifted up to 4 px each way; mirrored too, as a separate row) to their originals,
   against the distances between `--distinct` faces drawn at random (every pair), per distance.
2. Planted copies: 20 test-split faces re-encoded as in 1 are planted among `--distinct` train-split
   faces (a temporary folder of links), and `python -m mefem_jax.data.leakage` is run with the
   `--distinct` test-split faces as the evaluation set: how many copies it finds, and how many other
   test faces it flags (false positives, unless they are real duplicates of the train split: listed,
   to be looked at).
3. Speed: fingerprints per CPU-second of one thread (time.process_time, BLAS held to one thread) over
   `--speed_faces` UTKFace JPEG bytes already in memory (decode, SHA-256 of the pixels, registration, DCT),
   and of `hash_files` on all cores from disk (threads), beside the same files on one process per core
   (what the GIL costs the threads). Per CPU-second because the machine is shared: wall-clock
   rates there measure the other jobs. `--against=REV` also hashes the same faces with face_hash.py as it
   is at git revision REV, alternating blocks of 100 faces between the two so both see the same load, and
   checks that every fingerprint (pixel SHA-256, hash, mirror hash) is the same: a speed-up must not move
   a hash already stored in shard records.
4. --utkface_duplicates: every face of UTKFace hashed; exact copies (same pixels) and near pairs within
   the threshold, within the set and between its train and test splits.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread: before numpy loads
    os.environ.setdefault(_var, "1")

import argparse
import csv
import importlib.util
import io
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageOps

from common import REPO  # before mefem_jax: puts this checkout first on sys.path
from mefem_jax.data import face_hash

SHIFT_PX = 4


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"


def reencoded(path: str, rng: np.random.Generator, mirror: bool = False) -> tuple[bytes, str]:
    """A copy of the face at `path` as another pipeline might have stored it, and what was done to it."""
    scale, quality = rng.uniform(0.8, 1.25), int(rng.integers(60, 96))
    dx, dy = (int(v) for v in rng.integers(-SHIFT_PX, SHIFT_PX + 1, 2))
    with Image.open(path) as im:
        im = im.convert("RGB")
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
        im = im.transform(im.size, Image.AFFINE, (1, 0, dx, 0, 1, dy), Image.BILINEAR)  # black edge strip
        im = ImageOps.mirror(im) if mirror else im
        out = io.BytesIO()
        im.save(out, "JPEG", quality=quality)
    return out.getvalue(), f"x{scale:.2f} q{quality} shift({dx},{dy}){' mirrored' if mirror else ''}"


def _table(name: str, hashes: list[face_hash.FaceHash]) -> face_hash.HashTable:
    table = face_hash.HashTable(name)
    for k, h in enumerate(hashes):
        table.add(str(k), h)
    return table


def _distance(a: face_hash.FaceHash, b: face_hash.FaceHash) -> int:
    return min(bin(a.phash ^ b.phash).count("1"), bin(a.mirror ^ b.phash).count("1"))


def threshold_rows(images: str, files: list[str], distinct: list[face_hash.FaceHash], twins: int,
                   rng: np.random.Generator) -> None:
    picked = rng.choice(len(files), twins, replace=False)
    for mirror in (False, True):
        d = []
        for k in picked:
            path = os.path.join(images, files[k])
            copy, _ = reencoded(path, rng, mirror)
            with open(path, "rb") as f:
                d.append(_distance(face_hash.hash_bytes(f.read()), face_hash.hash_bytes(copy)))
        d = np.array(d)
        print(f"copies{' (mirrored)' if mirror else ''}, n={twins}: distance median {np.median(d):.0f}, "
              f"p99 {np.percentile(d, 99):.0f}, max {d.max()}; histogram {dict(sorted(Counter(d.tolist()).items()))}")
    table = _table("distinct", distinct)
    phash = table.column("phash")
    counts = np.zeros(64, np.int64)
    for start in range(0, len(phash), 256):  # every pair once: rows after the query only
        block = np.minimum(np.bitwise_count(phash[start:start + 256, None] ^ phash[None]),
                           np.bitwise_count(table.column("mirror")[start:start + 256, None] ^ phash[None]))
        rows, cols = np.indices(block.shape)
        counts += np.bincount(block[cols > rows + start].ravel(), minlength=64)[:64]
    pairs = counts.sum()
    cumulative = np.cumsum(counts)
    print(f"distinct faces, n={len(distinct)} ({pairs:,} pairs): pairs at distance <= t, t=0..16: "
          f"{cumulative[:17].tolist()}; median distance {int(np.searchsorted(cumulative, pairs / 2))}")


def textbook_rows(images: str, files: list[str], sample: list[str], twins: int, rng: np.random.Generator) -> None:
    """The same measurements for the textbook pHash (each image's own median, the centre square), which
    face_hash.py does not use: what its two choices are for."""
    def bits(data: bytes) -> np.ndarray:  # [2, 63]: the hash and the mirror's
        gray = Image.open(io.BytesIO(data)).convert("L")
        side = min(gray.size)
        left, top = (gray.width - side) / 2, (gray.height - side) / 2
        block = face_hash.dct_block(gray, (left, top, left + side, top + side))
        ac = np.stack([block.ravel()[1:], (block * (-1.0) ** np.arange(face_hash.BLOCK)).ravel()[1:]])
        return ac > np.median(ac, 1, keepdims=True)

    def read(f: str) -> bytes:
        with open(os.path.join(images, f), "rb") as fh:
            return fh.read()

    d = []
    for k in rng.choice(len(files), twins, replace=False):
        a, b = bits(read(files[k])), bits(reencoded(os.path.join(images, files[k]), rng)[0])
        d.append(min(np.count_nonzero(a[0] != b[0]), np.count_nonzero(a[0] != b[1])))
    h = np.stack([bits(read(f)) for f in sample])
    pairs = np.minimum((h[:, None, 0] != h[None, :, 0]).sum(-1), (h[:, None, 1] != h[None, :, 0]).sum(-1))
    pairs = pairs[np.triu_indices(len(h), 1)]
    print(f"textbook pHash: copies, n={twins}: distance median {np.median(d):.0f}, p99 {np.percentile(d, 99):.0f}, "
          f"max {max(d)}; distinct faces, n={len(h)}: pairs at distance <= t, t=0..16: "
          f"{[int((pairs <= t).sum()) for t in range(17)]}; median distance {np.median(pairs):.0f}")


def planted(utk: str, rows: list[dict], n_distinct: int, rng: np.random.Generator, tmp: str) -> None:
    images = os.path.join(utk, "images")
    train = [r["file"] for r in rows if r["split"] == "train"]
    test = [r["file"] for r in rows if r["split"] == "test"]
    pre = [train[k] for k in rng.choice(len(train), n_distinct, replace=False)]
    evaluated = [test[k] for k in rng.choice(len(test), n_distinct, replace=False)]
    pretrain = os.path.join(tmp, "pretrain")
    os.makedirs(pretrain)
    for f in pre:
        os.symlink(os.path.join(images, f), os.path.join(pretrain, f))  # read in place, never copied
    plants = {}
    for k, mirror in [(k, False) for k in range(20)] + [(k, True) for k in range(20, 40)]:
        data, how = reencoded(os.path.join(images, evaluated[k]), rng, mirror)
        name = f"planted_{k:02d}.jpg"
        with open(os.path.join(pretrain, name), "wb") as f:
            f.write(data)
        plants[name] = (evaluated[k], how)
    eval_csv = os.path.join(tmp, "eval.csv")
    with open(eval_csv, "w", newline="") as f:
        csv.writer(f).writerows([["file"]] + [[e] for e in evaluated])
    out = os.path.join(tmp, "leaks.csv")
    command = [sys.executable, "-m", "mefem_jax.data.leakage", f"--pretrain={pretrain}",
               f"--eval={eval_csv}:images={images}", f"--out={out}", "--max_leaked=100000"]
    t0 = time.perf_counter()
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise SystemExit(f"leakage failed ({run.returncode}): {run.stderr[-2000:]}")
    seconds = time.perf_counter() - t0
    with open(out, newline="") as f:
        pairs = list(csv.DictReader(f))
    for mirror, label in ((False, "copies"), (True, "mirrored copies")):
        mine = {p: v for p, v in plants.items() if ("mirrored" in v[1]) == mirror}
        found = {p["pretrain_id"] for p in pairs
                 if p["pretrain_id"] in mine and mine[p["pretrain_id"]][0] == p["eval_id"]}
        dist = sorted(int(p["distance"]) for p in pairs if p["pretrain_id"] in found)
        print(f"planted {label}: {len(found)} of {len(mine)} found by `leakage` (distances {dist})")
        for name in sorted(set(mine) - found):
            print(f"  missed {name}: {mine[name][1]}")
    planted_eval = {v[0] for v in plants.values()}
    others = [p for p in pairs if p["pretrain_id"] not in plants]
    flagged = {p["eval_id"] for p in others} - planted_eval
    print(f"other test faces flagged: {len(flagged)} of {n_distinct - len(planted_eval)} "
          f"({100 * len(flagged) / (n_distinct - len(planted_eval)):.2f} %), against {n_distinct} train faces:")
    for p in others:
        print(f"  {p['eval_id']} ~ {p['pretrain_id']}: distance {p['distance']} ({p['kind']})")
    print(f"`leakage` took {seconds:.1f} s (hashing {2 * n_distinct + len(plants)} files, start-up included): "
          f"{' '.join(c for c in command[1:] if not c.startswith('--out'))}")


def _module_at(rev: str, tmp: str):
    """face_hash.py as it is at git revision `rev`, imported from a temporary copy."""
    source = subprocess.run(["git", "show", f"{rev}:mefem_jax/data/face_hash.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    path = os.path.join(tmp, "face_hash_at_rev.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("face_hash_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _hash_paths(paths: list[str]) -> int:
    """Hashes image files in a worker process of `speed`'s processes row; returns how many."""
    for path in paths:
        with open(path, "rb") as f:
            face_hash.hash_bytes(f.read())
    return len(paths)


def speed(images: str, files: list[str], against: str | None = None) -> None:
    blobs = []
    for f in files:
        with open(os.path.join(images, f), "rb") as fh:
            blobs.append(fh.read())
    with tempfile.TemporaryDirectory() as tmp:
        modules = {"this checkout": face_hash} | ({f"at {against}": _module_at(against, tmp)} if against else {})
        for module in modules.values():
            module.hash_bytes(blobs[0])  # imports and first-call set-up out of the timing
        wall, cpu, hashes = dict.fromkeys(modules, 0.0), dict.fromkeys(modules, 0.0), {k: [] for k in modules}
        fastest = dict.fromkeys(modules, 0.0)  # faces per CPU-second of the block that ran with the least load
        for start in range(0, len(blobs), 100):  # alternate blocks: both see the same load on a shared machine
            block = blobs[start:start + 100]
            for name in (list(modules) if start % 200 == 0 else list(modules)[::-1]):
                t0, c0 = time.perf_counter(), time.process_time()
                hashes[name] += [modules[name].hash_bytes(b) for b in block]
                used = time.process_time() - c0
                wall[name] += time.perf_counter() - t0
                cpu[name] += used
                fastest[name] = max(fastest[name], len(block) / max(used, 1e-9))
    for name in modules:
        print(f"one thread, bytes in memory, {name}: {len(blobs) / cpu[name]:.0f} faces per CPU-second "
              f"({1e3 * cpu[name] / len(blobs):.2f} CPU-ms/face; fastest block of 100: {fastest[name]:.0f}; "
              f"wall clock {len(blobs) / wall[name]:.0f} faces/s)")
    if against:
        mine, theirs = hashes["this checkout"], hashes[f"at {against}"]
        same = sum((a.pixels, a.phash, a.mirror) == (b.pixels, b.phash, b.mirror) for a, b in zip(mine, theirs))
        print(f"fingerprints equal to {against}'s: {same} of {len(blobs)} faces (pixel SHA-256, hash, mirror hash); "
              f"speed-up x{cpu[f'at {against}'] / cpu['this checkout']:.2f} per CPU-second")
        if same != len(blobs):
            raise SystemExit(f"{len(blobs) - same} faces hash differently from {against}")
    t0, c0 = time.perf_counter(), time.process_time()
    table = face_hash.hash_files("speed", images, files)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"hash_files, {os.cpu_count()} threads, from disk: {len(table) / wall:.0f} faces/s "
          f"({len(table) / cpu:.0f} faces per CPU-second)")
    # The same files on one process per core: no GIL shared, so the gap to the threads row is what the GIL
    # costs hash_files (its threads stay: it runs inside evaluate, where JAX's threads rule out forking).
    n = os.cpu_count() or 1
    paths = [os.path.join(images, f) for f in files]
    with ProcessPoolExecutor(n) as pool:
        sum(pool.map(_hash_paths, [paths[:10]] * n))  # start-up and imports out of the timing
        t0 = time.perf_counter()
        done = sum(pool.map(_hash_paths, [paths[k::4 * n] for k in range(4 * n)]))
        wall = time.perf_counter() - t0
    print(f"{n} processes, from disk: {done / wall:.0f} faces/s ({done / wall / n:.0f} faces/s per core)")


def utkface_duplicates(utk: str, rows: list[dict], max_distance: int) -> None:
    t0 = time.perf_counter()
    table = face_hash.hash_files("utkface", os.path.join(utk, "images"), [r["file"] for r in rows])
    split = {r["file"]: r["split"] for r in rows}
    print(f"UTKFace: {len(table)} faces hashed in {time.perf_counter() - t0:.0f} s; skipped "
          f"{ {k: len(v) for k, v in table.skipped.items()} }")
    exact = face_hash.find_duplicates(table, "exact")
    near = face_hash.find_duplicates(table, "near", max_distance)
    pairs = [m for m in face_hash.near_pairs(table, table, max_distance) if m.found < m.query]
    between = [m for m in pairs if split[table.ids[m.query]] != split[table.ids[m.found]]]
    by_kind = Counter(m.kind for m in pairs)

    def test_side(m: face_hash.Match) -> str:
        return table.ids[m.query] if split[table.ids[m.query]] == "test" else table.ids[m.found]

    test_leaked = {test_side(m) for m in between}
    print(f"exact copies (same pixels): {len(exact)} faces repeat an earlier one; "
          f"near (distance <= {max_distance}, mirrors included): {len(near)} faces would go with --dedup=near")
    print(f"pairs within distance {max_distance}: {len(pairs)} ({dict(by_kind)}); between train and test: "
          f"{len(between)} pairs, {len(test_leaked)} test faces with a near-duplicate in train")
    labels = {r["file"]: r for r in rows}
    same = [(table.ids[m.query], table.ids[m.found]) for m in pairs if m.kind == "exact"]
    differ = {c: sum(labels[a][c] != labels[b][c] for a, b in same) for c in ("age", "gender", "race")}
    exact_between = {a if split[a] == "test" else b for a, b in same if split[a] != split[b]}
    print(f"exact pairs: {len(same)}, labelled differently: {differ}; test faces with an exact copy in train: "
          f"{len(exact_between)}")
    within = [len({test_side(m) for m in between if m.distance <= t}) for t in range(max_distance + 1)]
    print(f"test faces with a train face within distance t = 0..{max_distance}: {within}")


def fit(utk: str, rows: list[dict], n: int, seed: int) -> None:
    """Prints face_hash's two tables, fitted on `n` train-split faces: the mean face (the registration
    template) and, on the squares registered to it, each DCT coefficient's median (the thresholds)."""
    import base64
    import textwrap

    train = [r["file"] for r in rows if r["split"] == "train"]
    picked = [train[k] for k in np.random.default_rng(seed).choice(len(train), n, replace=False)]
    grays = []
    for f in picked:  # and the mirror image of each: the hash of a mirror must come from the same tables
        with Image.open(os.path.join(utk, "images", f)) as im:
            grays += [im.convert("L"), ImageOps.mirror(im.convert("L"))]
    total = np.zeros((32, 32))
    for g in grays:
        side = min(g.size)
        left, top = (g.width - side) / 2, (g.height - side) / 2
        total += np.asarray(g.resize((32, 32), Image.BOX, box=(left, top, left + side, top + side)), np.float64)
    mean_face = np.clip(np.rint(total / len(grays)), 0, 255).astype(np.uint8)
    template = face_hash.registration_template(mean_face)
    medians = np.median([face_hash.dct_block(g, face_hash.face_box(g, template)) for g in grays], 0)
    print(f"# fitted on {n} UTKFace train faces and their mirror images (seed {seed}); paste into "
          "mefem_jax/data/face_hash.py")
    text = base64.b64encode(mean_face.tobytes()).decode()
    print("_MEAN_FACE = (\n" + "\n".join(f'    "{line}"' for line in textwrap.wrap(text, 100)) + ")")
    values = ", ".join(f"{v:.3f}" for v in medians.ravel())
    print("_MEDIANS = np.array([\n" + "\n".join("    " + line for line in textwrap.wrap(values, 108))
          + "]).reshape(BLOCK, BLOCK)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utkface", default=os.path.join(REPO, "..", "shared", "data", "utkface"))
    parser.add_argument("--distinct", type=int, default=2000)
    parser.add_argument("--twins", type=int, default=500)
    parser.add_argument("--speed_faces", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--utkface_duplicates", action="store_true")
    parser.add_argument("--fit", action="store_true", help="print face_hash's fitted tables and stop")
    parser.add_argument("--speed_only", action="store_true", help="only the speed rows (3.)")
    parser.add_argument("--against", help="git revision whose face_hash.py is timed beside this one and must "
                        "give the same fingerprints (e.g. HEAD)")
    args = parser.parse_args()
    utk = os.path.abspath(args.utkface)
    images = os.path.join(utk, "images")
    with open(os.path.join(utk, "labels.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    if args.fit:
        return fit(utk, rows, 2000, 2024)
    rng = np.random.default_rng(args.seed)
    print(f"CPU: {_cpu()} ({os.cpu_count()} cores); threshold NEAR_DISTANCE = {face_hash.NEAR_DISTANCE} of 63 bits")
    files = [r["file"] for r in rows]
    sample = [files[k] for k in rng.choice(len(files), args.distinct, replace=False)]
    if args.speed_only:
        return speed(images, sample[:args.speed_faces], args.against)
    t0 = time.perf_counter()
    distinct = face_hash.hash_files("distinct", images, sample).hashes
    print(f"hashed {len(distinct)} random faces in {time.perf_counter() - t0:.1f} s")
    threshold_rows(images, files, distinct, args.twins, rng)
    textbook_rows(images, files, sample[:1000], args.twins, np.random.default_rng(args.seed + 1))
    with tempfile.TemporaryDirectory() as tmp:
        planted(utk, rows, args.distinct, rng, tmp)
    speed(images, sample[:args.speed_faces], args.against)
    if args.utkface_duplicates:
        utkface_duplicates(utk, rows, face_hash.NEAR_DISTANCE)


if __name__ == "__main__":
    main()

"""Image folder + labels CSV → ArrayRecord face shards and a manifest.

    python -m mefem_jax.data.build_shards --images=../shared/data/utkface/images \
        --labels=../shared/data/utkface/labels.csv --split=train --out=/data/utk_train \
        [--num_shards=16] [--image_size=S] [--workers=W]

One record per face (see `records.py`): the image bytes, an id (the CSV's file name) and every
other CSV column as a typed label. What is written:

* JPEG and PNG files go in byte for byte; an image is re-encoded (JPEG, --jpeg_quality) only
  when it must change: downscaled (shorter side above --image_size, or longer side above
  --max_side — e.g. an 8000x8000 photo becomes 1024x1024 instead of costing a full decode
  every epoch), rotated by its EXIF orientation, or in another format (BMP, WebP, TIFF…).
  Grayscale, RGBA and CMYK images are kept as they are; the reader converts them to RGB.
* Skipped, each listed in the manifest's `skipped` with the reason: unreadable or truncated
  files, dangling or looping symbolic links, non-images, images under --min_side (a 1x1 pixel
  says nothing about a face), CSV rows whose file is missing, duplicated, or whose numeric label
  is missing or not a number.
* Refused up front, with the path in the message: a missing or empty images folder, a missing
  labels file or `file` column, a labels file that is not UTF-8 (named with its line), filters on
  columns that do not exist, and a non-empty --out that holds no build of ours (its files are never
  deleted). A build in which no image is usable writes no manifest and exits non-zero.

Re-running is safe. The manifest is written last, atomically, and carries a fingerprint of the
inputs and options: the same command on a finished folder does nothing; a folder holding a
different build is refused unless --overwrite. A build that was interrupted left per-shard status
files in OUT/.build/; finished shards whose inputs did not change are kept, the rest are
rewritten (each shard goes to a temporary file renamed into place only when complete), so no
half-written shard is ever under a final name. One builder per folder at a time.

Shards are built in parallel over --workers processes; each shard is written by one process.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time

from PIL import Image, ImageOps, UnidentifiedImageError

from mefem_jax.data import csv_text
from mefem_jax.data import decode
from mefem_jax.data import manifest as manifest_lib
from mefem_jax.data import records

log = logging.getLogger("build_shards")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_KEPT_FORMATS = ("JPEG", "PNG")
_EXIF_ORIENTATION = 0x0112
_STATUS_DIR = ".build"
# Written into .build/ before anything else: marks a folder holding an unfinished build of ours,
# the only kind (besides one with our manifest) whose leftovers the builder may delete.
_BUILD_MARK = "builder.json"


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    images: str
    out: str
    labels: str | None = None
    name: str = "faces"
    num_shards: int = 16
    image_size: int = 0            # downscale so the shorter side is at most this (0: keep)
    max_side: int = 1024           # downscale so the longer side is at most this
    min_side: int = 16             # skip images whose shorter side is below this
    jpeg_quality: int = 95
    workers: int = 1
    file_column: str = "file"
    filters: tuple[tuple[str, str], ...] = ()      # keep rows where column == value
    label_columns: tuple[str, ...] | None = None   # None: every column but file and filters
    label_types: tuple[tuple[str, str], ...] = ()  # override inferred types: (column, type)
    overwrite: bool = False

    def content_options(self) -> dict:
        """The options that change what is written (not where, nor how fast)."""
        return {k: getattr(self, k) for k in (
            "name", "image_size", "max_side", "min_side", "jpeg_quality", "file_column",
            "filters", "label_columns", "label_types")}


class SkipImage(Exception):
    """This image cannot be used; the message is the reason written to the manifest."""


@dataclasses.dataclass(frozen=True)
class Row:
    file: str                 # as written in the CSV (or relative to the images folder)
    path: str
    labels: tuple[tuple[str, object], ...]
    stat: tuple[int, int]     # (size, mtime_ns): part of the fingerprint


# ---------------------------------------------------------------------------------------------
# Planning: which files, with which labels. Reads the CSV and stats files; opens no image.
# ---------------------------------------------------------------------------------------------

def list_images(folder: str) -> list[str]:
    """Image files under `folder`, recursively, as sorted paths relative to it."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, f), folder))
    return sorted(found)


def _row_stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns)


def plan_rows(opts: BuildOptions) -> tuple[list[Row], list[dict], dict[str, str], int]:
    """(rows to write, skipped [{file, reason}], label schema, images the CSV does not list)."""
    if not os.path.isdir(opts.images):
        raise FileNotFoundError(f"images folder {opts.images} does not exist")
    on_disk = list_images(opts.images)
    if not on_disk:
        raise ValueError(f"images folder {opts.images} holds no image files "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    if opts.labels is None:
        return (*_plan_unlabelled(opts, on_disk), {}, 0)
    return _plan_from_csv(opts, set(on_disk))


def _plan_unlabelled(opts: BuildOptions, on_disk: list[str]) -> tuple[list[Row], list[dict]]:
    """Every image file as a row; a name that cannot be stat'ed is skipped, not the whole build."""
    rows, skipped = [], []
    for f in on_disk:
        path = os.path.join(opts.images, f)
        try:
            rows.append(Row(f, path, (), _row_stat(path)))
        except OSError as err:  # dangling or looping symlink, vanished or unreachable file
            skipped.append({"file": f, "reason": _stat_problem(path, err)})
    return rows, skipped


def _stat_problem(path: str, err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "symbolic link loop"
    if os.path.islink(path) and not os.path.exists(path):
        return f"dangling symbolic link (to {os.readlink(path)})"
    return f"cannot read: {err.strerror or err}"


def _plan_from_csv(opts: BuildOptions, on_disk: set[str]):
    if not os.path.isfile(opts.labels):
        raise FileNotFoundError(f"labels file {opts.labels} does not exist")
    columns, table = csv_text.read_rows(opts.labels)
    where = os.path.basename(opts.labels)
    if opts.file_column not in columns:
        raise ValueError(f"{opts.labels} has no {opts.file_column!r} column (columns: {columns})")
    for column, _ in opts.filters:
        if column not in columns:
            raise ValueError(f"filter column {column!r} is not in {opts.labels} ({columns})")
    filtered = {c for c, _ in opts.filters}
    if opts.label_columns is None:
        label_columns = [c for c in columns if c != opts.file_column and c not in filtered]
    else:
        label_columns = list(opts.label_columns)
        unknown = [c for c in label_columns if c not in columns]
        if unknown:
            raise ValueError(f"label columns {unknown} are not in {opts.labels} ({columns})")

    keep = [(line, r) for line, r in enumerate(table, start=2)
            if all((r.get(c) or "").strip() == v for c, v in opts.filters)]
    if not keep:
        raise ValueError(f"{opts.labels}: no rows" + (f" match {dict(opts.filters)}"
                                                       if opts.filters else ""))
    overrides = dict(opts.label_types)
    schema = {c: overrides.get(c) or records.infer_label_type([r.get(c) or "" for _, r in keep])
              for c in label_columns}

    rows, skipped, seen = [], [], {}
    for line, r in keep:
        name = (r.get(opts.file_column) or "").strip()
        at = f"{where} line {line}"
        problem, row = _check_row(opts, r, name, at, schema, label_columns, seen)
        if problem:
            skipped.append({"file": name or at, "reason": problem})
        else:
            rows.append(row)
        seen.setdefault(name, line)
    unlisted = len(on_disk - set(seen))
    return rows, skipped, schema, unlisted


def _check_row(opts: BuildOptions, r: dict, name: str, at: str, schema: dict[str, str],
               label_columns: list[str], seen: dict[str, int]) -> tuple[str | None, Row | None]:
    """(None, Row) for a usable CSV row, else (reason, None); `at` is "labels.csv line N"."""
    if None in r or any(v is None for v in r.values()):
        return f"{at}: wrong number of fields", None
    if not name:
        return f"{at}: empty {opts.file_column!r}", None
    if name in seen:
        return f"{at}: duplicate of line {seen[name]}", None
    root = os.path.abspath(opts.images)
    path = os.path.normpath(os.path.join(root, name))
    if not path.startswith(root + os.sep):
        return f"{at}: path leaves the images folder", None
    if not os.path.isfile(path):
        return f"listed in {at} but not found in {opts.images}", None
    labels, bad = [], []
    for c in label_columns:
        try:
            labels.append((c, records.cast_label(r[c], schema[c])))
        except ValueError as err:
            bad.append(f"label {c!r} ({schema[c]}): {err}")
    if bad:
        return f"{at}: " + "; ".join(bad), None
    return None, Row(name, path, tuple(labels), _row_stat(path))


def _fingerprint(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# One image: validate fully, keep its bytes when possible.
# ---------------------------------------------------------------------------------------------

def _target_size(width: int, height: int, opts: BuildOptions) -> tuple[int, int] | None:
    scale = 1.0
    if opts.image_size and min(width, height) > opts.image_size:
        scale = opts.image_size / min(width, height)
    if max(width, height) * scale > opts.max_side:
        scale = opts.max_side / max(width, height)
    if scale >= 1.0:
        return None
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def prepare_image(path: str, opts: BuildOptions) -> bytes:
    """The bytes to store for one image file, or SkipImage(reason)."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise SkipImage("empty file")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        fmt = image.format
    except Image.DecompressionBombError as err:
        raise SkipImage(f"too many pixels to decode safely: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SkipImage(f"not an image PIL can read ({type(err).__name__})") from None
    if min(width, height) < opts.min_side:
        raise SkipImage(f"too small: {width}x{height} px (--min_side={opts.min_side})")
    target = _target_size(width, height, opts)
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to drop the face
        orientation = 1
    if target and fmt == "JPEG":
        image.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale when that is still enough
    try:
        image.load()  # the full decode is what finds truncated and corrupt files
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError…
        raise SkipImage(f"truncated or corrupt {fmt or 'image'}: {err}") from None
    if target is None and orientation in (None, 1) and fmt in _KEPT_FORMATS:
        return data
    if orientation not in (None, 1):
        image = ImageOps.exif_transpose(image)
        if target and orientation in (5, 6, 7, 8):  # quarter turns swap width and height
            target = target[::-1]
    rgb = decode.to_rgb(image)
    if target:
        rgb = rgb.resize(target, Image.BICUBIC, reducing_gap=2.0)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=opts.jpeg_quality)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# One shard: written to a temporary file, renamed into place, then its status file.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _ShardJob:
    index: int
    file: str
    rows: tuple[Row, ...]
    fingerprint: str
    opts: BuildOptions


def _status_path(opts: BuildOptions, file: str) -> str:
    return os.path.join(opts.out, _STATUS_DIR, file + ".json")


def write_shard(job: _ShardJob) -> dict:
    from array_record.python import array_record_module

    final = os.path.join(job.opts.out, job.file)
    tmp = f"{final}.tmp.{os.getpid()}"
    skipped, count = [], 0
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    try:
        for row in job.rows:
            try:
                image = prepare_image(row.path, job.opts)
            except SkipImage as err:
                skipped.append({"file": row.file, "reason": str(err)})
                continue
            except OSError as err:  # unreadable file (permissions, vanished mid-build)
                skipped.append({"file": row.file, "reason": f"cannot read: {err}"})
                continue
            writer.write(records.encode_record(row.file, dict(row.labels), image))
            count += 1
    finally:
        writer.close()
    os.replace(tmp, final)
    status = {"fingerprint": job.fingerprint, "file": job.file, "num_records": count,
              "bytes": os.path.getsize(final), "skipped": skipped}
    manifest_lib.write_json_atomic(_status_path(job.opts, job.file), status)
    return status


def _reusable(opts: BuildOptions, file: str, fingerprint: str) -> dict | None:
    """The status of a shard finished by an earlier (interrupted) run with the same inputs."""
    try:
        with open(_status_path(opts, file), encoding="utf-8") as f:
            status = json.load(f)
        if (status["fingerprint"] == fingerprint
                and os.path.getsize(os.path.join(opts.out, file)) == status["bytes"]):
            return status
    except (OSError, ValueError, KeyError):
        pass
    return None


def _remove_stale(opts: BuildOptions, expected: set[str]) -> None:
    """Deletes leftovers of other builds under this name: temp files, shards of another count.
    Only called on a folder `_check_out_folder` accepted as ours."""
    pattern = os.path.join(opts.out, f"{opts.name}-?????-of-?????{manifest_lib.SHARD_SUFFIX}")
    for path in glob.glob(pattern) + glob.glob(pattern + ".tmp.*"):
        if os.path.basename(path) not in expected:
            log.info("removing %s: left by an earlier build of this folder", path)
            os.remove(path)


def _is_our_build_mark(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("format") == manifest_lib.FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out_folder(opts: BuildOptions) -> None:
    """Refuses an --out holding anything but a build of ours: the builder deletes shard-like
    files, temp files and .build/ in its folder, which in someone else's folder are not ours."""
    if os.path.exists(opts.out) and not os.path.isdir(opts.out):
        raise FileExistsError(f"--out {opts.out} is a file, not a folder")
    if not os.path.isdir(opts.out) or not os.listdir(opts.out):
        return  # new or empty
    if os.path.exists(os.path.join(opts.out, manifest_lib.MANIFEST_NAME)):
        manifest_lib.read_manifest(opts.out)  # ours, or ValueError naming the file
        return
    if _is_our_build_mark(os.path.join(opts.out, _STATUS_DIR, _BUILD_MARK)):
        return  # an interrupted build of ours
    raise FileExistsError(f"{opts.out} is not empty and holds no shard build (no "
                          f"{manifest_lib.MANIFEST_NAME}); pick a new or empty --out")


def _mark_build(opts: BuildOptions) -> None:
    status_dir = os.path.join(opts.out, _STATUS_DIR)
    os.makedirs(status_dir, exist_ok=True)
    manifest_lib.write_json_atomic(os.path.join(status_dir, _BUILD_MARK),
                                   {"format": manifest_lib.FORMAT, "state": "building"})


# ---------------------------------------------------------------------------------------------
# The build.
# ---------------------------------------------------------------------------------------------

def build(opts: BuildOptions) -> dict:
    """Builds (or completes, or confirms) the shard folder `opts.out`; returns its manifest."""
    start = time.time()
    rows, skipped, schema, unlisted = plan_rows(opts)
    if not rows:
        raise ValueError(f"nothing to write: every row was skipped, e.g. "
                         f"{skipped[0]['file']}: {skipped[0]['reason']}" if skipped else
                         f"nothing to write from {opts.images}")
    clash = sorted(set(schema) & set(records.RESERVED_KEYS))
    if clash:
        raise ValueError(f"label columns {clash} clash with the pipeline's keys "
                         f"{records.RESERVED_KEYS}; select others with --label_columns")
    num_shards = max(1, min(opts.num_shards, len(rows)))
    content = {"options": opts.content_options(), "num_shards": num_shards}
    chunks = [tuple(rows[k * len(rows) // num_shards:(k + 1) * len(rows) // num_shards])
              for k in range(num_shards)]
    shard_prints = [_fingerprint([content, k, [(r.file, r.labels, r.stat) for r in chunk]])
                    for k, chunk in enumerate(chunks)]
    fingerprint = _fingerprint([content, shard_prints, skipped])

    _check_out_folder(opts)
    os.makedirs(opts.out, exist_ok=True)
    manifest_path = os.path.join(opts.out, manifest_lib.MANIFEST_NAME)
    if os.path.exists(manifest_path):
        old = manifest_lib.read_manifest(opts.out)
        if old.get("fingerprint") == fingerprint:
            log.info("%s is up to date (%d records); nothing to do", opts.out, old["num_records"])
            return old
        if not opts.overwrite:
            raise FileExistsError(
                f"{opts.out} already holds a different build (its manifest.json has another "
                "fingerprint); pass --overwrite or pick another --out")
        log.info("removing %s: --overwrite replaces that build", manifest_path)
        _mark_build(opts)  # first, so an interruption leaves a folder still recognisably ours
        os.remove(manifest_path)  # from here on the folder reads as "not finished"

    files = [manifest_lib.shard_name(opts.name, k, num_shards) for k in range(num_shards)]
    _mark_build(opts)
    _remove_stale(opts, set(files))
    statuses = {f: _reusable(opts, f, fp) for f, fp in zip(files, shard_prints)}
    jobs = [_ShardJob(k, f, chunks[k], shard_prints[k], opts)
            for k, f in enumerate(files) if statuses[f] is None]
    log.info("%d rows → %d shards (%d kept from an earlier run), %d workers",
             len(rows), num_shards, num_shards - len(jobs), opts.workers)
    for status in _run(jobs, opts.workers):
        statuses[status["file"]] = status
        log.info("wrote %s: %d records, %d skipped", status["file"], status["num_records"],
                 len(status["skipped"]))

    shards = [{"file": f, "num_records": statuses[f]["num_records"]} for f in files]
    for f in files:
        skipped.extend(statuses[f]["skipped"])
    if not any(s["num_records"] for s in shards):
        # A 0-record dataset would only fail later, in training, far from its cause; no manifest.
        raise ValueError(f"nothing usable in {opts.images}: all {len(skipped)} inputs were skipped, "
                         f"e.g. {skipped[0]['file']}: {skipped[0]['reason']}")
    manifest = {
        "format": manifest_lib.FORMAT, "version": manifest_lib.VERSION, "name": opts.name,
        "num_records": sum(s["num_records"] for s in shards), "shards": shards,
        "label_schema": schema, "skipped": skipped, "unlisted_images": unlisted,
        "options": content["options"],
        "source": {"images": os.path.abspath(opts.images),
                   "labels": opts.labels and os.path.abspath(opts.labels)},
        "fingerprint": fingerprint,
    }
    manifest_lib.write_json_atomic(manifest_path, manifest)
    log.info("removing %s: status files of this finished build",
             os.path.join(opts.out, _STATUS_DIR))
    shutil.rmtree(os.path.join(opts.out, _STATUS_DIR), ignore_errors=True)
    log.info("done in %.1fs: %d records in %d shards, %d skipped → %s", time.time() - start,
             manifest["num_records"], num_shards, len(skipped), manifest_path)
    return manifest_lib.read_manifest(opts.out)  # as JSON has it (lists, not tuples)


def _run(jobs: list[_ShardJob], workers: int):
    if workers <= 1 or len(jobs) <= 1:
        yield from map(write_shard, jobs)
        return
    # spawn, not fork: the caller may have threads (or JAX) running, which fork does not copy.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap_unordered(write_shard, jobs)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

def _pairs(text: str, what: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=") if "=" in item else item.partition(":")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{what}: expected NAME=VALUE, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def parse_args(argv: list[str]) -> BuildOptions:
    p = argparse.ArgumentParser(prog="python -m mefem_jax.data.build_shards",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="folder of face images (searched recursively)")
    p.add_argument("--labels", help="CSV with a file column (relative to --images) and labels; "
                                    "without it every image in the folder is written, unlabelled")
    p.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    p.add_argument("--name", default="faces", help="shard name prefix")
    p.add_argument("--num_shards", type=int, default=16)
    p.add_argument("--image_size", type=int, default=0,
                   help="downscale so the shorter side is at most this (0: keep)")
    p.add_argument("--max_side", type=int, default=1024,
                   help="downscale so the longer side is at most this")
    p.add_argument("--min_side", type=int, default=16, help="skip images smaller than this")
    p.add_argument("--jpeg_quality", type=int, default=95, help="for re-encoded images")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--file_column", default="file")
    p.add_argument("--split", help="keep rows whose 'split' column equals this")
    p.add_argument("--filter", default="", help="keep rows where COL=VALUE[,COL=VALUE…]")
    p.add_argument("--label_columns", help="comma-separated label columns (default: all others)")
    p.add_argument("--label_types", default="",
                   help="override inferred types, e.g. age=float,id_code=str")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different finished build in --out")
    a = p.parse_args(argv)
    filters = _pairs(a.filter, "--filter") + ((("split", a.split),) if a.split else ())
    label_types = _pairs(a.label_types, "--label_types")
    for column, kind in label_types:
        if kind not in records.LABEL_TYPES:
            p.error(f"--label_types: {column}={kind}: type must be one of {records.LABEL_TYPES}")
    for name in ("num_shards", "max_side", "min_side"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    return BuildOptions(
        images=a.images, labels=a.labels, out=a.out, name=a.name, num_shards=a.num_shards,
        image_size=a.image_size, max_side=a.max_side, min_side=a.min_side,
        jpeg_quality=a.jpeg_quality, workers=a.workers, file_column=a.file_column,
        filters=filters,
        label_columns=tuple(c.strip() for c in a.label_columns.split(",")) if a.label_columns
        else None,
        label_types=label_types, overwrite=a.overwrite)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        manifest = build(opts)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        log.error("%s", err)
        return 2
    for item in manifest["skipped"][:20]:
        log.warning("skipped %s: %s", item["file"], item["reason"])
    if len(manifest["skipped"]) > 20:
        log.warning("… and %d more, listed in manifest.json", len(manifest["skipped"]) - 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())

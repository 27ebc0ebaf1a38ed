"""Image folder + labels CSV → ArrayRecord face shards and a manifest.

    python -m mefem_jax.data.build_shards --images=../shared/data/utkface/images \
        --labels=../shared/data/utkface/labels.csv --split=train --out=/data/utk_train \
        [--num_shards=16] [--image_size=S] [--workers=W] [--align] [--landmark_labels] \
        [--min_face_px=N] [--min_sharpness=V] [--max_yaw=DEG] [--max_pitch=DEG]

One record per face (see `records.py`): the image bytes, an id (the CSV's file name) and every
other CSV column as a typed label. What is written:

* JPEG and PNG files go in byte for byte; an image is re-encoded (JPEG, --jpeg_quality) only
  when it must change: downscaled (shorter side above --image_size, or longer side above
  --max_side — e.g. an 8000x8000 photo becomes 1024x1024 instead of costing a full decode
  every epoch), rotated by its EXIF orientation, or in another format (BMP, WebP, TIFF…).
  Grayscale, RGBA and CMYK images are kept as they are; the reader converts them to RGB.
* From raw photos (the `landmarks` extra): --align finds the face (dlib's HOG detector and 68-point
  landmarks), turns the photo so the eyes are level and crops it to --align_size with the framing
  of face_align.py (the UTKFace crops'); --landmark_labels adds the facial proportions of
  face_proportions.py and the 68 points, in the frame of the image stored (landmark_points.py:
  lm00_x ... lm67_y), as float labels and writes OUT/landmark_labels.csv (file, the CSV's labels,
  the proportions, the points) for `evaluate --targets=anthropometry` and `--targets=landmarks`
  (with --align the points are the crops', which only the shards hold). Photos without a usable face are
  skipped with the reason (no face found, several faces with --faces=skip, a poor landmark fit
  with --poor_fit=skip, a face too small for the framing). The landmark model was trained on
  iBUG 300-W: non-commercial research use only.
* Duplicates within the build (--dedup, default exact) go: `exact`, images whose decoded pixels are
  identical; `near`, faces within --dedup_distance bits of each other's perceptual hash, mirror
  images included (face_hash.py); `off` keeps every image. The first in CSV (or file) order is kept.
  Every record stores its fingerprints (records.py), whatever --dedup, for the leakage check
  (`python -m mefem_jax.data.leakage`). The manifest's `duplicates` lists each kept photo with its
  removed twins; the counts are in the last log line.
* Faces outside the quality limits go (quality.py; each limit 0, the default, is off): --min_face_px
  (the landmarks' box, else the image's shorter side), --min_sharpness (the variance of the Laplacian of
  the grey face at 128 px) and, with landmarks only (--align or --landmark_labels; refused without),
  --max_yaw and --max_pitch (degrees, estimated from the landmarks). Every record stores its measures,
  whatever the limits. The manifest's `quality` lists each rejected face with the first limit it failed
  and the value measured (and all its measures); the counts per limit are in the last log line.
* Skipped, each listed in the manifest's `skipped` with the reason: unreadable or truncated
  files, dangling or looping symbolic links, non-images, images under --min_side (a 1x1 pixel
  says nothing about a face), CSV rows whose file is missing, duplicated, or whose numeric label
  is missing or not a number.
* Refused up front, with the path in the message: a missing or empty images folder, a missing
  labels file or `file` column, a labels file that is not UTF-8 (named with its line), filters on
  columns that do not exist, and a non-empty --out that holds no build of ours (its files are never
  deleted). A build in which no image is usable writes no manifest and exits non-zero (2).

Re-running is safe. The manifest is written last, atomically, and carries a fingerprint of the
inputs and options: the same command on a finished folder does nothing; a folder holding a
different build is refused unless --overwrite. A build that was interrupted left per-shard status
files in OUT/.build/; finished shards whose inputs did not change are kept, the rest are
rewritten (each shard goes to a temporary file renamed into place only when complete), so no
half-written shard is ever under a final name. One builder per folder at a time: a second one,
or a rerun while the workers of a killed build still run, is refused naming the holder (writer.py).

Duplicates are found once every shard is written (each worker returns its records' fingerprints),
and only the shards holding one are rewritten, copying their other records as they are: a build
without duplicates costs no second pass. Shards then hold slightly different record counts.

Shards are built in parallel over --workers processes; each shard is written by one process, which
dies with the builder (kill -9 included: on Linux the kernel kills it, elsewhere it polls its parent).
The modules of `data/shards/`: plan (options, which files), image (one image), faces (the face
step), quality (the measures of a face), writer (one shard, the folder's safety), this one (the build
and its command line); the command's name, `mefem_jax.data.build_shards`, is a two-line module that
calls `main` here.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time

from mefem_jax import cli
from mefem_jax.data import csv_text
from mefem_jax.data import face_hash
from mefem_jax.data import manifest as manifest_lib
from mefem_jax.data import records
from mefem_jax.data.shards import face_align
from mefem_jax.data.shards import face_landmarks
from mefem_jax.data.shards import face_proportions
from mefem_jax.data.shards import landmark_points
from mefem_jax.data.shards import quality
from mefem_jax.data.shards.plan import BuildOptions, Row, plan_rows
from mefem_jax.data.shards.writer import (STATUS_DIR, SharedFd, ShardJob, check_out_folder, die_with_parent,
                                         mark_build, out_lock, remove_records, remove_stale, reusable,
                                         write_shard)

log = logging.getLogger("build_shards")

LANDMARK_CSV = "landmark_labels.csv"


def _fingerprint(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


def build(opts: BuildOptions) -> dict:
    """Builds (or completes, or confirms) the shard folder `opts.out`; returns its manifest."""
    start = time.time()
    angles = [f"--{flag}" for flag in quality.ANGLE_LIMITS if flag in opts.quality_limits()]
    if angles and not opts.uses_faces:  # before any work: there are no landmarks to measure them from
        raise ValueError(f"{' and '.join(angles)} {'need' if len(angles) > 1 else 'needs'} the face's landmarks: "
                         "add --align (or --landmark_labels for faces already aligned)")
    if opts.uses_faces:
        face_landmarks.check_available()  # before any work: one line naming the install command
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

    check_out_folder(opts)
    os.makedirs(opts.out, exist_ok=True)
    manifest_path = os.path.join(opts.out, manifest_lib.MANIFEST_NAME)
    old = manifest_lib.read_manifest(opts.out) if os.path.exists(manifest_path) else None
    if old is not None and old.get("fingerprint") == fingerprint:
        log.info("%s is up to date (%d records); nothing to do", opts.out, old["num_records"])
        return old
    if old is not None and not opts.overwrite:
        raise FileExistsError(
            f"{opts.out} already holds a different build (its manifest.json has another "
            "fingerprint); pass --overwrite or pick another --out")
    # First, so an interruption leaves a folder still recognisably ours; it is also the lock's home.
    mark_build(opts)
    with out_lock(opts) as lock:  # held until the last write (see writer.py)
        if old is not None:
            log.info("removing %s: --overwrite replaces that build", manifest_path)
            os.remove(manifest_path)  # from here on the folder reads as "not finished"
            old_csv = (old.get("landmark_labels") or {}).get("csv")
            if old_csv == LANDMARK_CSV and os.path.exists(os.path.join(opts.out, LANDMARK_CSV)):
                log.info("removing %s: written by the build --overwrite replaces", LANDMARK_CSV)
                os.remove(os.path.join(opts.out, LANDMARK_CSV))

        files = [manifest_lib.shard_name(opts.name, k, num_shards) for k in range(num_shards)]
        remove_stale(opts, set(files))
        statuses = {f: reusable(opts, f, fp) for f, fp in zip(files, shard_prints)}
        jobs = [ShardJob(k, f, chunks[k], shard_prints[k], opts)
                for k, f in enumerate(files) if statuses[f] is None]
        log.info("%d rows → %d shards (%d kept from an earlier run), %d workers",
                 len(rows), num_shards, num_shards - len(jobs), opts.workers)
        for status in _run(jobs, opts.workers, lock):
            statuses[status["file"]] = status
            log.info("wrote %s: %d records, %d skipped", status["file"], status["num_records"],
                     len(status["skipped"]))

        duplicates = _remove_duplicates(opts, files, statuses)
        shards = [{"file": f, "num_records": statuses[f]["num_records"]} for f in files]
        rejected = []
        for f in files:
            skipped.extend(statuses[f]["skipped"])
            rejected.extend(statuses[f].get("rejected", []))  # status files of older builds have none
        if not any(s["num_records"] for s in shards):
            # A 0-record dataset would only fail later, in training, far from its cause; no manifest.
            raise ValueError(_nothing_usable(opts, skipped, rejected))
        quality_section = _quality_section(opts, rejected)
        manifest = {
            "format": manifest_lib.FORMAT, "version": manifest_lib.VERSION, "name": opts.name,
            "num_records": sum(s["num_records"] for s in shards), "shards": shards,
            "label_schema": schema, "skipped": skipped, "unlisted_images": unlisted,
            "duplicates": duplicates, "quality": quality_section, "options": content["options"],
            "source": {"images": os.path.abspath(opts.images),
                       "labels": opts.labels and os.path.abspath(opts.labels)},
            "fingerprint": fingerprint,
        }
        if opts.uses_faces:
            manifest.update(_face_sections(opts, rows, schema, [statuses[f] for f in files]))
        manifest_lib.write_json_atomic(manifest_path, manifest)
        written = manifest_lib.read_manifest(opts.out)  # as JSON has it (lists, not tuples)
        # The last write of the build: the lock file goes with the status files (see writer.out_lock).
        log.info("removing %s: status files of this finished build", os.path.join(opts.out, STATUS_DIR))
        shutil.rmtree(os.path.join(opts.out, STATUS_DIR), ignore_errors=True)
        log.info("done in %.1fs: %d records in %d shards, %d skipped, %s%s → %s", time.time() - start,
                 manifest["num_records"], num_shards, len(skipped), _duplicates_summary(duplicates),
                 _quality_summary(quality_section), manifest_path)
        return written


def _remove_duplicates(opts: BuildOptions, files: list[str], statuses: dict[str, dict]) -> dict:
    """Finds the duplicates of the whole build from the shards' fingerprints, rewrites the shards that hold
    them (`statuses` is updated), and returns the manifest's `duplicates` section."""
    if opts.dedup == "off":
        return {"mode": "off"}
    table = face_hash.HashTable(opts.out)
    for f in files:  # shard order is plan order: the first copy of a photo is kept
        for file, stored in statuses[f]["hashes"].items():
            table.add(file, face_hash.FaceHash.from_record(stored))
    found = face_hash.find_duplicates(table, opts.dedup, opts.dedup_distance)
    gone = {table.ids[k] for k in found}
    for f in files:
        drop = gone & set(statuses[f]["hashes"])
        if drop - set(statuses[f].get("removed", [])):  # a rerun finds the shards it compacted already done
            statuses[f] = remove_records(opts, statuses[f], drop)
            log.info("rewrote %s without %d duplicates", f, len(drop))
    groups: dict[int, list[dict]] = {}
    for k, m in sorted(found.items()):
        groups.setdefault(m.found, []).append({"file": table.ids[k], "distance": m.distance, "kind": m.kind})
    exact = sum(m.kind == "exact" for m in found.values())
    section = {"mode": opts.dedup, "removed": len(found), "exact": exact, "near": len(found) - exact}
    if opts.dedup == "near":
        section["max_distance"] = opts.dedup_distance
    section["groups"] = [{"kept": table.ids[k], "removed": twins} for k, twins in sorted(groups.items())]
    return section


def _duplicates_summary(section: dict) -> str:
    if section["mode"] == "off":
        return "duplicates kept (--dedup=off)"
    return f"{section['removed']} duplicates removed ({section['exact']} exact, {section['near']} near)"


def _nothing_usable(opts: BuildOptions, skipped: list[dict], rejected: list[dict]) -> str:
    if not rejected:
        return (f"nothing usable in {opts.images}: all {len(skipped)} inputs were skipped, "
                f"e.g. {skipped[0]['file']}: {skipped[0]['reason']}")
    first = rejected[0]
    return (f"nothing usable in {opts.images}: {len(skipped)} inputs skipped and {len(rejected)} faces outside "
            f"the quality limits, e.g. {first['file']}: {first['reason']} {first['value']} "
            f"(limit {first['limit']})")


def _quality_section(opts: BuildOptions, rejected: list[dict]) -> dict:
    """The manifest's `quality`: the limits that were on, the faces they rejected, counted per measure."""
    counts = {name: 0 for flag, name, _ in quality.LIMITS if flag in opts.quality_limits()}
    for r in rejected:
        counts[r["reason"]] += 1
    return {"limits": opts.quality_limits(), "version": quality.VERSION, "removed": len(rejected),
            "by_reason": counts, "rejected": rejected}


def _quality_summary(section: dict) -> str:
    if not section["limits"]:
        return ""
    counts = ", ".join(f"{name} {n}" for name, n in section["by_reason"].items())
    return f", {section['removed']} faces outside the quality limits ({counts})"


def _face_sections(opts: BuildOptions, rows: list[Row], schema: dict, statuses: list[dict]) -> dict:
    """The manifest's `faces` (and `landmark_labels`) sections; writes OUT/landmark_labels.csv."""
    # Duplicates and faces outside the quality limits had a face too: this counts detections.
    found = sum(s["num_records"] + len(s.get("removed", ())) + len(s.get("rejected", ())) for s in statuses)
    faces = {
        "landmark_model": face_landmarks.LICENCE,
        "aligned": opts.align, "framing": face_align.Framing(opts.align_size).describe() if opts.align else None,
        "policies": {"faces": opts.faces, "poor_fit": opts.poor_fit},
        "photos": len(rows), "kept": found, "detection_rate": round(found / max(1, len(rows)), 4),
        "several_faces": [f for s in statuses for f in s.get("several_faces", [])],
    }
    out = {"faces": faces}
    if opts.landmark_labels:
        columns = [opts.file_column] + list(schema)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(columns)
        for s in statuses:
            removed = set(s.get("removed", ()))  # duplicates: not in the shards, so not in their CSV
            for file, labels in s.get("face_labels", {}).items():
                if file not in removed:
                    writer.writerow([file] + [labels.get(c, "") for c in schema])
        tmp = os.path.join(opts.out, f"{LANDMARK_CSV}.tmp.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text.getvalue())
        os.replace(tmp, os.path.join(opts.out, LANDMARK_CSV))
        out["landmark_labels"] = {
            "names": list(face_proportions.NAMES), "csv": LANDMARK_CSV,
            "definition": "each a length over the inter-ocular distance; formulas in "
                          "mefem_jax/data/shards/face_proportions.py",
            "points": list(landmark_points.COLUMNS),
            "points_definition": "the 68 points (dlib's layout, 0-based) in units of the side of the stored "
                                 "image's centred square, from its top-left corner; "
                                 "mefem_jax/data/shards/landmark_points.py",
            "licence": face_landmarks.LICENCE}
    return out


def _run(jobs: list[ShardJob], workers: int, lock):
    if workers <= 1 or len(jobs) <= 1:
        yield from map(write_shard, jobs)
        return
    # spawn, not fork: the caller may have threads (or JAX) running, which fork does not copy. The workers
    # share the out folder's lock and die with this process (writer.py).
    shared = None if lock.fileno() is None else SharedFd(lock.fileno())
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=die_with_parent,
                                                   initargs=(os.getpid(), shared)) as pool:
        yield from pool.imap_unordered(write_shard, jobs)


# ---------------------------------------------------------------------------------------------
# Command line (absl flags, on a FlagValues of its own: importing this module, or calling main()
# twice in one process, registers nothing globally).
# ---------------------------------------------------------------------------------------------
PROG = "build_shards"


def _define_flags(fv) -> None:
    from absl import flags

    def string(name, default, help_):
        flags.DEFINE_string(name, default, help_, flag_values=fv)

    def integer(name, default, help_, lower=None):
        flags.DEFINE_integer(name, default, help_, lower_bound=lower, flag_values=fv)

    string("images", None, "Folder of face images (searched recursively).")
    string("labels", None, "CSV with a file column (relative to --images) and labels; without it "
                           "every image in the folder is written, unlabelled.")
    string("out", None, "Output folder for shards and manifest.json.")
    string("name", "faces", "Shard name prefix.")
    integer("num_shards", 16, "Number of shards.", lower=1)
    integer("image_size", 0, "Downscale so the shorter side is at most this (0: keep).", lower=0)
    integer("max_side", 1024, "Downscale so the longer side is at most this.", lower=1)
    integer("min_side", 16, "Skip images smaller than this.", lower=1)
    integer("jpeg_quality", 95, "For re-encoded images.", lower=1)
    integer("workers", max(1, (os.cpu_count() or 2) - 1), "Processes writing shards.", lower=1)
    string("file_column", "file", "The CSV column naming each image file.")
    string("split", None, "Keep rows whose 'split' column equals this (the filter split=NAME).")
    string("filter", "", "Keep rows where COL=VALUE (or COL:VALUE; VALUE may be A|B for either), "
                         "comma-separated clauses that must all hold; see data/csv_text.py.")
    string("label_columns", None, "Comma-separated label columns (default: all others).")
    string("label_types", "", "Override inferred types, e.g. age=float,id_code=str.")
    flags.DEFINE_bool("overwrite", False, "Replace a different finished build in --out.", flag_values=fv)
    flags.DEFINE_bool("align", False, "Detect the face, level the eyes and crop to --align_size with the "
                      "UTKFace framing (face_align.py). Needs the landmarks extra; its 68-point model is "
                      "for NON-COMMERCIAL use only (trained on iBUG 300-W).", flag_values=fv)
    integer("align_size", 224, "Side of the aligned crop, in pixels.", lower=32)
    flags.DEFINE_enum("faces", "largest", list(face_align.FACE_POLICIES), "Several faces in a photo: "
                      "keep the largest, or skip the photo.", flag_values=fv)
    flags.DEFINE_enum("poor_fit", "skip", list(face_align.FIT_POLICIES), "Landmarks that do not make a "
                      "plausible face: skip the photo, or keep it.", flag_values=fv)
    flags.DEFINE_bool("landmark_labels", False, "Add facial proportions (face_proportions.py) and the 68 "
                      f"points (landmark_points.py) as labels and write OUT/{LANDMARK_CSV}. Needs the landmarks "
                      "extra; its 68-point model is for NON-COMMERCIAL use only (trained on iBUG 300-W).",
                      flag_values=fv)
    flags.DEFINE_enum("dedup", "exact", list(face_hash.DEDUP_MODES), "Duplicates within the build: exact "
                      "(identical pixels), near (perceptual hash within --dedup_distance, mirror images "
                      "included) or off; the first copy is kept, the others listed in the manifest.",
                      flag_values=fv)
    flags.DEFINE_integer("dedup_distance", face_hash.NEAR_DISTANCE, "Hamming distance (of 63 bits) up to which "
                         "--dedup=near counts two faces as one photo (face_hash.py).", lower_bound=0,
                         upper_bound=63, flag_values=fv)

    def limit(name, help_):
        flags.DEFINE_float(name, 0.0, help_ + " 0: off. The rejected faces are listed in the manifest's "
                           "`quality` with the value measured (quality.py).", lower_bound=0.0, flag_values=fv)

    limit("min_face_px", "Drop faces smaller than this, in pixels of the photo: the side of the landmarks' "
                         "box with --align or --landmark_labels (~170 on a 200 px UTKFace crop), else the "
                         "image's shorter side.")
    limit("min_sharpness", "Drop faces less sharp than this: the variance of the 3x3 Laplacian of the grey "
                           "face resampled to 128 px (UTKFace: median 54, 5th percentile 13 on the landmarks' "
                           "box; 80 and 15 on the whole crop).")
    limit("max_yaw", "Drop faces turned sideways by more than this many degrees, estimated from the "
                     "landmarks: needs --align or --landmark_labels.")
    limit("max_pitch", "Drop faces nodding up or down by more than this many degrees, estimated from the "
                       "landmarks: needs --align or --landmark_labels.")
    flags.DEFINE_bool("debug", False, "On an error, show the traceback instead of one line.", flag_values=fv)


def _pairs(text: str, what: str) -> tuple[tuple[str, str], ...]:
    """NAME=VALUE (or NAME:VALUE) pairs, as written: the filters keep their text, so builds
    made before the shared grammar keep their fingerprints."""
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=") if "=" in item else item.partition(":")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{what}: expected NAME=VALUE, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def options_from_flags(fv) -> BuildOptions:
    """BuildOptions from parsed flags, or ValueError (a bad flag value, in one line)."""
    for name in ("images", "out"):
        if not fv[name].value:
            raise ValueError(f"--{name} is required")
    filters = _pairs(fv.filter, "--filter") + ((("split", fv.split),) if fv.split else ())
    csv_text.parse_filters(",".join(f"{c}={v}" for c, v in filters))  # the grammar's own checks
    label_types = _pairs(fv.label_types, "--label_types")
    for column, kind in label_types:
        if kind not in records.LABEL_TYPES:
            raise ValueError(f"--label_types: {column}={kind}: type must be one of {records.LABEL_TYPES}")
    return BuildOptions(
        images=fv.images, labels=fv.labels, out=fv.out, name=fv.name, num_shards=fv.num_shards,
        image_size=fv.image_size, max_side=fv.max_side, min_side=fv.min_side,
        jpeg_quality=fv.jpeg_quality, workers=fv.workers, file_column=fv.file_column,
        filters=filters,
        label_columns=tuple(c.strip() for c in fv.label_columns.split(",")) if fv.label_columns else None,
        label_types=label_types, overwrite=fv.overwrite, align=fv.align, align_size=fv.align_size,
        faces=fv.faces, poor_fit=fv.poor_fit, landmark_labels=fv.landmark_labels, dedup=fv.dedup,
        dedup_distance=fv.dedup_distance, min_face_px=fv.min_face_px, min_sharpness=fv.min_sharpness,
        max_yaw=fv.max_yaw, max_pitch=fv.max_pitch)


def parse_args(argv: list[str]) -> BuildOptions:
    """BuildOptions from command-line arguments (without the program name); ValueError if bad."""
    from absl import flags

    fv = flags.FlagValues()
    _define_flags(fv)
    try:
        rest = fv([PROG, *argv])
    except flags.Error as err:
        raise ValueError(str(err)) from None
    if len(rest) > 1:
        raise ValueError(f"unexpected arguments {rest[1:]}")
    return options_from_flags(fv)


def _usage() -> str:
    from absl import flags

    fv = flags.FlagValues()
    _define_flags(fv)
    return f"python -m mefem_jax.data.build_shards --images=DIR --out=DIR [flags]\n\n" \
           f"{__doc__.split(chr(10) * 2)[0]}\n\n{fv.get_help()}"


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0 done, 2 bad input: one line on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "--helpfull", "--helpshort") for a in argv):
        print(_usage())
        return cli.EXIT_FINISHED
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        opts = parse_args(argv)
        manifest = build(opts)
    except face_landmarks.LandmarksUnavailable as err:  # an extra to install: the user's to mend
        if "--debug" in argv:
            raise
        cli.fail(PROG, err)
        return cli.EXIT_BAD_INPUT
    except cli.HANDLED as err:
        if "--debug" in argv:
            raise
        return cli.fail(PROG, err)
    for item in manifest["skipped"][:20]:
        log.warning("skipped %s: %s", item["file"], item["reason"])
    if len(manifest["skipped"]) > 20:
        log.warning("… and %d more, listed in manifest.json", len(manifest["skipped"]) - 20)
    if "faces" in manifest:
        log.info("faces kept in %d of %d photos; landmark model: %s", manifest["faces"]["kept"],
                 manifest["faces"]["photos"], face_landmarks.LICENCE)
    return cli.EXIT_FINISHED


if __name__ == "__main__":  # the documented name is `python -m mefem_jax.data.build_shards`
    sys.exit(main())

"""`manifest.json`: the file that makes a folder of ArrayRecord shards a dataset.

Written by `build_shards` as the very last step of a build (atomically, via a rename), so a
folder with a manifest is complete and one without is not a dataset yet. Fields:

    format, version      "mefem_jax.face_shards", 1
    name                 the shard name prefix: NAME-00000-of-00016.array_record
    num_records          total records over all shards
    shards               [{"file": "NAME-00000-of-00016.array_record", "num_records": int}, …]
    label_schema         {column: "int" | "float" | "str"}, the labels stored in every record
    skipped              [{"file": str, "reason": str}, …], every CSV row or image not written
    unlisted_images      image files in the folder that the labels CSV does not mention
    duplicates           --dedup: {"mode": "exact" | "near" | "off", and unless off: "removed", "exact",
                         "near" (counts), "max_distance" (near only), "groups": [{"kept": file,
                         "removed": [{"file", "distance", "kind"}, …]}, …]} (kind: exact, near, mirror;
                         distance: bits of the perceptual hash, face_hash.py). Builds made before
                         issue 24 have no such section, and their records no fingerprints.
    quality              {"limits": {flag: threshold} of the filters that were on (min_face_px, min_sharpness,
                         max_yaw, max_pitch; {} for none), "version": shards/quality.py's VERSION, "removed":
                         count, "by_reason": {measure: count} (each face counted under the first limit it
                         failed, in that order), "rejected": [{"file", "reason" (face_px, sharpness, yaw,
                         pitch), "value" (measured), "limit", "measures": every measure of the face}, …]}.
                         Every record stores its measures (a "quality" header key, records.py). Builds made
                         before have no such section.
    options, source      how the build was made (sizes, filters, input paths)
    fingerprint          hash of the inputs and options; a re-run with the same one is a no-op

Builds made with the face step (`--align` / `--landmark_labels`, the `landmarks` extra) add:

    faces                {"landmark_model": the model and its licence (iBUG 300-W: non-commercial
                         use only), "aligned": bool, "framing": face_align.Framing.describe() or
                         null, "policies": {"faces", "poor_fit"}, "photos": rows planned, "kept":
                         records written, "detection_rate": kept / photos, "several_faces": [file,
                         …] (photos where more than one face was found; the largest was kept)}
    landmark_labels      {"names": face_proportions.NAMES (also in label_schema, as "float"),
                         "csv": "landmark_labels.csv", "definition", "licence"}
"""
from __future__ import annotations

import json
import os

MANIFEST_NAME = "manifest.json"
FORMAT = "mefem_jax.face_shards"
VERSION = 1
SHARD_SUFFIX = ".array_record"


def shard_name(name: str, index: int, count: int) -> str:
    return f"{name}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def read_manifest(folder: str) -> dict:
    """The manifest of a shard folder, or a clear error saying why the folder is not one."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder} has no {MANIFEST_NAME}: it is not a shard folder, or its build did not "
            f"finish (re-run `python -m mefem_jax.data.build_shards --out={folder} ...`).")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON: {err}") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} manifest (format="
                         f"{manifest.get('format')!r}, version={manifest.get('version')!r})")
    return manifest


def write_json_atomic(path: str, payload: dict) -> None:
    """Write-then-rename: readers see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

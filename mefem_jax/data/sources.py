"""Data specs → Grain random-access sources of raw examples.

A spec string names where faces come from:

    "synthetic" | "synthetic:SPLIT"   procedurally drawn faces (`synthetic.py`), no files needed
    DIR                               a shard folder written by `build_shards` (has manifest.json)
    "PATTERN*.array_record" | FILE    a glob of, or one, shard file(s)
    "tfds:NAME[:SPLIT]"               a TFDS dataset stored as ArrayRecord, read with
                                      `tfds.data_source` (no TensorFlow); NAME may carry a
                                      config and version, "name/config:1.0.0"
    "gs://BUCKET/PATH"                a shard folder, glob or file on Cloud Storage, read through
                                      its gcsfuse mount at /mnt/gcs/BUCKET/PATH (gcs.py)

A mixture of specs (`A:0.7;B:0.3`, mixture.py) is opened part by part by the training pipeline.

Every source yields the same raw example, so one preprocessing path serves them all:

    {"id": str, "labels": {column: value}, "image": encoded bytes | uint8 [H, W, 3]}

or, when the stored record itself cannot be read (a corrupted ArrayRecord chunk),
`{"id": ..., "error": reason}` — the pipeline skips and counts it like an undecodable image.

A gs:// spec is read on its mount as a local folder: the ArrayRecord reader needs POSIX paths, so the
shard listing and the manifest are read there too, one view of the bucket through one cache (a second
route through etils.epath would bypass the mount's cache and need Cloud Storage libraries and
credentials of its own). Without the mount the spec is refused in one line saying how to mount it.

Problems with the spec itself (a path that does not exist, a shard that is not an ArrayRecord
file or disagrees with its manifest, an unknown TFDS dataset or split) are refused here, before
any training starts, with the offending file named.
"""
from __future__ import annotations

import bisect
import glob
import os
import re

import grain
import numpy as np

from mefem_jax.data import gcs, mixture
from mefem_jax.data import manifest as manifest_lib
from mefem_jax.data import records
from mefem_jax.data.synthetic import SyntheticFaces


def _check_label_names(schema: dict[str, str], where: str) -> None:
    clash = sorted(set(schema) & set(records.RESERVED_KEYS))
    if clash:
        raise ValueError(f"{where}: label column(s) {clash} clash with the pipeline's own keys "
                         f"{records.RESERVED_KEYS}; rename them")


def _open_shard(path: str) -> int:
    """Number of records in one shard; FileNotFoundError / ValueError naming the bad file."""
    # Imported here so that merely importing this module does not load the C++ extension.
    from array_record.python import array_record_module

    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path} does not exist")
    try:
        reader = array_record_module.ArrayRecordReader(path)
        ok, count = reader.ok(), reader.num_records()
        reader.close()
    except Exception as err:  # the extension raises RuntimeError with a Riegeli message
        raise ValueError(f"shard {path} is corrupted or not an ArrayRecord file: {err}") from err
    if not ok:
        raise ValueError(f"shard {path} is corrupted or not an ArrayRecord file")
    return count


class ShardSource(grain.sources.RandomAccessDataSource):
    """Face records from ArrayRecord shards (a `build_shards` folder, or a glob of shards)."""

    def __init__(self, paths: list[str], label_schema: dict[str, str],
                 expected_counts: list[int] | None = None):
        if not paths:
            raise ValueError("no shard files given")
        counts = [_open_shard(p) for p in paths]
        if expected_counts is not None:
            for path, got, want in zip(paths, counts, expected_counts):
                if got != want:
                    raise ValueError(f"shard {path} holds {got} records but its manifest says "
                                     f"{want}: the file was changed or damaged after the build")
        _check_label_names(label_schema, os.path.dirname(paths[0]) or ".")
        self.paths = list(paths)
        self.label_schema = dict(label_schema)
        self._offsets = [0]
        for c in counts:
            self._offsets.append(self._offsets[-1] + c)
        if self._offsets[-1] == 0:
            raise ValueError(f"shards {paths[:3]}{'…' if len(paths) > 3 else ''} hold no records")
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return self._offsets[-1]

    def _where(self, index: int) -> str:
        shard = bisect.bisect_right(self._offsets, index) - 1
        return f"{os.path.basename(self.paths[shard])}[{index - self._offsets[shard]}]"

    def __getitem__(self, index: int) -> dict:
        try:
            record_id, labels, image = records.decode_record(self._source[index])
        except Exception as err:  # a damaged chunk or record: skipped downstream, never fatal
            return {"id": self._where(index), "error": f"{type(err).__name__}: {err}"}
        return {"id": record_id, "labels": labels, "image": image}

    def __repr__(self) -> str:
        return f"ShardSource({len(self.paths)} shards, {len(self)} records)"


def shard_folder_source(folder: str) -> ShardSource:
    manifest = manifest_lib.read_manifest(folder)
    shards = manifest["shards"]
    return ShardSource([os.path.join(folder, s["file"]) for s in shards],
                       manifest["label_schema"], [s["num_records"] for s in shards])


def shard_glob_source(pattern: str) -> ShardSource:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no shard files match {pattern}")
    folders = {os.path.dirname(p) for p in paths}
    schema = None
    if len(folders) == 1:
        folder = folders.pop()
        if os.path.isfile(os.path.join(folder, manifest_lib.MANIFEST_NAME)):
            schema = manifest_lib.read_manifest(folder)["label_schema"]
    source = ShardSource(paths, schema or {})
    if schema is None:
        source.label_schema = _schema_from_first_record(source)
        _check_label_names(source.label_schema, pattern)
    return source


def _schema_from_first_record(source: ShardSource) -> dict[str, str]:
    """Without a manifest, the label types are read off the first record that can be read."""
    for index in range(min(len(source), 100)):
        example = source[index]
        if "error" not in example:
            kinds = {bool: "int", int: "int", float: "float", str: "str"}
            return {k: kinds.get(type(v), "str") for k, v in example["labels"].items()}
    raise ValueError(f"not one of the first {min(len(source), 100)} records of "
                     f"{source.paths[0]} can be read")


class TfdsSource(grain.sources.RandomAccessDataSource):
    """A TFDS ArrayRecord dataset through `tfds.data_source` (numpy decoding, no TensorFlow).

    The first top-level Image feature is the face; it is read as encoded bytes (SkipDecoding)
    so that our crop-aware decoder does the work. Scalar numeric and text features become labels
    (ClassLabel → int); the "id" feature, when present, is the id, else "NAME/SPLIT/index".
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        import tensorflow_datasets as tfds  # heavy and optional: only for tfds: specs

        try:
            builder = tfds.builder(name, data_dir=data_dir)
            info = builder.info
        except Exception as err:
            raise ValueError(f"TFDS dataset {name!r} not found in data_dir="
                             f"{data_dir or 'default'}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0]}") from err
        if str(info.file_format).lower().find("array_record") < 0:
            raise ValueError(f"TFDS dataset {name!r} is stored as {info.file_format}; only "
                             "ArrayRecord datasets can be read without TensorFlow")
        if split not in info.splits:
            raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; it has "
                             f"{sorted(info.splits)}")
        features = info.features
        images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
        if not images:
            raise ValueError(f"TFDS dataset {name!r} has no top-level Image feature: {features}")
        self.image_key = images[0]
        self.id_key = "id" if "id" in features and isinstance(features["id"], tfds.features.Text) \
            else None
        self.label_schema = {}
        for key, feature in features.items():
            if key in (self.image_key, self.id_key) or tuple(feature.shape) != ():
                continue
            if isinstance(feature, tfds.features.Text):
                self.label_schema[key] = "str"
            elif np.dtype(feature.np_dtype).kind in "iub":
                self.label_schema[key] = "int"
            elif np.dtype(feature.np_dtype).kind == "f":
                self.label_schema[key] = "float"
        _check_label_names(self.label_schema, f"tfds:{name}")
        self.name, self.split = name, split
        self._source = tfds.data_source(
            name, split=split, data_dir=data_dir, download=False,
            decoders={self.image_key: tfds.decode.SkipDecoding()})

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        fallback_id = f"{self.name}/{self.split}/{index}"
        try:
            example = self._source[index]
        except Exception as err:  # a damaged record: skipped downstream, never fatal
            return {"id": fallback_id, "error": f"{type(err).__name__}: {err}"}
        labels = {}
        for key, kind in self.label_schema.items():
            value = example[key]
            if kind == "str":
                labels[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) \
                    else str(value)
            else:
                labels[key] = int(value) if kind == "int" else float(value)
        record_id = example[self.id_key] if self.id_key else fallback_id
        if isinstance(record_id, bytes):
            record_id = record_id.decode("utf-8", "replace")
        return {"id": record_id, "labels": labels, "image": example[self.image_key]}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"


_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def parse_tfds_spec(spec: str, default_split: str) -> tuple[str, str]:
    """"tfds:NAME[:SPLIT]" → (NAME, SPLIT); a trailing ":1.2.3" is NAME's version, not a split."""
    rest = spec[len("tfds:"):]
    if not rest:
        raise ValueError(f"{spec!r}: expected tfds:NAME[:SPLIT]")
    name, _, tail = rest.rpartition(":")
    if not name or _VERSION.match(tail):
        return rest, default_split
    return name, tail


def open_source(spec: str, *, split: str = "train", synthetic_size: int = 4096,
                synthetic_resolution: int = 112, seed: int = 0,
                tfds_data_dir: str | None = None) -> grain.sources.RandomAccessDataSource:
    """The source a spec names (see the module docstring). `split` is the default split for
    synthetic and tfds specs that do not give one; shard folders hold one split each."""
    spec = spec.strip()
    if mixture.is_mixture(spec):
        raise ValueError(f"data spec {spec!r} is a mixture; only training data (data.train) can mix sources")
    if gcs.is_gcs(spec):
        spec = gcs.mounted_path(spec)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        part = spec.partition(":")[2] or split
        return SyntheticFaces(synthetic_size, synthetic_resolution, seed=seed, split=part)
    if spec.startswith("tfds:"):
        name, part = parse_tfds_spec(spec, split)
        return TfdsSource(name, part, tfds_data_dir)
    if os.path.isdir(spec):
        return shard_folder_source(spec)
    if glob.has_magic(spec) or spec.endswith(manifest_lib.SHARD_SUFFIX):
        return shard_glob_source(spec)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"data spec {spec!r}: no such shard folder or file (expected "
                                "'synthetic', a shard folder, a *.array_record glob or tfds:NAME)")
    raise ValueError(f"data spec {spec!r} is a file but not an .array_record shard")

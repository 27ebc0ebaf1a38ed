"""What `--train`, `--test` and `--pairs_data` name: data specs for evaluation, and a reader for
an image folder with a labels CSV.

A spec is a source optionally followed by `:` and comma-separated `key=value` options
(spec_options.py):

    ../shared/data/utkface:split=train             image folder + labels.csv, rows with split == train
    ../shared/data/utkface:split=test,sample=500   ... 500 of the test rows, drawn at random
    faces/labels.csv:images=/data/faces,race=0|1   a CSV anywhere, images elsewhere, race 0 or 1
    SHARD_FOLDER:split=test                        the training pipeline's sources: shards,
    synthetic:split=train,limit=256                  the synthetic faces,
    tfds:NAME[:SPLIT]                                TFDS datasets

Options: `limit=N` keeps the first N rows (after filtering); `sample=N` (folder + CSV only) keeps N
rows drawn at random with a fixed seed, in file order: a CSV sorted by file name (UTKFace's names
start with the age) has no representative first N; `csv=FILE` names the labels CSV of a
folder (default labels.csv); `images=DIR` the image folder (default `images/` beside the CSV if it
exists, else the CSV's folder); `id=COLUMN` the column naming each image file (default the first of
file, filename, image, path). Any other `key=value` keeps rows whose label `key` equals `value`
(`|` separates alternatives; cells compared with surrounding spaces stripped): the row filter
grammar of `mefem_jax.data.csv_text`, which the shard builder's `--filter` shares. `split=NAME` is
that filter too, except for `synthetic` and `tfds:` sources, whose splits are separate sets: there
it picks the set (default: train for --train, test otherwise). A tail without `=` is not options:
`synthetic:test` stays one source.

Folder + CSV sources are read here; each image gets the shard pipeline's eval preprocessing
(`data.augment`: centre square, resize to the model size, ImageNet mean/std), so a folder and the
shards written from it embed identically. Every other source goes through
`mefem_jax.data.pipeline.make_eval_iterator`. Unreadable or missing images are skipped and
counted, never fatal. Every batch is a dict: "image" float32 [b, H, W, 3], "id" [b] str, and one
[b] array per label column (strings here; the caller converts the targets it uses). `exclude` drops
ids from every pass (`evaluate --exclude_leaked`: the test images also in the pretraining data).

For the leakage check (`python -m mefem_jax.data.leakage`, `evaluate --exclude_leaked`), `spec_hashes`
gives the fingerprints (`data/face_hash.py`) of the images a spec names, under the ids evaluation gives
them, and `split_specs` reads a comma-separated list of specs whose options hold commas too.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from mefem_jax.data import csv_text, face_hash
from mefem_jax.data import manifest as manifest_lib
from mefem_jax.spec_options import SpecError, split_options

ID_COLUMNS = ("file", "filename", "image", "path")
_RESERVED = {"limit", "sample", "csv", "images", "id"}


class DataSpecError(SpecError):
    """A data spec that names nothing readable, or options that do not fit it."""


@dataclass(frozen=True)
class DataSpec:
    source: str                                 # the part before the options
    options: tuple[tuple[str, str], ...] = ()   # ordered (key, value) pairs

    def _count(self, key: str) -> int | None:
        value = dict(self.options).get(key)
        if value is None:
            return None
        if not value.isdigit() or int(value) < 1:
            raise DataSpecError(f"{key} must be a positive integer, got {value!r}")
        return int(value)

    @property
    def limit(self) -> int | None:
        return self._count("limit")

    @property
    def sample(self) -> int | None:
        return self._count("sample")

    @property
    def clauses(self) -> tuple[csv_text.Clause, ...]:
        """The row filters: every option that is not a reserved word (csv_text's grammar)."""
        try:
            return tuple(csv_text.clause(k, v) for k, v in self.options if k not in _RESERVED)
        except csv_text.CsvTextError as err:
            raise DataSpecError(f"{self}: {err}") from None

    @property
    def filters(self) -> dict[str, set[str]]:
        return {c.column: set(c.values) for c in self.clauses}

    def __str__(self) -> str:
        tail = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.source}:{tail}" if tail else self.source


def parse_data_spec(text: str) -> DataSpec:
    if not text.strip():
        raise DataSpecError("empty data spec")
    return DataSpec(*split_options(text, DataSpecError))


def split_specs(text: str) -> list[str]:
    """'A:split=train,limit=5,B,C:split=test' -> ['A:split=train,limit=5', 'B', 'C:split=test']. A piece
    that is a bare key=value (no ':' or '/' before its '=') continues a spec that has options already;
    any other piece starts a new spec."""
    specs: list[str] = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        key, eq, _ = piece.partition("=")
        if specs and eq and not set(key) & {":", "/"} and split_options(specs[-1], DataSpecError)[1]:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    if not specs:
        raise DataSpecError(f"no data spec in {text!r}")
    return specs


# ---------------------------------------------------------------------------------------------
# Image folder + labels CSV
# ---------------------------------------------------------------------------------------------
@dataclass
class FolderTable:
    """The rows of a labels CSV that a spec selects, and where their images are."""
    csv_path: Path
    image_dir: Path
    id_column: str
    columns: list[str]                   # label columns (every CSV column but the id column)
    rows: list[dict[str, str]]
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> ids


def folder_csv_path(spec: DataSpec) -> Path | None:
    """The labels CSV a spec names, or None when it is not a folder + CSV source."""
    path = Path(spec.source)
    if path.is_file() and path.suffix.lower() == ".csv":
        return path
    if path.is_dir():
        name = dict(spec.options).get("csv", "labels.csv")
        if (path / name).is_file():
            return path / name
        if "csv" in dict(spec.options):
            raise DataSpecError(f"{spec}: no {name} in {path}")
    return None


def read_folder_table(spec: DataSpec) -> FolderTable:
    csv_path = folder_csv_path(spec)
    if csv_path is None:
        raise DataSpecError(f"{spec}: not an image folder with a labels CSV")
    opts = dict(spec.options)
    if "images" in opts:
        image_dir = Path(opts["images"])
    else:
        image_dir = csv_path.parent / "images"
        image_dir = image_dir if image_dir.is_dir() else csv_path.parent
    if not image_dir.is_dir():
        raise DataSpecError(f"{spec}: image folder {image_dir} does not exist")

    try:  # one reader and one filter grammar with the shard builder; errors name the file and line
        table = csv_text.read_table(str(csv_path), spec.clauses)
    except csv_text.CsvTextError as err:
        raise DataSpecError(f"{spec}: {err}") from None
    header, rows = table.header, [r for _, r in table.rows]
    id_column = opts.get("id") or next((c for c in ID_COLUMNS if c in header), None)
    if id_column not in header:
        raise DataSpecError(f"{csv_path}: no image column (looked for {opts.get('id') or ID_COLUMNS}); "
                            f"columns are {header}; name one with id=COLUMN")
    seen, duplicates = set(), []
    for r in rows:  # ids name embeddings (and pairs), so they must be unique
        if r[id_column] in seen:
            duplicates.append(r[id_column])
        seen.add(r[id_column])
    if duplicates:
        raise DataSpecError(f"{csv_path}: {len(duplicates)} duplicate image id(s), e.g. {duplicates[:3]}")
    if spec.sample is not None and spec.sample < len(rows):
        chosen = np.random.default_rng(0).choice(len(rows), spec.sample, replace=False)
        rows = [rows[i] for i in np.sort(chosen)]
    if spec.limit is not None:
        rows = rows[:spec.limit]
    return FolderTable(csv_path, image_dir, id_column, [c for c in header if c != id_column], rows)


def load_image(path: Path, size: int) -> np.ndarray:
    """One file -> float32 [size, size, 3], exactly as the shard pipeline's eval pass makes it."""
    from mefem_jax.data import augment  # with grain: only when a folder is read (see open_eval_data)

    return augment.normalize(augment.crop_resize(path.read_bytes(), augment.center_box, size))


def iterate_folder(table: FolderTable, image_size: int, batch_size: int,
                   threads: int = 4) -> Iterator[dict]:
    """Batches in CSV order; an unreadable image is dropped from its batch and recorded in
    `table.skipped`, so batches may come out shorter than `batch_size`."""
    from PIL import Image

    # Missing, truncated, not an image, absurdly large; PIL reports some corrupt files as SyntaxError.
    unreadable = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

    def load(row: dict) -> np.ndarray | Exception:
        try:
            return load_image(table.image_dir / row[table.id_column], image_size)
        except unreadable as err:
            return err

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(table.rows), batch_size):
            chunk = table.rows[start:start + batch_size]
            loaded = list(pool.map(load, chunk))
            keep = []
            for row, image in zip(chunk, loaded):
                if isinstance(image, Exception):
                    reason = "missing file" if isinstance(image, FileNotFoundError) else "unreadable image"
                    table.skipped.setdefault(reason, []).append(row[table.id_column])
                else:
                    keep.append((row, image))
            if not keep:
                continue
            batch = {"image": np.stack([image for _, image in keep]),
                     "id": np.array([row[table.id_column] for row, _ in keep])}
            for column in table.columns:
                batch[column] = np.array([row[column] for row, _ in keep])
            yield batch


# ---------------------------------------------------------------------------------------------
# Every source
# ---------------------------------------------------------------------------------------------
@dataclass
class EvalData:
    """One ordered pass over a spec's images: `batches()` plus what identifies the data."""
    spec: DataSpec
    image_size: int
    batch_size: int
    default_split: str = "test"
    table: FolderTable | None = None
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> ids, of the last pass
    exclude: frozenset[str] = frozenset()                        # ids left out of every pass

    def identity(self) -> dict:
        """What the images are: for cache keys (a changed CSV or shard invalidates them)."""
        ident: dict = {"spec": str(self.spec), "image_size": self.image_size}
        if self.exclude:
            ident["exclude"] = hashlib.sha256("\n".join(sorted(self.exclude)).encode()).hexdigest()
        paths = [self.table.csv_path] if self.table else [Path(self.spec.source)]
        for p in paths:
            if p.exists():
                st = p.stat()
                ident[str(p.resolve())] = [st.st_mtime_ns, st.st_size]
                if p.is_dir():  # a shard folder: its files' stamps
                    ident["files"] = sorted((q.name, q.stat().st_mtime_ns, q.stat().st_size)
                                            for q in p.iterdir() if q.is_file())
        return ident

    def batches(self) -> Iterator[dict]:
        for batch in self._all_batches():
            if self.exclude:  # ids are unique (read_folder_table checks a CSV's), so this drops whole images
                keep = ~np.isin(batch["id"], list(self.exclude))
                if not keep.any():
                    continue
                batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
            yield batch

    def _all_batches(self) -> Iterator[dict]:
        if self.table is not None:
            self.table.skipped = self.skipped = {}
            yield from iterate_folder(self.table, self.image_size, self.batch_size)
            return
        self.skipped = {}
        yield from _pipeline_batches(self.spec, self.image_size, self.batch_size,
                                     self.default_split, self.skipped)


def open_eval_data(spec: str | DataSpec, image_size: int, batch_size: int,
                   default_split: str = "test", exclude: frozenset[str] = frozenset()) -> EvalData:
    """`default_split`: the split of synthetic / tfds sources whose spec names none; `exclude`: ids to
    leave out."""
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    if folder_csv_path(spec) is not None:
        return EvalData(spec, image_size, batch_size, table=read_folder_table(spec), exclude=exclude)
    _check_no_folder_options(spec)
    if not (_has_named_splits(spec.source) or os.path.exists(spec.source)):
        raise DataSpecError(f"data spec {str(spec)!r}: {spec.source} is neither an image folder with "
                            "labels.csv, a CSV file, a shard folder, 'synthetic' nor tfds:NAME")
    return EvalData(spec, image_size, batch_size, default_split=default_split, exclude=exclude)


def _check_no_folder_options(spec: DataSpec) -> None:
    unknown = [k for k in ("csv", "images", "id", "sample") if k in dict(spec.options)]
    if unknown:
        raise DataSpecError(f"{spec}: options {unknown} apply only to an image folder with a labels CSV")


def _has_named_splits(source: str) -> bool:
    return source == "synthetic" or source.startswith(("synthetic:", "tfds:"))


def _pipeline_batches(spec: DataSpec, image_size: int, batch_size: int, default_split: str,
                      skipped: dict[str, list[str]]) -> Iterator[dict]:
    """The training pipeline's eval pass, with this spec's row filters and limit applied;
    records it could not decode are added to `skipped`."""
    from mefem_jax.data.pipeline import make_eval_iterator  # grain and friends: only when needed

    filters, remaining = spec.filters, spec.limit
    split = default_split
    if _has_named_splits(spec.source) and "split" in filters:
        names = filters.pop("split")
        if len(names) != 1:
            raise DataSpecError(f"{spec}: pick one split of {spec.source}, not {sorted(names)}")
        split = next(iter(names))
    # Without row filters, the first `limit` records are the ones kept: let the reader stop there.
    iterator = make_eval_iterator(spec.source, image_size=image_size, batch_size=batch_size,
                                  split=split, limit=None if filters else remaining)
    for batch in iterator:
        batch = dict(batch, id=np.asarray(batch["id"]).astype(str))
        keep = np.ones(len(batch["id"]), bool)
        if "valid" in batch:  # the pipeline pads its last batch to a fixed size
            keep &= np.asarray(batch.pop("valid"), bool)
        for key, allowed in filters.items():
            if key not in batch:
                raise DataSpecError(f"{spec}: filter on unknown label {key!r}; labels are "
                                    f"{sorted(k for k in batch if k not in ('image', 'id'))}")
            keep &= np.isin(np.char.strip(np.asarray(batch[key]).astype(str)), list(allowed))
        if remaining is not None:
            keep &= np.cumsum(keep) <= remaining
            remaining -= int(keep.sum())
        if keep.any():
            yield {k: np.asarray(v)[keep] for k, v in batch.items()}
        if remaining == 0:
            break
    for record_id, reason in getattr(iterator, "skipped", []):
        skipped.setdefault(reason, []).append(record_id)


# ---------------------------------------------------------------------------------------------
# Fingerprints, for the leakage check
# ---------------------------------------------------------------------------------------------
def spec_hashes(spec: str | DataSpec) -> face_hash.HashTable:
    """The fingerprints of the images a spec names, under the ids evaluation gives them: a folder with a
    labels CSV or a CSV (the rows its options select; files hashed here), a shard folder (fingerprints
    read from its records, or computed for builds that predate them; label filters and limit apply), or
    an image folder without a CSV (every image under it, ids relative to it). Synthetic and TFDS data
    hold no photos to compare and are refused."""
    from mefem_jax.data.shards.plan import list_images  # the builder's listing: only folders without a CSV

    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    if folder_csv_path(spec) is not None:
        table = read_folder_table(spec)
        return face_hash.hash_files(str(spec), str(table.image_dir), [r[table.id_column] for r in table.rows])
    source = Path(spec.source)
    if (source / manifest_lib.MANIFEST_NAME).is_file():
        _check_no_folder_options(spec)
        clauses = spec.clauses
        labels = manifest_lib.read_manifest(str(source))["label_schema"]
        unknown = [c.column for c in clauses if c.column not in labels]
        if unknown:
            raise DataSpecError(f"{spec}: filter on unknown label {unknown[0]!r}; labels are {sorted(labels)}")
        hashes = face_hash.read_shard_folder(
            str(source), lambda row: all(c.holds({k: str(v) for k, v in row.items()}) for c in clauses),
            spec.limit)
        hashes.name = str(spec)
        return hashes
    if source.is_dir() and not spec.options:
        files = list_images(str(source))
        if not files:
            raise DataSpecError(f"{spec}: no images, labels.csv or manifest.json in {source}")
        return face_hash.hash_files(str(spec), str(source), files)
    if source.is_dir():
        raise DataSpecError(f"{spec}: options need a labels CSV (labels.csv) or a shard folder")
    raise DataSpecError(f"data spec {str(spec)!r}: only photos can be compared: give an image folder (with or "
                        "without labels.csv), a labels CSV, or a shard folder")

"""Labelled faces for fine-tuning: each split decoded once into host memory, and the Grain stream of the
train split (shuffled, or balanced over bins of a label), saved in checkpoints like pretraining's.

    data.train / data.val / data.test   any labelled data spec `evaluate` reads: an image folder with
                                        labels.csv, a CSV with images=..., a shard folder, tfds:NAME;
                                        with its filters (split=train, sample=500, ...)

Labelled sets are small next to pretraining corpora (hundreds to tens of thousands of faces), and a
fine-tune passes over them dozens of times: decoding each JPEG once, into uint8 centre squares of
`data.source_size` px (about 48 KiB a face at 128 px, 1 GiB for 20,000), leaves the cores to the step.
The random-resized crop and flip run inside the jitted step from those squares
(data/device_augment.py), as they do in pretraining, so the stream is plain indices into memory.

Balanced sampling (`data.balance='age:10'`) puts the rows in bins of that label (10 years wide) and
draws every bin equally often, the inverse-frequency weighting FAHR-FaceAge fine-tunes with: rare
ages are seen as often as common ones. Rows without that label are not drawn.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np
from absl import logging

from mefem_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from mefem_jax.evaluation.data import DataSpecError, open_eval_data
from mefem_jax.evaluation.targets import missing_labels, numeric


@dataclasses.dataclass
class LabelledSplit:
    ids: np.ndarray                 # str [n]
    images: np.ndarray              # uint8 [n, S, S, 3], centre squares
    labels: dict[str, np.ndarray]   # every label column, as read
    skipped: dict[str, list[str]]   # reason -> ids of images that could not be read

    def __len__(self) -> int:
        return len(self.ids)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """The eval reader's normalised float images back to the uint8 pixels they were made from (the
    normalisation is affine in float32, so rounding recovers every value exactly)."""
    mean = np.asarray(IMAGENET_MEAN, np.float32) * 255
    std = np.asarray(IMAGENET_STD, np.float32) * 255
    return np.clip(np.rint(images * std + mean), 0, 255).astype(np.uint8)


def load_split(spec: str, size: int, split: str, batch_size: int = 256) -> LabelledSplit:
    """All images of a labelled spec as uint8 `size`-px centre squares, with their labels."""
    data = open_eval_data(spec, image_size=size, batch_size=batch_size, default_split=split)
    ids, images, labels = [], [], {}
    for batch in data.batches():
        ids.append(np.asarray(batch["id"]).astype(str))
        images.append(_to_uint8(np.asarray(batch["image"])))
        for key, value in batch.items():
            if key not in ("image", "id"):
                labels.setdefault(key, []).append(np.asarray(value))
    if not ids:
        raise DataSpecError(f"data.{split}={spec!r} holds no readable image")
    result = LabelledSplit(np.concatenate(ids), np.concatenate(images),
                           {k: np.concatenate(v) for k, v in labels.items()}, dict(data.skipped))
    skipped = sum(len(v) for v in result.skipped.values())
    logging.info("data.%s: %d faces%s", split, len(result), f", {skipped} unreadable skipped" if skipped else "")
    return result


class _Rows:
    """Random access to (image, encoded labels) rows held in memory: a Grain source."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, rows: np.ndarray):
        self.images, self.targets, self.rows = images, targets, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i]
        return {"image": self.images[r], "labels": self.targets[r]}


def parse_balance(text: str) -> tuple[str, float] | None:
    """'age:10' -> ("age", 10.0); '' -> None."""
    if not text:
        return None
    column, sep, width = text.rpartition(":")
    try:
        width_value = float(width)
    except ValueError:
        width_value = 0.0
    if not sep or not column or width_value <= 0:
        raise DataSpecError(f"data.balance={text!r}: expected COLUMN:BIN_WIDTH, e.g. age:10")
    return column, width_value


def balance_bins(values: np.ndarray, width: float, column: str) -> list[np.ndarray]:
    """Row indices per occupied bin of `width`, rows with a missing or non-finite value left out."""
    present = ~missing_labels(values)
    y = np.full(len(values), np.nan)
    y[present] = numeric(values[present], column, "data.balance")
    rows = np.flatnonzero(np.isfinite(y))
    bins = np.floor(y[rows] / width).astype(np.int64)
    return [rows[bins == b] for b in np.unique(bins)]


def train_iterator(split: LabelledSplit, targets: np.ndarray, *, batch_size: int, seed: int,
                   balance: str = "", process_index: int = 0, process_count: int = 1):
    """The infinite shuffled stream of {"image": uint8 [b, S, S, 3], "labels": float32 [b, k]} batches
    of this process (b = batch_size // process_count), a checkpointable Grain DatasetIterator."""
    seeds = np.random.SeedSequence(seed)
    spec = parse_balance(balance)
    if spec is None:
        ds = grain.MapDataset.source(_Rows(split.images, targets, np.arange(len(split))))
        ds = ds.shuffle(seed=int(seeds.generate_state(1)[0])).repeat()
    else:
        column, width = spec
        if column not in split.labels:
            raise DataSpecError(f"data.balance: column {column!r} is not in the train data; its labels are "
                                f"{sorted(split.labels)}")
        bins = balance_bins(split.labels[column], width, column)
        children = seeds.spawn(len(bins))
        parts = [grain.MapDataset.source(_Rows(split.images, targets, rows)).shuffle(
            seed=int(child.generate_state(1)[0])).repeat() for rows, child in zip(bins, children)]
        ds = grain.MapDataset.mix(parts, [1.0] * len(parts))  # every bin equally often
        logging.info("data.balance %s: %d bins of %g, %s rows each", column, len(bins), width,
                     "/".join(str(len(b)) for b in bins))
    ds = ds[process_index::process_count]
    it = ds.to_iter_dataset().batch(batch_size // process_count, drop_remainder=True)
    return iter(it)

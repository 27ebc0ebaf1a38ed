"""Grain input pipelines: the infinite, augmented training stream and the one-pass eval stream.

Training (`make_train_iterator`), per process:

    source → shuffle(seed) → repeat (reshuffled every epoch) → decode + (augment_on=host)
    random-resized crop + flip, or (augment_on=device) centre square at data.source_size
    → this process's slice → drop undecodable records (counted) → batch(drop_remainder) as uint8
    → worker processes, each keeping `prefetch` batches ready

A mixture (`data.train='A:0.7;B:0.3'`, mixture.py) runs the stages up to the decode once per source,
each with its own seeds, tags every element with its source's index, and interleaves the sources with
`grain.MapDataset.mix` in the given proportions before the slice; the rest is the same.

Normalisation (and, with augment_on=device, the crop and flip) happen inside the jitted train step
(`device_augment.py`): the host only decodes and resamples, and a batch crosses to the device as
uint8, a quarter of the bytes of float32.

Everything up to the slice is a lazy Grain `MapDataset`, so a process only ever reads and decodes
its own elements. The augmentation sits before the slice on purpose: Grain seeds each element's
Generator from its index, and indices before the slice are global, so two processes never share
crop parameters. Results are a pure function of (seed, process_index, process_count, workers):
the worker count changes which worker batches which elements, hence the batch composition.

Each training batch is a dict of numpy arrays:

    image    uint8 [b, R, R, 3]    RGB NHWC, b = global_batch_size // process_count; R is the model's
                                   image size (host) or data.source_size (device)
    decoded  int32 []              images in this batch (= b)
    skipped  int32 []              records dropped as undecodable while this batch was assembled
    decoded_per_source int32 [k]   mixtures only: images of each of the k sources, in mixture order
    id       str [b]               only with data.return_ids (to audit what a run saw)

Pop "decoded" / "skipped" (and "decoded_per_source", "id") before putting the batch on devices;
summed over steps they are the run's decoded/skipped counts, and decoded / wall-time is the pipeline's images/s.
The iterator is a `grain.DatasetIterator`: `get_state()` / `set_state()` (or Orbax with
`grain.checkpoint.CheckpointSave`) resume it exactly, with or without worker processes;
`close()` stops its workers.

Evaluation (`make_eval_iterator`) reads every record once, in order, centre square resized, and
yields fixed-size batches: the last one is padded, with a "valid" mask marking real rows.
"""
from __future__ import annotations

from typing import Iterator

import grain
import ml_collections
import numpy as np
from absl import logging
from grain.multiprocessing import SharedMemoryArray

from mefem_jax.data import augment, device_augment
from mefem_jax.data import mixture, sources
from mefem_jax.data.config import default_data_config


def _process_slice(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # the data package's only direct use of JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


class _DropFailed(grain.IterDataset):
    """Drops `{"error": ...}` elements, logs them, and tells the next good element how many.

    A failed element is counted in the "skipped" field of the element that follows it, so the
    counts travel with the data through worker processes and batching and sum correctly.
    """

    def __init__(self, parent: grain.IterDataset, max_consecutive: int):
        super().__init__(parent)
        self.max_consecutive = max_consecutive

    def __iter__(self) -> grain.DatasetIterator:
        return _DropFailedIterator(self._parent.__iter__(), self.max_consecutive)


class _DropFailedIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, max_consecutive: int):
        super().__init__(parent)
        self._max_consecutive = max_consecutive
        self._failures = 0  # over this iterator's life, for rate-limited logging

    def __next__(self) -> dict:
        skipped = 0
        while True:
            element = next(self._parent)
            if "error" not in element:
                return {**element, "skipped": skipped}
            skipped += 1
            self._failures += 1
            if self._failures <= 10 or self._failures % 1000 == 0:
                logging.warning("skipping undecodable record %s (%s); %d skipped so far",
                                element["id"], element["error"], self._failures)
            if skipped >= self._max_consecutive:
                raise RuntimeError(
                    f"{skipped} records in a row could not be decoded (last: {element['id']}: "
                    f"{element['error']}); the data source looks broken")

    # The count of pending failures is always 0 between calls, so the parent's state is ours.
    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class _CollateTrain:
    """Grain batch_fn: stacks the uint8 images into one batch and sums the skip counters.

    In worker processes Grain calls `enable_shared_memory_output`, and the batch is then written
    straight into shared memory: the trainer receives it without the copy Grain otherwise makes
    (9.6 MB for 64 images at 224 px).
    """

    def __init__(self, return_ids: bool, num_sources: int = 1):
        self.return_ids = return_ids
        self.num_sources = num_sources  # > 1: a mixture, whose elements carry their source's index
        self._shared = False

    def enable_shared_memory_output(self) -> None:
        self._shared = True

    def __call__(self, elements) -> dict:
        images = [e["image"] for e in elements]
        shape = (len(images),) + images[0].shape
        out = (SharedMemoryArray(shape, np.uint8) if self._shared
               else np.empty(shape, np.uint8))
        np.stack(images, out=out)
        batch = {
            "image": out,
            "decoded": np.int32(len(elements)),
            "skipped": np.int32(sum(e["skipped"] for e in elements)),
        }
        if self.num_sources > 1:
            batch["decoded_per_source"] = np.bincount(
                [e["source"] for e in elements], minlength=self.num_sources).astype(np.int32)
        if self.return_ids:
            batch["id"] = np.array([e["id"] for e in elements])
        return batch


class _TagSource(grain.transforms.Map):
    """Marks a mixture's elements (failed ones too) with their source's index: the per-source counts."""

    def __init__(self, index: int):
        self.index = index

    def map(self, element: dict) -> dict:
        return {**element, "source": self.index}


def _source_stream(source, data_cfg: ml_collections.ConfigDict, image_size: int,
                   seeds: np.random.SeedSequence) -> grain.MapDataset:
    """One source shuffled, repeated (reshuffled every epoch) and decoded (+ the host crop)."""
    shuffle_seed, augment_seed = (int(s) for s in seeds.generate_state(2))
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
    if data_cfg.augment_on == "host":
        return ds.random_map(augment.TrainPreprocess(
            image_size, scale=data_cfg.crop_scale, ratio=data_cfg.crop_ratio, flip=data_cfg.flip,
            keep_id=data_cfg.return_ids), seed=augment_seed)
    # the step crops and flips, from its own key
    return ds.map(augment.SourcePreprocess(device_augment.input_size(data_cfg, image_size),
                                           keep_id=data_cfg.return_ids))


def train_dataset(source, data_cfg: ml_collections.ConfigDict, *, image_size: int,
                  local_batch_size: int, seed: int, process_index: int,
                  process_count: int, weights: list[float] | None = None) -> grain.IterDataset:
    """The training `IterDataset` for one process (see the module docstring for its stages).

    `source` is one source, or with `weights` the list of a mixture's sources. Each of those is
    shuffled on its own, from a child of `seed`: the sources draw independent orders and crops.
    """
    if weights is None:
        ds = _source_stream(source, data_cfg, image_size, np.random.SeedSequence(seed))
    else:
        children = np.random.SeedSequence(seed).spawn(len(source))
        ds = grain.MapDataset.mix([_source_stream(s, data_cfg, image_size, child).map(_TagSource(i))
                                   for i, (s, child) in enumerate(zip(source, children))], weights)
    ds = ds[process_index::process_count]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads,
                                              prefetch_buffer_size=data_cfg.read_buffer))
    it = _DropFailed(it, data_cfg.max_consecutive_failures)
    it = it.batch(local_batch_size, drop_remainder=True,
                  batch_fn=_CollateTrain(data_cfg.return_ids, len(weights or [None])))
    # Prefetch: the decode threads above already run `read_buffer` elements ahead of the
    # consumer, and with workers each one keeps `prefetch` finished batches queued. No extra
    # batch-prefetch thread: JAX dispatch is asynchronous, so the training loop's next() already
    # overlaps the device step; measured here, grain's ThreadPrefetchIterDataset on top of the
    # workers slowed batch delivery (and 0.2.18 prints tracebacks at exit for one left open).
    if data_cfg.workers > 0:
        _allow_flags_in_workers()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_cfg.workers, per_worker_buffer_size=max(1, data_cfg.prefetch)))
    return it


def _allow_flags_in_workers() -> None:
    # Grain 0.2.18 reads absl flags in its worker processes, which raise UnparsedFlagAccessError
    # unless the parent's flags count as parsed (fixed upstream later). Under absl.app.run they
    # already are; from a test or notebook they are not.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _train_source(data_cfg: ml_collections.ConfigDict, image_size: int, spec: str):
    return sources.open_source(
        spec, split="train", synthetic_size=data_cfg.synthetic_size,
        synthetic_resolution=data_cfg.synthetic_resolution or image_size,
        seed=data_cfg.synthetic_seed, tfds_data_dir=data_cfg.tfds_data_dir)


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, image_size: int,
                        global_batch_size: int, seed: int, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """The infinite, shuffled, augmented training iterator of this process.

    Each process gets `global_batch_size // process_count` images per batch, from a disjoint
    slice of the same shuffled stream. process_index / process_count default to JAX's.
    `data_cfg.train` is one spec or a mixture of several (mixture.py).
    """
    process_index, process_count = _process_slice(process_index, process_count)
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} does not split over "
                         f"{process_count} processes")
    parts = mixture.parse(data_cfg.train)
    if parts is None:
        source, weights = _train_source(data_cfg, image_size, data_cfg.train), None
        logging.info("training data: %s (%d records), process %d of %d", source, len(source),
                     process_index, process_count)
    else:
        source = [_train_source(data_cfg, image_size, p.spec) for p in parts]
        weights = [p.weight for p in parts]
        logging.info("training data: a mixture of %s; process %d of %d", "; ".join(
            f"{p.name} {p.weight:.1%} of {s} ({len(s)} records)" for p, s in zip(parts, source)),
            process_index, process_count)
    ds = train_dataset(source, data_cfg, image_size=image_size,
                       local_batch_size=global_batch_size // process_count, seed=seed,
                       process_index=process_index, process_count=process_count, weights=weights)
    return iter(ds)


class EvalIterator:
    """One ordered pass over an evaluation set, in fixed-size batches; re-iterable.

    Batches: "image" float32 [B, S, S, 3], "id" str [B], one array per label column (int64,
    float32 or str, per `label_schema`), and "valid" bool [B]. The last batch is padded to B
    (ids "", ints 0, floats NaN) and only its first rows are valid, so a jitted forward sees one
    shape. Records that cannot be decoded are left out; after a pass `num_decoded`,
    `num_skipped` and `skipped` ([(id, reason)], the first 1000) say what happened.
    """

    def __init__(self, source, *, image_size: int, batch_size: int, read_threads: int = 4,
                 shard_index: int = 0, shard_count: int = 1, limit: int | None = None):
        self.source = source
        self.label_schema = dict(getattr(source, "label_schema", {}))
        self.image_size = image_size
        self.batch_size = batch_size
        self._read_threads = read_threads
        self._dataset = grain.MapDataset.source(source)[:limit][shard_index::shard_count]
        self.num_decoded = 0
        self.num_skipped = 0
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        """Number of records (not batches) this iterator reads."""
        return len(self._dataset)

    def _fail(self, record_id: str, reason: str) -> None:
        self.num_skipped += 1
        if len(self.skipped) < 1000:
            self.skipped.append((record_id, reason))
        logging.warning("eval: skipping %s (%s)", record_id, reason)

    def __iter__(self) -> Iterator[dict]:
        self.num_decoded, self.num_skipped, self.skipped = 0, 0, []
        ds = self._dataset.map(augment.EvalPreprocess(self.image_size)).to_iter_dataset(
            grain.ReadOptions(num_threads=self._read_threads,
                              prefetch_buffer_size=2 * self.batch_size))
        pending = []
        for element in ds:
            if "error" in element:
                self._fail(element["id"], element["error"])
                continue
            missing = [k for k in self.label_schema if k not in element]
            if missing:
                self._fail(element["id"], f"record lacks label(s) {missing}")
                continue
            self.num_decoded += 1
            pending.append(element)
            if len(pending) == self.batch_size:
                yield self._collate(pending)
                pending = []
        if pending:
            yield self._collate(pending)

    def _collate(self, elements: list[dict]) -> dict:
        n, pad = len(elements), self.batch_size - len(elements)
        image = augment.normalize_into([e["image"] for e in elements], np.empty(
            (self.batch_size,) + elements[0]["image"].shape, np.float32))
        batch = {"image": image,
                 "id": np.array([e["id"] for e in elements] + [""] * pad),
                 "valid": np.arange(self.batch_size) < n}
        fill = {"int": (np.int64, 0), "float": (np.float32, np.nan), "str": (np.str_, "")}
        for key, kind in self.label_schema.items():
            dtype, value = fill[kind]
            batch[key] = np.array([e[key] for e in elements] + [value] * pad, dtype=dtype)
        return batch


def make_eval_iterator(spec: str, *, image_size: int, batch_size: int,
                       data_cfg: ml_collections.ConfigDict | None = None, split: str = "test",
                       limit: int | None = None, shard_index: int = 0,
                       shard_count: int = 1) -> EvalIterator:
    """One in-order pass over `spec` (see `EvalIterator` for the batch layout).

    `split` is used by specs that do not name one ("synthetic", "tfds:NAME"); synthetic eval
    sets have `data_cfg.synthetic_eval_size` faces per split. `limit` reads only the first
    records; shard_index / shard_count give a process its disjoint part.
    """
    data_cfg = data_cfg or default_data_config()
    source = sources.open_source(
        spec, split=split, synthetic_size=data_cfg.synthetic_eval_size,
        synthetic_resolution=data_cfg.synthetic_resolution or image_size,
        seed=data_cfg.synthetic_seed, tfds_data_dir=data_cfg.tfds_data_dir)
    return EvalIterator(source, image_size=image_size, batch_size=batch_size,
                        read_threads=data_cfg.read_threads, shard_index=shard_index,
                        shard_count=shard_count, limit=limit)

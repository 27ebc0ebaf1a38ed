"""Linear probes during pretraining: is the encoder learning something about faces?

The train loop calls `probe_during_training(encoder, target_params, config.eval)` every
`config.eval.every_steps` steps. The first call reads the eval images (at most `max_images` per
split) and keeps them in host memory as uint8; every call embeds them with the current params
(the jitted forward of embeddings.py, compiled once) and fits the probes of `targets` on train,
scored on test. It returns flat scalars for the metric writer, e.g.

    {"probe_face_width_mae": 0.031, "probe_face_width_r2": 0.71, "rankme_cls": 41.3, "rankme_mean": 38.0,
     "rankme_patch": 52.9, "probe_seconds": 4.2}

The RankMe values (rankme.py) are the effective ranks of the CLS, mean-pooled and patch-token
embeddings of the held `test` images; one that falls below half of its value at this process's first
probe is also a log warning, since a collapsing representation can keep its loss falling and its
`target_std` up.

The default reads the embedded synthetic faces, whose drawing attributes are the labels, so it
runs on a fresh machine. For real faces:

    --config.eval.every_steps=2000 \\
    --config.eval.train=../shared/data/utkface:split=train --config.eval.test=../shared/data/utkface:split=test \\
    --config.eval.targets=age:regression,gender:classification
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import ml_collections
import numpy as np
from absl import logging

from mefem_jax.data.augment import normalize
from mefem_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from mefem_jax.evaluation import rankme
from mefem_jax.evaluation.data import DataSpec, folder_csv_path, open_eval_data, parse_data_spec
from mefem_jax.models.vit import ViT

# The headline metric(s) of each probe kind, renamed for the metric writer.
_HEADLINE = {"regression": {"mae": "mae", "r2": "r2"},
             "classification": {"accuracy": "acc", "roc_auc": "auc"},
             "survival": {"c_index": "c_index"}}


@dataclass
class _HeldImages:
    """An eval split held in host memory; quacks like `data.EvalData` for compute_embeddings.

    Images are kept as uint8 and normalised per batch: 4x less memory than float32, and exact,
    since the pipeline makes each float image from uint8 pixels (see `_to_uint8`).
    """
    spec: DataSpec
    batch_size: int
    pixels: np.ndarray                     # uint8 [n, S, S, 3]
    ids: np.ndarray
    labels: dict[str, np.ndarray]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def batches(self) -> Iterator[dict]:
        for start in range(0, len(self.ids), self.batch_size):
            stop = start + self.batch_size
            batch = {"image": np.stack([normalize(p) for p in self.pixels[start:stop]]),
                     "id": self.ids[start:stop]}
            batch.update({k: v[start:stop] for k, v in self.labels.items()})
            yield batch


def _to_uint8(images: np.ndarray) -> np.ndarray:
    pixels = (images * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _capped(spec: str, max_images: int) -> DataSpec:
    """The spec with a size cap: a random `sample` for CSV folders (their order may be sorted by
    label), the first `limit` records otherwise. A cap the spec already sets is kept."""
    parsed = parse_data_spec(spec)
    keys = dict(parsed.options)
    if "limit" in keys or "sample" in keys:
        return parsed
    key = "sample" if folder_csv_path(parsed) is not None else "limit"
    return DataSpec(parsed.source, parsed.options + ((key, str(max_images)),))


# (spec, image size, max images, split) -> held images; filled on first use.
_HELD: dict[tuple, _HeldImages] = {}
# (eval test spec, encoder) -> the peak RankMe of each readout in this run.
_WATCH: dict[tuple, rankme.CollapseWatch] = {}


def _held_images(spec: str, image_size: int, eval_cfg, split: str) -> _HeldImages:
    key = (spec, image_size, int(eval_cfg.max_images), split)
    if key not in _HELD:
        data = open_eval_data(_capped(spec, int(eval_cfg.max_images)), image_size,
                              int(eval_cfg.batch_size), default_split=split)
        images, ids, labels = [], [], {}
        for batch in data.batches():
            images.append(_to_uint8(batch.pop("image")))
            ids.append(batch.pop("id"))
            for k, v in batch.items():
                labels.setdefault(k, []).append(v)
        if not ids:
            raise ValueError(f"eval {split} data {spec!r}: no images could be read")
        n = int(eval_cfg.max_images)
        _HELD[key] = _HeldImages(data.spec, int(eval_cfg.batch_size), np.concatenate(images)[:n],
                                 np.concatenate(ids)[:n],
                                 {k: np.concatenate(v)[:n] for k, v in labels.items()}, data.skipped)
    return _HELD[key]


def _watch(test_spec: str, encoder: ViT, history: Iterable[dict]) -> rankme.CollapseWatch:
    key = (test_spec, encoder)
    if key not in _WATCH:
        _WATCH[key] = rankme.CollapseWatch(history)
    return _WATCH[key]


def _features(eval_cfg) -> list[str]:
    return [f.strip() for f in eval_cfg.features.split(",") if f.strip()]


def _metric_name(target, short: str, feature: str) -> str:
    """probe_<target>_<metric>, with _<readout> for readouts other than CLS: probe_age_mae_grid."""
    return f"probe_{'_'.join(target.columns)}_{short}" + ("" if feature == "cls" else f"_{feature}")


def metric_names(eval_cfg: ml_collections.ConfigDict) -> list[str]:
    """The probe and RankMe columns `probe_during_training` logs under `eval_cfg` (what eval.select may name)."""
    from mefem_jax.evaluation.targets import parse_targets  # the probes' imports, as in probe_during_training

    names = [_metric_name(target, short, feature) for target in parse_targets(eval_cfg.targets)
             for feature in _features(eval_cfg) for short in _HEADLINE.get(target.kind, {}).values()]
    return names + [f"rankme_{readout}" for readout in ("cls", "mean", "patch")]


def probe_during_training(encoder: ViT, params, eval_cfg: ml_collections.ConfigDict,
                          history: Iterable[dict] = ()) -> dict[str, float]:
    """Embed the held eval splits with `params` and fit the configured probes (module docstring).
    `history`: the run's metric rows logged before this process started (a resume), whose RankMe
    peaks the collapse warning measures against; read on the first probe only."""
    # Imported on the first probe, not with the config: the probes pull in scikit-learn and lifelines,
    # seconds of start-up that a run without `eval.every_steps` should not pay.
    from mefem_jax.evaluation.embeddings import GRID_SIZE, compute_embeddings
    from mefem_jax.evaluation.probes import blas_threads
    from mefem_jax.evaluation.targets import check_columns, parse_targets, probe_target

    t0 = time.perf_counter()
    targets = parse_targets(eval_cfg.targets)
    features = _features(eval_cfg)
    size = encoder.image_size
    g = int(eval_cfg.get("grid_size", GRID_SIZE))  # configs saved before the key existed lack it
    train = compute_embeddings(encoder, params, _held_images(eval_cfg.train, size, eval_cfg, "train"), grid_size=g)
    test = compute_embeddings(encoder, params, _held_images(eval_cfg.test, size, eval_cfg, "test"), grid_size=g)
    check_columns(targets, list(train.labels), "eval train")
    check_columns(targets, list(test.labels), "eval test")

    out: dict[str, float] = {}
    with blas_threads(eval_cfg.get("probe_threads", 1) or None):
        for target in targets:
            for feature in features:
                row, _ = probe_target(target, train, test, feature)
                for metric, short in _HEADLINE[target.kind].items():
                    out[_metric_name(target, short, feature)] = float(row["metrics"][metric])
    ranks = rankme.health(test.features, test.tokens)
    for line in _watch(eval_cfg.test, encoder, history).check(ranks):
        logging.warning("representation health: %s", line)
    out.update(ranks)
    out["probe_seconds"] = time.perf_counter() - t0
    return out

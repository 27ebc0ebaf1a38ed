"""Evaluate a frozen encoder: linear probes, verification and survival on its embeddings.

    python -m mefem_jax.evaluate --model=MeFEm-S.pth.tar \\
        --train=../shared/data/utkface:split=train --test=../shared/data/utkface:split=test \\
        --targets=age:regression,gender:classification,race:classification --out=runs/eval_s

    python -m mefem_jax.evaluate --model=random:vitti@112 --train=synthetic:split=train,limit=512 \\
        --test=synthetic:split=test,limit=256 --targets=face_width:regression --out=/tmp/eval_random

--model (see encoders.py): a weights file, an exported folder, a training workdir, or
random:vitti|vits|vitb|vitl[@SIZE][:width=..,depth=..,heads=..,seed=..].
--train / --test / --pairs_data (see evaluation/data.py): an image folder with labels.csv, a CSV, a shard
folder, synthetic or tfds:NAME, each optionally followed by :key=value options (split=, limit=,
sample=, label filters).
--targets (see targets.py): age:regression,gender:classification,time,event:survival, or
anthropometry: a regression probe per facial proportion of `build_shards --landmark_labels`.
--pairs: a verification pairs file (see verification.py), scored on --pairs_data (default --test).
--exclude_leaked: the pretraining data (shard or image folders, comma-separated; data/leakage.py); test
images with a near-duplicate in it (face_hash.py) are left out of the test split, counted in the log and
report.json ("leakage").

For every target and each feature set (CLS token, mean-pooled patches, patch tokens pooled to a
--grid_size grid, and a raw-pixel baseline) a probe is fitted on train with its penalty chosen by
cross-validation on train, and scored once on test, with a bootstrap 95 % interval over the test
rows. The report also gives the effective rank (RankMe) of the CLS, mean-pooled and patch-token
embeddings of the test images, and warns when one has collapsed. Writes OUT/report.json,
OUT/report.md and PNG plots. Embeddings are cached (see
embeddings.py), so re-running with other targets costs only the probes.

--grid_size is at most the model's patch grid (image size / patch size a side: 14 for 224 px and
16 px patches, 7 for 112 px). A grid that does not divide it pools uneven, area-weighted bins (3 on
7x7: cells 7/3 patches wide); a finer one is refused: 8 on 7x7 would only copy or blend neighbouring
patches into 8x8 cells, more dimensions than the patch tokens with no more information (and a grid
far larger, 1000 on 14x14, asks the forward for terabytes). --pixel_size is at most the image size.

Flags are checked before --out is created; a run refused later (a constant target, a missing column)
removes the --out folder it created if nothing was written into it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from mefem_jax import cli
from mefem_jax.data import face_hash
from mefem_jax.evaluation import rankme
from mefem_jax.evaluation import report as eval_report
from mefem_jax.evaluation.data import open_eval_data, spec_hashes, split_specs
from mefem_jax.evaluation.embeddings import (FEATURES, GRID_SIZE, PIXEL_SIZE, cached_embeddings,
                                             default_cache_dir)
from mefem_jax.evaluation.probes import blas_threads
from mefem_jax.evaluation.targets import Target, check_columns, parse_targets, probe_target
from mefem_jax.evaluation.verification import cosine_scores, read_pairs, verification_metrics
from mefem_jax.models.vit import encoder_dims
from mefem_jax.weights.encoders import load_encoder


class UsageError(ValueError):
    """Flags that do not make an evaluation (nothing asked, a needed split missing)."""


logger = logging.getLogger(__name__)


def _embed(model, spec: str, split: str, batch_size: int, cache_dir, pixel_size: int, grid_size: int,
           report: dict, targets: list[Target] = (), exclude: frozenset[str] = frozenset()):
    # The pairs are scored on a test set: synthetic / tfds sources default to their test split.
    data = open_eval_data(spec, model.image_size, batch_size, default_split="train" if split == "train" else "test",
                          exclude=exclude)
    if data.table is not None:  # a CSV's columns are known before embedding: fail fast
        check_columns(list(targets), data.table.columns, split)
    t0 = time.perf_counter()
    emb, cache_file, hit = cached_embeddings(model, data, cache_dir, pixel_size, grid_size)
    report["data"][split] = {
        "spec": str(data.spec), "n": len(emb), "skipped": {k: len(v) for k, v in emb.skipped.items()},
        "skipped_examples": {k: v[:10] for k, v in emb.skipped.items()},
        "cache": str(cache_file) if cache_file else None, "cache_hit": hit,
        "seconds": round(time.perf_counter() - t0, 2)}
    logger.info("%s: %d images embedded from %s (%s)", split, len(emb), data.spec,
                "cache hit" if hit else "computed")
    return emb


def run_evaluation(model: str, out: str | Path, train: str | None = None, test: str | None = None,
                   targets: str | None = None, pairs: str | None = None, pairs_data: str | None = None,
                   which: str = "target", batch_size: int = 64, cache_dir: str | Path | None = "default",
                   pixel_size: int = PIXEL_SIZE, features: tuple[str, ...] = FEATURES,
                   dtype: str = "float32", seed: int = 0, probe_threads: int | None = 1,
                   grid_size: int = GRID_SIZE, exclude_leaked: str | None = None) -> dict:
    """Everything the CLI does; returns the report dict (also written to `out`).
    `cache_dir="default"` uses `embeddings.default_cache_dir()`; None disables the cache.
    `probe_threads`: BLAS threads for the probe fits (see `probes.blas_threads`; None: default).
    `exclude_leaked`: the pretraining data; test images with a near-duplicate in it are left out."""
    t_start = time.perf_counter()
    out = Path(out)
    if not features:
        raise UsageError(f"--features is empty; choose one or more of {','.join(FEATURES)}")
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise UsageError(f"unknown feature set(s) {unknown}; choose from {FEATURES}")
    for flag, value in (("batch_size", batch_size), ("grid_size", grid_size), ("pixel_size", pixel_size)):
        if value < 1:
            raise UsageError(f"--{flag} must be at least 1, got {value}")
    parsed: list[Target] = parse_targets(targets) if targets else []
    if parsed and not (train and test):
        raise UsageError("--targets needs both --train and --test")
    if not parsed and not pairs:
        raise UsageError("nothing to evaluate: give --targets (with --train/--test) and/or --pairs")
    if pairs and not (pairs_data or test):
        raise UsageError("--pairs needs --pairs_data (or --test) naming the images the pairs refer to")
    pairs_parsed = read_pairs(pairs) if pairs else None  # a malformed file fails before any embedding
    if exclude_leaked and not parsed:
        raise UsageError("--exclude_leaked leaves leaked images out of the test split: it needs --targets")
    leakage = _leakage(test, exclude_leaked) if exclude_leaked and parsed else None  # before --out exists
    cache_dir = default_cache_dir() if cache_dir == "default" else cache_dir

    loaded = load_encoder(model, which=which, dtype=dtype)
    _check_sizes(loaded, grid_size, pixel_size)
    width, depth, heads = encoder_dims(loaded.model_cfg)
    report: dict = {
        "model": {"spec": model, "which": which, "identity": loaded.identity,
                  "config": loaded.model_cfg.to_dict(), "width": width, "depth": depth, "heads": heads},
        "pixel_size": pixel_size, "grid_size": grid_size, "data": {}, "probes": [], "verification": [],
        "plots": [], "health": {}, "warnings": []}
    if leakage is not None:
        report["leakage"] = leakage
    with _out_folder(out):
        if parsed:
            emb_train = _embed(loaded, train, "train", batch_size, cache_dir, pixel_size, grid_size, report, parsed)
            emb_test = _embed(loaded, test, "test", batch_size, cache_dir, pixel_size, grid_size, report, parsed,
                              exclude=frozenset(leakage["ids"]) if leakage else frozenset())
            report["health"] = rankme.health(emb_test.features, emb_test.tokens)
            report["warnings"] += rankme.low_rank_warnings(report["health"])
            check_columns(parsed, list(emb_train.labels), "train")
            check_columns(parsed, list(emb_test.labels), "test")
            shared = np.intersect1d(emb_train.ids, emb_test.ids)
            if len(shared):
                report["warnings"].append(f"{len(shared)} image id(s) are in both train and test "
                                          f"(e.g. {shared[:3].tolist()}): probe scores are optimistic")
            with blas_threads(probe_threads):
                _run_probes(parsed, emb_train, emb_test, features, out, report, seed)

        if pairs_parsed is not None:
            emb_pairs = _embed(loaded, pairs_data or test, "pairs", batch_size, cache_dir, pixel_size, grid_size,
                               report)
            _run_verification(pairs_parsed, emb_pairs, features, out, report)

    for w in report["warnings"]:
        logger.warning(w)
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    eval_report.write_report(out, report)
    return report


def _leakage(test: str, pretrain: str) -> dict:
    """The test images with a near-duplicate in the pretraining data (report.json's "leakage")."""
    found = face_hash.leaks(spec_hashes(test), [spec_hashes(spec) for spec in split_specs(pretrain)])
    ids = sorted({leak.eval_id for leak in found})
    logger.info("test: leaving out %d image(s) with a near-duplicate in the pretraining data %s (distance <= %d)",
                len(ids), pretrain, face_hash.NEAR_DISTANCE)
    return {"pretrain": pretrain, "max_distance": face_hash.NEAR_DISTANCE, "excluded": len(ids), "ids": ids,
            "pairs": [dataclasses.asdict(leak) for leak in found]}


@contextlib.contextmanager
def _out_folder(out: Path):
    """Creates --out for the run inside; a run refused there (a constant target, a missing column, a
    pair id not in the data) removes it again if it made it and nothing was written into it."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # not empty (or gone): what the run wrote stays
                out.rmdir()
        raise


def _check_sizes(loaded, grid_size: int, pixel_size: int) -> None:
    """--grid_size within the patch grid, --pixel_size within the image (module docstring): a larger one
    adds no information, and a far larger one asks for an output no memory holds."""
    gh, gw = loaded.encoder.grid
    if grid_size > min(gh, gw):
        raise UsageError(f"--grid_size={grid_size} is finer than the model's {gh}x{gw} patch grid; "
                         f"choose 1 to {min(gh, gw)}")
    if pixel_size > loaded.image_size:
        raise UsageError(f"--pixel_size={pixel_size} is larger than the model's {loaded.image_size} px "
                         f"images; choose 1 to {loaded.image_size}")


def _run_probes(parsed: list[Target], emb_train, emb_test, features, out: Path, report: dict,
                seed: int) -> None:
    for target in parsed:
        results = {}
        for feature in features:
            t0 = time.perf_counter()
            row, result = probe_target(target, emb_train, emb_test, feature, seed=seed, intervals=True)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            report["probes"].append(row)
            results[feature] = result
            logger.info("%s [%s] %s: %s", target.name, target.kind, feature, row["metrics"])
        nonfinite = {split: row[f"n_nonfinite_{split}"] for split in ("train", "test")}  # same for every feature
        if any(nonfinite.values()):
            report["warnings"].append(f"target {target.name!r}: left out {nonfinite['train']} train and "
                                      f"{nonfinite['test']} test row(s) whose label is not finite (inf, -inf, "
                                      "or too large for a float)")
        name = eval_report.safe_name(target.name)
        if target.kind == "regression":
            eval_report.plot_regression(out / f"{name}_scatter.png", target.name, results)
            report["plots"].append(f"{name}_scatter.png")
        elif target.kind == "classification" and all(len(r.classes) == 2 for r in results.values()):
            positive = results[features[0]].classes[1]
            curves = {f: (r.y_true == 1, r.scores[:, 1]) for f, r in results.items()}
            eval_report.plot_roc(out / f"{name}_roc.png", f"{target.name} = {positive}", curves)
            report["plots"].append(f"{name}_roc.png")


def _run_verification(pairs_parsed, emb, features, out: Path, report: dict) -> None:
    ids_a, ids_b, same = pairs_parsed
    curves = {}
    for feature in features:
        scores = cosine_scores(emb.features[feature], list(emb.ids), ids_a, ids_b)
        report["verification"].append({"features": feature, **verification_metrics(scores, same)})
        curves[feature] = (same, scores)
    eval_report.plot_roc(out / "verification_roc.png", "verification", curves)
    report["plots"].append("verification_roc.png")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def main(argv) -> None:
    """Bad input (a ValueError: specs, targets, pairs, weights; a missing path) is one line and status 2,
    through cli.run."""
    from absl import flags

    del argv
    f = flags.FLAGS
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = run_evaluation(
        model=f.model, out=f.out, train=f.train, test=f.test, targets=f.targets, pairs=f.pairs,
        pairs_data=f.pairs_data, which=f.which, batch_size=f.batch_size,
        cache_dir=f.cache_dir or None, pixel_size=f.pixel_size, features=tuple(f.features),
        dtype=f.dtype, seed=f.seed, probe_threads=f.probe_threads or None, grid_size=f.grid_size,
        exclude_leaked=f.exclude_leaked)
    print(eval_report.markdown_report(report))
    print(f"wrote {Path(f.out) / 'report.json'} and report.md")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("model", None, "Model spec: weights file, exported folder, workdir, or random:NAME[@SIZE].")
    flags.DEFINE_string("out", None, "Output folder for report.json, report.md and plots.")
    flags.DEFINE_string("train", None, "Train data spec, e.g. ../shared/data/utkface:split=train.")
    flags.DEFINE_string("test", None, "Test data spec, e.g. ../shared/data/utkface:split=test.")
    flags.DEFINE_string("targets", None, "e.g. age:regression,gender:classification,time,event:survival; "
                        "'anthropometry' = every facial-proportion label of build_shards --landmark_labels.")
    flags.DEFINE_string("pairs", None, "Verification pairs file: id_a id_b same(1/0) per line.")
    flags.DEFINE_string("pairs_data", None, "Data spec holding the pair ids (default: --test).")
    flags.DEFINE_enum("which", "target", ["target", "context"], "Encoder of a checkpoint holding both.")
    flags.DEFINE_integer("batch_size", 64, "Images per forward pass (at least 1).")
    flags.DEFINE_string("cache_dir", str(default_cache_dir()), "Embedding cache folder; empty to disable.")
    flags.DEFINE_integer("pixel_size", PIXEL_SIZE, "Side of the downsampled raw-pixel baseline (at most the image's).")
    flags.DEFINE_list("features", list(FEATURES), "Feature sets to probe (one or more).")
    flags.DEFINE_integer("grid_size", GRID_SIZE, "The grid readout pools the patch tokens to this many cells a side: "
                         "1 (= mean) up to the model's patch grid (14 for 224 px / 16 px patches), which is the "
                         "patch tokens themselves; 3 on a 7x7 grid pools uneven, area-weighted bins; a finer "
                         "grid (8 on 7x7) is refused: it would only copy and blend neighbouring patches.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the forward pass.")
    flags.DEFINE_integer("seed", 0, "Seed of the cross-validation folds.")
    flags.DEFINE_integer("probe_threads", 1, "BLAS threads for the probe fits; 0 = the library default.")
    flags.DEFINE_string("exclude_leaked", None, "The pretraining data (shard or image folders, comma-separated): "
                        "test images with a near-duplicate in it are left out and counted (data/leakage.py).")
    flags.mark_flags_as_required(["model", "out"])


if __name__ == "__main__":
    _define_flags()
    cli.run("evaluate", main)

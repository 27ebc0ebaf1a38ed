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
OUT/report.md, PNG plots and OUT/per_face.csv (every probe's per-face test score, for pairing with
scores made elsewhere). Embeddings are cached (see
embeddings.py), so re-running with other targets costs only the probes.

--grid_size is at most the model's patch grid (image size / patch size a side: 14 for 224 px and
16 px patches, 7 for 112 px). A grid that does not divide it pools uneven, area-weighted bins (3 on
7x7: cells 7/3 patches wide); a finer one is refused: 8 on 7x7 would only copy or blend neighbouring
patches into 8x8 cells, more dimensions than the patch tokens with no more information (and a grid
far larger, 1000 on 14x14, asks the forward for terabytes). --pixel_size is at most the image size.

Beyond the linear probe (see README "Evaluating a face encoder"):
--model several times (or --model=A,B is not split: repeat the flag): every encoder on the same faces,
  its own preprocessing, and a table of paired differences against the first (compare.py). timm:ARCH[:...]
  names any timm image model (timm_encoder.py).
--protocols=linear,knn,fewshot: kNN as DINO's (knn.py); label efficiency over --shots and --fewshot_seeds
  (label_efficiency.py), one curve per readout and encoder.
--groups=gender,race,age_bin=0,20,40,60,120: every linear probe's metrics per group, the worst group and
  the largest gap, with intervals (subgroups.py).
--saliency=N: occlusion (and, for our encoders, gradient x input) maps of each probe over N test faces.
--targets=landmarks: 68 points from `build_shards --landmark_labels`, scored by NME (landmarks.py).

Flags are checked before --out is created; a run refused later (a constant target, a missing column)
removes the --out folder it created if nothing was written into it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from pathlib import Path

import numpy as np

from mefem_jax import cli
from mefem_jax.data import face_hash
from mefem_jax.evaluation import label_efficiency, rankme
from mefem_jax.evaluation import report as eval_report
from mefem_jax.evaluation.compare import paired_comparison, write_per_face
from mefem_jax.evaluation.data import open_eval_data, spec_hashes, split_specs
from mefem_jax.evaluation.embeddings import FEATURES, GRID_SIZE, PIXEL_SIZE, default_cache_dir
from mefem_jax.evaluation.encoder_source import open_encoders
from mefem_jax.evaluation.probes import blas_threads
from mefem_jax.evaluation.protocols import PROTOCOLS, Plan, parse_protocols, probe_plots, run_protocols
from mefem_jax.evaluation.report import safe_name
from mefem_jax.evaluation.saliency_figures import first_faces, saliency_figures
from mefem_jax.evaluation.subgroups import check_group_columns, parse_groups, plot_subgroups
from mefem_jax.evaluation.targets import Target, check_columns, parse_targets
from mefem_jax.evaluation.verification import cosine_scores, read_pairs, verification_metrics
from mefem_jax.weights.encoders import load_encoder

SHOTS = "10,100,1000,all"  # label-efficiency sizes (per class for a classification)


class UsageError(ValueError):
    """Flags that do not make an evaluation (nothing asked, a needed split missing)."""


logger = logging.getLogger(__name__)


def _embed(encoder, spec: str, split: str, batch_size: int, cache_dir, pixel_size: int, grid_size: int,
           targets: list[Target] = (), exclude: frozenset[str] = frozenset(), groupings=()):
    """(embeddings, the data entry of report.json) of one split for one encoder."""
    # The pairs are scored on a test set: synthetic / tfds sources default to their test split.
    data = open_eval_data(spec, encoder.image_size, batch_size,
                          default_split="train" if split == "train" else "test", exclude=exclude)
    if data.table is not None:  # a CSV's columns are known before embedding: fail fast
        check_columns(list(targets), data.table.columns, split)
        check_group_columns(groupings, data.table.columns, split)
    t0 = time.perf_counter()
    emb, cache_file, hit = encoder.embed(data, cache_dir, pixel_size, grid_size)
    info = {"spec": str(data.spec), "n": len(emb), "skipped": {k: len(v) for k, v in emb.skipped.items()},
            "skipped_examples": {k: v[:10] for k, v in emb.skipped.items()},
            "cache": str(cache_file) if cache_file else None, "cache_hit": hit,
            "seconds": round(time.perf_counter() - t0, 2)}
    logger.info("%s, %s: %d images embedded from %s (%s)", encoder.label, split, len(emb), data.spec,
                "cache hit" if hit else "computed")
    return emb, info


def run_evaluation(model: str | list[str], out: str | Path, train: str | None = None, test: str | None = None,
                   targets: str | None = None, pairs: str | None = None, pairs_data: str | None = None,
                   which: str = "target", batch_size: int = 64, cache_dir: str | Path | None = "default",
                   pixel_size: int = PIXEL_SIZE, features: tuple[str, ...] = FEATURES,
                   dtype: str = "float32", seed: int = 0, probe_threads: int | None = 1,
                   grid_size: int = GRID_SIZE, exclude_leaked: str | None = None,
                   protocols: tuple[str, ...] = ("linear",), shots: str = SHOTS, fewshot_seeds: int = 3,
                   groups: str | None = None, min_group: int = 30, saliency: int = 0) -> dict:
    """Everything the CLI does; returns the report dict (also written to `out`).
    `model`: one spec or several (the first is the baseline of the comparison).
    `cache_dir="default"` uses `embeddings.default_cache_dir()`; None disables the cache.
    `probe_threads`: BLAS threads for the probe fits (see `probes.blas_threads`; None: default).
    `exclude_leaked`: the pretraining data; test images with a near-duplicate in it are left out."""
    t_start = time.perf_counter()
    out = Path(out)
    specs = [model] if isinstance(model, str) else list(model)
    plan = _plan(specs, train, test, targets, pairs, pairs_data, batch_size, pixel_size, features, grid_size,
                 seed, exclude_leaked, protocols, shots, fewshot_seeds, groups, min_group, saliency)
    pairs_parsed = read_pairs(pairs) if pairs else None  # a malformed file fails before any embedding
    leakage = _leakage(test, exclude_leaked) if exclude_leaked and plan.targets else None  # before --out exists
    excluded = frozenset(leakage["ids"]) if leakage else frozenset()
    cache_dir = default_cache_dir() if cache_dir == "default" else cache_dir

    encoders = open_encoders(specs, functools.partial(load_encoder, which=which, dtype=dtype), batch_size)
    for encoder in encoders:
        _check_sizes(encoder, grid_size, pixel_size)
        if encoder.loaded is not None:  # which of a run's two encoders; a timm model has one
            encoder.info["which"] = which
    report: dict = {
        "model": encoders[0].info, "models": [e.info for e in encoders], "protocols": list(plan.protocols),
        "pixel_size": pixel_size, "grid_size": grid_size, "data": {}, "probes": [], "fewshot": [],
        "subgroups": [], "comparison": [], "saliency": [], "verification": [], "plots": [], "health": {},
        "warnings": []}
    if leakage is not None:
        report["leakage"] = leakage
    scored = []
    with _out_folder(out):
        for i, encoder in enumerate(encoders):
            prefix = "" if len(encoders) == 1 else f"{safe_name(encoder.label)}_"
            if plan.targets:
                # The raw-pixel baseline does not depend on the encoder: the first one's stands for all.
                own = dataclasses.replace(plan, features=tuple(f for f in plan.features if i == 0 or f != "pixels"))
                scored += _measure(encoder, own, train, test, batch_size, cache_dir, pixel_size, grid_size,
                                   excluded, probe_threads, saliency, out, prefix, report)
            if pairs_parsed is not None:
                emb_pairs, info = _embed(encoder, pairs_data or test, "pairs", batch_size, cache_dir, pixel_size,
                                         grid_size)
                encoder.info.setdefault("data", {})["pairs"] = info
                report["data"].setdefault("pairs", info)
                _run_verification(pairs_parsed, emb_pairs, plan.features, out, prefix, encoder.label, report)
        if len(encoders) > 1:
            report["comparison"] = paired_comparison(scored, encoders[0].label, seed=seed)
        if scored:  # for pairing with scores made elsewhere (a fine-tune's test/predictions.csv)
            write_per_face(out / "per_face.csv", scored)
        for target in plan.targets:
            rows = [r for r in report["fewshot"] if r["target"] == target.name]
            if rows:
                png = f"{safe_name(target.name)}_label_efficiency.png"
                label_efficiency.plot_label_efficiency(out / png, f"{target.name}: label efficiency", rows)
                report["plots"].append(png)

    for w in report["warnings"]:
        logger.warning(w)
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    eval_report.write_report(out, report)
    return report


def _plan(specs, train, test, targets, pairs, pairs_data, batch_size, pixel_size, features, grid_size, seed,
          exclude_leaked, protocols, shots, fewshot_seeds, groups, min_group, saliency) -> Plan:
    """Every flag checked, before any weights are read or --out is made."""
    if not specs:
        raise UsageError("--model is required")
    if not features:
        raise UsageError(f"--features is empty; choose one or more of {','.join(FEATURES)}")
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise UsageError(f"unknown feature set(s) {unknown}; choose from {FEATURES}")
    for flag, value in (("batch_size", batch_size), ("grid_size", grid_size), ("pixel_size", pixel_size),
                        ("fewshot_seeds", fewshot_seeds), ("min_group", min_group)):
        if value < 1:
            raise UsageError(f"--{flag} must be at least 1, got {value}")
    if saliency < 0:
        raise UsageError(f"--saliency must be 0 (off) or a number of test faces, got {saliency}")
    parsed: list[Target] = parse_targets(targets) if targets else []
    if parsed and not (train and test):
        raise UsageError("--targets needs both --train and --test")
    if not parsed and not pairs:
        raise UsageError("nothing to evaluate: give --targets (with --train/--test) and/or --pairs")
    if pairs and not (pairs_data or test):
        raise UsageError("--pairs needs --pairs_data (or --test) naming the images the pairs refer to")
    for flag, given in (("exclude_leaked", exclude_leaked), ("groups", groups), ("saliency", saliency)):
        if given and not parsed:
            raise UsageError(f"--{flag} works on the probes' test split: it needs --targets")
    chosen = parse_protocols(protocols)
    if "fewshot" in chosen:
        for target in parsed:
            if target.kind in ("regression", "classification"):
                label_efficiency.check_shots(target.kind, label_efficiency.parse_shots(shots))
    return Plan(targets=parsed, features=tuple(features), protocols=chosen,
                shots=tuple(label_efficiency.parse_shots(shots)) if "fewshot" in chosen else (),
                fewshot_seeds=fewshot_seeds, groupings=tuple(parse_groups(groups)) if groups else (),
                min_group=min_group, seed=seed)


def _measure(encoder, plan: Plan, train: str, test: str, batch_size: int, cache_dir, pixel_size: int,
             grid_size: int, excluded: frozenset[str], probe_threads, saliency: int, out: Path, prefix: str,
             report: dict) -> list:
    """Embeds train and test with one encoder and runs the protocols, subgroups and saliency on them;
    fills `report` and returns the per-face scores for the comparison."""
    emb_train, info_train = _embed(encoder, train, "train", batch_size, cache_dir, pixel_size, grid_size,
                                   plan.targets)
    emb_test, info_test = _embed(encoder, test, "test", batch_size, cache_dir, pixel_size, grid_size,
                                 plan.targets, exclude=excluded, groupings=plan.groupings)
    encoder.info["data"] = {"train": info_train, "test": info_test}
    report["data"].setdefault("train", info_train)
    report["data"].setdefault("test", info_test)
    health = rankme.health(emb_test.features, emb_test.tokens)
    encoder.info["health"] = health
    if not report["health"]:
        report["health"] = health
    report["warnings"] += [f"{encoder.label}: {w}" for w in rankme.low_rank_warnings(health)]
    check_columns(plan.targets, list(emb_train.labels), "train")
    check_columns(plan.targets, list(emb_test.labels), "test")
    if plan.groupings:
        check_group_columns(plan.groupings, list(emb_test.labels), "test")
    shared = np.intersect1d(emb_train.ids, emb_test.ids)
    if len(shared):
        report["warnings"].append(f"{len(shared)} image id(s) are in both train and test "
                                  f"(e.g. {shared[:3].tolist()}): probe scores are optimistic")
    with blas_threads(probe_threads):
        outcome = run_protocols(plan, encoder.label, emb_train, emb_test)
    report["probes"] += outcome.probes
    report["fewshot"] += outcome.fewshot
    report["subgroups"] += outcome.subgroups
    report["warnings"] += _nonfinite_warnings(outcome.probes)
    report["plots"] += probe_plots(out, prefix, plan.targets, outcome, plan.features)
    for name, rows in _by_target(outcome.subgroups).items():
        png = f"{prefix}{safe_name(name)}_subgroups.png"
        plot_subgroups(out / png, f"{encoder.label}: {name} by group (linear probe)", rows)
        report["plots"].append(png)
    if saliency:
        faces = first_faces(test, encoder.image_size, batch_size, saliency, excluded)
        report["saliency"] += saliency_figures(encoder, faces, plan.targets, outcome.linear, plan.features,
                                               grid_size, batch_size, out, prefix)
    return outcome.scored


def _by_target(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Subgroup reports -> {"target (features)": {grouping: report}}: one figure per target and readout."""
    grouped: dict[str, dict[str, dict]] = {}
    for r in rows:
        grouped.setdefault(f"{r['target']} ({r['features']})", {})[r["grouping"]] = r
    return grouped


def _nonfinite_warnings(rows: list[dict]) -> list[str]:
    warnings, seen = [], set()
    for row in rows:
        counts = (row.get("n_nonfinite_train", 0), row.get("n_nonfinite_test", 0))
        if any(counts) and row["target"] not in seen:  # the same for every readout and protocol
            seen.add(row["target"])
            warnings.append(f"target {row['target']!r}: left out {counts[0]} train and {counts[1]} test row(s) "
                            "whose label is not finite (inf, -inf, or too large for a float)")
    return warnings


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


def _check_sizes(encoder, grid_size: int, pixel_size: int) -> None:
    """--grid_size within the patch grid, --pixel_size within the image (module docstring): a larger one
    adds no information, and a far larger one asks for an output no memory holds."""
    gh, gw = encoder.grid
    if grid_size > min(gh, gw):
        raise UsageError(f"--grid_size={grid_size} is finer than {encoder.label}'s {gh}x{gw} patch grid; "
                         f"choose 1 to {min(gh, gw)}")
    if pixel_size > encoder.image_size:
        raise UsageError(f"--pixel_size={pixel_size} is larger than {encoder.label}'s {encoder.image_size} px "
                         f"images; choose 1 to {encoder.image_size}")


def _run_verification(pairs_parsed, emb, features, out: Path, prefix: str, label: str, report: dict) -> None:
    ids_a, ids_b, same = pairs_parsed
    curves = {}
    for feature in features:
        scores = cosine_scores(emb.features[feature], list(emb.ids), ids_a, ids_b)
        report["verification"].append({"model": label, "features": feature, **verification_metrics(scores, same)})
        curves[feature] = (same, scores)
    eval_report.plot_roc(out / f"{prefix}verification_roc.png", f"{label}: verification", curves)
    report["plots"].append(f"{prefix}verification_roc.png")


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
        exclude_leaked=f.exclude_leaked, protocols=tuple(f.protocols), shots=f.shots,
        fewshot_seeds=f.fewshot_seeds, groups=f.groups, min_group=f.min_group,
        saliency=f.saliency)
    print(eval_report.markdown_report(report))
    print(f"wrote {Path(f.out) / 'report.json'} and report.md")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_multi_string("model", None, "Model spec: weights file, exported folder, workdir, random:NAME[@SIZE] "
                              "or timm:ARCH[:weights=FILE,...]. Repeat to compare encoders against the first.")
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
    flags.DEFINE_list("protocols", ["linear"], f"Any of {','.join(PROTOCOLS)}: linear probes, DINO's kNN, "
                      "label efficiency (linear and kNN on few labels).")
    flags.DEFINE_string("shots", SHOTS, "fewshot: training labels per class (classification) or in all "
                        "(regression); 'all' is every label.")
    flags.DEFINE_integer("fewshot_seeds", 3, "fewshot: draws of the labelled faces per size.")
    flags.DEFINE_string("groups", None,
                        "Subgroup report of every linear probe, e.g. gender,race,age_bin=0,20,40,60,120.")
    flags.DEFINE_integer("min_group", 30, "Groups with fewer test faces are listed without an interval.")
    flags.DEFINE_integer("saliency", 0, "Saliency maps of every probe over this many test faces (0: none).")
    flags.mark_flags_as_required(["model", "out"])


if __name__ == "__main__":
    _define_flags()
    cli.run("evaluate", main)

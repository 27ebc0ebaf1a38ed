"""`evaluate` with everything issue 23 added, end to end on real UTKFace faces: two encoders (ours and a
timm ViT) compared face by face, kNN and label efficiency, subgroups and saliency, in one report."""
import csv
import json

import numpy as np
import pytest

from helpers.tiny_configs import TINY_SPEC
from mefem_jax.evaluate import run_evaluation
from mefem_jax.evaluation.probes import blas_threads

TIMM_TINY = "timm:vit_tiny_patch16_224:img_size=64,depth=2"


@pytest.fixture(scope="module")
def compared(utkface_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    with blas_threads(1):
        report = run_evaluation(
            model=[TINY_SPEC, TIMM_TINY], out=out, train=f"{utkface_dir}:split=train,sample=60",
            test=f"{utkface_dir}:split=test,sample=40", targets="age:regression,gender:classification",
            cache_dir=None, batch_size=20, protocols=("linear", "knn", "fewshot"), shots="5,all",
            groups="age_bin=0,30,60,120", min_group=8, saliency=4, features=("grid", "pixels"))
    return out, report


def test_every_encoder_is_probed_and_compared_face_by_face(compared):
    out, report = compared
    assert [m["label"] for m in report["models"]] == ["random:vitti@64", "timm:vit_tiny_patch16_224"]
    probes = {(r["model"], r["target"], r["features"], r["protocol"], r.get("k")) for r in report["probes"]}
    # The pixel baseline is the first encoder's alone; every readout gets a linear probe and two kNNs.
    assert ("random:vitti@64", "age", "pixels", "linear", None) in probes
    assert not any(m == "timm:vit_tiny_patch16_224" and f == "pixels" for m, _, f, _, _ in probes)
    assert ("timm:vit_tiny_patch16_224", "gender", "grid", "knn", 20) in probes
    compared_rows = {(r["target"], r["features"], r["protocol"], r["k"]): r for r in report["comparison"]}
    assert set(compared_rows) == {(t, "grid", p, k) for t in ("age", "gender")
                                  for p, k in (("linear", None), ("knn", 10), ("knn", 20))}
    for r in compared_rows.values():
        assert r["n_paired"] == 40 and r["low"] <= r["difference"] <= r["high"]
        assert r["difference"] == pytest.approx(r["value"] - r["baseline_value"])
    # The paired value is the probe's own headline metric.
    timm_age = next(p for p in report["probes"] if p["model"] == "timm:vit_tiny_patch16_224"
                    and p["target"] == "age" and p["features"] == "grid" and p["protocol"] == "linear")
    assert compared_rows[("age", "grid", "linear", None)]["value"] == pytest.approx(timm_age["metrics"]["mae"])
    md = (out / "report.md").read_text()
    assert "against `random:vitti@64`" in md and "kNN k=20" in md
    # per_face.csv: every probe's per-face scores, whose mean is that probe's headline metric
    with open(out / "per_face.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for probe in report["probes"]:
        key = (probe["model"], probe["target"], probe["features"], probe["protocol"], str(probe.get("k") or ""))
        scores = [float(r["score"]) for r in rows
                  if (r["model"], r["target"], r["features"], r["protocol"], r["k"]) == key]
        assert len(scores) == 40, key
        headline = "mae" if probe["kind"] == "regression" else "accuracy"
        assert np.mean(scores) == pytest.approx(probe["metrics"][headline]), key


def test_label_efficiency_subgroups_and_saliency_are_in_the_report(compared):
    out, report = compared
    fewshot = {(r["model"], r["target"], r["features"], r["protocol"], r["n"]) for r in report["fewshot"]}
    assert ("timm:vit_tiny_patch16_224", "gender", "grid", "knn", 5) in fewshot
    assert ("random:vitti@64", "age", "pixels", "linear", "all") in fewshot
    groups = {(r["model"], r["target"], r["features"], r["grouping"]) for r in report["subgroups"]}
    assert ("random:vitti@64", "age", "grid", "age_bin") in groups 
    assert len(groups) == (2 + 1) * 2  # readouts (pixels: first encoder only) x targets
    saliency = {(r["model"], r["target"], r["features"]): r for r in report["saliency"]}
    assert saliency[("random:vitti@64", "gender", "grid")]["methods"] == ["occlusion", "gradient x input, per patch"]
    assert saliency[("timm:vit_tiny_patch16_224", "age", "grid")]["methods"] == ["occlusion"]
    assert {k[2] for k in saliency} == {"grid"}  # no map of the pixel baseline
    pngs = report["plots"] + [r["png"] for r in report["saliency"]]
    assert "age_label_efficiency.png" in pngs and any(p.endswith("_subgroups.png") for p in pngs)
    for png in pngs:
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    md = (out / "report.md").read_text()
    assert all(f"]({png})" in md for png in pngs)
    assert json.loads((out / "report.json").read_text())["protocols"] == ["linear", "knn", "fewshot"]
    assert np.isfinite([r["metrics"][r["headline"]]["mean"] for r in report["fewshot"]]).all()

"""scripts/learning_curves.sh leaves the committed docs/ alone unless asked (issue 25, item 15).

A partial run (`PHASE=train RUNS=mefem:0`) ended by rewriting docs/learning_curves.png and
docs/learning_curves_table.md from its one run. The script runs here for real, in a copy of the repository
layout (so that a failure cannot touch the committed docs), on its cheapest path: PHASE=test with the
test reports already written, so it trains and evaluates nothing; its shard build is a real one of a
few UTKFace faces. The run folder's metrics rows and reports are in the train loop's and evaluate's
formats, with the numbers of the committed table (mefem seed 0, random init seed 0).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers.faces import UTKFACE, utkface_rows, write_labels

from helpers.repo import REPO
from mefem_jax.data.shards import build as build_shards

DOCS = ("learning_curves.png", "learning_curves_table.md")
KEYS = ("probe_age_mae", "probe_gender_acc", "probe_race_acc", "probe_age_mae_mean", "probe_age_mae_grid",
        "rankme_cls", "rankme_mean", "rankme_patch")
PROBES = {0: (13.24, 0.730, 0.516, 13.17, 13.03, 9.2, 7.9, 30.0), 600: (12.81, 0.765, 0.526, 13.14, 13.13, 10.7,
                                                                       12.3, 31.9)}
# readout → age MAE, age R², gender accuracy, race accuracy (docs/learning_curves_table.md, seed 0)
TESTS = {"mefem": {"cls": (12.79, 0.285, 0.776, 0.545), "mean": (12.98, 0.268, 0.776, 0.553),
                   "grid": (12.28, 0.335, 0.791, 0.587)},
         "random": {"cls": (13.14, 0.243, 0.746, 0.546), "mean": (13.24, 0.242, 0.760, 0.559),
                    "grid": (12.42, 0.321, 0.780, 0.593)}}


def report(readouts: dict, health: dict) -> dict:
    probes = []
    for feature, (mae, r2, gender, race) in readouts.items():
        probes += [{"target": "age", "kind": "regression", "features": feature, "metrics": {"mae": mae, "r2": r2}},
                   {"target": "gender", "kind": "classification", "features": feature,
                    "metrics": {"accuracy": gender}},
                   {"target": "race", "kind": "classification", "features": feature, "metrics": {"accuracy": race}}]
    return {"probes": probes, "health": health}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def finished_study(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the repository's scripts/ and docs/, a labels CSV, and a run folder in which mefem:0 has
    been trained and tested and the random init tested: the state PHASE=test finds after PHASE=train."""
    repo, faces, out = tmp_path / "repo", tmp_path / "faces", tmp_path / "out"
    shutil.copytree(REPO / "scripts", repo / "scripts")
    (repo / "docs").mkdir(parents=True)
    for name in DOCS:
        shutil.copy(REPO / "docs" / name, repo / "docs" / name)
    faces.mkdir()
    labels = write_labels(str(faces / "labels.csv"), utkface_rows(12))
    build_shards.build(build_shards.BuildOptions(images=os.path.join(UTKFACE, "images"), labels=labels,
                                                 out=str(out / "shards_train"), num_shards=1, workers=1))
    rows = [dict(step=step, **dict(zip(KEYS, values))) for step, values in PROBES.items()]
    (out / "mefem_s0").mkdir()
    (out / "mefem_s0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_json(out / "test_mefem_s0" / "report.json",
               report(TESTS["mefem"], {"rankme_cls": 10.7, "rankme_mean": 12.2, "rankme_patch": 31.9}))
    write_json(out / "test_random_s0" / "report.json",
               report(TESTS["random"], {"rankme_cls": 9.6, "rankme_mean": 8.2, "rankme_patch": 30.2}))
    return repo, faces, out


def run_script(repo: Path, faces: Path, out: Path, **env) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(REPO), PHASE="test", RUNS="mefem:0", RANDOM_SEEDS="0", FACES=str(faces), **env)
    return subprocess.run(["bash", str(repo / "scripts" / "learning_curves.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=240, check=False)


def digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in DOCS}


def test_a_run_writes_its_summary_into_out_and_leaves_docs_alone(tmp_path):
    repo, faces, out = finished_study(tmp_path)
    committed = digests(repo / "docs")
    done = run_script(repo, faces, out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert digests(repo / "docs") == committed
    table = (out / "learning_curves_table.md").read_text()
    assert "| MeFEm-full (stripes + circular + CLS p=0.5) | 0 | 600 | 12.81 | 0.765 |" in table
    assert "| random init (same ViT) | 0 | cls | 13.14 |" in table
    assert (out / "learning_curves.png").read_bytes().startswith(b"\x89PNG")
    assert "docs/ left as committed" in done.stdout


def test_update_docs_replaces_them_with_the_summary(tmp_path):
    repo, faces, out = finished_study(tmp_path)
    done = run_script(repo, faces, out, UPDATE_DOCS="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert digests(repo / "docs") == digests(out) != digests(REPO / "docs")

"""The real entry point, `python -m mefem_jax.train`, on UTKFace shards built by the real shard builder."""
import json
import os
import subprocess
import sys

import pytest

from helpers.faces import UTKFACE, utkface_rows, write_labels
from helpers.tiny_configs import TINY_RUN, as_flags

TINY = as_flags(TINY_RUN)


def build_utk_shards(tmp_path, n: int, num_shards: int):
    """n UTKFace faces through the real shard builder; returns (labels CSV, shard folder)."""
    labels = write_labels(str(tmp_path / "labels.csv"), utkface_rows(n))
    shards = tmp_path / "shards"
    build = subprocess.run([sys.executable, "-m", "mefem_jax.data.build_shards",
                            f"--images={os.path.join(UTKFACE, 'images')}", f"--labels={labels}",
                            f"--out={shards}", f"--num_shards={num_shards}", "--image_size=128", "--workers=1"],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert json.loads((shards / "manifest.json").read_text())["num_records"] == n
    return labels, shards


def test_train_20_steps_on_utkface_shards(tmp_path):
    _, shards = build_utk_shards(tmp_path, 96, num_shards=2)

    workdir = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "mefem_jax.train", "--config=configs/vits.py:smoke",
                          f"--workdir={workdir}", f"--config.data.train={shards}", "--config.total_steps=20",
                          "--config.log_every=5", *TINY],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["step"] == 20

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    for r in rows:
        assert {"loss", "lr", "img_per_sec", "data_decoded", "data_skipped"} <= set(r)
    assert rows[-1]["data_decoded"] == 20 * 8 and rows[-1]["data_skipped"] == 0
    assert all(r["img_per_sec"] > 0 for r in rows[1:])  # the first interval's rate excludes compile
    config = json.loads((workdir / "config.json").read_text())
    assert config["data"]["train"] == str(shards)
    assert (workdir / "plots" / "loss.png").stat().st_size > 1000
    assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tb").iterdir())
    assert (workdir / "checkpoints" / "20").is_dir()
    assert "step/s" in run.stderr  # the progress bar, with its rate and ETA


def test_cpu_recipe_trains_and_probes_through_the_entry_point(tmp_path):
    """`configs/vits.py:cpu` (the small-scale recipe of docs/RESULTS.md) on UTKFace shards: 14x14 patch grid,
    lr scaled from the reference batch, probes with RankMe at step 0 (the run's own random init) and after."""
    from configs import vits

    c = vits.get_config("cpu")
    assert (c.model.image_size // c.model.patch_size) == 14
    assert c.optim.ref_batch == 2048 and c.data.batch_size == 64  # lr is scaled, not quoted at the batch

    labels, shards = build_utk_shards(tmp_path, 48, num_shards=1)
    spec = f"{labels}:images={os.path.join(UTKFACE, 'images')}"
    workdir = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "mefem_jax.train", "--config=configs/vits.py:cpu",
                          f"--workdir={workdir}", f"--config.data.train={shards}", "--config.total_steps=4",
                          "--config.log_every=2", "--config.eval.every_steps=2", "--config.eval.max_images=24",
                          "--config.eval.batch_size=8", f"--config.eval.train={spec}", f"--config.eval.test={spec}",
                          "--config.eval.targets=age:regression", "--config.loss.sigreg.weight=0.05",
                          "--config.eval.select=probe_age_mae",
                          "--config.model.width=32", "--config.model.depth=1", "--config.model.heads=2",
                          "--config.predictor.width=16", "--config.predictor.depth=1", "--config.predictor.heads=2",
                          "--config.data.batch_size=8"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    probed = [r for r in metrics if "probe_age_mae" in r]
    assert [r["step"] for r in probed] == [0, 2, 4]
    for r in probed:
        assert {"probe_age_mae_mean", "probe_age_mae_grid", "rankme_cls", "rankme_mean", "rankme_patch"} <= set(r)
        assert 1.0 <= r["rankme_patch"] <= 32
    trained = [r for r in metrics if "loss" in r]
    assert all(r["sigreg"] > 0 and r["loss"] > r["loss_jepa"] for r in trained)
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["patch_size"] == 8

    # eval.select keeps the target encoder of the best-probed step; loaded back, it probes as logged.
    from ml_collections import ConfigDict
    from mefem_jax.evaluation.online_probe import probe_during_training
    from mefem_jax.weights.encoders import load_encoder

    # the columns eval.select may name are the ones the probes log
    from mefem_jax.evaluation.online_probe import metric_names
    logged = {k for k in probed[0] if k.startswith(("probe_", "rankme_")) and k != "probe_seconds"}
    assert logged == set(metric_names(ConfigDict(config["eval"])))
    kept = json.loads((workdir / "selected" / "selected.json").read_text())
    best = min(probed, key=lambda r: r["probe_age_mae"])
    assert kept["step"] == best["step"] and kept["val"]["probe_age_mae"] == best["probe_age_mae"]
    loaded = load_encoder(str(workdir / "selected"))
    assert loaded.identity["step"] == best["step"] and loaded.run_config["total_steps"] == 4
    again = probe_during_training(loaded.encoder, loaded.params, ConfigDict(config["eval"]))
    assert again["probe_age_mae"] == pytest.approx(best["probe_age_mae"], rel=1e-4)
    from mefem_jax.export import _load  # what export --checkpoint=WORKDIR/selected writes on the model card

    card = _load(str(workdir / "selected"), "target", None, from_run=False)[2]
    assert card["selected by"] == f"validation probe_age_mae = {best['probe_age_mae']:.4g}"
    assert card["source"].endswith(f"run, step {best['step']}")

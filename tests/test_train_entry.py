"""The real entry point, `python -m mefem_jax.train`, on UTKFace shards built by the real shard builder."""
import json
import os
import subprocess
import sys

from data_corpus import UTKFACE, utkface_rows, write_labels

TINY = ["--config.model.width=64", "--config.model.depth=2", "--config.model.heads=2",
        "--config.predictor.width=32", "--config.predictor.depth=1", "--config.predictor.heads=2",
        "--config.data.batch_size=8", "--config.optim.ref_batch=8"]


def test_train_20_steps_on_utkface_shards(tmp_path):
    rows = utkface_rows(96)
    labels = write_labels(str(tmp_path / "labels.csv"), rows)
    shards = tmp_path / "shards"
    build = subprocess.run([sys.executable, "-m", "mefem_jax.data.build_shards",
                            f"--images={os.path.join(UTKFACE, 'images')}", f"--labels={labels}",
                            f"--out={shards}", "--num_shards=2", "--image_size=128", "--workers=1"],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert json.loads((shards / "manifest.json").read_text())["num_records"] == 96

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

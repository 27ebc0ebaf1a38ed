"""Evaluation end to end: model and data specs, the batched forward and its cache, the CLI on real
UTKFace faces, survival on synthetic faces, probes during training, and the bad-input errors."""
import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers.faces import write_labels
from helpers.repo import REPO
from helpers.tiny_configs import TINY_SPEC
from mefem_jax.evaluate import UsageError, run_evaluation
from mefem_jax.evaluation.data import DataSpecError, open_eval_data, parse_data_spec
from mefem_jax.evaluation.embeddings import cached_embeddings, compute_embeddings, embed_batch
from mefem_jax.evaluation.probes import blas_threads
from mefem_jax.evaluation.survival import fit_survival_probe
from mefem_jax.evaluation.targets import TargetError, parse_targets
from mefem_jax.evaluation.verification import PairsError
from mefem_jax.weights.encoders import load_encoder
from mefem_jax.weights.spec import ModelSpecError, random_model_config

TINY = TINY_SPEC  # 4x4 patch grid; compiles in about a second


@pytest.fixture(scope="module")
def tiny():
    return load_encoder(TINY)


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    with blas_threads(1):
        yield


def utk(utkface_dir, options: str) -> str:
    return f"{utkface_dir}:{options}"


def utk_rows(utkface_dir, split: str, n: int) -> list[dict]:
    with open(utkface_dir / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    return rows[:: len(rows) // n][:n]  # spread over the (name-sorted, so age-sorted) file


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------
def test_model_specs(tiny):
    cfg = tiny.model_cfg
    assert (cfg.variant, cfg.image_size, cfg.width, cfg.depth, cfg.heads, cfg.posemb) == ("Ti", 64, 64, 2, 2, "sincos")
    cfg, seed = random_model_config("random:vits@32:depth=1,seed=3,posemb=learn")
    assert (cfg.variant, cfg.image_size, cfg.depth, cfg.width, cfg.posemb, seed) == ("S", 32, 1, None, "learn", 3)
    for bad, msg in [("random:vitz", "NAME in"), ("random:vits@big", "NAME in"),
                     ("random:vits:depth=two", "must be an integer"), ("random:vits:colour=red", "unknown option"),
                     ("random:vits:width=64", "not divisible by heads 6"),
                     ("no/such/weights.pth.tar", "unknown model spec")]:
        with pytest.raises(ModelSpecError, match=msg):
            load_encoder(bad)


def test_data_and_target_specs():
    spec = parse_data_spec("../shared/data/utkface:split=train,limit=5,race=0|1")
    assert spec.source == "../shared/data/utkface" and spec.limit == 5
    assert spec.filters == {"split": {"train"}, "race": {"0", "1"}}
    assert parse_data_spec("synthetic:test").source == "synthetic:test"
    assert parse_data_spec("tfds:celeb_a:test").options == ()
    with pytest.raises(DataSpecError, match="not key=value"):
        parse_data_spec("x:split=train,limit")
    with pytest.raises(DataSpecError, match="positive integer"):
        _ = parse_data_spec("x:limit=-3").limit

    targets = parse_targets("age:regression,gender:classification,time,event:survival")
    assert [(t.kind, t.columns) for t in targets] == [
        ("regression", ("age",)), ("classification", ("gender",)), ("survival", ("time", "event"))]
    for bad, msg in [("age", "lack a :KIND"), ("age:ordinal", "unknown kind"),
                     ("a,b:regression", "takes 1 column"), ("time:survival", "takes 2 column")]:
        with pytest.raises(TargetError, match=msg):
            parse_targets(bad)


def test_folder_reader_filters_and_counts_unreadable_images(utkface_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = utk_rows(utkface_dir, "test", 5)
    for r in rows:  # links, not copies: the faces stay in ../shared
        (images / r["file"]).symlink_to(utkface_dir / "images" / r["file"])
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    extra = [{**rows[0], "file": "broken.jpg"}, {**rows[0], "file": "missing.jpg"}]
    write_labels(tmp_path / "labels.csv", rows + extra)

    data = open_eval_data(f"{tmp_path}:split=test", image_size=32, batch_size=4)
    batches = list(data.batches())
    ids = np.concatenate([b["id"] for b in batches]).tolist()
    assert ids == [r["file"] for r in rows]
    assert data.skipped == {"unreadable image": ["broken.jpg"], "missing file": ["missing.jpg"]}
    assert batches[0]["image"].shape == (4, 32, 32, 3) and batches[0]["image"].dtype == np.float32
    assert batches[0]["age"].tolist() == [r["age"] for r in rows[:4]]

    only_first = open_eval_data(f"{tmp_path}:age={rows[0]['age']},limit=1", 32, 4)
    assert [b["id"].tolist() for b in only_first.batches()] == [[rows[0]["file"]]]
    with pytest.raises(DataSpecError, match="unknown column 'colour'"):
        open_eval_data(f"{tmp_path}:colour=red", 32, 4)
    with pytest.raises(DataSpecError, match="no rows"):
        open_eval_data(f"{tmp_path}:split=nope", 32, 4)
    with pytest.raises(DataSpecError, match="neither an image folder"):
        open_eval_data(str(tmp_path / "nowhere"), 32, 4)


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------
def test_short_batches_are_padded_not_recompiled(tiny, utkface_dir):
    data = open_eval_data(utk(utkface_dir, "split=test,sample=10"), tiny.image_size, batch_size=4)
    before = embed_batch._cache_size()
    emb = compute_embeddings(tiny.encoder, tiny.params, data)  # batches of 4, 4, 2
    assert embed_batch._cache_size() == before + 1
    assert len(emb) == 10 and emb.features["cls"].shape == (10, 64)
    assert emb.features["pixels"].shape == (10, 16 * 16 * 3)

    # The same images in one unpadded batch give the same features: padding rows leak nothing.
    images = np.concatenate([b["image"] for b in data.batches()])
    whole = embed_batch(tiny.params, images, encoder=tiny.encoder, pixel_size=16)
    for k in ("cls", "mean", "pixels"):
        np.testing.assert_allclose(emb.features[k], np.asarray(whole[k]), rtol=1e-5, atol=1e-5)


def test_cache_hits_and_invalidates(tiny, utkface_dir, tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    write_labels(folder / "labels.csv", utk_rows(utkface_dir, "test", 6))
    spec = f"{folder}:images={utkface_dir / 'images'}"
    data = open_eval_data(spec, tiny.image_size, 4)
    first, path, hit = cached_embeddings(tiny, data, tmp_path / "cache")
    assert not hit and path.is_file()
    again, path2, hit = cached_embeddings(tiny, open_eval_data(spec, tiny.image_size, 4), tmp_path / "cache")
    assert hit and path2 == path
    for k in first.features:
        np.testing.assert_array_equal(again.features[k], first.features[k])
    assert again.labels["age"].tolist() == first.labels["age"].tolist()

    os.utime(folder / "labels.csv", ns=(1, 1))  # an edited CSV must not be served stale features
    _, path3, hit = cached_embeddings(tiny, open_eval_data(spec, tiny.image_size, 4), tmp_path / "cache")
    assert not hit and path3 != path
    other_model = load_encoder(TINY + ",seed=1")
    _, path4, hit = cached_embeddings(other_model, open_eval_data(spec, 64, 4), tmp_path / "cache")
    assert not hit and path4 not in (path, path3)


def test_exported_folder_embeds_like_its_params(tiny, utkface_dir, tmp_path, random_params):
    from mefem_jax.weights.release import export_folder

    params = random_params(jax.tree.map(np.asarray, tiny.params))  # non-trivial biases and scales
    folder = export_folder(params, tiny.model_cfg, tmp_path / "export")
    loaded = load_encoder(str(folder))
    assert loaded.model_cfg.posemb == "sincos" and loaded.image_size == 64
    data = open_eval_data(utk(utkface_dir, "split=test,sample=6"), 64, 4)
    ours = compute_embeddings(tiny.encoder, params, data)
    theirs = compute_embeddings(loaded.encoder, loaded.params, data)
    for k in ours.features:
        np.testing.assert_array_equal(theirs.features[k], ours.features[k])


# ---------------------------------------------------------------------------------------------
# The command line on real faces
# ---------------------------------------------------------------------------------------------
def test_cli_on_utkface(utkface_dir, tmp_path):
    test_spec = f"{utkface_dir}:split=test,sample=24"
    test_ids = [r["file"] for r in open_eval_data(test_spec, 64, 16).table.rows]
    pairs = tmp_path / "pairs.txt"
    # Genuine pairs repeat an image (cosine 1); impostor pairs join different faces.
    pairs.write_text("".join(f"{a} {a} 1\n{a} {b} 0\n" for a, b in zip(test_ids, test_ids[1:])))
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, "-m", "mefem_jax.evaluate", f"--model={TINY}",
           f"--train={utkface_dir}:split=train,sample=40", f"--test={test_spec}",
           "--targets=age:regression,gender:classification", f"--pairs={pairs}",
           f"--out={out}", f"--cache_dir={cache}", "--batch_size=16"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    assert report["data"]["train"]["n"] == 40 and report["data"]["test"]["n"] == 24
    rows = {(r["target"], r["features"]): r for r in report["probes"]}
    assert set(rows) == {(t, f) for t in ("age", "gender") for f in ("cls", "mean", "grid", "pixels")}
    assert all(np.isfinite(r["metrics"]["mae"]) for (t, _), r in rows.items() if t == "age")
    for r in rows.values():  # every probe figure carries its bootstrap interval
        for metric, (lo, hi) in r["intervals"].items():
            if np.isfinite(r["metrics"][metric]):
                assert lo <= r["metrics"][metric] <= hi, (metric, r)
    assert set(report["health"]) == {"rankme_cls", "rankme_mean", "rankme_patch"}
    assert all(1.0 <= v <= 64 for v in report["health"].values())
    assert all(0 <= r["metrics"]["accuracy"] <= 1 for (t, _), r in rows.items() if t == "gender")
    verification = {r["features"]: r for r in report["verification"]}
    assert verification["cls"]["n_genuine"] == 23 and verification["cls"]["roc_auc"] == 1.0
    for png in ("age_scatter.png", "gender_roc.png", "verification_roc.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| age | cls |" in md and "TAR@FAR=0.01" in md and "rankme_patch" in md

    # The CLI's cached embeddings are the tiny model's features of those faces.
    cached = np.load(report["data"]["test"]["cache"])
    model = load_encoder(TINY)
    direct = compute_embeddings(model.encoder, model.params,
                                open_eval_data(test_spec, 64, 16))
    assert cached["ids"].tolist() == direct.ids.tolist()
    np.testing.assert_allclose(cached["feature_cls"], direct.features["cls"], rtol=1e-5, atol=1e-6)


def test_cli_reports_bad_input_without_traceback(tmp_path):
    cmd = [sys.executable, "-m", "mefem_jax.evaluate", "--model=random:vitq", f"--out={tmp_path}",
           "--train=synthetic", "--test=synthetic", "--targets=face_width:regression"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "evaluate: unknown model spec 'random:vitq'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_inputs_get_clear_errors(tiny, utkface_dir, tmp_path):
    train, test = utk(utkface_dir, "split=train,sample=12"), utk(utkface_dir, "split=test,sample=8")
    common = dict(model=TINY, out=tmp_path / "out", cache_dir=tmp_path / "cache", batch_size=8)
    with pytest.raises(TargetError, match=r"\['weight'\] not in the train data"):
        run_evaluation(train=train, test=test, targets="weight:regression", **common)
    with pytest.raises(TargetError, match="'split' must be numeric.*'train'"):
        run_evaluation(train=train, test=test, targets="split:regression", **common)
    with pytest.raises(UsageError, match="needs both"):
        run_evaluation(train=train, targets="age:regression", **common)

    # A class with one training example.
    rows = utk_rows(utkface_dir, "train", 9)
    for i, r in enumerate(rows):
        r["group"] = "solo" if i == 0 else "ab"[i % 2]
    write_labels(tmp_path / "labels.csv", rows)
    lonely = f"{tmp_path}:images={utkface_dir / 'images'}"
    with pytest.raises(TargetError, match=r"\['solo'\] have a single training example"):
        run_evaluation(train=lonely, test=lonely, targets="group:classification", **common)

    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{rows[1]['file']} ghost.jpg 0\n{rows[1]['file']} {rows[2]['file']} 1\n")
    with pytest.raises(PairsError, match="1 id.*not in the embedded data: ghost.jpg"):
        run_evaluation(pairs=str(pairs), pairs_data=lonely, **common)
    with pytest.raises(ModelSpecError, match="unknown model spec"):
        run_evaluation(**{**common, "model": str(tmp_path / "missing.safetensors")}, pairs=str(pairs),
                       pairs_data=lonely)


def test_training_workdir(tiny, utkface_dir, tmp_path, random_params):
    """A workdir's target and context encoders, read through mefem_jax.training.checkpoint."""
    import grain
    import ml_collections

    from mefem_jax.training.checkpoint import Checkpointer

    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_encoder(str(tmp_path / "empty"))

    target = random_params(jax.tree.map(np.asarray, tiny.params), seed=1)
    context = random_params(jax.tree.map(np.asarray, tiny.params), seed=2)
    config = ml_collections.ConfigDict({"model": tiny.model_cfg.to_dict()})
    ckpt = Checkpointer(tmp_path / "run", every_steps=1, async_save=False)
    ckpt.save(7, {"params": {"encoder": context}, "target_params": target},
              iter(grain.MapDataset.range(4).to_iter_dataset()), config, force=True)
    ckpt.close()

    data = open_eval_data(utk(utkface_dir, "split=test,sample=4"), 64, 4)
    for which, params in (("target", target), ("context", context)):
        loaded = load_encoder(str(tmp_path / "run"), which=which)
        assert loaded.identity["step"] == 7 and loaded.model_cfg.width == 64
        np.testing.assert_array_equal(compute_embeddings(loaded.encoder, loaded.params, data).features["cls"],
                                      compute_embeddings(tiny.encoder, params, data).features["cls"])


# ---------------------------------------------------------------------------------------------
# Survival on synthetic faces, and probes during training
# ---------------------------------------------------------------------------------------------
def test_survival_on_synthetic_faces(tiny):
    """Hazard driven by the skin tone the faces were drawn with: the embeddings must rank it."""
    train = compute_embeddings(tiny.encoder, tiny.params,
                               open_eval_data("synthetic:split=train,limit=256", 64, 64, "train"))
    test = compute_embeddings(tiny.encoder, tiny.params,
                              open_eval_data("synthetic:split=test,limit=160", 64, 64, "test"))
    rng = np.random.default_rng(0)

    def times(tone, shuffle=False):
        risk = 6.0 * (np.asarray(tone, np.float64) - 0.5)  # an oracle ranks these at C ~ 0.85
        risk = rng.permutation(risk) if shuffle else risk
        t, censor = rng.exponential(np.exp(-risk)), rng.exponential(2.0, len(risk))
        return np.minimum(t, censor), (t <= censor).astype(int)

    grid = dict(components=(8, 16), penalizers=(0.1,))
    # Mean-pooled patches of the random encoder keep more of a face's colour than its CLS token.
    x_train, x_test = train.features["mean"], test.features["mean"]
    res = fit_survival_probe(x_train, *times(train.labels["skin_tone"]), x_test,
                             *times(test.labels["skin_tone"]), **grid)
    assert res.c_index > 0.65
    null = fit_survival_probe(x_train, *times(train.labels["skin_tone"], True), x_test,
                              *times(test.labels["skin_tone"], True), **grid)
    assert abs(null.c_index - 0.5) < 0.08


def test_probe_during_training(tiny):
    from mefem_jax.evaluation.config import default_eval_config
    from mefem_jax.evaluation.online_probe import _held_images, probe_during_training

    cfg = default_eval_config()
    assert cfg.every_steps == 0  # off unless asked for
    cfg.max_images, cfg.features = 96, "cls,mean"
    first = probe_during_training(tiny.encoder, tiny.params, cfg)
    expected = {f"probe_{t}_{m}{s}" for t in ("face_width", "skin_tone") for m in ("mae", "r2") for s in ("", "_mean")}
    expected |= {"rankme_cls", "rankme_mean", "rankme_patch"}
    assert expected <= set(first) and all(np.isfinite(first[k]) for k in expected)

    compiled = embed_batch._cache_size()
    again = probe_during_training(tiny.encoder, tiny.params, cfg)
    assert embed_batch._cache_size() == compiled  # same forward, no recompile
    assert {k: again[k] for k in expected} == {k: first[k] for k in expected}
    other = probe_during_training(tiny.encoder, load_encoder(TINY + ",seed=1").params, cfg)
    assert other["probe_skin_tone_mae"] != first["probe_skin_tone_mae"]

    # The images held as uint8 embed exactly like a fresh read of the same data.
    held = _held_images(cfg.test, 64, cfg, "test")
    fresh = open_eval_data(f"synthetic:split=test,limit={cfg.max_images}", 64, cfg.batch_size, "test")
    np.testing.assert_array_equal(compute_embeddings(tiny.encoder, tiny.params, held).features["cls"],
                                  compute_embeddings(tiny.encoder, tiny.params, fresh).features["cls"])

"""`python -m mefem_jax.export`: a training run -> a folder timm loads, with the JAX encoder's features.

One short real training run (test_resume.py's reference run, made once per session) is exported
in several ways; every export is a subprocess of the real command line.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers.repo import REPO
from helpers.runs import TOTAL, reference_run, subprocess_env
from mefem_jax.models.vit import encoder_from_config, unstack_blocks
from mefem_jax.training.checkpoint import load_params_for_eval
from mefem_jax.weights.encoders import load_encoder_params
from mefem_jax.weights.release import save_pth, timm_config
from mefem_jax.weights.timm_import import import_timm
from mefem_jax.weights.timm_keys import params_to_timm

torch = pytest.importorskip("torch")
timm = import_timm()



@pytest.fixture(scope="module")
def env() -> dict:
    return subprocess_env()


@pytest.fixture(scope="module")
def workdir(env, tmp_path_factory) -> Path:
    """A finished 20-step run of the tiny smoke model (checkpoints at 12, 16 and 20), shared with
    test_resume.py; read only."""
    return reference_run(env, tmp_path_factory)


def export(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mefem_jax.export", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def rel_err(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


def timm_model(folder: Path, weights: str | None = "model.safetensors"):
    """The exported architecture, built from config.json the way a timm user would."""
    config = json.loads((folder / "config.json").read_text())
    kwargs = dict(num_classes=0, global_pool="token", **config.get("model_args", {}))
    if weights:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(folder / weights)))
    return timm.create_model(config["architecture"], **kwargs).eval()


def cls_features(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(images).permute(0, 3, 1, 2)).numpy()


def test_export_from_a_workdir_loads_in_timm_with_the_jax_features(env, workdir, tmp_path, faces, forward):
    out = tmp_path / "export"
    done = export(env, f"--workdir={workdir}", f"--out={out}", "--format=safetensors,pth")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.pth.tar",
                                                      "model.safetensors"]

    params, config, step = load_params_for_eval(workdir, "target")
    assert step == TOTAL
    model_cfg = config["model"]
    images = faces(4, model_cfg["image_size"])
    encoder = encoder_from_config(ml_collections.ConfigDict(model_cfg))
    jax_cls = forward(encoder, params, images)[:, 0]

    by_file = timm_model(out)
    assert rel_err(cls_features(by_file, images), jax_cls) <= 1e-5
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # config.json + weights only
    np.testing.assert_array_equal(cls_features(by_dir, images), cls_features(by_file, images))

    # MeFEm's own format: a flat state dict that loads strictly into the same architecture.
    by_pth = timm_model(out, weights=None)
    by_pth.load_state_dict(torch.load(out / "model.pth.tar", map_location="cpu", weights_only=True), strict=True)
    np.testing.assert_array_equal(cls_features(by_pth, images), cls_features(by_file, images))

    card = (out / "README.md").read_text()
    for expected in ("target (EMA) encoder", f"step {TOTAL}", "training data: synthetic",
                     f"{TOTAL} of {TOTAL} at global batch 8", "mask strategy: stripes", "smooth_l1",
                     "p_target=", "timm.create_model", "pretrained_cfg_overlay"):
        assert expected in card, f"{expected!r} not in the model card:\n{card}"


def test_export_one_step_folder_and_the_context_encoder(env, workdir, tmp_path):
    out = tmp_path / "export"
    done = export(env, f"--checkpoint={workdir / 'checkpoints' / '12'}", "--which=context", f"--out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    params, config, _ = load_params_for_eval(workdir, "context", step=12)
    expected = params_to_timm(params, ml_collections.ConfigDict(config["model"]))
    written = load_file(str(out / "model.safetensors"))
    assert sorted(written) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(written[key], expected[key], err_msg=key)
    target, _, _ = load_params_for_eval(workdir, "target", step=12)
    assert not np.array_equal(jax.tree.leaves(target)[0], jax.tree.leaves(params)[0])  # a real choice
    card = (out / "README.md").read_text()
    assert "context (online) encoder" in card and "step 12" in card


def test_a_training_run_loads_as_encoder_params_in_either_block_layout(workdir):
    """`init_from` may name a run or one of its steps: encoders.load_encoder_params reads it and fits
    it to the new run's model config, scanned or not, through the timm layout."""
    params, config, _ = load_params_for_eval(workdir, "target", step=12)
    unrolled = unstack_blocks(params)
    for scan in (False, True):
        model_cfg = ml_collections.ConfigDict(dict(config["model"], scan_layers=scan))
        loaded = load_encoder_params(workdir / "checkpoints" / "12", model_cfg)
        got = unstack_blocks(loaded)
        assert ("blocks" in loaded) == scan
        assert jax.tree.structure(got) == jax.tree.structure(unrolled)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(unrolled)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    newest = load_encoder_params(workdir, ml_collections.ConfigDict(config["model"]))  # the run: step 20
    assert not np.array_equal(np.asarray(jax.tree.leaves(newest)[0]), np.asarray(jax.tree.leaves(params)[0]))


def test_export_converts_a_foreign_file(env, workdir, tmp_path):
    """A MeFEm-style .pth.tar with nothing beside it -> the timm folder of the same encoder."""
    params, config, _ = load_params_for_eval(workdir, "target")
    model_cfg = ml_collections.ConfigDict(config["model"])
    pth = tmp_path / "MeFEm-tiny.pth.tar"
    save_pth(params_to_timm(params, model_cfg), pth)
    out = tmp_path / "export"
    # Width 64 is no standard ViT width, so the head count must be given.
    done = export(env, f"--checkpoint={pth}:heads=2", f"--out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    expected, written = params_to_timm(params, model_cfg), load_file(str(out / "model.safetensors"))
    assert sorted(written) == sorted(expected) and all(np.array_equal(written[k], expected[k]) for k in expected)
    assert json.loads((out / "config.json").read_text()) == timm_config(model_cfg)


@pytest.mark.parametrize("args, message", [
    (["--workdir={tmp}/absent"], "does not exist"),
    (["--workdir={workdir}", "--step=5"], "no checkpoint for step 5"),
    (["--workdir={workdir}", "--format=safetensors,onnx"], "unknown --format ['onnx']"),
    (["--workdir={workdir}", "--checkpoint={workdir}/checkpoints/12"], "exactly one of --workdir or --checkpoint"),
    (["--checkpoint={tmp}/weights.bin"], "unknown model spec"),
    (["--workdir={workdir}", "--which=online"], "--which"),
])
def test_export_errors_are_clear(env, workdir, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, workdir=workdir) for a in args]
    done = export(env, *args, f"--out={tmp_path / 'out'}")
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_export_overwrites_an_earlier_export_only_when_asked(env, workdir, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    for name in ("model.safetensors", "model.pth.tar"):
        (out / name).write_bytes(b"an earlier export")
    done = export(env, f"--workdir={workdir}", f"--out={out}")
    assert done.returncode != 0 and "--overwrite" in done.stderr
    assert (out / "model.safetensors").read_bytes() == b"an earlier export"

    assert export(env, f"--workdir={workdir}", f"--out={out}", "--overwrite").returncode == 0
    assert set(load_file(str(out / "model.safetensors"))) >= {"cls_token", "pos_embed", "norm.weight"}
    assert not (out / "model.pth.tar").exists()  # not asked for, and would no longer match

"""A fine-tuned encoder with its linear head -> a timm folder that gives our logits (weights/classifier.py).

A tiny random encoder and a random head over [regression 1 + classification 3] columns, for both readouts:
timm, loading the folder with no custom code, must give the JAX forward's logits on real faces.
"""
from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from safetensors.numpy import load_file

from helpers.runs import run_module
from mefem_jax.models.vit import encoder_from_config
from mefem_jax.weights.classifier import (check_outputs, classifier_state_dict, export_classifier_folder,
                                          finetuned_workdir, load_finetuned)
from mefem_jax.weights.timm_import import import_timm
from mefem_jax.weights.timm_keys import ConversionError

torch = pytest.importorskip("torch")
timm = import_timm()

OUTPUTS = [
    {"name": "age", "kind": "regression", "index": 0, "size": 1, "mean": 33.3, "std": 19.9},
    {"name": "race", "kind": "classification", "index": 1, "size": 3, "classes": ["white", "black", "asian"]},
]
K = 4
TOLERANCE = 1e-4  # fp32 on both sides; measured about 1e-6


@pytest.fixture
def finetuned(model_cfg, random_params):
    """(model_cfg, params): the tiny encoder with every leaf random, and a random head of K columns."""
    cfg = model_cfg()
    abstract = jax.eval_shape(encoder_from_config(cfg).init, jax.random.key(0),
                              jnp.zeros((1, cfg.image_size, cfg.image_size, 3)))["params"]
    rng = np.random.default_rng(7)
    head = {"kernel": rng.standard_normal((64, K)).astype(np.float32) * 0.5,
            "bias": rng.standard_normal(K).astype(np.float32)}
    return cfg, {"encoder": random_params(abstract, 1), "head": head}


def jax_logits(forward, cfg, params, images, readout):
    tokens = forward(encoder_from_config(cfg), params["encoder"], images)  # [B, 1+N, D], final-normed
    feature = (tokens[:, 0] if readout == "cls" else tokens[:, 1:].mean(axis=1)).astype(np.float64)
    head = params["head"]
    if "input_mean" in head:  # the fine-tune's fixed input standardisation, as finetuning/model.py applies it
        feature = (feature - head["input_mean"]) / head["input_std"]
    return feature @ head["kernel"] + head["bias"]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def timm_logits(model, images) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.tensor(images).permute(0, 3, 1, 2)).numpy()


@pytest.mark.parametrize("readout", ["cls", "mean"])
def test_timm_loads_the_folder_and_gives_our_logits(finetuned, faces, utkface_dir, forward, tmp_path, readout):
    cfg, params = finetuned
    if readout == "mean":  # a head with its fixed input standardisation: the export folds it into head.weight
        rng = np.random.default_rng(3)
        params = dict(params, head=dict(params["head"], input_mean=rng.standard_normal(64).astype(np.float32),
                                         input_std=rng.uniform(0.05, 2.0, 64).astype(np.float32)))
    folder = export_classifier_folder(params, cfg, readout, OUTPUTS, tmp_path / "export",
                                      card={"data": "UTKFace (test)"})
    config = json.loads((folder / "config.json").read_text())
    assert config["mefem_outputs"] == OUTPUTS and config["mefem_readout"] == readout
    assert config["num_classes"] == K and config["label_names"] == ["age", "race=white", "race=black", "race=asian"]
    readme = (folder / "README.md").read_text()
    assert "logits[:, 0] * 19.9 + 33.3" in readme and "logits[:, 1:4].softmax(-1)" in readme

    images = faces(4, cfg.image_size)
    ours = jax_logits(forward, cfg, params, images, readout)
    # weight_init="skip": the loads below must then supply every tensor, the head's included.
    for kwargs in ({}, {"num_classes": K}):
        model = timm.create_model(f"local-dir:{folder}", pretrained=True, weight_init="skip", **kwargs)
        assert model.num_classes == K and model.global_pool == {"cls": "token", "mean": "avg"}[readout]
        # The final norm before the pooling, none after: the mean of normed tokens, as ours.
        assert isinstance(model.fc_norm, torch.nn.Identity) and not isinstance(model.norm, torch.nn.Identity)
        assert list(model.pretrained_cfg["label_names"]) == config["label_names"]
        diff = float(np.abs(timm_logits(model, images) - ours).max())
        print(f"{readout} {kwargs}: max |timm - jax| = {diff:.2e}")
        assert diff <= TOLERANCE

    # The model card's snippet, run as written on the same faces given as PIL images, decodes our logits.
    snippet = readme.split("```python\n")[1].split("```")[0].replace("/path/to/this/folder", str(folder))
    with open(utkface_dir / "labels.csv", newline="") as f:  # the files of `faces`: the test split's first
        names = [row["file"] for row in csv.DictReader(f) if row["split"] == "test"]
    pil_images = [Image.open(utkface_dir / "images" / name).convert("RGB") for name in names[:4]]
    scope = {"pil_images": pil_images}
    exec(snippet, scope)
    np.testing.assert_allclose(scope["age"].numpy(), ours[:, 0] * 19.9 + 33.3, atol=19.9 * TOLERANCE)
    np.testing.assert_allclose(scope["race_probs"].numpy(), softmax(ours[:, 1:]), atol=TOLERANCE)
    assert scope["race"] == [OUTPUTS[1]["classes"][i] for i in ours[:, 1:].argmax(-1)]


def test_a_finetune_workdir_exports_through_the_command(finetuned, tmp_path):
    cfg, params = finetuned
    workdir = tmp_path / "finetune"
    with ocp.StandardCheckpointer() as checkpointer:  # as the fine-tune writes it: device arrays
        checkpointer.save(workdir / "best" / "params", jax.tree.map(jnp.asarray, params))
    best = {"step": 120, "readout": "mean", "model": cfg.to_dict(), "outputs": OUTPUTS,
            "val": {"age_mae": 6.5, "race_acc": 0.8}, "init": "random:vitti"}
    (workdir / "best" / "best.json").write_text(json.dumps(best))

    loaded, model_cfg, readout, outputs, best_read = load_finetuned(workdir)
    assert readout == "mean" and outputs == OUTPUTS and best_read == best
    assert {k: model_cfg[k] for k in ("variant", "image_size", "patch_size", "width", "depth", "heads")} == \
        {k: cfg[k] for k in ("variant", "image_size", "patch_size", "width", "depth", "heads")}
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        assert isinstance(a, np.ndarray)
        np.testing.assert_array_equal(a, b)
    assert finetuned_workdir(str(workdir / "best")) == finetuned_workdir(str(workdir)) == str(workdir)

    out = tmp_path / "export"
    done = run_module("mefem_jax.export", f"--workdir={workdir}", f"--out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["num_classes"] == K
    written = load_file(out / "model.safetensors")
    expected = classifier_state_dict(params, cfg)
    assert set(written) == set(expected) and list(expected)[-2:] == ["head.weight", "head.bias"]
    for key, value in expected.items():
        np.testing.assert_array_equal(written[key], value)
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["global_pool"] == "avg" and config["model_args"]["fc_norm"] is False
    readme = (out / "README.md").read_text()
    assert "best step 120" in readme and "age_mae=6.5" in readme


def test_refusals_name_what_is_wrong(finetuned, tmp_path):
    cfg, params = finetuned
    with pytest.raises(ValueError, match="holds no fine-tuned head"):
        finetuned_workdir(str(tmp_path), require=True)
    assert finetuned_workdir(str(tmp_path)) is None
    with pytest.raises(ConversionError, match="a fine-tuned model has 'encoder' and 'head'"):
        classifier_state_dict(params["encoder"], cfg)
    with pytest.raises(ConversionError, match=r"head/kernel: shape \(32, 4\)"):
        classifier_state_dict(dict(params, head={"kernel": np.zeros((32, K)), "bias": np.zeros(K)}), cfg)
    with pytest.raises(ConversionError, match=r"head/input_mean/input_std: shapes \[\(32,\), \(64,\)\]"):
        classifier_state_dict(dict(params, head=dict(params["head"], input_mean=np.zeros(32), input_std=np.ones(64))),
                              cfg)
    with pytest.raises(ConversionError, match=r"head holds \['bias', 'input_mean', 'kernel'\]"):
        classifier_state_dict(dict(params, head=dict(params["head"], input_mean=np.zeros(64))), cfg)
    bad = [dict(OUTPUTS[0], std=None), dict(OUTPUTS[1], index=2, classes=["a", "b"])]
    with pytest.raises(ConversionError) as info:
        check_outputs(bad)
    assert info.value.problems == [
        "outputs[0] (age): a regression output needs a numeric 'std', got None",
        "outputs[1] (race): 'index' is 2; the columns before it end at 1",
        "outputs[1] (race): 'classes' must list 3 class name(s), got ['a', 'b']"]
    with pytest.raises(ConversionError, match="the outputs describe 4 column.s.; the head has 5"):
        check_outputs(OUTPUTS, num_classes=5)
    with pytest.raises(ValueError, match="readout must be one of"):
        export_classifier_folder(params, cfg, "max", OUTPUTS, tmp_path / "out")
    assert not (tmp_path / "out").exists()

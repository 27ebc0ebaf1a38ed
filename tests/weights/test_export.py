"""Export / import through the timm key table: round trips, timm loading, and refusals."""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mefem_jax.weights.encoders import load_encoder_params
from mefem_jax.weights.release import export_folder
from mefem_jax.weights.timm_keys import (KEY_TABLE, ConversionError, jax_to_timm_key, params_to_timm, timm_layout,
                                        timm_to_jax_key, timm_to_params)
from mefem_jax.models.vit import encoder_from_config
from mefem_jax.weights.timm_import import import_timm

torch = pytest.importorskip("torch")
timm = import_timm()

# (model_cfg fields, timm kwargs that build the same model): ViT-Ti/16 at 224, and a tiny
# custom encoder at 112 px that timm builds from model_args.
CASES = {
    "Ti-224": (dict(image_size=224, width=None, depth=None, heads=None), {}),
    "w64d2-112": (dict(), dict(img_size=112, embed_dim=64, depth=2, num_heads=2)),
}


@pytest.fixture
def jax_features(forward):
    return lambda cfg, params, images: forward(encoder_from_config(cfg), params, images)


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(np.asarray(b, np.float64)).max())


def torch_features(model, images) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model.forward_features(torch.tensor(images).permute(0, 3, 1, 2)).numpy()


def make_params(cfg, random_params, seed=0):
    model = encoder_from_config(cfg)
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    return random_params(jax.eval_shape(model.init, jax.random.key(0), x)["params"], seed)


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- the table ----------------------------------------------------------------------------------

def test_key_table_covers_timm_both_ways():
    with torch.device("meta"):  # keys only: no memory, no init
        model = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="token",
                                  embed_dim=64, depth=3, num_heads=2)
    for key in model.state_dict():
        path, kind = timm_to_jax_key(key)
        assert jax_to_timm_key(path) == (key, kind)
    assert timm_to_jax_key("head.weight") is None and jax_to_timm_key("blocks_0/ls1/gamma") is None
    assert len({j for j, _, _ in KEY_TABLE}) == len({t for _, t, _ in KEY_TABLE}) == len(KEY_TABLE)


@pytest.mark.parametrize("posemb", ["sincos", "learn"])
def test_round_trip_is_exact(model_cfg, random_params, posemb):
    cfg = model_cfg(posemb=posemb)
    params = make_params(cfg, random_params)
    state_dict = params_to_timm(params, cfg)
    assert list(state_dict)[:5] == ["cls_token", "pos_embed", "patch_embed.proj.weight",
                                    "patch_embed.proj.bias", "blocks.0.norm1.weight"]
    assert list(state_dict)[-2:] == ["norm.weight", "norm.bias"]
    assert all(v.dtype == np.float32 for v in state_dict.values())
    assert_trees_equal(timm_to_params(state_dict, cfg), params)
    assert_trees_equal(params_to_timm({"params": params}, cfg), state_dict)


# -- writing folders that timm loads ------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_exported_folder_loads_in_timm_without_custom_code(model_cfg, random_params, faces, jax_features,
                                                            tmp_path, case):
    fields, timm_kwargs = CASES[case]
    cfg = model_cfg(**fields)
    params = make_params(cfg, random_params, seed=2)
    folder = export_folder(params, cfg, tmp_path / "export", formats=("safetensors", "pth"),
                           card={"data": "UTKFace (test)", "steps": 0})
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "model.pth.tar",
                                                  "config.json", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["global_pool"] == "token"
    assert config["pretrained_cfg"]["input_size"] == [3, cfg.image_size, cfg.image_size]
    assert config.get("model_args", {}) == timm_kwargs
    readme = (folder / "README.md").read_text()
    assert "UTKFace (test)" in readme and "vit_tiny_patch16_224" in readme

    images = faces(2, cfg.image_size)
    ours = jax_features(cfg, params, images)
    # weight_init="skip" only saves timm's random init (seconds on a CPU); the loads below
    # must then provide every tensor, or the features come out as garbage.
    # 1. The weights file alone, through timm's own pretrained loader.
    by_file = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, global_pool="token",
                                pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors")),
                                weight_init="skip", **timm_kwargs)
    assert rel_err(ours[:, 0], torch_features(by_file, images)[:, 0]) <= 1e-5
    # 2. The folder, config.json included: architecture, model_args and preprocessing from it.
    by_dir = timm.create_model(f"local-dir:{folder}", pretrained=True, weight_init="skip")
    assert by_dir.num_classes == 0
    assert tuple(by_dir.pretrained_cfg["input_size"]) == (3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        cls = by_dir(torch.tensor(images).permute(0, 3, 1, 2)).numpy()
    assert rel_err(ours[:, 0], cls) <= 1e-5
    # 3. MeFEm's format: a flat .pth.tar that a timm model takes with strict=True, holding the
    # very tensors that gave the features above.
    pth = torch.load(folder / "model.pth.tar", weights_only=True)
    by_dir.load_state_dict(pth, strict=True)
    assert list(pth) == list(by_file.state_dict())
    for key, value in by_file.state_dict().items():
        assert torch.equal(pth[key], value), key
    # ...and each file imports back to the same params.
    for name in ("model.safetensors", "model.pth.tar"):
        assert_trees_equal(load_encoder_params(folder / name, cfg), params)
    assert_trees_equal(load_encoder_params(folder, cfg), params)


def test_export_refuses_bad_params_before_writing(model_cfg, random_params, tmp_path):
    cfg = model_cfg()
    params = make_params(cfg, random_params)
    bad = dict(params, extra={"kernel": np.zeros((2, 2))}, cls_token=np.zeros((1, 1, 32)))
    bad.pop("norm")
    with pytest.raises(ConversionError) as info:
        export_folder(bad, cfg, tmp_path / "out")
    assert set(info.value.problems) == {"unexpected parameter extra/kernel (no row in KEY_TABLE)",
                                        "missing parameter norm/scale", "missing parameter norm/bias",
                                        "cls_token: shape (1, 1, 32), the model has (1, 1, 64)"}
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="onnx"):
        export_folder(params, cfg, tmp_path / "out", formats=("onnx",))


# -- reading checkpoints written by others ------------------------------------------------------

@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_timm_checkpoint_imports_and_reproduces_timm(model_cfg, faces, jax_features, tmp_path, wrapper):
    cfg = model_cfg(posemb="learn")  # timm's pos_embed is learned (random here)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="token",
                                  **CASES["w64d2-112"][1])
    state_dict = {k: v.clone() for k, v in reference.state_dict().items()}
    for k, v in state_dict.items():  # timm inits biases to 0 and LN to (1, 0): make them count
        if k.endswith("bias") or "norm" in k:
            v.add_(0.1 * torch.randn_like(v))
    reference.load_state_dict(state_dict)
    torch.save(state_dict if wrapper is None else {wrapper: state_dict, "epoch": 7}, tmp_path / "m.pth.tar")

    params = load_encoder_params(tmp_path / "m.pth.tar", cfg)
    images = faces(2, cfg.image_size)
    assert rel_err(jax_features(cfg, params, images), torch_features(reference, images)) <= 1e-5
    # A learned table cannot go into a sin-cos model: refused, with the way out in the message.
    with pytest.raises(ConversionError, match="model.posemb=learn"):
        load_encoder_params(tmp_path / "m.pth.tar", model_cfg(posemb="sincos"))


def test_ijepa_checkpoint_imports_with_fresh_cls(model_cfg, random_params, tmp_path, caplog):
    """Official I-JEPA layout: encoder / target_encoder / predictor under `module.`, no CLS token
    and a sin-cos pos_embed without the CLS row."""
    cfg = model_cfg()
    target, context = make_params(cfg, random_params, seed=3), make_params(cfg, random_params, seed=4)

    def ijepa_encoder(params):
        sd = params_to_timm(params, cfg)
        sd.pop("cls_token")
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
        return {f"module.{k}": torch.tensor(v) for k, v in sd.items()}

    context_sd = ijepa_encoder(context)
    torch.save({"encoder": context_sd, "target_encoder": ijepa_encoder(target),
                "predictor": {"module.mask_token": torch.zeros(1, 1, 8)}, "epoch": 300,
                "opt": {"state": {}}, "lr": 1e-3}, tmp_path / "jepa-ep300.pth.tar")

    with caplog.at_level(logging.WARNING, logger="mefem_jax.weights.encoders"):
        imported = load_encoder_params(tmp_path / "jepa-ep300.pth.tar", cfg)
    assert "no cls_token" in caplog.text and "target_encoder" in caplog.text
    fresh = np.asarray(imported.pop("cls_token"))
    assert fresh.shape == (1, 1, 64) and 0 < np.abs(fresh).max() < 0.05
    target.pop("cls_token")
    assert_trees_equal(imported, target)

    # I-JEPA's "encoder" is what every loader here calls the context encoder.
    from_context = load_encoder_params(tmp_path / "jepa-ep300.pth.tar", cfg, which="context")
    from_context.pop("cls_token")
    context.pop("cls_token")
    assert_trees_equal(from_context, context)
    with pytest.raises(ValueError, match="'target' or 'context'"):
        load_encoder_params(tmp_path / "jepa-ep300.pth.tar", cfg, which="ema")
    torch.save({"encoder": context_sd, "predictor": {}}, tmp_path / "no-target.pth.tar")
    with pytest.raises(ConversionError, match=r"no 'target_encoder'; it holds \['encoder', 'predictor'\]"):
        load_encoder_params(tmp_path / "no-target.pth.tar", cfg)


# -- refusals list every problem ----------------------------------------------------------------

def test_wrong_width_lists_every_key(model_cfg, random_params):
    state_dict = params_to_timm(make_params(model_cfg(), random_params), model_cfg())
    with pytest.raises(ConversionError) as info:
        timm_to_params(state_dict, model_cfg(width=32))
    problems = info.value.problems
    assert len(problems) == len(state_dict)  # every single tensor has the wrong shape
    assert all("in the checkpoint" in p for p in problems)
    assert "blocks.1.attn.qkv.weight: shape (192, 64) in the checkpoint, (96, 32) in the model" in problems
    assert f"{len(state_dict)} problem(s)" in str(info.value)


def test_missing_block_extra_key_and_bad_shape_are_all_reported(model_cfg, random_params):
    cfg = model_cfg(depth=3)
    state_dict = params_to_timm(make_params(cfg, random_params), cfg)
    block1 = [k for k in state_dict if k.startswith("blocks.1.")]
    for k in block1:
        del state_dict[k]
    state_dict["extra.weight"] = np.zeros(3, np.float32)
    state_dict["head.weight"] = np.zeros((10, 64), np.float32)
    state_dict["blocks.3.norm1.weight"] = np.ones(64, np.float32)
    state_dict["norm.bias"] = np.zeros(65, np.float32)
    pos = state_dict["pos_embed"].copy()
    pos[0, 5, 0] += 0.5
    state_dict["pos_embed"] = pos

    with pytest.raises(ConversionError) as info:
        timm_to_params(state_dict, cfg)
    problems, message = info.value.problems, str(info.value)
    assert len(problems) == len(block1) + 3 + 1 + 1 == 17
    for k in block1:
        assert f"missing key {k}" in problems
    assert "unexpected key extra.weight (not a timm ViT encoder key)" in problems
    assert any(p.startswith("unexpected key head.weight (a classifier head") for p in problems)
    assert ("unexpected key blocks.3.norm1.weight (the configured encoder has no blocks_3/norm1/scale)"
            in problems)
    assert "norm.bias: shape (65,) in the checkpoint, (64,) in the model" in problems
    assert any(p.startswith("pos_embed differs from the fixed sin-cos table") for p in problems)
    assert all(p in message for p in problems)


def test_layout_matches_timm_model(model_cfg):
    """The expected layout (keys, order, shapes) is exactly what timm's model holds."""
    for fields, kwargs in CASES.values():
        cfg = model_cfg(**fields)
        with torch.device("meta"):  # keys and shapes only: no memory, no init
            reference = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="token",
                                          **kwargs).state_dict()
        layout = timm_layout(cfg)
        assert list(layout) == list(reference)
        assert {k: s for k, (s, _, _) in layout.items()} == {k: tuple(v.shape) for k, v in reference.items()}

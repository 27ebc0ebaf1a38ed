"""timm models as evaluation encoders (evaluation/timm_encoder.py) on real UTKFace faces: the readouts
against timm's own forward on a brute-force preprocessed input, a MeFEm-layout weights file through
timm against our own JAX encoder, one-line refusals, and the embedding cache."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mefem_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from mefem_jax.evaluation.data import open_eval_data
from mefem_jax.evaluation.embeddings import cached_embeddings, compute_embeddings
from mefem_jax.evaluation.timm_encoder import TimmSpecError, is_timm_spec, load_timm_encoder
from mefem_jax.models.vit import encoder_from_config
from mefem_jax.weights.encoders import load_encoder
from mefem_jax.weights.timm_import import import_timm
from mefem_jax.weights.timm_keys import ConversionError, params_to_timm

torch = pytest.importorskip("torch")
timm = import_timm()

# (spec, timm architecture, the kwargs timm.create_model takes for it, (image_size, input_size, grid)).
CASES = {
    # crop_pct 0.9 and mean/std 0.5: the crop and the re-normalisation both act
    "vit": ("timm:vit_tiny_patch16_224:img_size=32,patch_size=8,depth=2", "vit_tiny_patch16_224",
            dict(img_size=32, patch_size=8, depth=2), (35, 32, (4, 4))),
    # CLS + 4 registers before the patch tokens
    "dinov2_reg4": ("timm:vit_small_patch14_reg4_dinov2:img_size=28,depth=1,embed_dim=32,num_heads=2",
                    "vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=1, embed_dim=32, num_heads=2),
                    (28, 28, (2, 2))),
    # CNNs (timm's own small test_* builds of its ResNet and ConvNeXt classes) take no img_size: it sets
    # only the input side. ConvNeXt's head norms its pooled feature, so cls is not the mean there.
    "resnet": ("timm:test_resnet:img_size=64", "test_resnet", {}, (67, 64, (2, 2))),
    "convnext": ("timm:test_convnext:img_size=64", "test_convnext", {}, (67, 64, (2, 2))),
}


def area_pool(fmap: np.ndarray, g: int) -> np.ndarray:
    """Brute force: [B, h, w, D] -> [B, g*g*D], each cell the overlap-weighted mean of the cells under it."""
    b, h, w, d = fmap.shape
    out = np.zeros((b, g, g, d))
    for i in range(g):
        for j in range(g):
            total = 0.0
            for y in range(h):
                for x in range(w):
                    oy = max(0.0, min(y + 1, (i + 1) * h / g) - max(y, i * h / g))
                    ox = max(0.0, min(x + 1, (j + 1) * w / g) - max(x, j * w / g))
                    out[:, i, j] += oy * ox * fmap[:, y, x]
                    total += oy * ox
            out[:, i, j] /= total
    return out.reshape(b, -1)


@pytest.mark.parametrize("case", list(CASES))
def test_features_equal_timms_own_forward(case, faces):
    spec, arch, kwargs, (image_size, input_size, grid) = CASES[case]
    rng_state = torch.get_rng_state()
    encoder = load_timm_encoder(spec)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the seeded init leaves the caller's stream alone
    assert is_timm_spec(spec) and (encoder.image_size, encoder.input_size, encoder.grid) == (image_size, input_size,
                                                                                              grid)
    images = faces(3, image_size)
    got = encoder.features(images, grid_size=3)

    torch.manual_seed(0)  # the spec's default seed: timm's own init, built here independently
    reference = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval()
    config = timm.data.resolve_model_data_config(reference)
    top = int(round((image_size - input_size) / 2))
    pixels = images[:, top:top + input_size, top:top + input_size] * np.float64(IMAGENET_STD) + IMAGENET_MEAN
    x = torch.tensor(((pixels - config["mean"]) / config["std"]).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
        tokens = reference.forward_features(x)
        pooled = reference.forward_head(tokens, pre_logits=True).numpy()
    if tokens.ndim == 3:
        np.testing.assert_allclose(got["cls"], tokens[:, 0].numpy(), atol=1e-5, rtol=0)
        fmap = tokens[:, reference.num_prefix_tokens:].numpy().reshape(len(x), *grid, -1)
    else:
        fmap = tokens.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got["cls"], pooled, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["mean"], fmap.astype(np.float64).mean((1, 2)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["grid"], area_pool(fmap.astype(np.float64), 3), atol=1e-5, rtol=0)
    assert encoder.width == fmap.shape[-1] and {k: v.dtype for k, v in got.items()} == dict.fromkeys(got, np.float32)


def write_mefem(path, random_params, model_cfg, depth: int = 1, wrap: str = "flat", seed: int = 0) -> str:
    """One of our random encoders (32 px, 8 px patches, width 32) as a MeFEm-layout .pth.tar."""
    cfg = model_cfg(image_size=32, patch_size=8, width=32, depth=depth, heads=2)
    shapes = jax.eval_shape(encoder_from_config(cfg).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    state_dict = {k: torch.tensor(v) for k, v in params_to_timm(random_params(shapes["params"], seed), cfg).items()}
    if wrap == "target_encoder":  # an I-JEPA-style release: the EMA encoder, saved from DistributedDataParallel
        state_dict = {"target_encoder": {f"module.{k}": v for k, v in state_dict.items()}}
    elif wrap == "state_dict":
        state_dict = {"state_dict": state_dict, "epoch": torch.tensor(3)}
    torch.save(state_dict, str(path))
    return str(path)


TIMM_OF_OURS = "vit_tiny_patch16_224:img_size=32,patch_size=8,embed_dim=32,num_heads=2,crop_pct=1,normalize=imagenet"


def test_mefem_weights_through_timm_equal_our_encoder(tmp_path, utkface_dir, random_params, model_cfg):
    weights = write_mefem(tmp_path / "MeFEm-tiny.pth.tar", random_params, model_cfg, wrap="target_encoder")
    ours = load_encoder(f"{weights}:heads=2")
    theirs = load_timm_encoder(f"timm:{TIMM_OF_OURS},depth=1,weights={weights}")
    assert (theirs.image_size, theirs.input_size, theirs.grid, theirs.width, theirs.depth, theirs.heads) == (
        ours.image_size, 32, ours.encoder.grid, 32, 1, 2)
    for wrap in ("flat", "state_dict"):  # every wrapping of the same tensors loads the same model
        other = write_mefem(tmp_path / f"{wrap}.pth.tar", random_params, model_cfg, wrap=wrap)
        loaded = load_timm_encoder(f"timm:{TIMM_OF_OURS},depth=1,weights={other}").model.state_dict()
        assert all(torch.equal(v, loaded[k]) for k, v in theirs.model.state_dict().items())
    # 6 faces in batches of 4: the short last batch too
    data = open_eval_data(f"{utkface_dir}:split=test,limit=6", ours.image_size, 4)
    got = theirs.embed(data, pixel_size=8, grid_size=3)
    want = compute_embeddings(ours.encoder, ours.params, data, pixel_size=8, grid_size=3)
    for name in ("cls", "mean", "grid"):
        np.testing.assert_allclose(got.features[name], want.features[name], atol=1e-4, rtol=0, err_msg=name)
    np.testing.assert_allclose(got.features["pixels"], want.features["pixels"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got.ids, want.ids)
    assert list(got.labels) == list(want.labels) and all(
        np.array_equal(got.labels[c], want.labels[c]) for c in got.labels)
    assert got.tokens.count == want.tokens.count == 6 * 16
    np.testing.assert_allclose(got.tokens.gram, want.tokens.gram, rtol=1e-4, atol=1e-3)
    assert got.tokens.rankme() == pytest.approx(want.tokens.rankme(), rel=1e-3)  # ours: a float32 Gram


@pytest.mark.parametrize("spec, message", [
    ("timm:vit_tiny_patch16_2244", "timm has no architecture 'vit_tiny_patch16_2244'; close names: "
                                   "vit_tiny_patch16_224"),
    ("timm:resnet18:colour=1", "unknown option(s) ['colour']; allowed: ['img_size', 'patch_size'"),
    ("timm:resnet18:img_size=big", "img_size must be an integer, got 'big'"),
    ("timm:resnet18:crop_pct=1.5", "crop_pct must be in (0, 1], got 1.5"),
    ("timm:resnet18:normalize=hsv", "normalize must be one of model, imagenet, inception, clip; got 'hsv'"),
    ("timm:resnet18:depth=2", "timm cannot build resnet18 with {'depth': 2}: "),
    ("timm:vit_tiny_patch16_224:img_size=32,depth=1,global_pool=", "is not key=value"),
])
def test_bad_spec_is_one_line(spec, message):
    with pytest.raises(TimmSpecError) as err:
        load_timm_encoder(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("depth, spec_depth, embed_dim, message", [
    (1, 2, 32, "missing keys: blocks.1.norm1.weight, blocks.1.norm1.bias, blocks.1.attn.qkv.weight (+9 more)"),
    (2, 1, 48, "unexpected keys: blocks.1.norm1.weight, blocks.1.norm1.bias, blocks.1.attn.qkv.weight (+9 more); "
               "shape mismatch (file vs model): cls_token (1, 1, 32) vs (1, 1, 48)"),
])
def test_weights_that_do_not_fit_are_named(depth, spec_depth, embed_dim, message, tmp_path, random_params,
                                           model_cfg):
    weights = write_mefem(tmp_path / "w.pth.tar", random_params, model_cfg, depth=depth)
    with pytest.raises(ConversionError) as err:
        load_timm_encoder(f"timm:vit_tiny_patch16_224:img_size=32,patch_size=8,embed_dim={embed_dim},"
                          f"depth={spec_depth},num_heads=2,weights={weights}")
    assert f"{weights} does not fit timm's vit_tiny_patch16_224: {message}" in str(err.value)
    assert "\n" not in str(err.value)


def test_cached_embeddings_of_a_timm_model(tmp_path, utkface_dir):
    spec = f"timm:{TIMM_OF_OURS},depth=1"  # 32 px, as above: the pixel readout is compiled already
    encoder = load_timm_encoder(spec)
    data = open_eval_data(f"{utkface_dir}:split=test,limit=5", encoder.image_size, 4)
    first, path, hit = cached_embeddings(encoder, data, tmp_path / "cache", pixel_size=8, grid_size=2)
    assert not hit and path.is_file()
    reloaded = load_timm_encoder(spec)
    again, path2, hit = cached_embeddings(reloaded, data, tmp_path / "cache", 8, 2)
    fresh, _, _ = cached_embeddings(reloaded, data, None, 8, 2)  # the same seed rebuilds the same model
    assert hit and path2 == path
    for name in first.features:
        np.testing.assert_array_equal(again.features[name], first.features[name])
        np.testing.assert_array_equal(fresh.features[name], first.features[name])
    np.testing.assert_array_equal(again.tokens.gram, first.tokens.gram)
    np.testing.assert_array_equal(again.ids, first.ids)
    other, path3, hit = cached_embeddings(load_timm_encoder(spec + ",seed=1"), data, tmp_path / "cache", 8, 2)
    assert not hit and path3 != path and not np.allclose(other.features["cls"], first.features["cls"])


def test_a_machine_without_timm_gets_one_line_naming_the_extra(monkeypatch):
    """A base install (no torch extra): `import timm` fails, and the spec is refused in one line."""
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` meets where it is not installed
    with pytest.raises(TimmSpecError, match=r"timm models need torch and timm .*pip install -e '\.\[torch\]'"):
        load_timm_encoder("timm:vit_tiny_patch16_224")

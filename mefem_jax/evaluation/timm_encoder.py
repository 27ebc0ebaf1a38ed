"""Any timm image model as a frozen evaluation encoder: `--model=timm:ARCH[:options]`.

    timm:vit_small_patch14_reg4_dinov2:weights=dinov2_s.safetensors
    timm:vit_small_patch16_224:weights=MeFEm-S.pth.tar,crop_pct=1,normalize=imagenet
    timm:resnet18:img_size=112,seed=1              timm's random init (pretrained=False: never downloads)

Options: weights= a .safetensors / .pth / .pth.tar state dict, flat or wrapped (files.read_state_dict:
encoder / target_encoder / state_dict / model, a `module.` prefix), loaded strictly into the headless
model (a classifier head in the file is dropped); without it, seed= (default 0) seeds timm's random init
in a forked torch RNG, so the caller's stream is untouched. img_size= patch_size= embed_dim= depth=
num_heads= reg_tokens= global_pool= go to timm.create_model (img_size only where the model takes it, a
ViT's position table; a CNN just sees images of that side). crop_pct= and normalize=model|imagenet|
inception|clip replace the data config's, for weights trained with other preprocessing (MeFEm: 1, imagenet).

Preprocessing is the model's data config (resolve_model_data_config: input_size, crop_pct, mean, std),
split between our loader and `features`: the loader resizes the face crop's centre square to
`image_size = floor(input_size / crop_pct)` (timm's own scale size) and ImageNet-normalises it, as for
every encoder; `features` centre-crops `input_size` (torchvision's rounding) and maps ImageNet
normalisation to the model's (an affine map, exact up to float rounding). For a square image timm's
crop modes (center, squash, border) are all this resize + centre crop. What differs from timm's own
eval transform is the resize filter: our loader's PIL bilinear (data/augment.py) where the config
usually says bicubic. Both resample the same square to the same size and differ only in how sharp edges
come out; every model compared sees the faces through that same loader, so comparisons stay like for
like (the effect on a pretrained model's probe scores is not measured here).

Readouts, as close to our ViT's (embeddings.py) as the model allows:
    cls     the model's pooled pre-logits feature, forward_head(forward_features(x), pre_logits=True):
            for a ViT pooled by its token (DINOv2, CLIP towers, MeFEm), the final-normed CLS token as
            ours; for CNNs and avg-pooled ViTs (no CLS), the model's own pooled feature
    mean    the mean of the patch tokens (prefix tokens, CLS and registers, left out:
            model.num_prefix_tokens), or the spatial mean of a CNN's final feature map
    grid    those patch tokens, or the feature map's cells, pooled to grid_size^2 with
            embeddings.pooling_matrix's area weights, as grid_pool does
    pixels  embed_batch's baseline: the loader's image (before the crop) area-downsampled by the same
            jax.image.resize call, equal to a JAX run's at the same image size up to float rounding
The patch tokens (a CNN's feature-map cells) also give RankMe's TokenStats. Torch runs on the CPU in
eval mode, fp32, under no_grad, at the batch size given; torch's thread settings are left alone.
"""
from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mefem_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from mefem_jax.evaluation.data import DataSpecError
from mefem_jax.evaluation.embeddings import FEATURES, Embeddings, pooling_matrix
from mefem_jax.evaluation.rankme import TokenStats
from mefem_jax.spec_options import split_options
from mefem_jax.weights.files import folder_weights, read_state_dict
from mefem_jax.weights.spec import ModelSpecError
from mefem_jax.weights.timm_keys import ConversionError

PREFIX = "timm:"
# Option -> its type. The first group goes to timm.create_model; the rest is ours (module docstring).
_MODEL_OPTIONS = {"img_size": int, "patch_size": int, "embed_dim": int, "depth": int, "num_heads": int,
                  "reg_tokens": int, "global_pool": str}
_OPTIONS = {**_MODEL_OPTIONS, "weights": str, "seed": int, "crop_pct": float, "normalize": str}
# normalize=: the mean / std timm's data constants name (timm.data.constants).
NORMALIZE = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
             "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
             "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}


class TimmSpecError(ModelSpecError):
    """A `timm:` spec that names no model we can build: architecture, option or value."""


def is_timm_spec(text: str) -> bool:
    return str(text).strip().startswith(PREFIX)


def _parse(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """'timm:ARCH:k=v,...' -> (arch, timm.create_model kwargs, our own options), typed and checked."""
    head, opts = split_options(spec, TimmSpecError)
    arch = head[len(PREFIX):].strip()
    unknown = sorted(set(dict(opts)) - set(_OPTIONS))
    if not arch or unknown:
        raise TimmSpecError(f"model spec {spec!r}: " + (f"unknown option(s) {unknown}; allowed: {list(_OPTIONS)}"
                                                        if arch else "expected timm:ARCH[:key=value,...]"))
    values: dict[str, Any] = {"seed": 0, "normalize": "model"}
    for key, text in opts:
        kind = _OPTIONS[key]
        try:
            if kind is int and not text.isdigit():  # int() would take "-1" and "+2"
                raise ValueError(text)
            values[key] = kind(text)
        except ValueError:
            raise TimmSpecError(f"model spec {spec!r}: {key} must be "
                                f"{'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if not 0.0 < values.get("crop_pct", 1.0) <= 1.0:
        raise TimmSpecError(f"model spec {spec!r}: crop_pct must be in (0, 1], got {values['crop_pct']}")
    if values["normalize"] not in ("model", *NORMALIZE):
        raise TimmSpecError(f"model spec {spec!r}: normalize must be one of model, {', '.join(NORMALIZE)}; "
                            f"got {values['normalize']!r}")
    if "weights" in values and "seed" in dict(opts):
        raise TimmSpecError(f"model spec {spec!r}: seed= sets a random init; weights= leaves nothing random")
    kwargs = {k: values.pop(k) for k in list(values) if k in _MODEL_OPTIONS}
    return arch, kwargs, values


def load_timm_encoder(spec: str) -> TimmEncoder:
    """Build the model a `timm:` spec names (module docstring), with its weights and preprocessing."""
    # torch and timm load only when a timm model is asked for: every other evaluation runs without them.
    from mefem_jax.weights.timm_import import import_timm
    try:
        timm = import_timm()
        import torch
    except ImportError as err:  # a base install: one line naming the extra, not a traceback
        raise TimmSpecError(f"model spec {spec!r}: timm models need torch and timm ({err}); install them with "
                            "pip install -e '.[torch]'") from err
    from timm.data import resolve_model_data_config

    spec = str(spec).strip()
    arch, kwargs, own = _parse(spec)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        raise TimmSpecError(f"model spec {spec!r}: timm has no architecture {arch!r}"
                            + (f"; close names: {', '.join(close)}" if close else ""))
    model = _create(timm, torch, spec, arch, kwargs, own["seed"])
    identity: dict[str, Any] = {"kind": "timm", "arch": arch, "options": kwargs, "timm": timm.__version__,
                                "torch": torch.__version__}
    if "weights" in own:
        path = Path(own["weights"])
        notes = _load_weights(torch, model, path, arch)
        st = (folder_weights(path) if path.is_dir() else path).stat()
        identity.update(weights={"path": str(path.resolve()), "mtime_ns": st.st_mtime_ns, "size": st.st_size},
                        notes=notes)
    else:
        identity["seed"] = own["seed"]
    model.eval()

    config = resolve_model_data_config(model)
    _, height, width = config["input_size"]
    input_size = kwargs.get("img_size", height)  # the data config keeps the architecture's default size
    if "img_size" not in kwargs and height != width:
        raise TimmSpecError(f"model spec {spec!r}: input size {height}x{width} is not square; give img_size=")
    crop_pct = own.get("crop_pct", config["crop_pct"])
    mean, std = NORMALIZE.get(own["normalize"], (config["mean"], config["std"]))
    identity["preprocessing"] = {"input_size": input_size, "crop_pct": crop_pct, "mean": list(mean),
                                 "std": list(std)}
    return TimmEncoder(spec, model, math.floor(input_size / crop_pct), input_size, identity,
                       np.asarray(mean, np.float64), np.asarray(std, np.float64))


def _create(timm, torch, spec: str, arch: str, kwargs: dict[str, Any], seed: int):
    """timm.create_model headless at pretrained=False, its random init drawn from torch seed `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            try:
                return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
            except TypeError as err:
                if "img_size" not in kwargs or "img_size" not in str(err):
                    raise
                # A CNN takes images of any size: img_size sets only the input side (load_timm_encoder).
                rest = {k: v for k, v in kwargs.items() if k != "img_size"}
                return timm.create_model(arch, pretrained=False, num_classes=0, **rest)
        except (TypeError, ValueError, AssertionError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise TimmSpecError(f"model spec {spec!r}: timm cannot build {arch} with {kwargs}: {first}") from None


def _load_weights(torch, model, path: Path, arch: str) -> list[str]:
    """Load a state dict strictly; every key and shape that does not fit is named, a few of each kind."""
    state_dict, notes = read_state_dict(path)
    classifier = model.pretrained_cfg.get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    dropped = [k for k in state_dict if any(k.startswith(h + ".") for h in heads)]
    if dropped:  # the model is built headless (num_classes=0), as timm itself drops a head it does not use
        notes.append(f"dropped the classifier head ({', '.join(dropped)})")
    state_dict = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
                  for k, v in state_dict.items() if k not in dropped}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{what}: {', '.join(items[:3])}" + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatch (file vs model)", shapes)) if items]
    if problems:
        raise ConversionError(f"{path} does not fit timm's {arch}", ["; ".join(problems)])
    model.load_state_dict(state_dict, strict=True)
    return notes


@functools.partial(jax.jit, static_argnames="pixel_size")
def _pixels(images: jax.Array, pixel_size: int) -> jax.Array:
    """embeddings.embed_batch's pixel baseline: the image area-downsampled to pixel_size^2 x 3."""
    b = images.shape[0]
    small = jax.image.resize(images, (b, pixel_size, pixel_size, images.shape[-1]), method="linear",
                             antialias=True)
    return small.reshape(b, -1)


@dataclass
class TimmEncoder:
    spec: str
    model: Any                  # the torch module, headless, in eval mode
    image_size: int             # the side of the images our loader makes for it
    input_size: int             # the side the model sees, after the centre crop
    identity: dict              # what the weights and preprocessing are: keys the embedding cache
    mean: np.ndarray            # the model's input normalisation
    std: np.ndarray
    # Read off the model (__post_init__): the patch grid of a ViT or a CNN's final feature map, the
    # feature width, and depth / heads where the model has ViT blocks (None elsewhere).
    grid: tuple[int, int] = field(init=False)
    width: int = field(init=False)
    depth: int | None = field(init=False)
    heads: int | None = field(init=False)

    def __post_init__(self) -> None:
        """grid and width from one forward of a blank image, which also shows the head pools."""
        import torch

        out = self._forward(np.zeros((1, self.image_size, self.image_size, 3), np.float32), 1)
        self.grid, self.width = out.pop("grid_shape"), int(out["tokens"].shape[-1])
        if out["cls"].ndim != 2:
            raise TimmSpecError(f"model spec {self.spec!r}: its head pools no embedding (global_pool='')")
        blocks = getattr(self.model, "blocks", None)  # a ViT's transformer blocks (EfficientNet's are stages)
        attn = getattr(blocks[0], "attn", None) if isinstance(blocks, torch.nn.Sequential) and blocks else None
        self.depth = len(blocks) if attn is not None else None
        self.heads = getattr(attn, "num_heads", None)

    def _forward(self, images: np.ndarray, grid_size: int) -> dict[str, Any]:
        """cls / mean / grid, the patch tokens [B, n, D] and their grid (h, w), as numpy float32."""
        import torch

        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"{self.spec}: expected images [B, {self.image_size}, {self.image_size}, 3], "
                             f"got {list(images.shape)}")
        x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).permute(0, 3, 1, 2)
        s = self.input_size
        top = int(round((self.image_size - s) / 2.0))  # torchvision's center_crop
        x = x[:, :, top:top + s, top:top + s]
        # ImageNet-normalised -> the model's normalisation: x * std_in / std + (mean_in - mean) / std.
        scale = torch.tensor(np.asarray(IMAGENET_STD) / self.std, dtype=torch.float32)[:, None, None]
        shift = torch.tensor((np.asarray(IMAGENET_MEAN) - self.mean) / self.std, dtype=torch.float32)[:, None, None]
        x = x * scale + shift
        with torch.no_grad():
            feats = self.model.forward_features(x)
            pooled = self.model.forward_head(feats, pre_logits=True)
            if feats.ndim == 3:  # tokens [B, N, D]: prefix tokens first, then the square's patches row by row
                patches = feats[:, getattr(self.model, "num_prefix_tokens", 0):]
                side = math.isqrt(patches.shape[1])
                if side * side != patches.shape[1]:
                    raise TimmSpecError(f"{self.spec}: {patches.shape[1]} patch tokens make no square grid")
                fmap = patches.reshape(len(x), side, side, -1)
            else:  # a feature map, NCHW unless the model says otherwise (Swin: NHWC)
                fmap = feats if getattr(self.model, "output_fmt", "NCHW") == "NHWC" else feats.permute(0, 2, 3, 1)
            gh, gw = fmap.shape[1:3]
            ph, pw = (torch.tensor(pooling_matrix(n, grid_size), dtype=torch.float32) for n in (gh, gw))
            grid = torch.einsum("ih,bhwd,jw->bijd", ph, fmap, pw)
        return {"cls": pooled.numpy(), "mean": fmap.mean((1, 2)).numpy(), "grid": grid.reshape(len(x), -1).numpy(),
                "tokens": fmap.reshape(len(x), gh * gw, -1).numpy(), "grid_shape": (int(gh), int(gw))}

    def features(self, images: np.ndarray, grid_size: int) -> dict[str, np.ndarray]:
        """ImageNet-normalised float32 [B, image_size, image_size, 3] -> {"cls", "mean", "grid"}: float32 [B, d]."""
        out = self._forward(images, grid_size)
        return {k: out[k] for k in ("cls", "mean", "grid")}

    def embed(self, data, pixel_size: int, grid_size: int) -> Embeddings:
        """Every image of `data` (an evaluation.data.EvalData) in order, as compute_embeddings does."""
        ids, labels, feats = [], {}, {k: [] for k in FEATURES}
        tokens: list[TokenStats] = []
        for batch in data.batches():
            images = np.asarray(batch.pop("image"), np.float32)
            out = self._forward(images, grid_size)
            # Padded to the batch size, as embed_batch's input is, so the readout compiles once.
            padded = np.zeros((max(data.batch_size, len(images)),) + images.shape[1:], np.float32)
            padded[:len(images)] = images
            out["pixels"] = np.asarray(_pixels(padded, pixel_size))[:len(images)]
            for k in FEATURES:
                feats[k].append(out[k])
            t = out["tokens"].reshape(-1, out["tokens"].shape[-1]).astype(np.float64)
            tokens.append(TokenStats(float(len(t)), t.sum(0), t.T @ t))
            ids.append(batch.pop("id"))
            for column, values in batch.items():
                labels.setdefault(column, []).append(values)
        if not ids:
            counts = {reason: len(v) for reason, v in data.skipped.items()}
            raise DataSpecError(f"{data.spec}: no images could be read (skipped: {counts})")
        return Embeddings(ids=np.concatenate(ids).astype(str),
                          features={k: np.concatenate(v) for k, v in feats.items()},
                          labels={c: np.concatenate(v) for c, v in labels.items()},
                          skipped={k: list(v) for k, v in data.skipped.items()}, tokens=sum(tokens[1:], tokens[0]))

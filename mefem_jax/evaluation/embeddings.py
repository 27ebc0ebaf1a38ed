"""Frozen-encoder embeddings of an evaluation set: one jitted forward, batched, cached on disk.

For every image the forward returns three feature vectors:

    cls     the final-LayerNormed CLS token (what timm's `global_pool="token"` returns)
    mean    the mean of the final-LayerNormed patch tokens
    grid    the patch tokens average-pooled to a `grid_size` x `grid_size` grid of the face and
            concatenated ([g*g*D]): a readout that keeps the face's layout, like the pixel baseline
            does, so "does the encoder know more than the pixels" compares like with like. g = 1 is
            `mean`; a grid that does not divide the patch grid pools uneven bins (area weights): 3 on
            7x7 patches makes cells 7/3 patches wide. g equal to the patch grid is the patch tokens
            themselves. A finer g (8 on 7x7) would make each cell 7/8 of a patch wide, so by
            `pooling_matrix` every cell is a copy of one patch or an area blend of two neighbours a
            side: more dimensions (8*8*D > 7*7*D) and no more information; `evaluate` refuses it.
    pixels  the image itself, area-downsampled to `pixel_size`^2 x 3: the raw-pixel baseline a
            probe on the embeddings has to beat

and, for the effective rank of the patch tokens (rankme.py), the count, sum and Gram matrix of all
patch tokens of the batch (padding rows excluded), which add up over batches.

Every batch enters the forward at the same shape: a short batch (the last one, or one that lost
unreadable images) is zero-padded to `batch_size` and the padding rows are dropped afterwards, so
the forward compiles once per (encoder, batch size). The forward is jitted with the encoder as a
static argument, so repeated calls with new params (evaluation during training) reuse it. Batch
i + 1 is dispatched before batch i's features are pulled to the host, so loading images on the
host overlaps the device's work.

The cache (`cached_embeddings`) stores features, ids and labels in one `.npz` named by a hash of
everything that determines them: the model's identity (path + modification time + size of the
weights, or the random-init spec; for a timm model, embedded by its own `embed` (timm_encoder.py): its
architecture, options, preprocessing and the timm / torch versions), its config, the data's identity
(spec, CSV / shard stamps), the image size and the pixel-baseline size.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import einops
import jax
import jax.numpy as jnp
import numpy as np

from mefem_jax.evaluation.data import DataSpecError
from mefem_jax.evaluation.rankme import TokenStats
from mefem_jax.models.vit import ViT

logger = logging.getLogger(__name__)

FEATURES = ("cls", "mean", "grid", "pixels")
PIXEL_SIZE = 16
GRID_SIZE = 2
# Bump when what the forward computes changes, so old cache files stop matching.
CACHE_VERSION = 2


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEFEM_CACHE") or Path.home() / ".cache" / "mefem_jax" / "embeddings")


def pooling_matrix(cells: int, bins: int) -> np.ndarray:
    """[bins, cells] rows averaging `cells` grid cells into `bins` contiguous bins by overlap area, so
    every bin is the mean over its (possibly fractional) share of the cells and the rows sum to 1."""
    edges = np.linspace(0.0, cells, bins + 1)
    lo, hi = np.arange(cells), np.arange(cells) + 1.0
    overlap = np.clip(np.minimum(hi[None], edges[1:, None]) - np.maximum(lo[None], edges[:-1, None]), 0.0, None)
    return overlap / overlap.sum(1, keepdims=True)


def grid_pool(patches: jax.Array, grid: tuple[int, int], g: int) -> jax.Array:
    """Patch tokens [B, gh*gw, D] -> [B, g*g*D], each of the g x g cells the mean of its share of the face."""
    gh, gw = grid
    x = einops.rearrange(patches, "b (h w) d -> b h w d", h=gh, w=gw)
    pooled = jnp.einsum("ih,bhwd,jw->bijd", jnp.asarray(pooling_matrix(gh, g), x.dtype), x,
                        jnp.asarray(pooling_matrix(gw, g), x.dtype), precision="highest")
    return einops.rearrange(pooled, "b i j d -> b (i j d)")


@functools.partial(jax.jit, static_argnames=("encoder", "pixel_size", "grid_size"))
def embed_batch(params, images: jax.Array, n_valid: jax.Array | int | None = None, *, encoder: ViT,
                pixel_size: int, grid_size: int = GRID_SIZE) -> dict[str, jax.Array]:
    """images float [B, S, S, 3] -> {"cls": [B, D], "mean": [B, D], "grid": [B, g*g*D],
    "pixels": [B, p*p*3], "token_count" / "token_sum" / "token_gram": patch-token statistics of the
    first `n_valid` rows (default all)}, float32."""
    tokens = encoder.apply({"params": params}, images).astype(jnp.float32)
    b = images.shape[0]
    patches = tokens[:, 1:]
    # antialias=True makes the downsampling average over each output pixel's footprint instead of
    # sampling single pixels, so the baseline sees the whole image.
    small = jax.image.resize(images.astype(jnp.float32), (b, pixel_size, pixel_size, images.shape[-1]),
                             method="linear", antialias=True)
    row_ok = (jnp.arange(b) < (b if n_valid is None else n_valid)).astype(jnp.float32)
    weighted = patches * row_ok[:, None, None]
    return {"cls": tokens[:, 0], "mean": jnp.mean(patches, axis=1),
            "grid": grid_pool(patches, encoder.grid, grid_size), "pixels": small.reshape(b, -1),
            "token_count": row_ok.sum() * patches.shape[1],
            "token_sum": weighted.sum((0, 1)),
            "token_gram": jnp.einsum("bnd,bne->de", weighted, patches, precision="highest")}


def _to_host(tree) -> dict[str, np.ndarray]:
    # Wait for the forward first: a failed execution raises here (e.g. RESOURCE_EXHAUSTED when an output
    # cannot be allocated). Without it, np.asarray reads the buffer through the buffer protocol, which
    # on the CPU client waits forever (0 % CPU) on an output whose allocation failed (jaxlib 0.10).
    jax.block_until_ready(tree)

    def fetch(x: jax.Array) -> np.ndarray:
        if x.is_fully_addressable:
            return np.asarray(x)
        from jax.experimental import multihost_utils  # params sharded across hosts (training)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return {k: fetch(v) for k, v in tree.items()}


@dataclass
class Embeddings:
    ids: np.ndarray                               # str [n]
    features: dict[str, np.ndarray]               # name -> float32 [n, d]
    labels: dict[str, np.ndarray]                 # column -> [n] (str, int or float)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> ids not embedded
    tokens: TokenStats | None = None              # every patch token of every image, summarised

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, path: Path) -> None:
        """Atomic write (temp file + rename): a killed run never leaves a truncated cache entry."""
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = list(self.labels)
        arrays = {"ids": self.ids.astype(str)}
        arrays.update({f"feature_{k}": v for k, v in self.features.items()})
        arrays.update({f"label_{i}": self.labels[c] for i, c in enumerate(columns)})
        meta = {"features": list(self.features), "labels": columns, "skipped": self.skipped}
        if self.tokens is not None:
            arrays.update(token_count=np.float64(self.tokens.count), token_sum=self.tokens.total,
                          token_gram=self.tokens.gram)
        arrays["meta"] = np.array(json.dumps(meta))
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Embeddings":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            tokens = (TokenStats(float(z["token_count"]), z["token_sum"], z["token_gram"])
                      if "token_gram" in z.files else None)
            return cls(ids=z["ids"], features={k: z[f"feature_{k}"] for k in meta["features"]},
                       labels={c: z[f"label_{i}"] for i, c in enumerate(meta["labels"])},
                       skipped=meta["skipped"], tokens=tokens)


def compute_embeddings(encoder: ViT, params, data, pixel_size: int = PIXEL_SIZE,
                       grid_size: int = GRID_SIZE) -> Embeddings:
    """Embed every image of `data` (an `evaluation.data.EvalData`) in order."""
    batch_size = data.batch_size
    params = jax.device_put(params)  # once, not once per batch
    ids, labels, feats = [], {}, {k: [] for k in FEATURES}
    tokens: list[TokenStats] = []

    def collect(pending) -> None:
        out, n, batch = pending
        out = _to_host(out)
        tokens.append(TokenStats(float(out.pop("token_count")), out.pop("token_sum").astype(np.float64),
                                 out.pop("token_gram").astype(np.float64)))
        for k, v in out.items():
            feats[k].append(v[:n])  # drop the padding rows
        ids.append(batch["id"])
        for column, values in batch.items():
            if column != "id":
                labels.setdefault(column, []).append(values)

    pending = None
    for batch in data.batches():
        images = np.asarray(batch.pop("image"), np.float32)
        n = len(images)
        if n > batch_size:
            raise ValueError(f"data yielded a batch of {n} > batch_size {batch_size}")
        if n < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - n,) + images.shape[1:], np.float32)])
        out = embed_batch(params, images, n, encoder=encoder, pixel_size=pixel_size,
                          grid_size=grid_size)  # async dispatch
        if pending is not None:
            collect(pending)
        pending = (out, n, batch)
    if pending is None:
        counts = {reason: len(ids) for reason, ids in data.skipped.items()}
        raise DataSpecError(f"{data.spec}: no images could be read (skipped: {counts})")
    collect(pending)
    return Embeddings(
        ids=np.concatenate(ids).astype(str),
        features={k: np.concatenate(v) for k, v in feats.items()},
        labels={c: np.concatenate(v) for c, v in labels.items()},
        skipped={k: list(v) for k, v in data.skipped.items()},
        tokens=sum(tokens[1:], tokens[0]))


def cache_key(model_identity: dict, model_cfg, data_identity: dict, pixel_size: int,
              grid_size: int = GRID_SIZE) -> str:
    """`model_cfg`: our encoder's config, or None for a timm model (its identity holds its architecture)."""
    payload = {"version": CACHE_VERSION, "model": model_identity,
               "model_cfg": None if model_cfg is None else model_cfg.to_dict(),
               "data": data_identity, "pixel_size": pixel_size, "grid_size": grid_size}
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached_embeddings(model, data, cache_dir: str | Path | None = None, pixel_size: int = PIXEL_SIZE,
                      grid_size: int = GRID_SIZE) -> tuple[Embeddings, Path | None, bool]:
    """(embeddings, cache file or None, whether it was a cache hit). `model` is a
    `encoders.LoadedEncoder` (our jitted forward) or a `timm_encoder.TimmEncoder` (its torch forward,
    `embed`); `cache_dir=None` disables the cache."""
    model_cfg = getattr(model, "model_cfg", None)  # a TimmEncoder has none

    def compute() -> Embeddings:
        if model_cfg is None:
            return model.embed(data, pixel_size, grid_size)
        return compute_embeddings(model.encoder, model.params, data, pixel_size, grid_size)

    if cache_dir is None:
        return compute(), None, False
    key = cache_key(model.identity, model_cfg, data.identity(), pixel_size, grid_size)
    path = Path(cache_dir) / f"emb-{key}.npz"
    if path.is_file():
        try:
            return Embeddings.load(path), path, True
        except (OSError, ValueError, KeyError) as err:  # a damaged entry is recomputed, not fatal
            logger.warning("ignoring unreadable cache file %s: %s", path, err)
    emb = compute()
    emb.save(path)
    return emb, path, False

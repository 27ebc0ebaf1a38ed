"""The ViT encoder: a pre-norm Vision Transformer that is timm's `VisionTransformer` by construction.

Every choice here exists so that a parameter tree trained in JAX exports to a timm
`vit_*_patch16_*` state dict (see `models/timm_keys.py`) and reproduces its features:

* pre-norm blocks, LayerNorm eps 1e-6 with the two-pass variance torch uses, fused qkv with
  bias, an MLP with *exact* (erf) GELU, a final LayerNorm; CLS token prepended;
* the patch embedding is a conv with kernel = stride = patch on NHWC images, flattened
  row-major over the (H/p, W/p) grid exactly like timm's `flatten(2).transpose(1, 2)`;
* the position embedding covers `1 + N` tokens with a row for CLS. With `posemb="sincos"`
  it is a fixed 2D sin-cos table (zero at CLS), written into timm's learned `pos_embed`
  at export time; with `posemb="learn"` it is a trainable parameter.

For I-JEPA training the encoder also sees *subsets* of patches: `patch_idx` picks which grid
cells enter the sequence (static K, so one compilation; their pixels are gathered before the
embedding), `patch_valid` marks padding slots and `cls_visible` hides CLS. Hidden tokens are
removed as attention *keys*, so no visible token's output depends on them; they still get an output
row (which the caller ignores).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mefem_jax.models import attention_impl
from mefem_jax.models.activation_sharding import batch_sharded

# name -> (width, depth, heads), the standard ViT sizes (Dosovitskiy et al.; DeiT for Ti).
VARIANTS = {"Ti": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16)}


def default_model_config() -> ml_collections.ConfigDict:
    """The `model` section of every config, and the schema every rebuilt encoder starts from.

    Architecture (docs/METHOD.md 2): `variant` picks (width, depth, heads) from VARIANTS; an explicit
    width/depth/heads overrides it. `posemb` is "sincos" (fixed, timm-exportable) or "learn".
    Execution: `dtype` is the compute dtype (params stay float32); `remat` recomputes block activations
    in the backward pass; `scan_layers` runs the blocks as one scanned stack (`run_blocks`): one compiled
    block body, so compiles are 2-4x shorter and the CPU step faster (benchmarks/RESULTS.md).
    Checkpoints hold the stacked layout; export and evaluation convert, so timm files are the same.
    `attention` picks the attention kernel of the encoder and the predictor: "xla" (the default, the call
    made before the key existed), "cudnn" (fused flash attention; refused at start-up where it cannot run)
    or "auto" (cuDNN where it can run, else exactly "xla"); see models/attention_impl.py.
    """
    return ml_collections.ConfigDict(dict(
        variant="B", patch_size=16, image_size=224, posemb="sincos", width=None, depth=None, heads=None,
        dtype="bfloat16", remat=False, scan_layers=True, attention=attention_impl.DEFAULT))


# The keys that decide the parameter tree's shapes: a checkpoint cannot continue under other values.
PARAM_SHAPE_KEYS = ("variant", "patch_size", "image_size", "posemb", "width", "depth", "heads", "scan_layers")


def patch_grid(model_cfg) -> tuple[int, int]:
    """(rows, cols) of the patch grid: anything with `image_size` and `patch_size` (a config, a ViT)."""
    if model_cfg.image_size % model_cfg.patch_size:
        raise ValueError(f"image_size {model_cfg.image_size} is not a multiple of patch {model_cfg.patch_size}")
    side = model_cfg.image_size // model_cfg.patch_size
    return side, side

# The std of a unit normal truncated at +-2 sigma. torch's `trunc_normal_(std=.02, a=-2, b=2)`
# (timm, MAE, I-JEPA) truncates at +-2 in absolute units, i.e. at +-100 sigma: in effect an
# untruncated N(0, 0.02^2). JAX's `truncated_normal` truncates at +-2 sigma and does not
# rescale, which would give std 0.0176. We keep the +-2 sigma bound (no far outliers) and
# divide the std by this factor so the weights have the std the recipes were tuned for.
_TRUNC2_STD = 0.87962566103423978


def trunc_normal(std: float = 0.02) -> nn.initializers.Initializer:
    """Init with standard deviation exactly `std`: a normal cut at +-2 of its own sigma, rescaled."""
    return nn.initializers.truncated_normal(stddev=std / _TRUNC2_STD)


def sincos_pos_embed(width: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2D sin-cos position table, float32 `(1, 1 + grid_h * grid_w, width)`.

    Row 0 (CLS) is zero. Patch rows are in row-major grid order. Layout follows MAE / I-JEPA:
    the first `width/2` channels encode the column, the last `width/2` the row; within each
    half, `width/4` sines then `width/4` cosines of `pos * omega_i`, with
    `omega_i = 1 / 10000^(i / (width/4))`. Computed in float64, then rounded once.
    """
    if width % 4:
        raise ValueError(f"sin-cos position embedding needs width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                             np.arange(grid_w, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:  # (N,) -> (N, width/2)
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    patches = np.concatenate([encode(cols), encode(rows)], axis=1)
    table = np.concatenate([np.zeros((1, width)), patches], axis=0)
    return table[None].astype(np.float32)


def layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[x^2] - E[x]^2 loses digits; torch computes E[(x - mean)^2].
    return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=trunc_normal(),
                    bias_init=nn.initializers.zeros, name=name)


def key_mask(valid: jax.Array | None) -> jax.Array | None:
    """Bool `[B, S]` key validity -> the `[B, 1, 1, S]` mask `dot_product_attention` broadcasts."""
    return None if valid is None else valid[:, None, None, :]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout: out = [3, heads, dh]).

    `implementation`: "xla" | "cudnn" | "auto", resolved when traced (models/attention_impl.py)."""
    heads: int
    dtype: Any = jnp.float32
    implementation: str = attention_impl.DEFAULT

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, t, width = x.shape
        qkv = _dense(3 * width, self.dtype, "qkv")(x)
        q, k, v = einops.rearrange(qkv, "b t (qkv h d) -> qkv b t h d", qkv=3, h=self.heads)
        out = attention_impl.dot_product_attention(q, k, v, mask, self.implementation)  # [B, T, N, H]
        return _dense(width, self.dtype, "proj")(out.reshape(b, t, width))


class Mlp(nn.Module):
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _dense(self.hidden, self.dtype, "fc1")(x)
        h = nn.gelu(h, approximate=False)  # timm / I-JEPA use exact GELU; nn.gelu defaults to tanh
        return _dense(x.shape[-1], self.dtype, "fc2")(h)


class Block(nn.Module):
    """Pre-norm transformer block. `mask`: bool `[B, 1, 1, S]` of usable keys, or None for all.

    `drop_path` > 0 (fine-tuning) drops each branch for whole examples with that probability when not
    `deterministic` and scales the kept ones by 1/(1 - p), timm's DropPath; it draws from the `dropout` rng.
    """
    heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    drop_path: float = 0.0
    attention: str = attention_impl.DEFAULT  # the kernel (models/attention_impl.py)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        x = batch_sharded(x)  # see models/activation_sharding.py: FSDP gathers weights, not activations
        # One mask per example, shared over tokens and channels (broadcast_dims): stochastic depth.
        drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=deterministic or not self.drop_path)
        attention = Attention(self.heads, self.dtype, self.attention, name="attn")
        x = x + drop(attention(layer_norm(self.dtype, "norm1")(x), mask))
        hidden = int(x.shape[-1] * self.mlp_ratio)
        return x + drop(Mlp(hidden, self.dtype, name="mlp")(layer_norm(self.dtype, "norm2")(x)))


class _ScanBlock(Block):
    """A `Block` in `nn.scan`'s calling convention: (carry, broadcast mask) -> (carry, no output)."""

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, None]:
        return super().__call__(x, mask), None


def run_blocks(x: jax.Array, mask: jax.Array | None, *, depth: int, heads: int, mlp_ratio: float,
               dtype: Any, remat: bool, scan: bool, drop_path: float = 0.0,
               deterministic: bool = True, attention: str = attention_impl.DEFAULT) -> jax.Array:
    """`depth` blocks on `x`, created as children of the calling (compact) module.

    Unrolled (`scan=False`), the parameters are `blocks_0 ... blocks_{depth-1}`, one subtree per block,
    the layout the timm key table names. Scanned, they are one subtree `blocks` whose leaves carry a
    leading `depth` axis, and XLA compiles one block body instead of `depth` copies: compile time stops
    growing with depth, which matters for ViT-L and deeper predictors on pods, and XLA cannot fuse (and
    recompute) gradient chains across blocks, which made the unrolled step slower on CPU
    (benchmarks/RESULTS.md). `stack_blocks` / `unstack_blocks` convert between the two; the timm
    conversion (timm_keys.py) always goes through the unrolled one.
    `remat` recomputes each block's activations in the backward pass, in either form.
    `drop_path` is the last block's stochastic-depth rate; block i gets `drop_path * i / (depth - 1)`, timm's
    linear rule. Unrolled blocks only: each block has its own rate, which one scanned body cannot hold.
    `attention` is every block's attention kernel (models/attention_impl.py).
    """
    if drop_path and scan:
        raise ValueError("drop_path needs unrolled blocks (model.scan_layers=False)")
    if scan:
        body = nn.remat(_ScanBlock, prevent_cse=False) if remat else _ScanBlock  # CSE is moot in a loop
        stack = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=nn.broadcast, length=depth)
        x, _ = stack(heads, mlp_ratio, dtype, attention=attention, name="blocks")(x, mask)
        return x
    block = nn.remat(Block, static_argnums=(3,)) if remat else Block  # `deterministic` is a Python bool
    for i in range(depth):
        rate = drop_path * i / max(depth - 1, 1)
        x = block(heads, mlp_ratio, dtype, rate, attention, name=f"blocks_{i}")(x, mask, deterministic)
    return x


_BLOCK_KEY = re.compile(r"blocks_(\d+)$")


def stack_blocks(params: Mapping) -> dict:
    """Unrolled `blocks_{i}` subtrees -> one scanned `blocks` subtree (leaves stacked on a new axis 0)."""
    params = dict(params)
    found = {int(m.group(1)): k for k in params if (m := _BLOCK_KEY.match(k))}
    if not found:
        return params
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"block subtrees are not numbered 0..n-1: {sorted(found)}")
    layers = [params.pop(found[i]) for i in range(len(found))]
    params["blocks"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
    return params


def unstack_blocks(params: Mapping) -> dict:
    """One scanned `blocks` subtree -> unrolled `blocks_{i}`; a tree without it is returned as is."""
    params = dict(params)
    if "blocks" not in params:
        return params
    stacked = params.pop("blocks")
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
        params[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, `[B, H, W, C]` -> `[B, (H/p) * (W/p), width]` row-major.

    With `patch_idx` `[B, K]`, only those cells are embedded, `[B, K, width]`: the pixels are gathered
    first and the same conv runs on the K patches stacked into a `[B, K*p, p, C]` strip (stride p, so it
    sees each patch exactly once). The context encoder keeps about half the grid, so this halves its
    patch-embed work, and the backward pass has no scatter into a full-grid gradient (the images need none).
    """
    width: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, patch_idx: jax.Array | None = None) -> jax.Array:
        p = self.patch_size
        proj = nn.Conv(self.width, kernel_size=(p, p), strides=(p, p), padding="VALID",
                       dtype=self.dtype, kernel_init=trunc_normal(),
                       bias_init=nn.initializers.zeros, name="proj")
        if patch_idx is None:
            return einops.rearrange(proj(images), "b h w c -> b (h w) c")  # row-major, as timm flattens
        cells = einops.rearrange(images, "b (h p1) (w p2) c -> b (h w) p1 p2 c", p1=p, p2=p)
        picked = jnp.take_along_axis(cells, patch_idx[:, :, None, None, None], axis=1)
        strip = einops.rearrange(picked, "b k p1 p2 c -> b (k p1) p2 c")
        return einops.rearrange(proj(strip), "b k 1 c -> b k c")


class ViT(nn.Module):
    """ViT encoder. Parameters are float32; `dtype` is the compute dtype."""
    width: int
    depth: int
    heads: int
    patch_size: int = 16
    image_size: int = 224
    mlp_ratio: float = 4.0
    posemb: str = "sincos"  # "sincos" (fixed) | "learn"
    dtype: Any = jnp.float32
    remat: bool = False
    scan: bool = False  # one scanned `blocks` subtree instead of `blocks_{i}` (see `run_blocks`)
    drop_path: float = 0.0  # stochastic depth of the last block (fine-tuning); see `run_blocks`
    attention: str = attention_impl.DEFAULT  # "xla" | "cudnn" | "auto" (models/attention_impl.py)

    @property
    def grid(self) -> tuple[int, int]:
        return patch_grid(self)

    @nn.compact
    def __call__(self, images: jax.Array, patch_idx: jax.Array | None = None,
                 patch_valid: jax.Array | None = None,
                 cls_visible: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """Encode a batch; returns final-LayerNormed tokens `[B, 1 + K, width]`, CLS first.

        images:      float `[B, H, W, 3]`, already normalised, H = W = image_size.
        patch_idx:   int32 `[B, K]` cells of the row-major patch grid to encode; None = all, in order.
        patch_valid: bool `[B, K]`; False marks a padding slot, which no token attends to.
        cls_visible: bool `[B]`; False hides CLS from every token (MeFEm CLS reassignment).
        deterministic: False applies `drop_path` (needs a `dropout` rng); True, the default, never drops.
        """
        gh, gw = self.grid
        if images.shape[1:3] != (gh * self.patch_size, gw * self.patch_size):
            raise ValueError(f"expected {self.image_size}px images, got shape {images.shape}")
        batch = images.shape[0]

        x = PatchEmbed(self.width, self.patch_size, self.dtype, name="patch_embed")(images, patch_idx)
        cls = self.param("cls_token", trunc_normal(), (1, 1, self.width), jnp.float32)
        if self.posemb == "learn":
            pos = self.param("pos_embed", trunc_normal(), (1, 1 + gh * gw, self.width), jnp.float32)
        elif self.posemb == "sincos":
            pos = jnp.asarray(sincos_pos_embed(self.width, gh, gw))
        else:
            raise ValueError(f"posemb must be 'sincos' or 'learn', got {self.posemb!r}")

        # A token gets the position of the cell it came from, whatever subset is encoded.
        pos_patches = pos[0, 1:] if patch_idx is None else jnp.take(pos[0, 1:], patch_idx, axis=0)
        x = x + pos_patches.astype(x.dtype)
        cls = jnp.broadcast_to((cls + pos[:, :1]).astype(x.dtype), (batch, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1)

        # Keys: CLS where visible, patches where valid. None (no mask at all) when everything is
        # visible, which lets fused attention kernels skip masking.
        mask = None
        if patch_valid is not None or cls_visible is not None:
            k = x.shape[1] - 1
            cls_key = jnp.ones((batch,), bool) if cls_visible is None else cls_visible
            patch_key = jnp.ones((batch, k), bool) if patch_valid is None else patch_valid
            mask = key_mask(jnp.concatenate([cls_key[:, None], patch_key], axis=1))

        x = run_blocks(x, mask, depth=self.depth, heads=self.heads, mlp_ratio=self.mlp_ratio,
                       dtype=self.dtype, remat=self.remat, scan=self.scan, drop_path=self.drop_path,
                       deterministic=deterministic, attention=self.attention)
        return layer_norm(self.dtype, "norm")(x)


def compute_dtype(name: str) -> Any:
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in dtypes:
        raise ValueError(f"model.dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def encoder_dims(model_cfg) -> tuple[int, int, int]:
    """(width, depth, heads) of the encoder: the variant's, with any explicit override applied."""
    if model_cfg.variant not in VARIANTS:
        raise ValueError(f"model.variant must be one of {sorted(VARIANTS)}, got {model_cfg.variant!r}")
    dims = VARIANTS[model_cfg.variant]
    overrides = (model_cfg.get("width"), model_cfg.get("depth"), model_cfg.get("heads"))
    width, depth, heads = (o if o is not None else d for o, d in zip(overrides, dims))
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    return width, depth, heads


def attention_of(model_cfg, head_dim: int) -> str:
    """`model.attention` (absent in configs saved before it: "xla"), refused here where it cannot run."""
    requested = model_cfg.get("attention", "xla")
    attention_impl.check_attention(requested, compute_dtype(model_cfg.dtype), (head_dim,))
    return requested


def encoder_from_config(model_cfg) -> ViT:
    """Build the encoder from the `model` ConfigDict (variant, patch_size, image_size, posemb,
    dtype, remat, scan_layers, attention and optional width/depth/heads overrides)."""
    width, depth, heads = encoder_dims(model_cfg)
    return ViT(width=width, depth=depth, heads=heads, patch_size=model_cfg.patch_size,
               image_size=model_cfg.image_size, posemb=model_cfg.posemb,
               dtype=compute_dtype(model_cfg.dtype), remat=bool(model_cfg.remat),
               scan=bool(model_cfg.get("scan_layers", False)), attention=attention_of(model_cfg, width // heads))

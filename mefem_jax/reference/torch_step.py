"""A PyTorch reference of one MeFEm train step, built from timm modules the way official I-JEPA is written.

This is the baseline that `benchmarks/train_step.py` times against the JAX step, and that
`tests/test_torch_reference.py` proves computes the same thing (same loss, same parameters after an
AdamW + EMA update). It follows I-JEPA's `train.py` step:

    no_grad:  h = target_encoder(images);  h = F.layer_norm(h);  h = apply_masks(h, target sets)
              z = encoder(images, context sets);  p = predictor(z, context sets, target sets)
              loss = smooth_l1(p, h);  zero_grad; backward; AdamW step;  target <- m*target + (1-m)*encoder

with MeFEm's three additions expressed the same way the JAX step expresses them (docs/METHOD.md 5):
the target also carries the CLS token, the loss is weighted per slot (circular weights for patches,
the CLS flag for the CLS slot), and CLS reassignment hides tokens through an attention key mask.

Faithful to I-JEPA, on purpose:
* `apply_masks` gathers each index set and concatenates the sets along the batch axis (set-major), and
  the predictor sees `x.repeat(n_tgt, 1, 1)` of its embedded context, one sequence per
  (target set, context set, sample), all in one batched call, as official I-JEPA runs it;
* the encoders are timm `VisionTransformer`s and the predictor is built from timm `Block`s; the fixed
  sin-cos position embedding is a frozen parameter / buffer, as in I-JEPA;
* schedules are evaluated on the host each step and written into the optimizer's param groups.

Differences from official I-JEPA (each needed to match the MeFEm/JAX semantics being benchmarked):
* a CLS token (timm layout, MeFEm's released weights have one); I-JEPA's encoder has none;
* masks come in as fixed-size index tensors with validity flags (sampled by the JAX masker outside the
  timed region), so padding and hidden CLS use an attention mask where one is needed; I-JEPA truncates
  every mask to the batch minimum instead and never masks keys;
* weight decay applies to Linear / Conv weights only (the JAX `optim.decay_mask`); I-JEPA also decays
  its 3-D mask token;
* the loss is a weighted mean over slots (sum w*l / sum w) instead of `F.smooth_l1_loss`'s plain mean;
* AdamW runs torch's `fused=True` kernel (same update rule; on CPU the default per-tensor path is ~5x
  slower), and the EMA uses torch's multi-tensor ops instead of a Python loop over parameters.

timm is imported through `timm_import.import_timm()`, which works on CPU-torch machines with a CUDA
torchvision build (docs/PLATFORM_NOTES.md).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flax import traverse_util
from torch import nn

from mefem_jax.models.predictor import predictor_from_config
from mefem_jax.models.vit import encoder_dims, sincos_pos_embed, unstack_blocks
from mefem_jax.objective.losses import loss_weight_grid
from mefem_jax.weights.timm_import import import_timm
from mefem_jax.weights.timm_keys import jax_to_timm_key, params_to_timm


def _timm_vit():
    """timm's vision_transformer module (VisionTransformer, Block), through the CPU-torch workaround."""
    import_timm()
    from timm.models import vision_transformer
    return vision_transformer


# -------------------------------------------------------------------------------- I-JEPA's gathers


def apply_masks(x, index_sets):
    """Gather rows `[B, K]` of `x [B, T, D]` for every index set; sets stacked on the batch axis (set-major)."""
    return torch.cat([torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[-1])) for idx in index_sets])


def repeat_interleave_batch(x, batch: int, repeat: int):
    """[s0 | s1 | ...] (chunks of `batch` rows) -> [s0 x repeat | s1 x repeat | ...], as I-JEPA pairs sets."""
    if repeat == 1:
        return x
    chunks = x.split(batch)
    return torch.cat([c for c in chunks for _ in range(repeat)])


# ----------------------------------------------------------------------------------------- masks


@dataclasses.dataclass
class TorchMasks:
    """One step's masks as torch tensors, laid out the way the reference consumes them.

    Built on the host from the JAX masker's arrays (outside any timed region); the JAX step draws the
    very same masks on device from the same key.
    """

    ctx_idx: list  # n_ctx x LongTensor [B, Kc]: grid cells of each context set
    tgt_idx: list  # n_tgt x LongTensor [B, Kt]: grid cells of each target set
    tgt_slots: list  # n_tgt x LongTensor [B, 1+Kt]: rows of the target encoder's output (0 = CLS)
    enc_mask: Any  # bool [n_ctx*B, 1, 1, 1+Kc] usable keys of the context encoder, or None if all are
    pred_mask: Any  # bool [n_tgt*n_ctx*B, 1, 1, 2+Kc+Kt] usable keys of the predictor
    weights: Any  # float32 [n_tgt*n_ctx*B, 1+Kt] loss weight of every predicted slot


def torch_masks(ctx_idx, ctx_valid, tgt_idx, tgt_valid, cls_target, weight_grid,
                cls_weight: float = 1.0) -> TorchMasks:
    """numpy masks from `JEPA.sample` (`[B, n, K]` arrays, `cls_target [B]`) -> `TorchMasks`.

    weight_grid: the `(gh, gw)` circular loss weights; cls_weight: the CLS slot's weight when CLS is a target.

    Sequence order everywhere is I-JEPA's: predictor row `j*n_ctx*B + i*B + b` pairs target set j with
    context set i of sample b.
    """
    ctx_idx, ctx_valid = np.asarray(ctx_idx), np.asarray(ctx_valid, bool)
    tgt_idx, tgt_valid = np.asarray(tgt_idx), np.asarray(tgt_valid, bool)
    cls_in_ctx = ~np.asarray(cls_target, bool)
    b, n_ctx, k_ctx = ctx_idx.shape
    n_tgt, k_tgt = tgt_idx.shape[1:]

    enc_keys = np.concatenate([np.concatenate([cls_in_ctx[:, None], ctx_valid[:, i]], 1) for i in range(n_ctx)])
    pred_keys, weights = [], []
    grid_w = np.asarray(weight_grid, np.float64).reshape(-1)
    cls_w = np.where(cls_in_ctx, 0.0, cls_weight)[:, None]
    for j in range(n_tgt):
        w = np.concatenate([cls_w, grid_w[tgt_idx[:, j]] * tgt_valid[:, j]], 1)
        for i in range(n_ctx):
            pred_keys.append(np.concatenate([cls_in_ctx[:, None], ctx_valid[:, i], ~cls_in_ctx[:, None],
                                             tgt_valid[:, j]], 1))
            weights.append(w)

    def long(a):
        return torch.from_numpy(np.ascontiguousarray(a, np.int64))

    def key_mask(keys):
        return torch.from_numpy(keys[:, None, None, :].copy())

    return TorchMasks(
        ctx_idx=[long(ctx_idx[:, i]) for i in range(n_ctx)],
        tgt_idx=[long(tgt_idx[:, j]) for j in range(n_tgt)],
        tgt_slots=[long(np.concatenate([np.zeros((b, 1), np.int64), 1 + tgt_idx[:, j]], 1)) for j in range(n_tgt)],
        # No mask at all when every key is usable, so SDPA can take its unmasked path (as the JAX
        # encoder does with mask=None).
        enc_mask=None if enc_keys.all() else key_mask(enc_keys),
        pred_mask=key_mask(np.concatenate(pred_keys)),
        weights=torch.from_numpy(np.concatenate(weights).astype(np.float32)),
    )


# ------------------------------------------------------------------------------------ schedules
# Host-side mirrors of mefem_jax/training/optim.py (I-JEPA evaluates its schedulers on the host too); the parity
# test checks them against the JAX schedules.


def lr_at(cfg, batch: int, total_steps: int, step: int) -> float:
    scale = batch / cfg.ref_batch
    start, peak, final = cfg.start_lr * scale, cfg.lr * scale, cfg.final_lr * scale
    warmup = max(int(cfg.warmup_steps), 0)
    if step < warmup:
        return start + (peak - start) * step / max(warmup, 1)
    progress = min(max((step - warmup) / max(total_steps - warmup, 1), 0.0), 1.0)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wd_at(cfg, total_steps: int, step: int) -> float:
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return cfg.final_wd + (cfg.wd - cfg.final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_at(cfg, total_steps: int, step: int) -> float:
    m0, m1 = cfg.ema
    frac = min(max(step / max(cfg.ema_horizon * total_steps, 1.0), 0.0), 1.0)
    return m0 + (m1 - m0) * frac


# -------------------------------------------------------------------------------------- modules


def make_encoder(model_cfg):
    """A timm `VisionTransformer` with the JAX encoder's architecture; its pos_embed is the frozen sin-cos table."""
    width, depth, heads = encoder_dims(model_cfg)
    if model_cfg.posemb != "sincos":
        raise ValueError("the torch reference implements posemb='sincos' (I-JEPA's fixed table) only")
    vit = _timm_vit().VisionTransformer(
        img_size=model_cfg.image_size, patch_size=model_cfg.patch_size, embed_dim=width, depth=depth,
        num_heads=heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0, global_pool="token")
    grid = model_cfg.image_size // model_cfg.patch_size
    with torch.no_grad():
        vit.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(width, grid, grid)))
    vit.pos_embed.requires_grad_(False)
    return vit


def encode_context(vit, images, masks: TorchMasks):
    """timm ViT on each context set: patch embed + pos on the full grid, gather, prepend CLS, blocks, norm.

    Returns `[n_ctx*B, 1+Kc, D]`. Hidden CLS / padding are removed as attention keys via `masks.enc_mask`.
    """
    x = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    x = apply_masks(x, masks.ctx_idx)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in vit.blocks:
        x = blk(x, attn_mask=masks.enc_mask)
    return vit.norm(x)


class Predictor(nn.Module):
    """The narrow predictor of `mefem_jax.models.predictor` from timm `Block`s, I-JEPA's forward.

    Sequence per (target set, context set, sample): `[ctx CLS | ctx patches | CLS query | target slots]`;
    only the CLS query and target slots are normed and projected back to the encoder width.
    """

    def __init__(self, out_width: int, width: int, depth: int, heads: int, grid: tuple[int, int],
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.predictor_embed = nn.Linear(out_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.cls_query = nn.Parameter(torch.zeros(1, 1, width))
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        block = _timm_vit().Block
        self.predictor_blocks = nn.ModuleList(
            [block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.predictor_norm = norm(width)
        self.predictor_proj = nn.Linear(width, out_width)
        # The fixed sin-cos table (row 0, CLS, is zero): a buffer, so it is neither trained nor saved.
        self.register_buffer("pos", torch.from_numpy(sincos_pos_embed(width, *grid)[0]), persistent=False)
        for p in (self.mask_token, self.cls_query):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, model_cfg, predictor_cfg) -> "Predictor":
        spec = predictor_from_config(model_cfg, predictor_cfg)  # the JAX predictor's widths, heads, grid
        return cls(spec.out_width, spec.width, spec.depth, spec.heads, spec.grid, spec.mlp_ratio)

    def forward(self, z, masks: TorchMasks):
        """z `[n_ctx*B, 1+Kc, D]` -> predictions `[n_tgt*n_ctx*B, 1+Kt, D]` (CLS slot first)."""
        n_ctx, n_tgt = len(masks.ctx_idx), len(masks.tgt_idx)
        b = masks.ctx_idx[0].shape[0]
        grid_pos = self.pos[1:].expand(b, -1, -1)
        x = self.predictor_embed(z)
        x = x + torch.cat([self.pos[:1].expand(x.shape[0], 1, -1), apply_masks(grid_pos, masks.ctx_idx)], dim=1)
        n_ctx_tokens = x.shape[1]

        tgt = self.mask_token + repeat_interleave_batch(apply_masks(grid_pos, masks.tgt_idx), b, n_ctx)
        query = self.cls_query.expand(tgt.shape[0], -1, -1)
        # Embedded once per context set, then repeated for every target set (I-JEPA's x.repeat).
        x = torch.cat([x.repeat(n_tgt, 1, 1), query, tgt], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x, attn_mask=masks.pred_mask)
        return self.predictor_proj(self.predictor_norm(x[:, n_ctx_tokens:]))


def decay_groups(*modules) -> list[dict]:
    """AdamW groups: Linear / Conv weights decay, everything else trainable does not (optim.decay_mask)."""
    decay, no_decay = [], []
    for module in modules:
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                is_kernel = name == "weight" and isinstance(m, (nn.Linear, nn.Conv2d))
                (decay if is_kernel else no_decay).append(p)
    return [dict(params=decay, weight_decay=0.0, decayed=True), dict(params=no_decay, weight_decay=0.0, decayed=False)]


# ------------------------------------------------------------------------------------ the step


class TorchMeFEm:
    """Context encoder, EMA target encoder, predictor, AdamW and the step counter, built from a config.

    `step(images, masks)` is one full update; `images` is NCHW float32.
    """

    def __init__(self, config, seed: int = 0, dtype: str | None = None, optimizer_impl: str = "fused"):
        torch.manual_seed(seed)
        self.config = config
        self.batch = config.data.batch_size
        self.total_steps = config.total_steps
        self.dtype = dtype or config.model.dtype
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        self.encoder = make_encoder(config.model)
        self.target = copy.deepcopy(self.encoder).requires_grad_(False)
        self.predictor = Predictor.from_config(config.model, config.predictor)
        grid = (config.model.image_size // config.model.patch_size,) * 2
        lc = config.loss
        self.weight_grid, self.cls_weight = loss_weight_grid(lc, grid), lc.cls.loss_weight
        if lc.kind not in ("smooth_l1", "l2"):
            raise ValueError(f"loss.kind must be 'smooth_l1' or 'l2', got {lc.kind!r}")
        self.loss_kind, self.beta, self.ln_eps = lc.kind, lc.beta, lc.target_ln_eps
        oc = config.optim
        if oc.grad_clip:
            raise ValueError("the torch reference has no gradient clipping (I-JEPA does not clip)")
        # "fused": torch's single-kernel AdamW, its fastest path on CPU (measured ~5x faster than "foreach",
        # which on CPU loops over the tensors); the update rule is the same for all three.
        impl = {"foreach": dict(foreach=True), "fused": dict(fused=True), "loop": dict(foreach=False)}[optimizer_impl]
        self.optimizer = torch.optim.AdamW(decay_groups(self.encoder, self.predictor), lr=0.0,
                                           betas=(oc.b1, oc.b2), eps=oc.eps, **impl)
        self.ema_pairs = [(t, o) for t, o in zip(self.target.parameters(), self.encoder.parameters())
                          if o.requires_grad]
        self.step_count = 0

    def make_masks(self, masks, cls_target) -> TorchMasks:
        """`JEPA.sample`'s (Masks, cls_target), as numpy, -> this step's `TorchMasks` (host work: call it
        outside any timed region)."""
        return torch_masks(*masks, cls_target, self.weight_grid, self.cls_weight)

    def train(self):
        self.encoder.train()
        self.predictor.train()
        self.target.eval()
        return self

    def loss(self, images, masks: TorchMasks):
        """The weighted smooth-L1 JEPA loss of one batch (differentiable w.r.t. encoder and predictor)."""
        b = images.shape[0]
        n_ctx = len(masks.ctx_idx)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            with torch.no_grad():
                h = self.target.forward_features(images).float()
                h = F.layer_norm(h, (h.shape[-1],), eps=self.ln_eps)
                h = repeat_interleave_batch(apply_masks(h, masks.tgt_slots), b, n_ctx)
            z = encode_context(self.encoder, images, masks)
            p = self.predictor(z, masks)
        if self.loss_kind == "smooth_l1":
            per_slot = F.smooth_l1_loss(p.float(), h, reduction="none", beta=self.beta).mean(-1)
        else:
            per_slot = F.mse_loss(p.float(), h, reduction="none").mean(-1)
        return (per_slot * masks.weights).sum() / masks.weights.sum().clamp_min(1e-12)

    def step(self, images, masks: TorchMasks):
        t = self.step_count
        oc = self.config.optim
        lr, wd = lr_at(oc, self.batch, self.total_steps, t), wd_at(oc, self.total_steps, t)
        momentum = ema_at(oc, self.total_steps, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group["decayed"] else 0.0

        loss = self.loss(images, masks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():  # I-JEPA: param_k.mul_(m).add_((1 - m) * param_q), here over all leaves at once
            targets = [t_ for t_, _ in self.ema_pairs]
            torch._foreach_mul_(targets, momentum)
            torch._foreach_add_(targets, [o for _, o in self.ema_pairs], alpha=1.0 - momentum)
        self.step_count += 1
        return loss.detach()

    # --------------------------------------------------------------- loading the JAX parameters

    def load_jax(self, params, target_params) -> None:
        """Copy a JAX `TrainState`'s params (encoder + predictor) and target params into this reference."""
        model_cfg = self.config.model
        for module, tree in ((self.encoder, params["encoder"]), (self.target, target_params)):
            sd = {k: torch.from_numpy(np.array(v)) for k, v in params_to_timm(tree, model_cfg).items()}
            module.load_state_dict(sd, strict=True)
        sd = {k: torch.from_numpy(np.array(v)) for k, v in predictor_state_dict(params["predictor"]).items()}
        self.predictor.load_state_dict(sd, strict=True)


# The predictor's own (non-block) parameters: JAX path -> (torch key, transform). Its blocks reuse the
# encoder's block rows of `weights/timm_keys.KEY_TABLE`, under the `predictor_blocks.` prefix.
_PREDICTOR_KEYS = {
    "predictor_embed/kernel": ("predictor_embed.weight", "dense"),
    "predictor_embed/bias": ("predictor_embed.bias", "identity"),
    "mask_token": ("mask_token", "identity"),
    "cls_query": ("cls_query", "identity"),
    "predictor_norm/scale": ("predictor_norm.weight", "identity"),
    "predictor_norm/bias": ("predictor_norm.bias", "identity"),
    "predictor_proj/kernel": ("predictor_proj.weight", "dense"),
    "predictor_proj/bias": ("predictor_proj.bias", "identity"),
}


def predictor_state_dict(predictor_params) -> dict[str, np.ndarray]:
    """JAX predictor params -> the torch predictor's state dict; raises on any leaf without a mapping."""
    flat = traverse_util.flatten_dict(unstack_blocks(predictor_params), sep="/")  # scanned or not
    out, unknown = {}, []
    for path, value in flat.items():
        if path in _PREDICTOR_KEYS:
            key, kind = _PREDICTOR_KEYS[path]
        elif path.startswith("blocks_") and jax_to_timm_key(path) is not None:
            key, kind = jax_to_timm_key(path)
            key = "predictor_" + key
        else:
            unknown.append(path)
            continue
        value = np.asarray(value, np.float32)
        out[key] = np.ascontiguousarray(value.T if kind == "dense" else value)
    if unknown:
        raise KeyError(f"predictor parameters with no torch key: {unknown}")
    return out

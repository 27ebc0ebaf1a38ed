"""The MeFEm objective as one pure function: (params, target_params, images, rng) -> (loss, metrics).

    images --(EMA target encoder, all patches, stop_gradient)--> h --LN--> targets at tgt_idx (+ CLS)
    images --(context encoder, ctx_idx patches [+ CLS unless reassigned])--> z
    z --(predictor, mask tokens at tgt_idx + CLS query)--> predictions
    loss = sum_slots w * smooth_l1(pred, target) / sum w,   w = circular weight (patches) | CLS flag
         [+ sigreg_weight * SIGReg(z's CLS and mean-pooled patches), optional, off in MeFEm's recipe]

Masks and the per-sample CLS coin are drawn from `rng` inside the jitted step, on device, with static
shapes (docs/METHOD.md 4): nothing in here depends on the host or changes shape between steps.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mefem_jax.masking import Masker, Masks
from mefem_jax.objective import losses


@dataclasses.dataclass(frozen=True)
class JEPA:
    encoder: "flax.linen.Module"  # models.vit.ViT  # noqa: F821
    predictor: "flax.linen.Module"  # models.predictor.Predictor  # noqa: F821
    masker: Masker
    weight_grid: jax.Array  # (gh, gw) circular loss weights, mean 1
    loss_kind: str = "smooth_l1"
    beta: float = 1.0
    target_ln_eps: float = 1e-5
    p_cls_target: float = 0.5
    cls_weight: float = 1.0
    sigreg_weight: float = 0.0
    sigreg_slices: int = 256
    sigreg_knots: int = 17
    sigreg_t_max: float = 3.0

    # ----------------------------------------------------------------------------------- pieces

    def sample(self, rng: jax.Array, batch: int) -> tuple[Masks, jax.Array]:
        mask_rng, cls_rng = jax.random.split(rng)
        masks = self.masker(mask_rng, batch)
        cls_target = jax.random.bernoulli(cls_rng, self.p_cls_target, (batch,))
        return masks, cls_target

    def targets(self, target_params, images) -> jax.Array:
        """LN'd target-encoder features of the full image [B, 1+N, D] (CLS first), no gradient."""
        h = self.encoder.apply({"params": target_params}, images)
        return losses.normalize_targets(jax.lax.stop_gradient(h), self.target_ln_eps)

    def predict(self, params, images, masks: Masks, cls_target: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Predictions [B, n_ctx, n_tgt, 1+Kt, D] for every (context set, target set) pair, as I-JEPA
        pairs them, and the context encoder's tokens [B*n_ctx, 1+Kc, D] they were made from."""
        b, n_ctx, k_ctx = masks.ctx_idx.shape
        n_tgt, k_tgt = masks.tgt_idx.shape[1:]
        cls_in_ctx = ~cls_target

        # The context encoder sees each context set as its own sequence.
        rep_c = lambda x: jnp.repeat(x, n_ctx, axis=0)  # noqa: E731  [B, ...] -> [B*n_ctx, ...]
        z = self.encoder.apply(
            {"params": params["encoder"]},
            rep_c(images),
            patch_idx=masks.ctx_idx.reshape(b * n_ctx, k_ctx),
            patch_valid=masks.ctx_valid.reshape(b * n_ctx, k_ctx),
            cls_visible=rep_c(cls_in_ctx),
        )

        # One predictor sequence per (sample, context set, target set).
        rep_t = lambda x: jnp.repeat(x, n_tgt, axis=0)  # noqa: E731  [B*n_ctx, ...] -> [B*n_ctx*n_tgt, ...]
        tgt_idx = jnp.broadcast_to(masks.tgt_idx[:, None], (b, n_ctx, n_tgt, k_tgt)).reshape(-1, k_tgt)
        tgt_valid = jnp.broadcast_to(masks.tgt_valid[:, None], (b, n_ctx, n_tgt, k_tgt)).reshape(-1, k_tgt)
        pred = self.predictor.apply(
            {"params": params["predictor"]},
            rep_t(z),
            rep_t(masks.ctx_idx.reshape(b * n_ctx, k_ctx)),
            rep_t(masks.ctx_valid.reshape(b * n_ctx, k_ctx)),
            rep_t(rep_c(cls_in_ctx)),
            tgt_idx,
            tgt_valid,
        )
        return pred.reshape(b, n_ctx, n_tgt, 1 + k_tgt, -1), z

    def anti_collapse(self, z: jax.Array, ctx_valid: jax.Array, rng: jax.Array) -> jax.Array:
        """SIGReg (losses.sigreg) of the context encoder's two readouts, CLS and the mean of the valid
        patch tokens, averaged. CLS is computed even where it is hidden as a key (reassigned), so every
        sample contributes both. 0 when the term is off."""
        if not self.sigreg_weight:
            return jnp.zeros((), jnp.float32)
        valid = ctx_valid.reshape(z.shape[0], -1, 1).astype(jnp.float32)
        mean = jnp.sum(z[:, 1:].astype(jnp.float32) * valid, 1) / jnp.maximum(valid.sum(1), 1.0)
        kw = dict(slices=self.sigreg_slices, knots=self.sigreg_knots, t_max=self.sigreg_t_max)
        r_cls, r_mean = jax.random.split(rng)
        return 0.5 * (losses.sigreg(z[:, 0], r_cls, **kw) + losses.sigreg(mean, r_mean, **kw))

    # ------------------------------------------------------------------------------- objective

    def loss(self, params, target_params, images, rng):
        b = images.shape[0]
        reg_rng = jax.random.fold_in(rng, 1)  # leaves the mask stream of `rng` as it was without the term
        masks, cls_target = self.sample(rng, b)
        h = self.targets(target_params, images)  # [B, 1+N, D]
        pred, z = self.predict(params, images, masks, cls_target)  # [B, n_ctx, n_tgt, 1+Kt, D]
        n_ctx = pred.shape[1]

        # Targets at the slots: CLS first, then the patch tokens at tgt_idx (+1 skips the CLS row of h).
        patch_t = jnp.take_along_axis(h[:, None], 1 + masks.tgt_idx[..., None], axis=2)  # [B, n_tgt, Kt, D]
        cls_t = jnp.broadcast_to(h[:, None, :1], patch_t.shape[:2] + (1, h.shape[-1]))
        target = jnp.concatenate([cls_t, patch_t], axis=2)[:, None]  # [B, 1, n_tgt, 1+Kt, D]
        target = jnp.broadcast_to(target, pred.shape)

        w = losses.slot_weights(self.weight_grid, masks.tgt_idx, masks.tgt_valid, cls_target[:, None],
                                self.cls_weight)  # [B, n_tgt, 1+Kt]
        w = jnp.broadcast_to(w[:, None], pred.shape[:-1])
        jepa_loss, per_slot = losses.weighted_loss(pred, target, w, self.loss_kind, self.beta)
        reg = self.anti_collapse(z, masks.ctx_valid, reg_rng)
        loss = jepa_loss + self.sigreg_weight * reg

        patch_w = w[..., 1:]
        cls_w = w[..., 0]
        metrics = {
            "loss": loss,
            "loss_jepa": jepa_loss,
            "sigreg": reg,
            "loss_patch": jnp.sum(per_slot[..., 1:] * patch_w) / jnp.maximum(patch_w.sum(), 1e-12),
            # Mean CLS loss over the samples whose CLS was a target (0 when none was in this batch).
            "loss_cls": jnp.sum(per_slot[..., 0] * cls_w) / jnp.maximum(cls_w.sum(), 1e-12),
            "cls_target_frac": cls_target.mean(),
            "ctx_valid_frac": masks.ctx_valid.mean(),
            "tgt_valid_frac": masks.tgt_valid.mean(),
            # Collapse monitor: how much the target features still differ between images.
            "target_std": feature_std(h),
            "n_pred_seqs": jnp.asarray(b * n_ctx * masks.tgt_idx.shape[1], jnp.float32),
        }
        return loss, metrics


def feature_std(h: jax.Array) -> jax.Array:
    """Mean over channels of the batch std of the mean-pooled normalised target features.

    Each token is layer-normed, so a healthy encoder gives O(0.1-1) here; a collapsed one (every image
    mapped to the same features) gives ~0 however the per-token normalisation rescales them.
    """
    pooled = h[:, 1:].mean(1)
    return jnp.std(pooled, axis=0).mean()


def make_jepa(config, encoder, predictor, masker: Masker) -> JEPA:
    """Builds the objective from the `loss` section of the config."""
    grid = masker.grid
    lc = config.loss
    return JEPA(
        encoder=encoder,
        predictor=predictor,
        masker=masker,
        weight_grid=jnp.asarray(losses.loss_weight_grid(lc, grid), jnp.float32),
        loss_kind=lc.kind,
        beta=lc.beta,
        target_ln_eps=lc.target_ln_eps,
        p_cls_target=lc.cls.p_target,
        cls_weight=lc.cls.loss_weight,
        sigreg_weight=float(lc.sigreg.weight),
        sigreg_slices=int(lc.sigreg.slices),
        sigreg_knots=int(lc.sigreg.knots),
        sigreg_t_max=float(lc.sigreg.t_max),
    )

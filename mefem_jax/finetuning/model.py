"""The fine-tuned model: the pretrained ViT and one linear head on its CLS token or mean-pooled patches.

Parameters are `{"encoder": <ViT params, the layout timm_keys.py maps>, "head": {"kernel", "bias"}}`,
so the encoder half is exactly what `encoders.load_encoder_params` returns and what an export writes,
and the head is timm's `head` Linear (weights/classifier.py maps it). With `standardize` the head also
holds `input_mean` and `input_std` and reads `(feature - input_mean) / input_std` (LinearHead says
where they come from); the export folds them into `head.weight` / `head.bias`. The readouts are the ones timm
computes with `global_pool="token"` (CLS) and `global_pool="avg", fc_norm=False` (the mean of the
final-normed patch tokens), which is what makes the export equal to this model.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mefem_jax.models.vit import ViT

READOUTS = ("cls", "mean")


def readout(tokens: jax.Array, how: str) -> jax.Array:
    """[B, 1 + N, D] final-normed tokens -> [B, D] head input."""
    if how == "cls":
        return tokens[:, 0]
    if how == "mean":
        return jnp.mean(tokens[:, 1:], axis=1)
    raise ValueError(f"head.readout must be one of {READOUTS}, got {how!r}")


STANDARDIZE = ("batch", "fixed", "none")
BATCH_EPS = 1e-6  # MAE's linear-probe BatchNorm eps


class LinearHead(nn.Module):
    """logits = z @ kernel + bias on the feature z, standardised per `standardize`:

    * "none":  z is the feature itself.
    * "fixed": z = (feature - input_mean) / input_std, both measured on the frozen encoder before step 0
               and never changed (no gradient reaches them; the optimiser gives them a factor of 0).
    * "batch": BatchNorm without affine, as MAE's linear-probing head: in training z is standardised by
               the batch's own mean and std (the global batch: the step is one SPMD program), and the
               step moves input_mean / input_std towards them (step.py); evaluation and the export use
               those tracked values.

    Why: a small pretrained encoder's final-normed features can vary from face to face by a fraction of
    their size (the 1,000-step `:cpu` encoder: median std 0.04 against |mean| 0.65). On the raw features a
    head needs weights of order 1 / spread, which Adam reaches only after thousands of steps. And any
    update of the encoder moves the large shared part of the features by many spreads, which a fixed
    standardisation turns into a large shift of every logit; batch statistics follow the shift, and
    their gradient does not push the encoder along it. Either way the export folds input_mean /
    input_std into a plain Linear."""
    num_logits: int
    standardize: str = "none"

    @nn.compact
    def __call__(self, feature: jax.Array, training: bool = False) -> jax.Array:
        width = feature.shape[-1]
        if self.standardize != "none":
            mean = self.param("input_mean", nn.initializers.zeros, (width,), jnp.float32)
            std = self.param("input_std", nn.initializers.ones, (width,), jnp.float32)
            if training and self.standardize == "batch":
                mean, std = feature.mean(0), jnp.sqrt(feature.var(0) + BATCH_EPS)
                self.sow("batch_stats", "input_mean", jax.lax.stop_gradient(mean))
                self.sow("batch_stats", "input_std", jax.lax.stop_gradient(std))
            else:
                mean, std = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(std)
            feature = (feature - mean) / std
        # MAE initialises the head at std 2e-5: the pretrained features are not disturbed while it finds its
        # scale. With head.init='probe' (LP-FT) it is replaced by a fitted linear probe before step 0.
        kernel = self.param("kernel", nn.initializers.truncated_normal(2e-5), (width, self.num_logits), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.num_logits,), jnp.float32)
        return feature @ kernel + bias


class Classifier(nn.Module):
    encoder: ViT
    num_logits: int
    how: str = "cls"
    standardize: str = "none"

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """Logits; `deterministic=False` is the training step's call (drop path on, batch statistics)."""
        tokens = self.encoder(images, deterministic=deterministic)
        head = LinearHead(self.num_logits, self.standardize, name="head")
        return head(readout(tokens, self.how).astype(jnp.float32), training=not deterministic)

    def features(self, images: jax.Array) -> jax.Array:
        """The head's input, deterministic: for the head's starting statistics and the LP-FT probe."""
        return readout(self.encoder(images), self.how)

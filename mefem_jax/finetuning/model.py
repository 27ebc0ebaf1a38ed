"""The fine-tuned model: the pretrained ViT and one linear head on its CLS token or mean-pooled patches.

Parameters are `{"encoder": <ViT params, the layout timm_keys.py maps>, "head": {"kernel", "bias"}}`,
so the encoder half is exactly what `encoders.load_encoder_params` returns and what an export writes,
and the head is timm's `head` Linear (weights/classifier.py maps it). With `standardize` the head also
holds `input_mean` and `input_std`, fixed: it reads `(feature - input_mean) / input_std`, the frozen
encoder's spread over the train faces measured before step 0 (finetune.py), and the export folds them
into `head.weight` / `head.bias`. The readouts are the ones timm
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


class LinearHead(nn.Module):
    """logits = z @ kernel + bias, with z the feature, or with `standardize` the feature standardised by
    the fixed `input_mean` / `input_std` (set before step 0; no gradient reaches them, and the optimiser
    gives them no step: finetuning/layer_decay.py).

    Why standardise: a small pretrained encoder's final-normed features can vary from face to face by a
    fraction of their size. A head on the raw features then needs weights of order 1 / spread, which
    Adam, moving each weight by about the learning rate per step, takes thousands of steps to reach; on
    the standardised features the same head is of order 1. This is MAE's linear-probing BatchNorm
    without affine, frozen at the start so the export stays a plain Linear."""
    num_logits: int
    standardize: bool = False

    @nn.compact
    def __call__(self, feature: jax.Array) -> jax.Array:
        width = feature.shape[-1]
        if self.standardize:
            mean = self.param("input_mean", nn.initializers.zeros, (width,), jnp.float32)
            std = self.param("input_std", nn.initializers.ones, (width,), jnp.float32)
            feature = (feature - jax.lax.stop_gradient(mean)) / jax.lax.stop_gradient(std)
        # MAE initialises the head at std 2e-5: the pretrained features are not disturbed while it finds its
        # scale. With head.init='probe' (LP-FT) it is replaced by a fitted linear probe before step 0.
        kernel = self.param("kernel", nn.initializers.truncated_normal(2e-5), (width, self.num_logits), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.num_logits,), jnp.float32)
        return feature @ kernel + bias


class Classifier(nn.Module):
    encoder: ViT
    num_logits: int
    how: str = "cls"
    standardize: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        tokens = self.encoder(images, deterministic=deterministic)
        head = LinearHead(self.num_logits, self.standardize, name="head")
        return head(readout(tokens, self.how).astype(jnp.float32))

    def features(self, images: jax.Array) -> jax.Array:
        """The head's input, deterministic: for fitting the LP-FT probe."""
        return readout(self.encoder(images), self.how)

"""The fine-tuned model: the pretrained ViT and one linear head on its CLS token or mean-pooled patches.

Parameters are `{"encoder": <ViT params, the layout timm_keys.py maps>, "head": {"kernel", "bias"}}`,
so the encoder half is exactly what `encoders.load_encoder_params` returns and what an export writes,
and the head is timm's `head` Linear (weights/classifier.py maps it). The readouts are the ones timm
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


class Classifier(nn.Module):
    encoder: ViT
    num_logits: int
    how: str = "cls"

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        tokens = self.encoder(images, deterministic=deterministic)
        # MAE initialises the head at std 2e-5: the pretrained features are not disturbed while it finds its
        # scale. With head.init='probe' (LP-FT) it is replaced by a fitted linear probe before step 0.
        head = nn.Dense(self.num_logits, kernel_init=nn.initializers.truncated_normal(2e-5),
                        bias_init=nn.initializers.zeros, name="head")
        return head(readout(tokens, self.how).astype(jnp.float32))

    def features(self, images: jax.Array) -> jax.Array:
        """The head's input, deterministic: for fitting the LP-FT probe."""
        return readout(self.encoder(images), self.how)

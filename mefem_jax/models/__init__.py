"""Flax linen models: the ViT encoder and the I-JEPA predictor."""
from mefem_jax.models.predictor import Predictor, predictor_from_config
from mefem_jax.models.vit import VARIANTS, ViT, encoder_from_config, sincos_pos_embed

__all__ = ["VARIANTS", "ViT", "Predictor", "encoder_from_config", "predictor_from_config",
           "sincos_pos_embed"]

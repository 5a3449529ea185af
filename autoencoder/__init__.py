"""Stage 1 models: the latent autoencoder and the text <-> latents codec."""

from .modeling_latent_autoencoder import LatentAutoencoder
from .text_codec import DEFAULT_GENERATE_KWARGS, GREEDY_GENERATE_KWARGS, decode_latents, encode_texts

__all__ = ["LatentAutoencoder", "encode_texts", "decode_latents", "DEFAULT_GENERATE_KWARGS", "GREEDY_GENERATE_KWARGS"]

"""Video VAEs: the Wan2.1 3D causal VAE (wan_vae)."""

from astraea_jax.vae.wan_vae import (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD,
                                     WanVAE, WanVAEConfig, clamp_video,
                                     decode_jit, encode_jit)

__all__ = ["WAN21_LATENTS_MEAN", "WAN21_LATENTS_STD", "WanVAE",
           "WanVAEConfig", "clamp_video", "decode_jit", "encode_jit"]

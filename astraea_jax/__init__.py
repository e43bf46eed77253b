"""astraea-jax: token-wise acceleration of video diffusion transformers."""

from astraea_jax.checkpoint import load_model
from astraea_jax.configs import WanConfig
from astraea_jax.models.wan import WanDiT

__all__ = ["WanConfig", "WanDiT", "load_model"]
__version__ = "0.1.0"

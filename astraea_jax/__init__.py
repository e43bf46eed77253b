"""astraea-jax: token-wise acceleration of video diffusion transformers.

The names a research script needs:

  import astraea_jax as aj
  model = aj.load_model("ckpt/wan2.1-t2v-1.3b")        # a converted folder
  graphdef, params = nnx.split(model)
  noise = aj.draw_noise(jax.random.key(0), aj.wan_latent_shape(480, 832, 81))
  dense = aj.sample(graphdef, params, noise, context, negative)
  fast = aj.astraea_sample(graphdef, params, noise, context, negative,
                           budget=0.4)
  fast = aj.astraea_sample(..., schedule=aj.default_schedule(0.4, 50),
                           selection_config=aj.SelectionConfig(w_beta=0.3))
"""

from astraea_jax.astraea.schedule import default_schedule
from astraea_jax.astraea.selection import SelectionConfig
from astraea_jax.astraea.stdit3_tokenwise import (
    sample as opensora_astraea_sample,
)
from astraea_jax.astraea.wan_tokenwise import sample as astraea_sample
from astraea_jax.checkpoint import load_model
from astraea_jax.configs import STDiT3Config, WanConfig
from astraea_jax.models.stdit3 import STDiT3
from astraea_jax.models.wan import WanDiT
from astraea_jax.sampling.opensora import sample_opensora
from astraea_jax.sampling.sampler import (
    SampleStats,
    draw_noise,
    make_scheduler,
    sample,
    wan_latent_shape,
)

__all__ = [
    "STDiT3",
    "STDiT3Config",
    "SampleStats",
    "SelectionConfig",
    "WanConfig",
    "WanDiT",
    "astraea_sample",
    "default_schedule",
    "draw_noise",
    "load_model",
    "make_scheduler",
    "opensora_astraea_sample",
    "sample",
    "sample_opensora",
    "wan_latent_shape",
]
__version__ = "0.1.0"

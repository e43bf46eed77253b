"""Text encoder + DiT + VAE of each model family on one base
(`base.Pipeline`): `WanPipeline` (Wan2.1), `Wan22TI2VPipeline`,
`Wan22T2VA14BPipeline` and `Wan22I2VA14BPipeline` (Wan2.2) and `OpenSoraPipeline` (OpenSora v1.2);
`pipeline_class(folder)` picks the one a converted folder holds.

  pipe = WanPipeline.from_pretrained("wan-1.3b", dtype="bfloat16")
  video = pipe("A cat baking a cake", budget=0.4)
"""

from astraea_jax.pipelines.base import (
    PIPELINES,
    GenerateConfig,
    Pipeline,
    pipeline_class,
)
from astraea_jax.pipelines.opensora_pipeline import OpenSoraPipeline
from astraea_jax.pipelines.wan22_pipeline import (
    Wan22I2VA14BPipeline,
    Wan22T2VA14BPipeline,
    Wan22TI2VPipeline,
)
from astraea_jax.pipelines.wan_pipeline import WanPipeline

__all__ = ["GenerateConfig", "OpenSoraPipeline", "PIPELINES", "Pipeline",
           "Wan22I2VA14BPipeline", "Wan22T2VA14BPipeline",
           "Wan22TI2VPipeline", "WanPipeline",
           "pipeline_class"]

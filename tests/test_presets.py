"""The Wan presets build the exact tensors of the real checkpoints.

Expected shapes are written out here from the published architecture
(Wan2.1 config.json: dim, ffn_dim, heads, layers; in/out 16 channels, text
4096, freq 256, patch (1, 2, 2)), independently of the converter's map.
Abstract evaluation only: no weights are allocated.
"""

import pytest

from astraea_jax.configs import WanConfig
from converters import wan as wan_converter


def published_shapes(dim, ffn, layers, in_dim=16, out_dim=16):
  shapes = {
      "patch_embedding.weight": (dim, in_dim, 1, 2, 2),
      "patch_embedding.bias": (dim,),
      "text_embedding.0.weight": (dim, 4096), "text_embedding.0.bias": (dim,),
      "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
      "time_embedding.0.weight": (dim, 256), "time_embedding.0.bias": (dim,),
      "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
      "time_projection.1.weight": (6 * dim, dim),
      "time_projection.1.bias": (6 * dim,),
      "head.head.weight": (4 * out_dim, dim),
      "head.head.bias": (4 * out_dim,),
      "head.modulation": (1, 2, dim),
  }
  for i in range(layers):
    b = f"blocks.{i}."
    shapes[b + "modulation"] = (1, 6, dim)
    for attn in ("self_attn", "cross_attn"):
      for p in "qkvo":
        shapes[f"{b}{attn}.{p}.weight"] = (dim, dim)
        shapes[f"{b}{attn}.{p}.bias"] = (dim,)
      shapes[f"{b}{attn}.norm_q.weight"] = (dim,)
      shapes[f"{b}{attn}.norm_k.weight"] = (dim,)
    shapes[b + "norm3.weight"] = (dim,)
    shapes[b + "norm3.bias"] = (dim,)
    shapes[b + "ffn.0.weight"] = (ffn, dim)
    shapes[b + "ffn.0.bias"] = (ffn,)
    shapes[b + "ffn.2.weight"] = (dim, ffn)
    shapes[b + "ffn.2.bias"] = (dim,)
  return shapes


@pytest.mark.parametrize("config,count,size", [
    (WanConfig.wan21_t2v_1_3b(), 825, (1536, 8960, 30)),
    (WanConfig.wan21_t2v_14b(), 1095, (5120, 13824, 40)),
    # Wan2.2 (wan22 configs/wan_ti2v_5B.py, wan_i2v_A14B.py)
    (WanConfig.wan22_ti2v_5b(), 825, (3072, 14336, 30, 48, 48)),
    (WanConfig.wan22_i2v_a14b(), 1095, (5120, 13824, 40, 36, 16)),
])
def test_preset_matches_published_checkpoint(config, count, size):
  ours = wan_converter.expected_checkpoint_shapes(config)
  published = published_shapes(*size)
  assert len(published) == count
  assert ours == published

"""Model presets as frozen dataclasses, one named constructor per preset.

Wan2.1 sizes: Reference: the `config.json` files of the published
Wan-AI/Wan2.1-T2V-1.3B and -14B checkpoints and Table 1 of the Wan report
(arXiv 2503.20314): 1.3B = dim 1536, ffn 8960, 12 heads, 30 layers;
14B = dim 5120, ffn 13824, 40 heads, 40 layers.
Wan2.2 sizes: Reference: `wan/configs/wan_ti2v_5B.py`, `wan_t2v_A14B.py`
and `wan_i2v_A14B.py` of the `wan22` package: TI2V-5B = dim 3072, ffn
14336, 24 heads, 30 layers over the 48-channel Wan2.2 VAE latents; each
A14B expert (high-noise and low-noise) = the Wan2.1 14B DiT, the I2V one
with in_dim 36 (16 noisy + 4 mask + 16 image latent channels).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16}


def dtype_from_name(name: str):
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def config_kwargs(cls, d: dict[str, Any], model: str) -> dict[str, Any]:
  """The constructor arguments of config class `cls` from its `to_dict()`
  form; raises ValueError for another model's tag or unknown fields."""
  d = dict(d)
  tag = d.pop("model", model)
  if tag != model:
    raise ValueError(f"not a {model} config ({cls.__name__}): model={tag!r}")
  unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
  return d


def _plain(value):
  """`dataclasses.asdict` output as JSON writes it: tuples become lists."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return list(value) if isinstance(value, tuple) else value


class ModelConfig:
  """What every model config shares (a mixin of frozen dataclasses with
  `dtype` and `param_dtype` fields): the dtypes by name, `replace`, and the
  JSON form tagged with the class's `MODEL`, which `config.json` holds."""

  MODEL: ClassVar[str]

  def check_dtypes(self):
    dtype_from_name(self.dtype)
    dtype_from_name(self.param_dtype)

  @property
  def compute_dtype(self):
    return dtype_from_name(self.dtype)

  @property
  def weight_dtype(self):
    return dtype_from_name(self.param_dtype)

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return {"model": self.MODEL, **_plain(dataclasses.asdict(self))}

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    return cls(**config_kwargs(cls, d, cls.MODEL))


@dataclasses.dataclass(frozen=True)
class WanConfig(ModelConfig):
  """Wan2.1 / Wan2.2 DiT (`WanModel` in the original code). Per-token
  timesteps (TI2V) and conditioning channels (I2V: in_dim > out_dim) are
  inputs of `WanDiT`, not fields: the parameters are the same."""

  MODEL: ClassVar[str] = "wan"

  dim: int
  ffn_dim: int
  num_heads: int
  num_layers: int
  in_dim: int = 16
  out_dim: int = 16
  text_dim: int = 4096
  text_len: int = 512
  freq_dim: int = 256
  patch_size: tuple[int, int, int] = (1, 2, 2)
  eps: float = 1e-6
  cross_attn_norm: bool = True
  rope_theta: float = 10000.0
  # Matmul inputs are cast to `dtype`; parameters are stored in
  # `param_dtype`. The fp32 islands (time MLP, modulation, norm statistics,
  # residual stream, head) ignore both, as the original does.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # `jax.lax.scan` unroll factor over the blocks (True = fully unrolled).
  scan_unroll: int | bool = 1

  def __post_init__(self):
    object.__setattr__(self, "patch_size", tuple(self.patch_size))
    if len(self.patch_size) != 3:
      raise ValueError(f"{self.patch_size=} must have 3 entries (t, h, w)")
    if self.dim % self.num_heads:
      raise ValueError(f"{self.dim=} must be divisible by {self.num_heads=}")
    if self.head_dim % 2 or self.head_dim < 6:
      raise ValueError(f"{self.head_dim=} must be even and >= 6 for 3-D RoPE")
    if self.freq_dim % 2:
      raise ValueError(f"{self.freq_dim=} must be even")
    self.check_dtypes()

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  # Presets ---------------------------------------------------------------

  @classmethod
  def wan21_t2v_1_3b(cls, **overrides) -> "WanConfig":
    """`astraea convert Wan2.1-T2V-1.3B out/` produces this config."""
    return cls(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
               **overrides)

  @classmethod
  def wan21_t2v_14b(cls, **overrides) -> "WanConfig":
    return cls(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
               **overrides)

  @classmethod
  def wan22_ti2v_5b(cls, **overrides) -> "WanConfig":
    """Wan2.2 TI2V-5B: text and image to video over the Wan2.2 VAE's
    48-channel latents (the image enters as the first latent frame, with
    per-token timesteps)."""
    return cls(**{"dim": 3072, "ffn_dim": 14336, "num_heads": 24,
                  "num_layers": 30, "in_dim": 48, "out_dim": 48,
                  **overrides})

  @classmethod
  def wan22_t2v_a14b(cls, **overrides) -> "WanConfig":
    """One expert (high- or low-noise) of Wan2.2 T2V-A14B."""
    return cls.wan21_t2v_14b(**overrides)

  @classmethod
  def wan22_i2v_a14b(cls, **overrides) -> "WanConfig":
    """One expert of Wan2.2 I2V-A14B: 16 latent + 20 condition channels."""
    return cls.wan21_t2v_14b(**{"in_dim": 36, **overrides})

  @classmethod
  def tiny(cls, **overrides) -> "WanConfig":
    """The parity fixture's config (../shared/fixtures/wan21_t2v)."""
    kw = dict(dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=48,
              text_len=16, freq_dim=32)
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def demo(cls, **overrides) -> "WanConfig":
    """The embedded demo model (astraea_jax/demo_model): pixel space.

    RGB video in [-1, 1] of 16 x 48 x 48, patch (2, 4, 4) -> 8 x 12 x 12 =
    1152 tokens; 3 heads of 64; text from the demo's 128-wide encoder.
    """
    kw = dict(dim=192, ffn_dim=768, num_heads=3, num_layers=6, in_dim=3,
              out_dim=3, text_dim=128, text_len=16, freq_dim=256,
              patch_size=(2, 4, 4))
    kw.update(overrides)
    return cls(**kw)



# OpenSora v1.2 STDiT3-XL/2. Reference: `STDiT3_XL_2` in
# `opensora/models/stdit/stdit3.py` of hpcaitech/Open-Sora (commit 3552145f)
# and the `config.json` of the published hpcai-tech/OpenSora-STDiT-v3
# checkpoint: hidden 1152, depth 28 (28 spatial + 28 temporal blocks), 16
# heads, patch (1, 2, 2), 4 latent channels, caption 4096 x 300 tokens
# (T5-v1.1-XXL), mlp ratio 4, q/k RMSNorm, input_sq_size 512.


@dataclasses.dataclass(frozen=True)
class STDiT3Config(ModelConfig):
  """OpenSora v1.2 spatial-temporal DiT (`STDiT3` in the original code)."""

  MODEL: ClassVar[str] = "stdit3"

  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  patch_size: tuple[int, int, int] = (1, 2, 2)
  in_channels: int = 4
  # pred_sigma: the output has 2 * in_channels channels (velocity, sigma).
  pred_sigma: bool = True
  caption_channels: int = 4096
  model_max_length: int = 300
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  # Resolution whose position embedding scale is 1: scale = sqrt(H*W) / it.
  input_sq_size: int = 512
  # Sinusoid size of the timestep and fps embedders (fixed in the original).
  freq_dim: int = 256
  eps: float = 1e-6
  rope_theta: float = 10000.0
  # Matmul inputs are cast to `dtype`; parameters are stored in
  # `param_dtype`. The float32 islands (timestep/fps embedders, t_block,
  # modulation, norm statistics, softmax, residual stream, final layer)
  # ignore both.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # `jax.lax.scan` unroll factor over the (spatial, temporal) block pairs.
  scan_unroll: int | bool = 1

  def __post_init__(self):
    object.__setattr__(self, "patch_size", tuple(self.patch_size))
    if len(self.patch_size) != 3:
      raise ValueError(f"{self.patch_size=} must have 3 entries (t, h, w)")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"{self.hidden_size=} must be divisible by {self.num_heads=}")
    if self.hidden_size % 4:
      raise ValueError(f"{self.hidden_size=} must be divisible by 4 (2-D "
                       "sin-cos position embedding)")
    if self.head_dim % 2:
      raise ValueError(f"{self.head_dim=} must be even (temporal RoPE)")
    if self.freq_dim % 2:
      raise ValueError(f"{self.freq_dim=} must be even")
    if self.depth < 1:
      raise ValueError(f"{self.depth=} must be >= 1")
    self.check_dtypes()

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.pred_sigma else self.in_channels

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)  # as timm's Mlp rounds

  # Presets ---------------------------------------------------------------

  @classmethod
  def opensora_v1_2(cls, **overrides) -> STDiT3Config:
    """STDiT3-XL/2 of OpenSora v1.2 (1.1B parameters)."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides) -> STDiT3Config:
    """The parity fixture's config (../shared/fixtures/opensora_stdit3)."""
    kw = {"hidden_size": 64, "depth": 2, "num_heads": 4,
          "caption_channels": 32, "model_max_length": 8}
    kw.update(overrides)
    return cls(**kw)


PRESETS = {
    "wan2.1-t2v-1.3b": WanConfig.wan21_t2v_1_3b,
    "wan2.1-t2v-14b": WanConfig.wan21_t2v_14b,
    "wan2.2-ti2v-5b": WanConfig.wan22_ti2v_5b,
    "wan2.2-t2v-a14b": WanConfig.wan22_t2v_a14b,
    "wan2.2-i2v-a14b": WanConfig.wan22_i2v_a14b,
    "wan-tiny": WanConfig.tiny,
    "opensora-v1.2": STDiT3Config.opensora_v1_2,
    "stdit3-tiny": STDiT3Config.tiny,
}


def get_config(name: str, **overrides):
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
  return PRESETS[name](**overrides)

"""The `wan22` package's PyTorch modules for parity tests, on CPU.

`import wan` runs wan/__init__, which imports wan/modules/t5.py, which
touches CUDA: `load_wan22_module` executes one submodule file under empty
`wan` / `wan.modules` packages instead. `exact_attention` replaces the
reference's flash-attention call by an exact float32 softmax with the same
key masking; `randomise_` draws every parameter (the references zero-init
some layers, which would leave paths untested).
"""

import importlib.util
import sys
import types

import numpy as np
import torch

from astraea_jax import testing


def load_wan22_module(name):
  """wan.modules.<name> (e.g. "model", "vae2_2") without wan/__init__."""
  root = str(testing.wan22_dir())  # ImportError naming the install
  saved = {k: sys.modules.get(k) for k in ("wan", "wan.modules")}
  for pkg_name, path in (("wan", root), ("wan.modules", root + "/modules")):
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [path]
    sys.modules[pkg_name] = pkg
  try:
    mspec = importlib.util.spec_from_file_location(
        f"wan.modules.{name}", f"{root}/modules/{name}.py")
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  return module


def exact_attention(q, k, v, q_lens=None, k_lens=None, softmax_scale=None,
                    **unused):
  """flash_attention's contract in float32: keys past k_lens are masked."""
  del q_lens, unused
  lk = k.shape[1]
  mask = None
  if k_lens is not None:
    mask = (torch.arange(lk)[None, :] < k_lens[:, None])[:, None, None, :]
  out = torch.nn.functional.scaled_dot_product_attention(
      q.float().transpose(1, 2), k.float().transpose(1, 2),
      v.float().transpose(1, 2), attn_mask=mask, scale=softmax_scale)
  return out.transpose(1, 2).to(q.dtype)


def wan_model(**kwargs):
  """wan22's `WanModel(**kwargs)` in eval mode, exact attention."""
  module = load_wan22_module("model")
  module.flash_attention = exact_attention
  return module.WanModel(**kwargs).eval()


def randomise_(module, seed):
  """Every parameter random: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2),
  norm gains (DiT norm weights, VAE `gamma`) ~ 1 + N(0, 0.1^2), modulation
  tables ~ N(0, 0.5^2)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      gain = name.endswith("gamma") or ("norm" in name and p.ndim == 1)
      fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
      scale = 0.5 if "scale_shift" in name or "modulation" in name else (
          fan_in ** -0.5 if p.ndim > 1 and not gain else 0.1)
      noise = torch.randn(p.shape, generator=gen) * scale
      p.copy_(1 + noise if gain else noise)


def random_reference_dit(config, model_type, seed):
  """wan22's WanModel of our WanConfig `config`, every parameter random."""
  ref = wan_model(
      model_type=model_type, patch_size=config.patch_size,
      text_len=config.text_len, in_dim=config.in_dim, dim=config.dim,
      ffn_dim=config.ffn_dim, freq_dim=config.freq_dim,
      text_dim=config.text_dim, out_dim=config.out_dim,
      num_heads=config.num_heads, num_layers=config.num_layers)
  randomise_(ref, seed)
  return ref

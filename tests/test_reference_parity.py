"""Live parity against the PyTorch references on tiny random models.

* diffusers `WanTransformer3DModel` with ALL parameters randomised, its
  weights written in the diffusers layout AND renamed to the original
  layout, each converted by `astraea convert`;
* the `wan22` package's `wan.modules.model.WanModel` (Wan2.2 code: per-token
  timesteps (B, seq_len); its flash-attention call is replaced by an exact
  float32 PyTorch softmax attention with the same key masking).

Tolerance: max abs error <= 1e-5 * max|reference| + 1e-6 (float32, same
math in a different order).
"""

import importlib.util
import sys
import types

import jax.numpy as jnp
import numpy as np
import torch

from astraea_jax import checkpoint, cli, testing
from astraea_jax.configs import WanConfig
from converters import wan as wan_converter

CONFIG = WanConfig.tiny(dim=96, ffn_dim=160, num_heads=4, num_layers=2,
                        text_dim=40, text_len=12, freq_dim=32)


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 16, 3, 8, 10)).astype(np.float32)
  t = np.array([981.25, 37.5], np.float32)
  ctx = np.zeros((2, CONFIG.text_len, CONFIG.text_dim), np.float32)
  ctx[0, :9] = rng.standard_normal((9, CONFIG.text_dim))
  ctx[1, :4] = rng.standard_normal((4, CONFIG.text_dim))
  return x, t, ctx


def randomise_(module, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
      scale = 0.5 if "scale_shift" in name or "modulation" in name else (
          fan_in ** -0.5 if p.ndim > 1 else 0.1)
      noise = torch.randn(p.shape, generator=gen) * scale
      p.copy_(1 + noise if "norm" in name and p.ndim == 1 else noise)


def convert_state_dict(tmp_path, state_dict, layout):
  src = testing.write_wan_checkpoint(
      tmp_path / f"src-{layout}", CONFIG, state_dict, layout=layout)
  dst = tmp_path / f"dst-{layout}"
  assert cli.main(["convert", str(src), str(dst), "--quiet", "--text-len",
                   str(CONFIG.text_len)]) == 0
  return checkpoint.load_model(dst)


def test_diffusers_parity_through_both_layouts(tmp_path):
  from diffusers import WanTransformer3DModel
  ref_model = WanTransformer3DModel(
      patch_size=CONFIG.patch_size, num_attention_heads=CONFIG.num_heads,
      attention_head_dim=CONFIG.head_dim, in_channels=16, out_channels=16,
      text_dim=CONFIG.text_dim, freq_dim=CONFIG.freq_dim,
      ffn_dim=CONFIG.ffn_dim, num_layers=CONFIG.num_layers,
      cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6).eval()
  randomise_(ref_model, seed=11)
  x, t, ctx = inputs()
  with torch.no_grad():
    ref = ref_model(hidden_states=torch.from_numpy(x),
                    timestep=torch.from_numpy(t),
                    encoder_hidden_states=torch.from_numpy(ctx),
                    return_dict=False)[0].numpy()
  diffusers_sd = {k: v.numpy() for k, v in ref_model.state_dict().items()}
  original_sd = {wan_converter.to_original_key(k, "diffusers"): v
                 for k, v in diffusers_sd.items()}
  outs = []
  for layout, sd in (("diffusers", diffusers_sd), ("wan", original_sd)):
    model = convert_state_dict(tmp_path, sd, layout)
    outs.append(np.asarray(model(jnp.asarray(x), jnp.asarray(t),
                                 jnp.asarray(ctx))))
    testing.assert_close(outs[-1], ref)
  np.testing.assert_array_equal(outs[0], outs[1])


def load_wan22_model_module():
  """wan.modules.model without running wan/__init__ (which touches CUDA)."""
  root = str(testing.wan22_dir())
  saved = {k: sys.modules.get(k) for k in ("wan", "wan.modules")}
  for name, path in (("wan", root), ("wan.modules", root + "/modules")):
    pkg = types.ModuleType(name)
    pkg.__path__ = [path]
    sys.modules[name] = pkg
  try:
    mspec = importlib.util.spec_from_file_location(
        "wan.modules.model", root + "/modules/model.py")
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


def test_wan22_parity(tmp_path):
  module = load_wan22_model_module()
  module.flash_attention = exact_attention
  ref_model = module.WanModel(
      model_type="t2v", patch_size=CONFIG.patch_size,
      text_len=CONFIG.text_len, in_dim=16, dim=CONFIG.dim,
      ffn_dim=CONFIG.ffn_dim, freq_dim=CONFIG.freq_dim,
      text_dim=CONFIG.text_dim, out_dim=16, num_heads=CONFIG.num_heads,
      num_layers=CONFIG.num_layers).eval()
  randomise_(ref_model, seed=12)
  x, t, ctx = inputs(seed=1)
  seq_len = 3 * 4 * 5
  with torch.no_grad():
    ref = ref_model(
        [torch.from_numpy(xi) for xi in x],
        t=torch.from_numpy(t)[:, None].expand(2, seq_len),  # per-token t
        context=[torch.from_numpy(ctx[0, :9]), torch.from_numpy(ctx[1, :4])],
        seq_len=seq_len)
  ref = np.stack([r.numpy() for r in ref])
  sd = {k: v.numpy() for k, v in ref_model.state_dict().items()
        if not k.startswith("freqs")}
  model = convert_state_dict(tmp_path, sd, "wan")
  # The reference pads each context to text_len itself; pass unpadded ones.
  out0 = model(jnp.asarray(x[:1]), jnp.asarray(t[:1]), jnp.asarray(ctx[:1, :9]))
  out1 = model(jnp.asarray(x[1:]), jnp.asarray(t[1:]), jnp.asarray(ctx[1:, :4]))
  testing.assert_close(np.concatenate([out0, out1]), ref)

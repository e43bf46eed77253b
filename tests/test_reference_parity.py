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

import jax.numpy as jnp
import numpy as np
import torch

from _wan22_reference import randomise_, wan_model
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


def test_wan22_parity(tmp_path):
  ref_model = wan_model(
      model_type="t2v", patch_size=CONFIG.patch_size,
      text_len=CONFIG.text_len, in_dim=16, dim=CONFIG.dim,
      ffn_dim=CONFIG.ffn_dim, freq_dim=CONFIG.freq_dim,
      text_dim=CONFIG.text_dim, out_dim=16, num_heads=CONFIG.num_heads,
      num_layers=CONFIG.num_layers)
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

"""`astraea demo`: the default model end to end on a CPU.

Until the project's trained demo model ships, this runs a tiny RANDOM
Wan2.1-architecture model end to end and says so: a checkpoint written in
the published layout -> `astraea convert` -> `load_model` -> dense CFG
sampling and Astraea sampling from the same noise -> a (random) Wan VAE
decode -> speed ratio and PSNR/SSIM of Astraea against the full model.
Random weights make the video meaningless; the numbers still show what
the pipeline does.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax import checkpoint, metrics, testing
from astraea_jax.astraea import sampler as astraea_sampler
from astraea_jax.configs import WanConfig
from astraea_jax.sampling import sampler as dense_sampler
from astraea_jax.vae import WanVAE, WanVAEConfig
from converters import safetensors_io
from converters import wan as wan_converter

# 17 frames of 64 x 64 pixels -> latent (16, 5, 8, 8) -> 80 tokens.
FRAMES, HEIGHT, WIDTH = 17, 64, 64


def main(*, steps: int = 8, budget: float = 0.5, seed: int = 0,
         out: str = "astraea-demo") -> int:
  print("astraea demo: no trained demo model is shipped yet, so this runs a "
        "tiny RANDOM Wan2.1-architecture model end to end (convert -> load "
        "-> dense and Astraea sampling -> VAE decode). The video is noise; "
        "the comparison of Astraea with the full model is real.")
  config = WanConfig.tiny()
  with tempfile.TemporaryDirectory() as tmp:
    src = testing.write_wan_checkpoint(pathlib.Path(tmp) / "Wan-tiny",
                                       config, seed=seed)
    converted = pathlib.Path(tmp) / "converted"
    checkpoint.save(converted, *wan_converter.read_checkpoint(src))
    model = checkpoint.load_model(converted)
  graphdef, params = nnx.split(model)
  key_noise, key_text = jax.random.split(jax.random.key(seed))
  shape = dense_sampler.wan_latent_shape(HEIGHT, WIDTH, FRAMES)
  noise = dense_sampler.draw_noise(key_noise, shape)
  context = jax.random.normal(key_text, (1, 12, config.text_dim))
  negative = jnp.zeros((1, 1, config.text_dim))
  common = dict(steps=steps, guidance_scale=5.0, shift=3.0, progress=True)

  t0 = time.perf_counter()
  full = dense_sampler.sample(graphdef, params, noise, context, negative,
                              **common)
  t_full = time.perf_counter() - t0
  t0 = time.perf_counter()
  fast, stats = astraea_sampler.sample(graphdef, params, noise, context,
                                       negative, budget=budget,
                                       return_stats=True, **common)
  t_fast = time.perf_counter() - t0

  vae = WanVAE(WanVAEConfig.tiny(), rngs=nnx.Rngs(seed))
  video_full = vae.decode(full, clamp=True)
  video_fast = vae.decode(fast, clamp=True)
  report = {
      "model": "tiny random Wan2.1 architecture (no trained demo model yet)",
      "video": [FRAMES, HEIGHT, WIDTH], "latent_shape": list(shape),
      "tokens": stats.num_tokens, "steps": steps,
      "budget_schedule": [float(b) for b in stats.budgets],
      "tokens_per_step": stats.num_selected,
      "seconds_full_incl_compile": t_full,
      "seconds_astraea_incl_compile": t_fast,
      "psnr_db": float(metrics.psnr(video_fast, video_full)),
      "ssim": float(metrics.ssim(video_fast, video_full, channel_axis=-3)),
  }
  out = pathlib.Path(out)
  with checkpoint.atomic_folder(out, overwrite=True) as tmp:
    safetensors_io.save_file(
        {"latents_full": np.asarray(full), "latents_astraea": np.asarray(fast),
         "video_full": np.asarray(video_full),
         "video_astraea": np.asarray(video_fast)},
        tmp / "outputs.safetensors")
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  print(f"Astraea (mean budget {np.mean(stats.budgets):.2f}, "
        f"{stats.num_tokens} tokens) vs full model: PSNR "
        f"{report['psnr_db']:.2f} dB, SSIM {report['ssim']:.4f}. "
        "Tiny CPU model: the timings include compilation and say nothing "
        "about GPU speed (see benchmarks/).")
  print(f"wrote {out}/outputs.safetensors and {out}/report.json")
  return 0

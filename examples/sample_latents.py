"""Sample video latents with a tiny random-weight Wan model (runs on CPU).

  PYTHONPATH=. python examples/sample_latents.py --steps 10 --seed 0
  PYTHONPATH=. python examples/sample_latents.py --scheduler euler --loop scan

The research workflow in a few lines: split the model into (graphdef,
params), draw the noise from a PRNG key, run the dense CFG sampler. The
weights here are random and so are the "prompt embeddings"; with a converted
checkpoint, take `graphdef, params = nnx.split(checkpoint.load_model(dir))`
and real umT5 embeddings instead. Prints the latents' statistics and
optionally saves them (`--out latents.npy`).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from astraea_jax import sampling, testing
from astraea_jax.configs import WanConfig


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--scheduler", choices=["unipc", "euler"],
                      default="unipc")
  parser.add_argument("--guidance", type=float, default=5.0)
  parser.add_argument("--shift", type=float, default=3.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--frames", type=int, default=9,
                      help="video frames (4k + 1)")
  parser.add_argument("--height", type=int, default=64)
  parser.add_argument("--width", type=int, default=96)
  parser.add_argument("--loop", choices=sampling.sampler.LOOPS,
                      default="python")
  parser.add_argument("--out", help="save the latents here (.npy)")
  args = parser.parse_args(argv)

  config = WanConfig.tiny()
  _, noise_key, text_key = jax.random.split(jax.random.key(args.seed), 3)
  graphdef, params = testing.random_wan(config, seed=args.seed)
  shape = sampling.wan_latent_shape(args.height, args.width, args.frames)
  noise = sampling.draw_noise(noise_key, shape)
  # Stand-ins for umT5 outputs: a 12-token prompt, an empty negative prompt.
  context = jax.random.normal(text_key, (1, 12, config.text_dim))
  negative_context = jnp.zeros((1, 1, config.text_dim))

  start = time.perf_counter()
  latents, trajectory = sampling.sample(
      graphdef, params, noise, context, negative_context,
      scheduler=args.scheduler, steps=args.steps,
      guidance_scale=args.guidance, shift=args.shift, loop=args.loop,
      return_trajectory=True)
  latents.block_until_ready()
  seconds = time.perf_counter() - start

  x = np.asarray(latents)
  print(f"latents {x.shape} {x.dtype}: mean {x.mean():+.4f} std "
        f"{x.std():.4f}; {args.steps} {args.scheduler} steps "
        f"({args.loop} loop) in {seconds:.1f} s incl. compilation")
  steps = np.concatenate([np.asarray(noise)[None], np.asarray(trajectory)])
  change = np.sqrt((np.diff(steps, axis=0) ** 2).mean(axis=(1, 2, 3, 4, 5)))
  print("per-step RMS change of the latents:",
        " ".join(f"{c:.3f}" for c in change))
  if args.out:
    np.save(args.out, x)
    print(f"saved {args.out}")


if __name__ == "__main__":
  main()

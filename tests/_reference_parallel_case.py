"""Library side of tests/test_reference_parallel.py, run in a subprocess.

  python tests/_reference_parallel_case.py OUT.npz

needs XLA_FLAGS=--xla_force_host_platform_device_count=4 (set by the
test): sequence-parallel Astraea over 4 fake CPU devices, one call per
budget of BUDGETS, velocities and caches (real token rows) saved to OUT.
"""

import sys

import numpy as np

import _method_adapter as lib

WAN = dict(num_layers=2, dim=64, ffn_dim=96, num_heads=2, text_dim=24,
           text_len=8, freq_dim=16)
SHAPE = (1, 16, 3, 6, 6)  # 3 x 3 x 3 = 27 tokens: shards of 7, 7, 7, 6
DEVICES = 4
BUDGETS = [1.0, 0.5, 0.25, 0.0, 0.5]


def inputs():
  rng = np.random.default_rng(6)
  base = rng.standard_normal(SHAPE)
  step = rng.standard_normal(SHAPE)
  ctx2b = np.zeros((2, 8, WAN["text_dim"]))
  ctx2b[0, :5] = rng.standard_normal((5, WAN["text_dim"]))
  ctx2b[1, :2] = rng.standard_normal((2, WAN["text_dim"]))
  latents = [np.concatenate([base + 0.05 * i * step] * 2)
             for i in range(len(BUDGETS))]
  timesteps = [np.full(2, 900.0 - 120 * i) for i in range(len(BUDGETS))]
  ks = [int(round(b * 27)) for b in BUDGETS]
  return latents, timesteps, ctx2b, ks


def main(out):
  split, _ = lib.wan_model(seed=9, **WAN)
  latents, timesteps, ctx2b, ks = inputs()
  results = lib.parallel_astraea_forwards(split, latents, timesteps, ctx2b,
                                          ks, DEVICES)
  arrays = {}
  for i, (v, cache) in enumerate(results):
    arrays[f"v{i}"] = v
    for name, a in cache.items():
      arrays[f"{name}{i}"] = a
  np.savez(out, **arrays)


if __name__ == "__main__":
  main(sys.argv[1])

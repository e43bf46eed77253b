"""Sample one video on several GPUs: CFG over "data", tokens over "seq".

  # one host, 8 GPUs (CFG 2 x tokens 4), Astraea at mean budget 0.4
  PYTHONPATH=. python examples/multi_gpu.py --devices 8 --budget 0.4
  # the Wan2.1-1.3B architecture (random weights) at 480p x 81, tokens only
  PYTHONPATH=. python examples/multi_gpu.py --preset wan2.1-t2v-1.3b \
      --size 832x480 --frames 81 --devices 2 --data 1 --steps 4
  # a converted checkpoint
  PYTHONPATH=. python examples/multi_gpu.py --model wan-1.3b/ --devices 8
  # try it on a CPU: 4 fake devices, ring attention, checked vs one device
  PYTHONPATH=. python examples/multi_gpu.py --fake-cpu-devices 4 \
      --devices 4 --strategy ring --check
  # two hosts with 8 GPUs each: run on both, ASTRAEA_PROCESS_ID=0 / 1
  ASTRAEA_COORDINATOR=10.0.0.1:12355 ASTRAEA_NUM_PROCESSES=2 \
  ASTRAEA_PROCESS_ID=0 PYTHONPATH=. python examples/multi_gpu.py \
      --distributed --devices 16 --data 2 --budget 0.4

The research workflow: build a mesh (`parallel.make_mesh`), then call
`parallel.sample` / `parallel.astraea_sample` as the one-device samplers,
with `mesh=`. Without --model the weights and "prompt embeddings" are
random. With --distributed (the launch recipe: astraea_jax/parallel/mesh.py)
every process runs this same script on the same inputs; process 0 prints
and saves.
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=None,
                      help="devices in the mesh (default: all)")
  parser.add_argument("--data", type=int, default=None,
                      help="data-axis size (default: as much of the CFG "
                           "batch as divides --devices)")
  parser.add_argument("--strategy", default="auto",
                      choices=["auto", "ulysses", "ring", "hybrid"])
  parser.add_argument("--budget", type=float, default=None,
                      help="Astraea mean token budget (default: dense)")
  parser.add_argument("--model", default=None,
                      help="converted checkpoint folder (astraea convert)")
  parser.add_argument("--preset", default="wan-tiny",
                      help="random-weight config without --model")
  parser.add_argument("--size", default="96x64", help="WIDTHxHEIGHT")
  parser.add_argument("--frames", type=int, default=9)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--check", action="store_true",
                      help="also sample on one device and compare")
  parser.add_argument("--distributed", action="store_true",
                      help="join a multi-process run (ASTRAEA_* variables)")
  parser.add_argument("--fake-cpu-devices", type=int, default=None,
                      help="CPU only: pretend to have N devices")
  parser.add_argument("--out", help="save the latents here (.npy)")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.fake_cpu_devices:  # must happen before JAX starts
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.fake_cpu_devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from astraea_jax import parallel  # pylint: disable=g-import-not-at-top
  if args.distributed:
    parallel.initialize_distributed()
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from astraea_jax import checkpoint, configs, sampling, testing
  from astraea_jax.astraea import wan_tokenwise as astraea
  # pylint: enable=g-import-not-at-top

  main_process = jax.process_index() == 0
  say = print if main_process else (lambda *a, **k: None)
  if args.model:
    graphdef, params = nnx.split(checkpoint.load_model(args.model))
  else:
    config = configs.get_config(args.preset)
    graphdef, params = testing.random_wan(config, seed=args.seed)
  config = nnx.merge(graphdef, params).config
  width, height = (int(v) for v in args.size.lower().split("x"))
  shape = sampling.wan_latent_shape(height, width, args.frames)
  _, noise_key, text_key = jax.random.split(jax.random.key(args.seed), 3)
  noise = sampling.draw_noise(noise_key, shape)
  context = jax.random.normal(text_key, (1, 12, config.text_dim))
  negative = jnp.zeros((1, 1, config.text_dim))

  devices = args.devices or len(jax.devices())
  data = args.data or parallel.default_mesh_shape(devices, 2 * shape[0])[0]
  mesh = parallel.make_mesh(devices, data=data)
  plan = parallel.SequenceParallel(mesh, args.strategy).plan(
      config.num_heads)
  tokens = int(np.prod([s // p for s, p in zip(shape[2:],
                                                config.patch_size)]))
  say(f"{jax.process_count()} process(es), mesh data {mesh.shape['data']} x "
      f"seq {mesh.shape['seq']} on {jax.devices()[0].device_kind}; "
      f"{tokens} tokens; attention: {plan.name} (Ulysses {plan.ulysses} x "
      f"ring {plan.ring})")

  common = {"steps": args.steps, "progress": main_process}
  start = time.perf_counter()
  if args.budget is None:
    latents = parallel.sample(graphdef, params, noise, context, negative,
                              mesh=mesh, strategy=args.strategy, **common)
  else:
    latents, stats = parallel.astraea_sample(
        graphdef, params, noise, context, negative, mesh=mesh,
        strategy=args.strategy, budget=args.budget, return_stats=True,
        **common)
    say(f"tokens per shard and step: {stats.selected_per_shard}")
  x = np.asarray(latents)
  say(f"latents {x.shape}: mean {x.mean():+.4f} std {x.std():.4f}; "
      f"{args.steps} steps in {time.perf_counter() - start:.1f} s incl. "
      "compilation")

  if args.check:
    # One device: the dense sampler, or Astraea with the same per-shard
    # selection only when seq = 1 (else the selections differ by design).
    if args.budget is None:
      want = sampling.sample(graphdef, params, noise, context, negative,
                             **common)
    else:
      want = astraea.sample(graphdef, params, noise, context, negative,
                            budget=args.budget, **common)
    err = float(np.abs(x - np.asarray(want)).max()
                / np.abs(np.asarray(want)).max())
    say(f"max relative difference vs one device: {err:.2e}"
        + ("" if args.budget is None or mesh.shape["seq"] == 1 else
           " (Astraea selects per shard on several devices: expected to "
           "differ)"))
  if args.out and main_process:
    np.save(args.out, x)
    say(f"saved {args.out}")
  if args.distributed:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()

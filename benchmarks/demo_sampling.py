"""Sampling settings of the demo model, chosen by measured prompt agreement.

  PYTHONPATH=. python benchmarks/demo_sampling.py --weights DIR \
      --shifts 1 2 3 --guidances 3 5 7 --n 64 --out sweep.json

For every (flow shift, guidance scale) pair: the full model generates n
held-out and n training captions (`demo_model.analysis.measure_agreement`,
the same captions and noise for every pair) and the clips are read back
by the analyser. The best pair (all-attributes agreement, held-out and
training captions together) is what the model's config.json ships as its
default; the table goes into the model card. Writes JSON in the results
format (benchmarks/common.write_results) to --out.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import time

import common
from astraea_jax.demo_model import analysis
from astraea_jax.demo_model import model as model_lib


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--weights", default=None,
                      help="exported demo model folder (default: shipped)")
  parser.add_argument("--shifts", type=float, nargs="+", default=[1, 2, 3])
  parser.add_argument("--guidances", type=float, nargs="+",
                      default=[3, 5, 7])
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--n", type=int, default=64)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args(argv)
  model = model_lib.load(args.weights)
  rows = []
  for shift, guidance in itertools.product(args.shifts, args.guidances):
    t0 = time.perf_counter()

    def generate(captions, seed, shift=shift, guidance=guidance):
      return model_lib.to_uint8(model_lib.sample(
          model, captions, seed=seed, steps=args.steps, guidance=guidance,
          shift=shift, progress=False))

    row = {"shift": shift, "guidance": guidance,
           "steps": args.steps or model.config.steps}
    for split in ("held_out", "train"):
      r = analysis.measure_agreement(generate, n=args.n, split=split)
      row[split] = {k: r[k] for k in ("colour", "shape", "direction", "all")}
    row["all_mean"] = (row["held_out"]["all"] + row["train"]["all"]) / 2
    row["seconds"] = time.perf_counter() - t0
    rows.append(row)
    print(row, flush=True)
  best = max(rows, key=lambda r: r["all_mean"])
  print(f"best: shift {best['shift']}, guidance {best['guidance']}: "
        f"{best['all_mean']:.3f}")
  common.write_results(
      args.out, "demo_sampling",
      {"weights": str(args.weights or model_lib.WEIGHTS_DIR), "n": args.n,
       "best": {"shift": best["shift"], "guidance": best["guidance"]}},
      rows, [])


if __name__ == "__main__":
  main()

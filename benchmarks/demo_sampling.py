"""Sampling settings of the demo model, chosen by measured prompt agreement.

  PYTHONPATH=. python benchmarks/demo_sampling.py --weights DIR \
      --shifts 1 2 3 --guidances 3 6 --out sweep.json

For every (flow shift, guidance scale) pair the full model generates the
clips of two caption sets and the analyser reads them back
(`demo_model.analysis.measure_agreement`, the same captions and noise for
every pair):

- the selection set (--select-split/--select-seed/--select-n; default 256
  training captions, seed 1): the pair with the best all-attributes
  agreement here is what the model's config.json ships as its default;
- the report set (64 held-out captions, seed 0: the captions every
  published agreement figure of the demo model is measured on), recorded
  for every pair but never used to choose.

The two sets share no caption (checked), so the reported figures are not
the ones the settings were tuned on. Writes JSON in the results format
(benchmarks/common.write_results) to --out.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import time

import common
from astraea_jax.demo_model import analysis
from astraea_jax.demo_model import model as model_lib

REPORT = {"split": "held_out", "seed": 0, "n": 64}
ATTRIBUTES = ("colour", "shape", "direction", "all")


def caption_sets(select: dict, report: dict = REPORT) -> dict:
  """The two caption sets' definitions, refusing overlapping ones."""
  chosen = set(analysis.prompt_captions(select["n"], split=select["split"],
                                        seed=select["seed"]))
  reported = set(analysis.prompt_captions(report["n"], split=report["split"],
                                          seed=report["seed"]))
  shared = chosen & reported
  if shared:
    raise SystemExit(
        f"the selection captions ({select}) share {len(shared)} captions "
        f"with the report captions ({report}), e.g. {sorted(shared)[0]!r}: "
        "choose another --select-split/--select-seed")
  return {"select": select, "report": report}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--weights", default=None,
                      help="exported demo model folder (default: shipped)")
  parser.add_argument("--shifts", type=float, nargs="+", default=[1, 2, 3])
  parser.add_argument("--guidances", type=float, nargs="+",
                      default=[3, 6])
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--select-split", default="train",
                      choices=["train", "held_out"])
  parser.add_argument("--select-seed", type=int, default=1)
  parser.add_argument("--select-n", type=int, default=256)
  parser.add_argument("--batch", type=int, default=64,
                      help="captions per generate call")
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args(argv)
  sets = caption_sets({"split": args.select_split, "seed": args.select_seed,
                       "n": args.select_n})
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
    for role, spec in sets.items():
      r = analysis.measure_agreement(generate, n=spec["n"],
                                     split=spec["split"], seed=spec["seed"],
                                     batch=args.batch)
      row[role] = {k: r[k] for k in ATTRIBUTES}
    row["seconds"] = time.perf_counter() - t0
    rows.append(row)
    print(row, flush=True)
  best = max(rows, key=lambda r: r["select"]["all"])
  print(f"chosen on the selection captions: shift {best['shift']}, guidance "
        f"{best['guidance']} ({best['select']['all']:.3f}; report captions "
        f"{best['report']['all']:.3f})")
  common.write_results(
      args.out, "demo_sampling",
      {"weights": str(args.weights or model_lib.WEIGHTS_DIR),
       "select": sets["select"], "report": sets["report"],
       "rule": "chosen by all-attributes agreement on the selection "
               "captions only; the report captions are disjoint (checked)",
       "best": {"shift": best["shift"], "guidance": best["guidance"]}},
      rows, [])


if __name__ == "__main__":
  main()

"""Quality of every policy of the comparison on the demo model.

  PYTHONPATH=. python benchmarks/eval_quality.py             # demo model
  PYTHONPATH=. python benchmarks/eval_quality.py --small     # CPU smoke run

Runs `astraea eval`'s harness (astraea_jax/evaluation.py) with the default
sweep of docs/baselines.md (Astraea at mean budgets 0.3-0.7, its ablations
at 0.5, step caching, ToCa, PAB) on the packaged demo model (pixel-space
Wan, 16 x 48 x 48 RGB, 1152 tokens): PSNR / SSIM (/ LPIPS when its weights
are found) of each policy's video against the full model's from the same
noise and prompt, mean +- std over prompts x seeds. With the H200 speed
table (benchmarks/results/eval_speed_h200.json, from eval_speed.py; used
when it exists) every run's plan is also priced at full size, and the plot
and targets use that speedup.

Writes benchmarks/results/eval_demo.{json,md,csv,png} and eval_demo_runs.csv
(--small: a tiny random Wan, to a temporary folder). On the 2-core CPU the
demo sweep takes ~25 min for 4 prompts x 1 seed at the demo's 20 steps;
on one GPU a few minutes (mostly compilation).
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import common
import kinds

from astraea_jax import evaluation
from astraea_jax.configs import WanConfig

SPEED_JSON = common.RESULTS / "eval_speed_h200.json"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="tiny random Wan on CPU; writes to a temp folder")
  parser.add_argument("--out", default=str(common.RESULTS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0])
  parser.add_argument("--prompts", nargs="+", default=None)
  parser.add_argument("--steps", type=int, default=None,
                      help="default: the demo model's (20)")
  parser.add_argument("--policies", nargs="+", default=["default"])
  parser.add_argument("--schedule", nargs="+", default=(),
                      help="searched schedule.json files to add")
  parser.add_argument("--speed-json", default=None,
                      help=f"default: {SPEED_JSON} when it exists")
  parser.add_argument("--demo-weights", default=None)
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args()
  policies = evaluation.resolve_policies(args.policies,
                                         schedules=args.schedule)
  speed = args.speed_json or (SPEED_JSON if SPEED_JSON.exists() else None)
  if args.small:
    problem = evaluation.random_problem(
        WanConfig.tiny(num_layers=2), (1, 16, 2, 12, 12), num_prompts=2,
        seeds=args.seeds, config=evaluation.EvalConfig(
            steps=args.steps or 10, shift=3.0))
    out = pathlib.Path(tempfile.mkdtemp(prefix="eval_quality_small_"))
  else:
    problem = evaluation.demo_problem(
        args.prompts or evaluation.DEFAULT_DEMO_PROMPTS, args.seeds,
        steps=args.steps, weights=args.demo_weights)
    out = pathlib.Path(args.out)
  weights = evaluation.lpips_weights_from()
  if weights is None:
    print("note: no LPIPS weights found (ASTRAEA_LPIPS_BACKBONE): LPIPS is "
          "left out")
  print(f"{len(policies)} policy settings on {problem.name}: "
        f"{len(problem.samples)} samples, {problem.config.steps} steps"
        + (f", H200 speeds from {speed}" if speed else ""))
  rows, paths = evaluation.run(
      problem, policies, out, speed_json=speed, lpips_weights=weights,
      progress=not args.quiet, benchmark="eval_quality",
      json_name="eval_demo.json", stem="eval_demo")
  kinds.relabel(paths["json"])  # measured / projected, benchmarks/kinds.py
  print(evaluation.markdown(rows))
  print("wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
  main()

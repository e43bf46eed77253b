"""Side-by-side evaluation of acceleration policies: `astraea eval`.

  astraea eval --model demo --seeds 0 1 --out eval-demo/
  astraea eval --model demo --prompts prompts.txt \
      --policies astraea:budget=0.4 toca:interval=3,ratio=0.3 pab \
      --speed-json benchmarks/results/eval_speed_h200.json --out eval/
  astraea eval --model wan-1.3b/ --text-embeddings a.safetensors \
      --height 480 --width 832 --frames 81 --out eval-wan/

Every policy of `astraea.policies` (Astraea, its ablations, step caching,
ToCa, PAB; docs/baselines.md) samples the same model from the same noise
and prompts as the full model, and is scored against the full model's
video of that (prompt, seed):

  1. samples: prompts x seeds, each with its noise and text embeddings;
  2. the full model (the Dense policy) once per sample: the reference;
  3. every policy per sample: PSNR and SSIM (no weights needed) and LPIPS
     (only when its AlexNet weights are found: `lpips.find_lpips_weights`)
     of the decoded video against the reference, and the wall time;
  4. per policy setting, mean and std over the samples; Pareto fronts of
     quality against speedup per method; the issue's targets.

Speedup, two ways. "speedup_cpu" is measured here: the sum of the run's
step times over the full model's, each step waited for, compilation
excluded (a step that compiled takes the median warm time of the same plan
on the same shapes, from a later run or from running the policy once more).
"speedup_h200" (with --speed-json) composes the run's
per-step compute configurations (`SampleStats.cost_keys`) with their times
measured once on one H200 on the full-size Wan2.1-1.3B at 480p x 81
(benchmarks/eval_speed.py): the speed the same plan has at full size, the
figure the plot uses when present.

Outputs in --out (each written atomically): eval.csv and eval.md (one row
per policy setting, mean +- std), eval_runs.csv (one row per run),
eval.json (the benchmarks' results format: rows = the settings, targets),
eval.png (quality vs speedup, Pareto front per method; needs matplotlib,
the `plot` extra).

Works with any WanDiT: `Problem(name, graphdef, params, samples, decode,
config)`; `demo_problem`, `checkpoint_problem` and `random_problem` build
one for the packaged demo model, a converted Wan2.1 checkpoint, and a
random model (tests, --small).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from astraea_jax import checkpoint, metrics, outputs
from astraea_jax.provenance import environment
from astraea_jax import lpips as lpips_lib
from astraea_jax import pipelines
from astraea_jax.astraea import policies as policies_lib
from astraea_jax.astraea import policy_specs
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.sampling import sampler as dense_sampler
from astraea_jax.text_embeddings import read_text_embeddings
from converters import wan_vae as wan_vae_converter

# Captions of the demo world (astraea_jax/demo_model/data.py).
DEFAULT_DEMO_PROMPTS = (
    "a red circle moving right on a striped background",
    "a blue square moving up on a black background",
    "a yellow triangle moving left on a checkered background",
    ("a green square moving up and a white triangle moving down on a gray "
     "background"),
)
BASELINE_FAMILIES = ("step_cache", "toca", "pab", "easycache", "magcache")
HEADLINE_SPEEDUP = 1.9        # issue #12: Astraea >= 5 dB above at ~1.9x
HEADLINE_MARGIN_DB = 5.0
RANDOM_MARGIN_DB = 1.0        # ours: the score must beat random by this


# Problems --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
  """One (prompt, seed): (1, L, D) embeddings and (1, C, F, H, W) noise."""
  prompt: str
  seed: int
  context: Any
  negative_context: Any
  noise: Any


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  steps: int = 50
  guidance_scale: float = 5.0
  shift: float | None = None
  scheduler: str = "unipc"


@dataclasses.dataclass
class Problem:
  """What is evaluated: a WanDiT, its samples and how to see its output.

  decode: latents (1, C, F, H, W) -> video (1, 3, T, H', W') in [-1, 1]
  (None: compare the latents themselves, data range = the reference's).
  """
  name: str
  graphdef: Any
  params: Any
  samples: list[Sample]
  decode: Callable | None = None
  config: EvalConfig = EvalConfig()


def demo_problem(prompts: Sequence[str] = DEFAULT_DEMO_PROMPTS,
                 seeds: Sequence[int] = (0,), *, weights=None,
                 steps: int | None = None, guidance: float | None = None,
                 dtype: str = "float32") -> Problem:
  """The packaged demo model (pixel space: its output is the video)."""
  from astraea_jax.demo_model import model as demo
  m = demo.load(weights, dtype=dtype)
  c = m.config
  graphdef, params = nnx.split(m.dit)
  samples = []
  for prompt in prompts:
    context = demo.encode(m, [prompt])
    negative = jnp.zeros_like(context)   # the empty caption encodes to 0
    for seed in seeds:
      samples.append(Sample(prompt, int(seed), context, negative,
                            demo.noise(c, 1, int(seed))))
  config = EvalConfig(steps=steps or c.steps,
                      guidance_scale=c.guidance if guidance is None
                      else guidance, shift=c.shift)
  return Problem(f"demo model ({c.frames}x{c.height}x{c.width}, "
                 f"{c.num_tokens} tokens)", graphdef, params, samples,
                 decode=lambda v: jnp.clip(v, -1.0, 1.0), config=config)


def checkpoint_problem(model_path, *, embeddings=(), prompts=(),
                       seeds: Sequence[int] = (0,), height: int = 480,
                       width: int = 832, frames: int = 81, vae=None,
                       allow_pth: bool = False, dtype: str | None = None,
                       config: EvalConfig = EvalConfig()) -> Problem:
  """A converted Wan2.1 (`astraea convert`): prompts need a whole-model
  folder (umT5); embeddings are safetensors with `context`. Videos are
  compared after the VAE (a whole-model folder's, or --vae); without one,
  the latents are compared."""
  if bool(embeddings) == bool(prompts):
    raise ValueError("give prompts or text embeddings, not both or neither")
  vae_model = None
  if not checkpoint.is_model_folder(model_path):
    if prompts:
      raise ValueError(f"prompts need a converted whole-model folder with "
                       f"the text encoder; {model_path} is a transformer "
                       "alone: pass --text-embeddings")
    if vae is not None:
      vae_model = wan_vae_converter.load_vae(vae, allow_pth=allow_pth)
  pipe = pipelines.WanPipeline.from_checkpoint(
      model_path, vae=vae_model, dtype=dtype,
      load_text_encoder=bool(prompts))
  text_dim = pipe.transformer.config.text_dim
  pairs = []
  if prompts:
    for p in prompts:
      pairs.append((p, *pipe.encode_prompt(p, "", progress=False)))
    pipe.text_encoder = None
  else:
    for path in embeddings:
      pairs.append((pathlib.Path(path).stem,
                    *read_text_embeddings(path, text_dim)))
  shape = pipe.latent_shape(height, width, frames)
  samples = [Sample(name, int(seed), ctx, neg,
                    dense_sampler.draw_noise(jax.random.key(int(seed)),
                                             shape))
             for name, ctx, neg in pairs for seed in seeds]
  graphdef, params = nnx.split(pipe.transformer)
  decode = None if pipe.vae is None else (lambda v: pipe.decode(v))
  return Problem(f"{pathlib.Path(model_path).name} ({frames}x{height}x"
                 f"{width})", graphdef, params, samples, decode, config)


def random_problem(wan_config, latent_shape, *, num_prompts: int = 2,
                   seeds: Sequence[int] = (0,), text_tokens: int = 6,
                   config: EvalConfig = EvalConfig(steps=8),
                   seed: int = 0) -> Problem:
  """A WanDiT with random weights and random prompt embeddings (tests,
  --small runs). The latents are compared directly."""
  from astraea_jax import testing
  graphdef, params = testing.random_wan(wan_config, seed=seed)
  samples = []
  for j in range(num_prompts):
    ctx = jax.random.normal(jax.random.key(1000 + j),
                            (1, text_tokens, wan_config.text_dim))
    neg = jnp.zeros((1, 1, wan_config.text_dim))
    for s in seeds:
      samples.append(Sample(f"random prompt {j}", int(s), ctx, neg,
                            dense_sampler.draw_noise(jax.random.key(int(s)),
                                                     tuple(latent_shape))))
  return Problem("random Wan " + "x".join(map(str, latent_shape[1:])),
                 graphdef, params, samples, None, config)


# Quality ---------------------------------------------------------------------


@jax.jit
def _psnr_ssim(video, reference, data_range):
  """(PSNR, SSIM) of (B, C, T, H, W) videos, SSIM per frame and channel."""
  frames_v = jnp.moveaxis(video.astype(jnp.float32), 1, 2)
  frames_r = jnp.moveaxis(reference.astype(jnp.float32), 1, 2)
  return (metrics.psnr(video, reference, data_range=data_range),
          metrics.ssim(frames_v, frames_r, data_range=data_range,
                       channel_axis=-3))


def quality(video, reference, *, data_range: float, lpips_weights=None):
  """PSNR, SSIM and LPIPS of (B, C, T, H, W) videos; None where a metric
  does not apply (SSIM: frames under 11 px; LPIPS: no weights, not RGB or
  frames under 31 px)."""
  video, reference = jnp.asarray(video), jnp.asarray(reference)
  if video.shape != reference.shape:
    raise ValueError(f"shapes differ: {video.shape=} {reference.shape=}")
  h, w = video.shape[-2:]
  if min(h, w) >= 11:
    psnr, ssim = _psnr_ssim(video, reference, jnp.float32(data_range))
    out = {"psnr": float(psnr), "ssim": float(ssim)}
  else:
    out = {"psnr": float(metrics.psnr(video, reference,
                                      data_range=data_range)), "ssim": None}
  out["lpips"] = None
  if lpips_weights is not None and video.shape[1] == 3 and min(h, w) >= 31:
    out["lpips"] = float(_lpips(jnp.moveaxis(video, 1, 2),
                                jnp.moveaxis(reference, 1, 2),
                                lpips_weights, frames_per_batch=16))
  return out


_lpips = jax.jit(lpips_lib.lpips, static_argnames=("channel_axis",
                                                   "frames_per_batch"))


# Speed -----------------------------------------------------------------------


def load_speed_table(path) -> dict:
  """{"dense": ms, cost_key: ms, ...} per step from eval_speed's JSON."""
  doc = json.loads(pathlib.Path(path).read_text())
  table = {r["cost_key"]: r["ms_per_step"] for r in doc["rows"]
           if r.get("row", r.get("kind")) == "step_config"}
  if "dense" not in table:
    raise ValueError(f"{path}: no dense step time (rows of kind "
                     "'step_config' with cost_key 'dense')")
  return table


# Reused steps of the 2025 step caches, until benchmarks/eval_speed.py
# times them: EasyCache's runs no model at all (x + cached Delta, a few
# elementwise ops on the latents: priced 0); MagCache's runs embedding and
# head, priced as step caching's reused step, which does that and also
# block 0's modulated input (an upper bound).
REUSED_STEP_PROXIES = {"easycache:reused": None,
                       "magcache:reused": "step_cache:reused"}


def cost_ms(key: str, table: dict) -> float:
  """A step's time from the table; a token budget that was not measured is
  interpolated linearly between the measured budgets of its selector (and
  the selector-free 0 and 1); `REUSED_STEP_PROXIES` price the reused steps
  of EasyCache and MagCache when the table lacks them."""
  if key in table:
    return table[key]
  if key in REUSED_STEP_PROXIES:
    proxy = REUSED_STEP_PROXIES[key]
    return 0.0 if proxy is None else cost_ms(proxy, table)
  if not key.startswith("tokens:"):
    raise KeyError(f"no H200 time for the step configuration {key!r}; "
                   f"measured: {sorted(table)}")
  _, budget, *rest = key.split(":")
  suffix = rest[0] if rest else ""
  points = {}
  for k, ms in table.items():
    if not k.startswith("tokens:"):
      continue
    _, b, *r = k.split(":")
    if (r[0] if r else "") == suffix or float(b) in (0.0, 1.0) and not r:
      points[float(b)] = ms
  xs = sorted(points)
  if len(xs) < 2 or not xs[0] <= float(budget) <= xs[-1]:
    raise KeyError(f"cannot interpolate {key!r} from {sorted(table)}")
  return float(np.interp(float(budget), xs, [points[x] for x in xs]))


def projected_speedup(cost_keys: Sequence[str], table: dict) -> float:
  """steps * dense step time / sum of the run's step times (full size)."""
  return len(cost_keys) * table["dense"] / sum(cost_ms(k, table)
                                               for k in cost_keys)


def _steady_seconds(records, warm):
  """A run's seconds with each compiling step replaced by a warm median."""
  total, estimated = 0.0, False
  for key, seconds, compiled in records:
    if compiled:
      if warm.get(key):
        seconds = float(np.median(warm[key]))
      else:
        estimated = True
    total += seconds
  return total, estimated


# Running ---------------------------------------------------------------------


def calibrate(problem: Problem, policies: Sequence) -> list:
  """The policies with MagCache's ratio curve filled in where missing: one
  full run on the problem's first sample (the paper calibrates on one),
  reused for every sample; not timed."""
  c, s = problem.config, problem.samples[0]
  return [p.calibrate(problem.graphdef, problem.params, s.noise, s.context,
                      s.negative_context, scheduler=c.scheduler,
                      steps=c.steps, guidance_scale=c.guidance_scale,
                      shift=c.shift, progress=False)
          if getattr(p, "needs_calibration", False) else p
          for p in policies]


def evaluate(problem: Problem, policies: Sequence, *, lpips_weights=None,
             speed_table: dict | None = None, progress: bool = True):
  """Runs every policy on every sample; returns (runs, references).

  runs: one dict per (policy, sample): label, method, family, prompt,
  seed, psnr, ssim, lpips, seconds, speedup_cpu (and speedup_h200 with a
  speed table), computed_fraction, cost_keys. references: per sample the
  full model's seconds.
  """
  c = problem.config
  common = {"scheduler": c.scheduler, "steps": c.steps,
                "guidance_scale": c.guidance_scale, "shift": c.shift,
                "progress": False, "return_stats": True}
  policies = [p for p in policies if not isinstance(p, policies_lib.Dense)]
  policies = calibrate(problem, policies)
  labels = [p.label() for p in policies]
  if len(set(labels)) != len(labels):
    raise ValueError(f"policies repeat: {labels}")
  seen, warm, pending, references = set(), {}, [], []
  bar = tqdm.tqdm(total=len(problem.samples) * (1 + len(policies)),
                  disable=not progress, desc="eval", unit="run")

  def sample_once(policy, s: Sample):
    latents, stats = policies_lib.sample(
        problem.graphdef, problem.params, s.noise, s.context,
        s.negative_context, policy=policy, **common)
    shape = (tuple(s.noise.shape), tuple(s.context.shape))
    records = []
    for plan, key, t, compiled in zip(stats.plans, stats.cost_keys,
                                      stats.step_seconds, stats.compiled):
      k = (shape, plan, key)
      if compiled is None:        # jax hides its cache: first use compiles
        compiled = (shape, plan) not in seen
      seen.add((shape, plan))
      if not compiled:
        warm.setdefault(k, []).append(t)
      records.append((k, t, compiled))
    bar.update()
    return latents, stats, records

  for s in problem.samples:
    bar.set_postfix(prompt=s.prompt[:30], seed=s.seed)
    ref, _, ref_records = sample_once(policies_lib.Dense(), s)
    ref_video = problem.decode(ref) if problem.decode else ref
    data_range = 2.0 if problem.decode else float(jnp.max(ref_video)
                                                  - jnp.min(ref_video))
    reference = {"prompt": s.prompt, "seed": s.seed,
                 "records": ref_records}
    references.append(reference)
    for policy in policies:
      latents, stats, records = sample_once(policy, s)
      video = problem.decode(latents) if problem.decode else latents
      row = {"label": policy.label(), "method": policy.method,
             "family": policy.family, "prompt": s.prompt, "seed": s.seed,
             **quality(video, ref_video, data_range=data_range,
                       lpips_weights=lpips_weights),
             "computed_fraction": stats.computed_fraction,
             "cost_keys": stats.cost_keys}
      if speed_table is not None:
        row["speedup_h200"] = projected_speedup(stats.cost_keys, speed_table)
      pending.append((row, records, reference, policy, s))
  # A step configuration that compiled and never ran warm again (one
  # sample, a plan used once per run) is timed by running its policy once
  # more, compiled.
  again = {}
  for records, policy, s in ([(r["records"], policies_lib.Dense(),
                               problem.samples[i])
                              for i, r in enumerate(references)]
                             + [(p[1], p[3], p[4]) for p in pending]):
    if any(c and not warm.get(k) for k, _, c in records):
      again.setdefault(policy.label(), (policy, s))
  bar.total += len(again)
  for policy, s in again.values():
    sample_once(policy, s)
  bar.close()
  runs = []
  for reference in references:
    reference["seconds"], reference["estimated"] = _steady_seconds(
        reference.pop("records"), warm)
  for row, records, reference, _, _ in pending:
    row["seconds"], estimated = _steady_seconds(records, warm)
    row["speedup_cpu"] = reference["seconds"] / row["seconds"]
    row["timing_includes_compile"] = estimated or reference["estimated"]
    runs.append(row)
  return runs, references


# Summaries -------------------------------------------------------------------

METRICS = ("speedup_h200", "speedup_cpu", "psnr", "ssim", "lpips",
           "computed_fraction")


def _mean_std(values):
  vals = [v for v in values if v is not None]
  if not vals:
    return None, None
  arr = np.asarray(vals, np.float64)
  if np.isinf(arr).any():
    return float("inf"), 0.0
  return float(arr.mean()), float(arr.std())


def summarize(runs, policies: Sequence) -> list[dict]:
  """One row per policy setting (in `policies` order): mean and std of
  each metric over the samples, and the policy's settings."""
  rows = []
  for p in policies:
    mine = [r for r in runs if r["label"] == p.label()]
    if not mine:
      continue
    row = {"label": p.label(), "method": p.method, "family": p.family,
           "samples": len(mine), "settings": p.settings()}
    for m in METRICS:
      mean, std = _mean_std([r.get(m) for r in mine])
      if mean is not None:
        row[m], row[f"{m}_std"] = mean, std
    row["timing_includes_compile"] = any(r["timing_includes_compile"]
                                         for r in mine)
    rows.append(row)
  return rows


def speed_column(rows) -> str:
  """The speedup the comparison uses: H200-projected when every row has
  it, else the CPU measurement."""
  return ("speedup_h200" if rows and all("speedup_h200" in r for r in rows)
          else "speedup_cpu")


def pareto_front(points):
  """Indices of (speed, quality) points that no other point beats in both
  (higher is better in both), sorted by speed."""
  order = sorted(range(len(points)), key=lambda i: (-points[i][0],
                                                    -points[i][1]))
  front, best = [], -math.inf
  for i in order:
    if points[i][1] > best:
      front.append(i)
      best = points[i][1]
  return sorted(front, key=lambda i: points[i][0])


def best_quality_at(rows, method_filter, speed: float, key: str,
                    metric: str = "psnr"):
  """The best mean quality among settings at least `speed` fast (None)."""
  vals = [r[metric] for r in rows if method_filter(r)
          and r.get(key, 0.0) >= speed and r.get(metric) is not None]
  return max(vals) if vals else None


def dominated_baselines(rows, is_ours, key: str):
  """(the baseline settings' rows that some `is_ours` setting is at least
  as fast as and at least as good as in mean PSNR, the others' rows). Settings that do not accelerate (speedup <= 1) compete with no
  one."""
  ours = [(r[key], r["psnr"]) for r in rows if is_ours(r)]
  dominated, others = [], []
  for r in rows:
    if r["family"] in BASELINE_FAMILIES and r[key] > 1.0:
      won = any(s >= r[key] and q >= r["psnr"] for s, q in ours)
      (dominated if won else others).append(r)
  return dominated, others


def targets(rows) -> list[dict]:
  """The issue's goals, restated with the measured values."""
  key = speed_column(rows)
  # Astraea proper: the default schedules and searched ones.
  is_astraea = lambda r: r["method"] in ("astraea", "astraea (searched)")
  out = []
  ours = best_quality_at(rows, is_astraea, HEADLINE_SPEEDUP, key)
  base = {f: best_quality_at(rows, lambda r, f=f: r["family"] == f,
                             HEADLINE_SPEEDUP, key)
          for f in BASELINE_FAMILIES}
  reached = [v for v in base.values() if v is not None]
  if ours is not None and reached:
    out.append({"name": f"astraea_psnr_margin_at_{HEADLINE_SPEEDUP}x_"
                        f"{key.split('_')[1]}",
                "value": ours - max(reached), "op": ">=",
                "target": HEADLINE_MARGIN_DB,
                "baselines_reaching_speed": sorted(
                    f for f, v in base.items() if v is not None)})
  dominated, others = dominated_baselines(rows, is_astraea, key)
  if any(is_astraea(r) for r in rows) and (dominated or others):
    out.append({"name": "baseline_settings_dominated_by_astraea",
                "value": len(dominated) / (len(dominated) + len(others)),
                "op": ">=", "target": 1.0})
  for r in rows:
    if r["method"] != "astraea (random)":
      continue
    budget = r["settings"].get("budget")
    twin = [a for a in rows if a["method"] == "astraea"
            and a["settings"].get("budget") == budget]
    if twin:
      out.append({"name": f"score_vs_random_psnr_margin_budget_{budget}",
                  "value": twin[0]["psnr"] - r["psnr"], "op": ">=",
                  "target": RANDOM_MARGIN_DB})
  return out


# Writing ---------------------------------------------------------------------

COLUMNS = ("method", "label", "samples") + tuple(
    x for m in METRICS for x in (m, f"{m}_std"))


def _fmt(v, digits=3):
  if v is None:
    return ""
  if isinstance(v, float):
    return "inf" if math.isinf(v) else f"{v:.{digits}f}"
  return str(v)


def _csv(rows, columns) -> str:
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(columns)
  for r in rows:
    writer.writerow([_fmt(r.get(c), 5) if isinstance(r.get(c), float)
                     else ("" if r.get(c) is None else r.get(c))
                     for c in columns])
  return buf.getvalue()


def markdown(rows, *, title: str = "") -> str:
  """A table: one line per setting, mean +- std over the samples."""
  key = speed_column(rows)
  cols = [("method", None), ("setting", None), ("speedup_h200", 2),
          ("speedup_cpu", 2), ("psnr", 2), ("ssim", 4), ("lpips", 4)]
  cols = [(c, d) for c, d in cols
          if d is None or any(r.get(c) is not None for r in rows)]
  head = {"speedup_h200": "speedup (H200)", "speedup_cpu": "speedup (CPU)",
          "psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}
  lines = [f"### {title}", ""] if title else []
  lines.append("| " + " | ".join(head.get(c, c) for c, _ in cols) + " |")
  lines.append("|" + "|".join("---" for _ in cols) + "|")
  for r in sorted(rows, key=lambda r: (r["method"], -r.get(key, 0))):
    cells = []
    for c, d in cols:
      if c == "setting":
        cells.append(r["label"][len(r["method"]):].strip() or "-")
      elif d is None:
        cells.append(r[c])
      elif r.get(c) is None:
        cells.append("")
      else:
        std = r.get(f"{c}_std")
        cells.append(_fmt(r[c], d) + (f" ± {_fmt(std, d)}"
                                      if std and r["samples"] > 1 else ""))
    lines.append("| " + " | ".join(map(str, cells)) + " |")
  return "\n".join(lines) + "\n"


def plot(path, rows, *, title: str = "") -> bool:
  """PNG of PSNR (and SSIM) against speedup, Pareto front per method.
  Without matplotlib prints a note and returns False."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print(f"note: matplotlib is not installed, so {path} was not drawn "
          "(pip install 'astraea-jax[plot]'); the numbers are in eval.csv")
    return False
  key = speed_column(rows)
  panels = [m for m in ("psnr", "ssim", "lpips")
            if any(r.get(m) is not None for r in rows)]
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8),
                           squeeze=False)
  methods = list(dict.fromkeys(r["method"] for r in rows))
  palette = plt.get_cmap("tab10").colors
  family_colour = {"astraea": palette[0], "toca": palette[1],
                   "pab": palette[2], "step_cache": palette[3],
                   "easycache": palette[4], "magcache": palette[5]}
  others = iter(palette[6:] * 3)   # not the six families' colours
  colour = {m: family_colour.get(m) or next(others) for m in methods}
  for ax, metric in zip(axes[0], panels):
    for method in methods:
      mine = [r for r in rows if r["method"] == method
              and r.get(metric) is not None and math.isfinite(r[metric])]
      if not mine:
        continue
      sign = -1.0 if metric == "lpips" else 1.0   # lower LPIPS is better
      pts = [(r[key], sign * r[metric]) for r in mine]
      front = pareto_front(pts)
      style = {"color": colour[method], "alpha": 0.9}
      main = not method.startswith("astraea (")
      ax.scatter([p[0] for p in pts], [sign * p[1] for p in pts],
                 s=30 if main else 18, marker="o" if main else "x", **style)
      ax.plot([pts[i][0] for i in front], [sign * pts[i][1] for i in front],
              "-" if main else ":", lw=2.2 if method == "astraea" else 1.2,
              label=method, **style)
    ax.set_xlabel("speedup over the full model"
                  + (" (H200, full size)" if key == "speedup_h200"
                     else " (CPU, measured)"))
    ax.set_ylabel({"psnr": "PSNR vs full model (dB)", "ssim": "SSIM",
                   "lpips": "LPIPS (lower is better)"}[metric])
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7, loc="best")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  outputs.write_figure(path, fig, dpi=120)
  plt.close(fig)
  return True


def _json_safe(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def write_report(out, problem: Problem, runs, rows, *, benchmark="eval",
                 json_name="eval.json", extra_settings=None,
                 stem="eval") -> dict:
  """eval.csv, eval_runs.csv, eval.md, eval.json, eval.png under `out`
  (file stems from `stem`, the JSON's name from `json_name`)."""
  out = pathlib.Path(out)
  goals = targets(rows)
  c = problem.config
  settings = {"problem": problem.name, "steps": c.steps,
              "guidance_scale": c.guidance_scale, "shift": c.shift,
              "scheduler": c.scheduler,
              "samples": [{"prompt": s.prompt, "seed": s.seed}
                          for s in problem.samples],
              "speedup_used": speed_column(rows),
              "speedup_cpu": "measured here, compilation excluded",
              "speedup_h200": "per-step compute configurations composed "
                              "with their H200 times (eval_speed)",
              "lpips": any(r.get("lpips") is not None for r in rows),
              **(extra_settings or {})}
  paths = {"csv": out / f"{stem}.csv", "runs_csv": out / f"{stem}_runs.csv",
           "md": out / f"{stem}.md", "json": out / json_name,
           "png": out / f"{stem}.png"}
  outputs.mark_folder(out, command="eval")
  outputs.write_text(paths["csv"], _csv(rows, COLUMNS))
  run_cols = ("method", "label", "prompt", "seed", "speedup_h200",
              "speedup_cpu", "seconds", "psnr", "ssim", "lpips",
              "computed_fraction", "timing_includes_compile")
  outputs.write_text(paths["runs_csv"], _csv(runs, run_cols))
  title = f"{problem.name}, {c.steps} steps, {len(problem.samples)} samples"
  md = markdown(rows, title=title)
  if goals:
    md += "\n| target | value | goal |\n|---|---|---|\n" + "".join(
        f"| {g['name']} | {g['value']:.3f} | {g['op']} {g['target']} |\n"
        for g in goals)
  outputs.write_text(paths["md"], md)
  doc = {"benchmark": benchmark, **environment(), "settings": settings,
         "rows": rows, "targets": goals}
  outputs.write_json(paths["json"], _json_safe(doc))
  if not plot(paths["png"], rows, title=title):
    paths.pop("png")
  return {k: str(v) for k, v in paths.items()}


# `astraea eval` -------------------------------------------------------------


def resolve_policies(specs: Sequence[str], *, schedules=(),
                     budgets=(0.3, 0.4, 0.5, 0.7),
                     ablation_budget: float = 0.5) -> list:
  """Specs -> policies; "default" expands to `policy_specs.default_sweep`,
  "frontier" to `policy_specs.frontier_sweep` (EasyCache, MagCache),
  searched schedule files join it as `astraea:schedule=FILE`."""
  out = []
  for spec in specs:
    if spec == "default":
      out += policy_specs.default_sweep(budgets=budgets,
                                        ablation_budget=ablation_budget)
    elif spec == "frontier":
      out += policy_specs.frontier_sweep()
    else:
      out.append(policy_specs.parse_policy(spec))
  for path in schedules:
    out.append(policies_lib.Astraea(
        schedule=tuple(schedule_lib.load(path)), schedule_name="searched"))
  seen, unique = set(), []
  for p in out:
    if p.label() not in seen:
      seen.add(p.label())
      unique.append(p)
  return unique


def lpips_weights_from(backbone=None, heads=None, *, allow_pth=True):
  """LPIPS weights from the given paths or the usual caches; None when
  absent (LPIPS is then left out of the report)."""
  if backbone is None:
    found = lpips_lib.find_lpips_weights()
    if found is None:
      return None
    backbone, heads = found
  return lpips_lib.load_lpips_weights(backbone, heads, allow_pth=allow_pth)


def run(problem: Problem, policies, out, *, speed_json=None,
        lpips_weights=None, progress=True, benchmark="eval",
        json_name="eval.json", stem="eval"):
  """evaluate + summarize + write_report; returns (rows, paths)."""
  table = load_speed_table(speed_json) if speed_json else None
  policies = calibrate(problem, policies)   # the report keeps the curves
  runs, references = evaluate(problem, policies, lpips_weights=lpips_weights,
                              speed_table=table, progress=progress)
  rows = summarize(runs, policies)
  extra = {"full_model_seconds": [r["seconds"] for r in references],
           "speed_json": str(speed_json) if speed_json else None}
  paths = write_report(out, problem, runs, rows, benchmark=benchmark,
                       json_name=json_name, extra_settings=extra, stem=stem)
  return rows, paths


def command(args) -> int:
  """The `astraea eval` subcommand (arguments:
  astraea_jax/commands/evaluate.py)."""
  prompts = list(args.prompt or [])
  if args.prompts:
    with open(args.prompts, encoding="utf-8") as f:
      prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
      raise ValueError(f"{args.prompts}: no prompts (the file is empty)")
  policies = resolve_policies(args.policies, schedules=args.schedule or (),
                              budgets=tuple(args.budgets),
                              ablation_budget=args.ablation_budget)
  if args.model == "demo":
    if args.text_embeddings:
      raise ValueError("--model demo encodes --prompts itself; "
                       "--text-embeddings is for converted checkpoints")
    problem = demo_problem(prompts or DEFAULT_DEMO_PROMPTS, args.seeds,
                           steps=args.steps, guidance=args.guidance,
                           weights=args.demo_weights)
  else:
    problem = checkpoint_problem(
        args.model, embeddings=args.text_embeddings or (), prompts=prompts,
        seeds=args.seeds, height=args.height, width=args.width,
        frames=args.frames, vae=args.vae, allow_pth=args.allow_pth,
        dtype=args.dtype, config=EvalConfig(
            steps=args.steps or 50, guidance_scale=args.guidance or 5.0,
            shift=args.shift, scheduler=args.scheduler))
  if args.shift is not None:
    problem.config = dataclasses.replace(problem.config, shift=args.shift)
  problem.config = dataclasses.replace(problem.config,
                                       scheduler=args.scheduler)
  weights = lpips_weights_from(args.lpips_backbone, args.lpips_heads)
  if weights is None:
    print("note: no LPIPS weights found (ASTRAEA_LPIPS_BACKBONE or "
          "--lpips-backbone): LPIPS is left out")
  print(f"evaluating {len(policies)} policy settings on {problem.name}: "
        f"{len(problem.samples)} samples, {problem.config.steps} steps")
  rows, paths = run(problem, policies, args.out, speed_json=args.speed_json,
                    lpips_weights=weights, progress=not args.quiet)
  print(markdown(rows))
  print("wrote " + ", ".join(paths.values()))
  return 0

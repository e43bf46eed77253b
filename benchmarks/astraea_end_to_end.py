"""Astraea end to end: whole runs timed with the wall clock, peak memory per
process, and what `astraea generate --compare` shows a user (issue #25).

  PYTHONPATH=. python benchmarks/astraea_end_to_end.py --part speed
  PYTHONPATH=. python benchmarks/astraea_end_to_end.py --part memory
  PYTHONPATH=. python benchmarks/astraea_end_to_end.py --part user
  PYTHONPATH=. python benchmarks/astraea_end_to_end.py --small  # CPU smoke

Random bfloat16 weights of the published sizes, CFG batch 2, UniPC with
the flow shift `astraea generate` uses, one prompt of 512 random text
tokens. Every configuration runs in its own process (JAX's peak is per
process), on a persistent compilation cache folder of its own:
  - "cold": a new process with an empty cache; run 1 includes every
    compile, run 2 in the same process is the warm (steady) run;
  - "cached": a second new process on the first one's cache (run 1).
Parts (each one device call; their rows merge into one JSON per GPU):
  speed  - Wan2.1-1.3B 480p x 81 (32,760 tokens), 50 steps: dense and
           Astraea at mean budgets 0.3/0.4/0.7 (the default lean state);
  speed04 - the speed part's dense and 0.4 rows alone; speed03 its 0.3 row;
  cold04 - a new process each: Astraea 0.4 (cold and warm run), dense
           (cold run);
  states - the same video: dense, Astraea 0.4 with the float32 state (the
           old default) and the compact state, and 0.5;
  memory - peak of a short run (the full step and the schedule's first
           partial token count) at 1.3B 720p x 81, 14B 480p x 81 and 14B
           720p x 81: dense, Astraea 0.4 with the lean state, and with
           the compact state at 14B 720p, plus the estimate
           `memory.check_fits` made before;
  user   - a random 1.3B checkpoint written as `astraea convert` writes
           it, then `astraea generate --text-embeddings ... --budget 0.4
           --compare` at 480p x 81, 50 steps, in a new process (its
           report's figures next to the speed part's);
  opensora - OpenSora v1.2 STDiT3-XL/2 at 480p 4 s (51 frames, 23,850
           tokens), 30 Euler steps: dense and Astraea 0.4.
`--small` runs tiny models on the CPU and writes to /tmp only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GIB = 2**30

# (name, model, video, method, budget, state, steps, runs, cached)
SPEED = [
    ("dense", "1.3b", "480p", "dense", None, None, 50, 2, True),
    ("astraea_0.4", "1.3b", "480p", "astraea", 0.4, "lean", 50, 2, True),
    ("astraea_0.3", "1.3b", "480p", "astraea", 0.3, "lean", 50, 2, False),
    ("astraea_0.7", "1.3b", "480p", "astraea", 0.7, "lean", 50, 2, False),
]
COLD04 = [  # astraea first: the row that matters most in a short call
    ("astraea_0.4", "1.3b", "480p", "astraea", 0.4, "lean", 50, 2, False),
    ("dense", "1.3b", "480p", "dense", None, None, 50, 1, False),
]
STATES = [
    ("dense", "1.3b", "480p", "dense", None, None, 50, 1, False),
    ("astraea_0.4_float32_state", "1.3b", "480p", "astraea", 0.4, "exact",
     50, 1, False),
    ("astraea_0.4_compact_state", "1.3b", "480p", "astraea", 0.4, "compact",
     50, 1, False),
    ("astraea_0.5", "1.3b", "480p", "astraea", 0.5, "lean", 50, 2, False),
]
MEMORY = [  # the rows that matter most first
    ("astraea_0.4_14b_720p_compact", "14b", "720p", "astraea", 0.4,
     "compact", 2, 1, False),
    ("astraea_0.4_14b_480p", "14b", "480p", "astraea", 0.4, "lean", 2, 1,
     False),
    ("dense_14b_480p", "14b", "480p", "dense", None, None, 1, 1, False),
    ("astraea_0.4_1.3b_720p", "1.3b", "720p", "astraea", 0.4, "lean", 2, 1,
     False),
    ("dense_1.3b_720p", "1.3b", "720p", "dense", None, None, 1, 1, False),
]
OPENSORA = [
    ("opensora_dense", "stdit3", "480p", "dense", None, None, 30, 2, False),
    ("opensora_astraea_0.4", "stdit3", "480p", "astraea", 0.4, "lean", 30,
     2, False),
]
VIDEOS = {"480p": (480, 832, 81), "720p": (720, 1280, 81),
          "small": (64, 96, 9)}


# The child: one configuration, in its own process ---------------------------


def _draw_params(abstract, seed):
  """`testing.random_params`' values rules, drawn leaf by leaf (stacked
  blocks layer by layer) in each leaf's own dtype, so that drawing the 14B
  model never holds a float32 copy of a whole leaf: the peak stays the
  sampler's, not the draw's."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from astraea_jax import testing  # pylint: disable=g-import-not-at-top

  paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  keys = jax.random.split(jax.random.key(seed), len(paths))
  leaves = []
  for key, (path, leaf) in zip(keys, paths):
    stacked = leaf.ndim >= 3  # (layers, ...): one layer at a time

    def one(k, leaf=leaf, name=jax.tree_util.keystr(path), stacked=stacked):
      shape = leaf.shape[1:] if stacked else leaf.shape
      x = jax.random.normal(k, shape, jnp.float32)
      # fan-in is shape[-2] of a layer and of the stack alike
      return testing.scaled_like_init(name, x, leaf.shape).astype(leaf.dtype)

    if stacked:
      leaves.append(jax.jit(lambda ks, one=one: jax.lax.map(one, ks))(
          jax.random.split(key, leaf.shape[0])))
    else:
      leaves.append(jax.jit(one)(key))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _wan(model, video, small):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from astraea_jax.configs import WanConfig  # pylint: disable=g-import-not-at-top
  from astraea_jax.models import wan  # pylint: disable=g-import-not-at-top
  if small:
    config = WanConfig.tiny(num_layers=2)
  elif model == "14b":
    config = WanConfig.wan21_t2v_14b(dtype="bfloat16",
                                     param_dtype="bfloat16")
  else:
    config = WanConfig.wan21_t2v_1_3b(dtype="bfloat16",
                                      param_dtype="bfloat16")
  graphdef, abstract = nnx.split(wan.abstract_model(config))
  return config, graphdef, _draw_params(abstract, 0)


def selection_for(state):
  from astraea_jax.astraea import selection  # pylint: disable=g-import-not-at-top
  return {"lean": selection.SelectionConfig(), "exact": selection.EXACT,
          "compact": selection.COMPACT}[state]


def short_schedule(budget, steps):
  """The first `steps` distinct budgets of the 50-step default schedule:
  the full step, then its first partial token counts (memory rows)."""
  from astraea_jax.astraea import schedule as schedule_lib  # pylint: disable=g-import-not-at-top
  distinct = list(dict.fromkeys(
      float(b) for b in schedule_lib.default_schedule(budget, 50)))
  return distinct[:steps]


def child_wan(spec, small):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from astraea_jax.astraea import wan_tokenwise as astraea  # pylint: disable=g-import-not-at-top
  from astraea_jax.sampling import sampler as dense  # pylint: disable=g-import-not-at-top
  config, graphdef, params = _wan(spec["model"], spec["video"], small)
  height, width, frames = VIDEOS["small" if small else spec["video"]]
  shape = dense.wan_latent_shape(height, width, frames)
  noise = dense.draw_noise(jax.random.key(0), shape)
  text_len = 16 if small else 512
  ctx = jax.random.normal(jax.random.key(1), (1, text_len, config.text_dim))
  neg = jnp.zeros((1, 1, config.text_dim))
  kw = dict(scheduler="unipc", guidance_scale=5.0, progress=False)
  full_run = spec["steps"] >= 30

  def run_once():
    if spec["method"] == "dense":
      return dense.sample(graphdef, params, noise, ctx, neg,
                          steps=spec["steps"], **kw), None
    budget = dict(budget=spec["budget"], steps=spec["steps"]) if full_run \
        else dict(schedule=short_schedule(spec["budget"], spec["steps"]),
                  steps=spec["steps"])
    return astraea.sample(graphdef, params, noise, ctx, neg,
                          selection_config=selection_for(spec["state"]),
                          return_stats=True, **budget, **kw)

  n = int(shape[2] * shape[3] * shape[4] // 4)
  return run_once, {"tokens": n, "latent_shape": list(shape),
                    "layers": config.num_layers, "dim": config.dim}, params


def child_opensora(spec, small):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from astraea_jax.astraea import stdit3_tokenwise as astraea  # pylint: disable=g-import-not-at-top
  from astraea_jax.configs import STDiT3Config  # pylint: disable=g-import-not-at-top
  from astraea_jax.models import stdit3  # pylint: disable=g-import-not-at-top
  from astraea_jax.sampling import opensora  # pylint: disable=g-import-not-at-top
  from astraea_jax.sampling import sampler as dense  # pylint: disable=g-import-not-at-top
  if small:
    config = STDiT3Config.tiny()
    shape, caption_len, valid = (1, 4, 3, 8, 12), 8, 5
    video = {"height": 64, "width": 96, "num_frames": 17}
  else:
    config = STDiT3Config.opensora_v1_2(dtype="bfloat16",
                                        param_dtype="bfloat16")
    shape, caption_len, valid = (1, 4, 15, 60, 106), 300, 120
    video = {"height": 480, "width": 854, "num_frames": 51}
  graphdef, abstract = nnx.split(stdit3.abstract_model(config))
  params = _draw_params(abstract, 0)
  noise = dense.draw_noise(jax.random.key(1), shape)
  y = jax.random.normal(jax.random.key(2),
                        (1, 1, caption_len, config.caption_channels))
  y_mask = (jnp.arange(caption_len) < valid).astype(jnp.int32)[None]
  kw = dict(steps=spec["steps"], guidance_scale=7.0, fps=24, progress=False,
            **video)

  def run_once():
    if spec["method"] == "dense":
      return opensora.sample_opensora(graphdef, params, noise, y, y_mask,
                                      **kw), None
    return astraea.sample(graphdef, params, noise, y, y_mask,
                          budget=spec["budget"], return_stats=True,
                          selection_config=selection_for(spec["state"]),
                          **kw)

  frames, per_frame = astraea.token_grid(config, shape)
  return run_once, {"tokens": frames * per_frame, "latent_shape":
                    list(shape), "layers": 2 * config.depth,
                    "dim": config.hidden_size}, params


def child(spec, small):
  """Runs one configuration `spec["runs"]` times; prints a JSON row."""
  t_start = time.perf_counter()
  import jax  # pylint: disable=import-outside-toplevel
  from astraea_jax import compile_cache  # pylint: disable=g-import-not-at-top
  from astraea_jax import provenance  # pylint: disable=g-import-not-at-top
  from astraea_jax.astraea import selection  # pylint: disable=g-import-not-at-top
  compile_cache.enable()
  make = child_opensora if spec["model"] == "stdit3" else child_wan
  run_once, facts, params = make(spec, small)
  jax.block_until_ready(params)
  setup_s = time.perf_counter() - t_start
  seconds, estimate, stats = [], None, None
  for _ in range(spec["runs"]):
    t0 = time.perf_counter()
    out, stats = run_once()
    jax.block_until_ready(out)
    seconds.append(time.perf_counter() - t0)
  device = jax.devices()[0]
  mem = device.memory_stats() or {}
  if stats is not None:
    estimate = stats.estimated_peak_bytes
  row = {**spec, **facts, "seconds": seconds, "setup_s": setup_s,
         "peak_bytes": mem.get("peak_bytes_in_use"),
         "bytes_limit": mem.get("bytes_limit"),
         "estimated_peak_bytes": estimate,
         "device": device.device_kind}
  if spec["method"] == "astraea":
    cfg = selection_for(spec["state"])
    row["state_bytes"] = selection.cache_bytes(facts["layers"], 2,
                                               facts["tokens"], facts["dim"],
                                               cfg)
    row["mean_budget"] = float(sum(stats.budgets) / len(stats.budgets))
    row["distinct_token_counts"] = stats.compiled_k
  row["environment"] = provenance.environment()
  print("ROW " + json.dumps(row))


# The parent: processes, caches, the JSON ------------------------------------


def spawn(spec, cache_dir, small, timeout):
  env = {**os.environ, "ASTRAEA_COMPILE_CACHE": str(cache_dir),
         "PYTHONPATH": os.pathsep.join(
             [str(ROOT), os.environ.get("PYTHONPATH", "")]),
         "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.97"}
  t0 = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, __file__, "--child", json.dumps(spec)]
      + (["--small"] if small else []), env=env, capture_output=True,
      text=True, timeout=timeout, check=False)
  wall = time.perf_counter() - t0
  rows = [json.loads(line[4:]) for line in proc.stdout.splitlines()
          if line.startswith("ROW ")]
  if proc.returncode or not rows:
    tail = (proc.stderr or proc.stdout)[-1500:]
    print(f"  {spec['name']}: FAILED (rc {proc.returncode})\n{tail}")
    return {**spec, "failed": True, "error": tail[-600:],
            "process_wall_s": wall}
  row = rows[-1]
  row["process_wall_s"] = wall
  print(f"  {spec['name']}: runs {[round(s, 2) for s in row['seconds']]} s,"
        f" peak {(row['peak_bytes'] or 0) / GIB:.2f} GiB, estimate "
        f"{(row['estimated_peak_bytes'] or 0) / GIB:.2f} GiB, process "
        f"{wall:.0f} s", flush=True)
  return row


def run_part(table, small, timeout, save):
  for name, model, video, method, budget, state, steps, runs, cached in table:
    spec = {"name": name, "model": model, "video": video, "method": method,
            "budget": budget, "state": state,
            "steps": 3 if small and steps >= 30 else steps, "runs": runs}
    with tempfile.TemporaryDirectory() as cache:
      row = spawn({**spec, "process": "cold"}, cache, small, timeout)
      save(row)
      if cached and not row.get("failed"):
        save(spawn({**spec, "runs": 1, "process": "cached"}, cache, small,
                   timeout))


def user_part(small, timeout, save):
  """`astraea generate --compare` as a user runs it, in a new process on an
  empty compilation cache; saves the report's figures as a row."""
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    prep = subprocess.run(
        [sys.executable, __file__, "--write-checkpoint", str(tmp)]
        + (["--small"] if small else []), capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=timeout,
        check=False)
    if prep.returncode:
      return save({"name": "user_generate_compare", "failed": True,
                   "error": prep.stderr[-600:]})
    height, width, frames = VIDEOS["small" if small else "480p"]
    cmd = [sys.executable, "-m", "astraea_jax.cli", "generate",
           str(tmp / "ckpt"), "--text-embeddings", str(tmp / "prompt.st"),
           "--height", str(height), "--width", str(width), "--frames",
           str(frames), "--steps", "3" if small else "50",
           "--budget", "0.4", "--compare", "--out", str(tmp / "out")]
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "ASTRAEA_COMPILE_CACHE": str(tmp / "cache"),
           "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.97"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
      return save({"name": "user_generate_compare", "failed": True,
                   "error": (proc.stderr or proc.stdout)[-600:]})
    report = json.loads((tmp / "out" / "report.json").read_text())
    print(f"  generate --compare: {wall:.0f} s; astraea "
          f"{report['astraea']['seconds']:.1f} s, full "
          f"{report['full']['seconds']:.1f} s", flush=True)
    return save({"name": "user_generate_compare", "process_wall_s": wall,
                 "command": " ".join(cmd[2:]), "report": report})


def write_checkpoint(folder, small):
  """A random 1.3B checkpoint (bf16) and a prompt embedding file."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from astraea_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from converters import safetensors_io  # pylint: disable=g-import-not-at-top
  config, graphdef, params = _wan("1.3b", "480p", small)
  model = nnx.merge(graphdef, params)
  checkpoint.save(pathlib.Path(folder) / "ckpt", config,
                  checkpoint.params_of(model))
  rng = np.random.default_rng(1)
  safetensors_io.save_file(
      {"context": rng.standard_normal((16 if small else 512,
                                       config.text_dim)).astype(np.float32)},
      pathlib.Path(folder) / "prompt.st")


def summarize(rows):
  """Ratios measured on the same GPU (rows of one machine): targets."""
  by = {(r["name"], r.get("process")): r for r in rows
        if not r.get("failed") and "seconds" in r}
  targets = []

  def add(name, value, op, target):
    if value is not None:
      targets.append({"name": name, "value": value, "op": op,
                      "target": target})

  dense = by.get(("dense", "cold"))
  warm = lambda row: row["seconds"][1] if len(row["seconds"]) > 1 else None
  if dense:
    for b, goal in ((0.3, 2.9), (0.4, 2.35), (0.5, None), (0.7, 1.4)):
      row = by.get((f"astraea_{b}", "cold"))
      if row and goal and warm(dense) and warm(row):
        add(f"end_to_end_speedup_{b}_warm", warm(dense) / warm(row), ">=",
            goal)
    fast = by.get(("astraea_0.4", "cold"))
    if fast:
      add("cold_process_speedup_0.4_with_compiles",
          dense["seconds"][0] / fast["seconds"][0], ">=", 1.8)
    dense_c, fast_c = by.get(("dense", "cached")), by.get(("astraea_0.4",
                                                          "cached"))
    if dense_c and fast_c:
      add("second_process_speedup_0.4_with_cache",
          dense_c["seconds"][0] / fast_c["seconds"][0], ">=", 2.3)
    peak = dense["peak_bytes"]
    for name, goal in (("astraea_0.4", 2.1), ("astraea_0.4_compact_state",
                                              1.6)):
      row = by.get((name, "cold"))
      if row and peak and row["peak_bytes"]:
        add(f"peak_ratio_{name}", row["peak_bytes"] / peak, "<=", goal)
        if name == "astraea_0.4":
          bound = 1.1 * 2 * row["layers"] * row["tokens"] * row["dim"] * 2
          add("astraea_0.4_extra_bytes_over_bound",
              (row["peak_bytes"] - peak) / bound, "<=", 1.0)
  for row in rows:
    if row.get("estimated_peak_bytes") and row.get("peak_bytes"):
      add(f"estimate_error_{row['name']}",
          abs(row["estimated_peak_bytes"] / row["peak_bytes"] - 1), "<=",
          0.15)
  return targets


def user_view_targets(rows):
  """`astraea generate --compare` against the speed part's whole runs."""
  by = {(r["name"], r.get("process")): r for r in rows
        if not r.get("failed")}
  user = by.get(("user_generate_compare", None))
  dense, fast = by.get(("dense", "cold")), by.get(("astraea_0.4", "cold"))
  if not (user and dense and fast):
    return []
  report = user["report"]
  bench = dense["seconds"][-1] / fast["seconds"][-1]
  return [
      {"name": "user_view_warm_speedup_vs_benchmark",
       "value": abs(report["speedup_without_compiles"] / bench - 1),
       "op": "<=", "target": 0.05},
      {"name": "user_view_full_seconds_vs_benchmark",
       "value": abs(report["full"]["seconds_without_compiles"]
                    / dense["seconds"][-1] - 1), "op": "<=", "target": 0.05},
      {"name": "user_view_cold_speedup_with_compiles",
       "value": report["full"]["seconds"] / report["astraea"]["seconds"],
       "op": ">=", "target": 1.8}]


def fit_and_opensora_targets(rows):
  out = []
  for r in rows:
    if r.get("model") == "14b" or r.get("video") == "720p":
      out.append({"name": f"runs_on_one_gpu_{r['name']}",
                  "value": 0.0 if r.get("failed") else 1.0, "op": ">=",
                  "target": 1.0})
  by = {r["name"]: r for r in rows if not r.get("failed")}
  if "opensora_dense" in by and "opensora_astraea_0.4" in by:
    out.append({"name": "opensora_end_to_end_speedup_0.4_warm",
                "value": by["opensora_dense"]["seconds"][-1]
                / by["opensora_astraea_0.4"]["seconds"][-1],
                "op": ">=", "target": 2.2})
  return out


def merge(paths, out):
  """One results file from the parts' files (device calls on one machine):
  rows tagged with their file's parts, every part's targets, and the
  targets across parts."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import common  # pylint: disable=import-outside-toplevel
  import kinds  # pylint: disable=import-outside-toplevel
  docs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
  rows, targets = [], []
  for doc in docs:
    part = "+".join(doc["settings"]["parts"])
    part_rows = [{k: v for k, v in r.items()
                  if k not in ("kind", "kind_rule")} | {"part": part}
                 for r in doc["rows"]]
    rows += part_rows
    targets += [{k: v for k, v in t.items()
                 if k not in ("kind", "kind_rule")} | {"part": part}
                for t in summarize(part_rows)]
  speed = [r for r in rows if r["part"] == "speed"]
  user = [r for r in rows if r["name"] == "user_generate_compare"]
  targets += user_view_targets(speed + user) + fit_and_opensora_targets(rows)
  doc = {**docs[0], "settings": {**docs[0]["settings"], "parts": [
      d["settings"]["parts"] for d in docs], "merged_from": [
          pathlib.Path(p).name for p in paths]},
         "rows": rows, "targets": targets}
  kinds.label(doc)
  pathlib.Path(out).write_text(json.dumps(doc, indent=2) + "\n")
  del common
  print(f"wrote {out}")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--part", action="append",
                      choices=["speed", "states", "memory", "user",
                               "opensora", "speed04", "speed03", "cold04"])
  parser.add_argument("--small", action="store_true")
  parser.add_argument("--out")
  parser.add_argument("--timeout", type=int, default=900)
  parser.add_argument("--child")
  parser.add_argument("--write-checkpoint")
  parser.add_argument("--merge", nargs="+", metavar="PART_JSON",
                      help="combine the parts' files into --out")
  args = parser.parse_args()
  if args.merge:
    return merge(args.merge, args.out)
  if args.child:
    return child(json.loads(args.child), args.small)
  if args.write_checkpoint:
    return write_checkpoint(args.write_checkpoint, args.small)
  parts = args.part or ["speed"]
  out = pathlib.Path(args.out) if args.out else (
      pathlib.Path(tempfile.gettempdir()) / "astraea_end_to_end_small.json"
      if args.small else RESULTS / f"astraea_end_to_end_{'_'.join(parts)}.json")
  sys.path.insert(0, str(ROOT / "benchmarks"))
  rows = []

  def save(row):  # after every row: a call cut short keeps what ran
    rows.append(row)
    import common  # pylint: disable=import-outside-toplevel
    device = next((r["device"] for r in rows if "device" in r), "unknown")
    settings = {"parts": parts, "device": device, "small": args.small,
                "timing": "whole runs, wall clock, each configuration in "
                          "its own process with its own compilation cache"}
    common.write_results(out, "astraea_end_to_end", settings, rows,
                         summarize(rows))

  tables = {"speed": SPEED, "states": STATES, "memory": MEMORY,
            "opensora": OPENSORA, "speed04": SPEED[:2], "speed03": SPEED[2:3],
            "cold04": COLD04}
  for part in parts:
    print(f"part {part}:", flush=True)
    if part == "user":
      user_part(args.small, args.timeout, save)
    else:
      run_part(tables[part], args.small, args.timeout, save)
  return 0


if __name__ == "__main__":
  sys.exit(main())

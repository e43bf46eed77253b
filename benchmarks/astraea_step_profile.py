"""Where an Astraea step's time goes, and what its programs cost to compile
(issue #25: bookkeeping <= 2% of a dense step; cold runs).

  PYTHONPATH=. python benchmarks/astraea_step_profile.py --out DIR    # GPU
  PYTHONPATH=. python benchmarks/astraea_step_profile.py --small --out /tmp/p

One Wan2.1-1.3B model evaluation (random bfloat16 weights, CFG batch 2,
480p x 81 = 32,760 tokens, 512 text tokens), each program compiled ahead of
time (compile seconds measured) and timed as the median of --repeats
calls:
  dense           the dense WanDiT forward;
  all             Astraea's full step (K = N, every cache entry written);
  astraea_K       Astraea at K = round(budget N) (the default lean state);
  fixed_K         the same blocks at K with a fixed token choice (no score,
                  no top-K: the selection's cost is astraea_K - fixed_K);
  select_only_K   scores + top-K of every block on the real cache, alone;
  select_only_sort_K  the same with the sort-based top-K (the old way);
  write_only_K    the cache writes and the x + update pass alone;
  *_notriton      compiled with XLA's Triton GEMMs off (cuBLAS only);
  *_autotune0     compiled with XLA's autotuning off.
--trace NAMES profiles those programs and summarises their device time
by kernel (dense_wan.profile_summary); --hlo NAMES writes their optimised
HLO (gzip), where the profile's fusion names are defined.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from astraea_jax.astraea import layer_loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from astraea_jax.astraea import schedule as schedule_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from astraea_jax.astraea import selection  # pylint: disable=g-import-not-at-top,wrong-import-position
from astraea_jax.astraea import wan_tokenwise  # pylint: disable=g-import-not-at-top,wrong-import-position
from astraea_jax.sampling import sampler  # pylint: disable=g-import-not-at-top,wrong-import-position

OPTIONS = {"": None,
           "_notriton": {"xla_gpu_enable_triton_gemm": False},
           "_autotune0": {"xla_gpu_autotune_level": 0}}


def _dense(graphdef, params, latents, t, ctx):
  return nnx.merge(graphdef, params)(latents, t, ctx)


def _astraea(graphdef, params, latents, t, ctx, cache, *, k, config):
  return wan_tokenwise.forward(nnx.merge(graphdef, params), latents, t, ctx,
                               cache, num_selected=k, config=config)


def _fixed(graphdef, params, latents, t, ctx, cache, index, *, config):
  model = nnx.merge(graphdef, params)
  x, e, e0, c, rope = model.embed(latents, t, ctx)
  x, cache, _ = wan_tokenwise.run_blocks(
      model, x, e0, c, rope, cache, mode="select", config=config,
      select=lambda x, lc, layer, state: (index, state))
  return model.unembed(x, e, latents.shape), cache


def _select_only(x, cache, *, k, config):
  def body(i, acc):
    scores = selection.token_scores(x, selection.layer_cache(cache, i),
                                    config)
    return acc + selection.select_tokens(scores, k)[:, :8].sum()
  return jax.lax.fori_loop(0, cache["lse"].shape[0], body, 0)


def _select_only_sort(x, cache, *, k, config):
  """`_select_only` with the sort-based top-K (jax.lax.top_k, then a sort
  of the indices): what select_tokens ran before the radix select."""
  def body(i, acc):
    scores = selection.token_scores(x, selection.layer_cache(cache, i),
                                    config)
    idx = jnp.sort(jax.lax.top_k(scores, k)[1], axis=-1)
    return acc + idx[:, :8].sum()
  return jax.lax.fori_loop(0, cache["lse"].shape[0], body, 0)


def _write_only(x, cache, index, x_sel, lse_sel, *, config):
  def body(i, carry):
    x, cache = carry
    return selection.write_selected(cache, i, x, index, x_sel, lse_sel,
                                    config)
  return jax.lax.fori_loop(0, cache["lse"].shape[0], body, (x, cache))


def _time(fn, args, repeats, donate_index=None):
  """Median seconds of `repeats` calls; a donated argument is fed back."""
  args = list(args)
  seconds = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    seconds.append(time.perf_counter() - t0)
    if donate_index is not None:
      args[donate_index] = out[1] if isinstance(out, tuple) else out
  return statistics.median(seconds[1:]), args


def targets_of(rows, budgets) -> list[dict]:
  """Issue #25's bookkeeping target (<= 2% of a dense step) and the
  compile-time ratios of the Triton-GEMM-off programs, per tree."""
  out = []
  for tree in dict.fromkeys(r.get("tree", "") for r in rows):
    by = {r["name"]: r for r in rows if r.get("tree", "") == tree}
    if "dense" not in by:
      continue
    for b in budgets:
      parts = [f"select_only_{b}", f"write_only_{b}"]
      if all(p in by for p in parts):
        value = sum(by[p]["step_ms"] for p in parts) / by["dense"]["step_ms"]
        out.append({"name": f"bookkeeping_fraction_{b}", "tree": tree,
                    "rows": parts + ["dense"], "value": value, "op": "<=",
                    "target": 0.02, "met": value <= 0.02})
    for name in ("dense", "all", *[f"astraea_{b}" for b in budgets]):
      if name in by and name + "_notriton" in by:
        ratio = by[name + "_notriton"]["step_ms"] / by[name]["step_ms"]
        out.append({"name": f"step_time_ratio_notriton_{name}",
                    "tree": tree, "rows": [name, name + "_notriton"],
                    "value": ratio, "op": "<=", "target": 1.02,
                    "met": ratio <= 1.02})
  return out


def record(paths_and_trees, out, note):
  """benchmarks/results/astraea_step_profile_<gpu>.json from device calls'
  rows files, each tagged with the tree that ran it."""
  import common  # pylint: disable=import-outside-toplevel
  rows, profiles, device, budgets = [], {}, None, set()
  for path, tree in paths_and_trees:
    doc = json.loads(pathlib.Path(path).read_text())
    device = device or doc["device"]
    for row in doc["rows"]:
      rows.append({**row, "tree": tree, "device": doc["device"],
                   "jax": doc["jax"]})
      if row["name"].startswith("select_only_"):
        budgets.add(row["name"].rsplit("_", 1)[1])
    profiles.update({f"{tree}:{k}": v for k, v in doc["profiles"].items()})
  settings = {"device": device, "model": "Wan2.1-1.3B random bfloat16",
              "video": "480p x 81 (32,760 tokens), CFG batch 2, 512 text "
                       "tokens", "source_note": note, "profiles": profiles}
  common.write_results(out, "astraea_step_profile", settings, rows,
                       targets_of(rows, sorted(budgets)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--record", nargs="+", metavar="ROWS_JSON:TREE",
                      help="write --out (a results file) from device rows")
  parser.add_argument("--note", default="")
  parser.add_argument("--small", action="store_true")
  parser.add_argument("--budgets", type=float, nargs="+", default=[0.4])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--variants", nargs="*",
                      default=["_notriton", "_autotune0"])
  parser.add_argument("--trace", nargs="*", default=[],
                      help="programs to profile (dense, astraea_0.4, ...)")
  parser.add_argument("--hlo", nargs="*", default=[],
                      help="programs whose optimised HLO is written")
  parser.add_argument("--only", nargs="*", default=None)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args()
  if args.record:
    return record([p.rsplit(":", 1) for p in args.record], args.out,
                  args.note)
  args.out.mkdir(parents=True, exist_ok=True)
  import astraea_end_to_end as e2e  # pylint: disable=import-outside-toplevel
  import dense_wan  # pylint: disable=import-outside-toplevel

  config, graphdef, params = e2e._wan("1.3b", "480p", args.small)  # pylint: disable=protected-access
  height, width, frames = e2e.VIDEOS["small" if args.small else "480p"]
  shape = sampler.wan_latent_shape(height, width, frames)
  latents = jax.random.normal(jax.random.key(0), (2,) + shape[1:])
  t = jnp.full((2,), 500.0)
  ctx = jax.random.normal(jax.random.key(1),
                          (2, 16 if args.small else 512, config.text_dim))
  n = int(np.prod([s // p for s, p in zip(shape[2:], config.patch_size)]))
  lean = selection.SelectionConfig()
  cache_args = (config.num_layers, 2, n, config.dim)
  rows, summaries = [], {}

  def save():
    (args.out / "astraea_step_profile_rows.json").write_text(json.dumps(
        {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "tokens": n, "layers": config.num_layers, "dim": config.dim,
         "rows": rows, "profiles": summaries}, indent=1))

  def program(name, fn, make_args, donate=None, static=None, trace=False):
    """make_args() -> fresh arguments (a donated cache is used up)."""
    if args.only is not None and name not in args.only:
      return
    jitted = jax.jit(fn, donate_argnums=() if donate is None else (donate,),
                     static_argnames=tuple(static or ()))
    for suffix, options in OPTIONS.items():
      if suffix and suffix not in args.variants:
        continue
      if suffix and not name.startswith(("dense", "all", "astraea")):
        continue
      fn_args = make_args()
      t0 = time.perf_counter()
      compiled = jitted.lower(*fn_args, **(static or {})).compile(
          compiler_options=options)
      compile_s = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      if args.hlo and name in args.hlo and not suffix:
        with gzip.open(args.out / f"{name}.hlo.txt.gz", "wt") as f:
          f.write(compiled.as_text())
      seconds, fresh = _time(compiled, fn_args, args.repeats, donate)
      del fn_args
      row = {"name": name + suffix, "compile_s": compile_s,
             "step_ms": seconds * 1e3, "options": options,
             "temp_bytes": getattr(mem, "temp_size_in_bytes", None)}
      if name in args.trace and not suffix:
        trace_dir = args.out / f"trace_{name}"
        with jax.profiler.trace(str(trace_dir)):
          jax.block_until_ready(compiled(*fresh))
        try:
          summaries[name] = dense_wan.profile_summary(trace_dir, top=40)
        except Exception as error:  # pylint: disable=broad-except
          summaries[name] = {"error": repr(error)}
      rows.append(row)
      print(json.dumps(row), flush=True)
      save()

  def fresh_cache():
    return selection.init_cache(*cache_args, lean)

  program("dense", _dense, lambda: (graphdef, params, latents, t, ctx))
  program("all", _astraea,
          lambda: (graphdef, params, latents, t, ctx, fresh_cache()),
          donate=5, static={"k": n, "config": lean})
  x = jax.random.normal(jax.random.key(2), (2, n, config.dim))
  for budget in args.budgets:
    k = schedule_lib.num_selected(budget, n)
    def scored_cache():
      cache = fresh_cache()
      return {**cache, "lse": jax.random.normal(jax.random.key(3),
                                                cache["lse"].shape)}

    program(f"astraea_{budget}", _astraea,
            lambda: (graphdef, params, latents, t, ctx, scored_cache()),
            donate=5, static={"k": k, "config": lean})
    index = jnp.tile(jnp.round(jnp.linspace(0, n - 1, k)).astype(
        jnp.int32)[None], (2, 1))
    program(f"fixed_{budget}", _fixed,
            lambda: (graphdef, params, latents, t, ctx, fresh_cache(),
                     index), donate=5, static={"config": lean})
    program(f"select_only_{budget}", _select_only,
            lambda: (x, scored_cache()), static={"k": k, "config": lean})
    program(f"select_only_sort_{budget}", _select_only_sort,
            lambda: (x, scored_cache()), static={"k": k, "config": lean})
    x_sel = x[:, :k]
    lse = jnp.zeros((2, config.num_heads, k))
    program(f"write_only_{budget}", _write_only,
            lambda: (x, fresh_cache(), index, x_sel, lse),
            donate=1, static={"config": lean})


if __name__ == "__main__":
  main()

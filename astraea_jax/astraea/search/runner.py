"""Proxies, the plot and the file runner: what `astraea search` runs."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax import checkpoint, outputs
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.sampling import sampler as dense_sampler
from astraea_jax.text_embeddings import read_text_embeddings
from astraea_jax.astraea.search.genetic import (
    SearchConfig,
    initial_population,
)
from astraea_jax.astraea.search import separable
from astraea_jax.astraea.search.loop import (
    STATE_FILE,
    search,
)
from astraea_jax.astraea.search.fitness import (
    EvalConfig,
    TreeFitness,
)



METHODS = ("ga", "dp")


# Proxies --------------------------------------------------------------------


def spearman(a, b) -> float:
  """Spearman rank correlation (average ranks for ties)."""
  def ranks(x):
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for value in np.unique(x):      # ties share their mean rank
      tie = x == value
      r[tie] = r[tie].mean()
    return r
  ra, rb = ranks(a), ranks(b)
  if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
    return float("nan")
  return float(np.corrcoef(ra, rb)[0, 1])


def rank_correlation(proxy, full, genomes) -> dict:
  """How well `proxy` ranks `genomes` like `full` (Spearman rho)."""
  proxy_fitness, full_fitness = proxy(genomes), full(genomes)
  return {"spearman": spearman(proxy_fitness, full_fitness),
          "genomes": np.asarray(genomes).tolist(),
          "proxy_fitness": proxy_fitness.tolist(),
          "full_fitness": full_fitness.tolist()}


# Plot -----------------------------------------------------------------------


def plot(path, history, schedule, target_budget) -> bool:
  """PNG: best/mean fitness per generation and the chosen schedule.

  Needs matplotlib (the optional extra `plot`); without it, prints a note
  and returns False.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print(f"note: matplotlib is not installed, so {path} was not drawn "
          "(pip install 'astraea-jax[plot]'); the numbers are in "
          "report.json")
    return False
  gens = [h["generation"] for h in history]
  fig, (ax_fit, ax_sched) = plt.subplots(1, 2, figsize=(11, 4))
  ax_fit.plot(gens, [h["best"] for h in history], "o-", label="best")
  ax_fit.plot(gens, [h["mean"] for h in history], "s--",
              label="population mean")
  ax_fit.set_yscale("log")
  ax_fit.set_xlabel("generation")
  ax_fit.set_ylabel("fitness: MSE vs full model (lower is better)")
  ax_fit.legend()
  steps = np.arange(len(schedule))
  ax_sched.bar(steps, schedule, color="tab:blue")
  ax_sched.axhline(target_budget, color="k", ls="--",
                   label=f"target {target_budget:g}")
  ax_sched.axhline(float(np.mean(schedule)), color="tab:red", ls=":",
                   label=f"mean {np.mean(schedule):.3f}")
  ax_sched.set_ylim(0, 1.05)
  ax_sched.set_xlabel("denoising step")
  ax_sched.set_ylabel("token budget")
  ax_sched.legend()
  fig.tight_layout()
  outputs.write_figure(path, fig, dpi=100)
  plt.close(fig)
  return True


# From files: what `astraea search` runs --------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
  """The samples the fitness averages over: video size, count, seed."""
  height: int = 480
  width: int = 832
  frames: int = 81
  samples: int = 4
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class SearchModel:
  """The model a search samples: `run_files` loads a converted transformer
  alone (`load`); the Wan2.2 pipelines make theirs (`Wan22Pipeline.
  search_model`).

    graphdef, params: `nnx.split` of the DiT; or params the experts' pair
      with `boundary_ratio` (Wan2.2 A14B; `TreeFitness`);
    text_dim: the width of its text embeddings;
    latent_shape: (height, width, frames) -> (1, C, F, H, W) of a video;
    image_input: None (text to video) or frames -> the image's input of
      that many frames (the pipeline's `image_conditioning`);
    image_hooks: (noise (1, C, F, H, W), image input) -> (noise, sampler
      hooks: token_mask, post_step, condition), the pipeline's.
  """
  graphdef: Any
  params: Any
  text_dim: int
  boundary_ratio: float | None = None
  latent_shape: Callable = dense_sampler.wan_latent_shape
  image_input: Callable | None = None
  image_hooks: Callable | None = None

  @classmethod
  def load(cls, path, *, dtype: str | None = None) -> SearchModel:
    """A converted Wan DiT (`checkpoint.load_model`) on Wan2.1's latents."""
    model = checkpoint.load_model(path, dtype=dtype)
    return cls(*nnx.split(model), model.config.text_dim)

  def problem_inputs(self, noise, frames: int):
    """(noise, `TreeFitness` hook arguments) of samples `noise` (S, ...):
    text to video as they are; image to video each sample (batch 1)
    through `image_hooks` with the image input of `frames` frames, the
    hooks stacked per sample (token_mask is one for all)."""
    if self.image_input is None:
      return noise, {}
    image = self.image_input(frames)
    pairs = [self.image_hooks(noise[j:j + 1], image)
             for j in range(noise.shape[0])]
    hooks = [h for _, h in pairs]
    kwargs = {}
    if "token_mask" in hooks[0]:  # (L,): the same for every sample
      kwargs["token_mask"] = hooks[0]["token_mask"]
    if "post_step" in hooks[0]:   # leaves (S, 1, ...)
      kwargs["post_steps"] = jax.tree.map(
          lambda *xs: jnp.stack(xs), *(h["post_step"] for h in hooks))
    if "condition" in hooks[0]:   # (S, C', F, H, W)
      kwargs["conditions"] = jnp.concatenate([h["condition"]
                                              for h in hooks])
    return jnp.concatenate([n for n, _ in pairs]), kwargs


def load_samples(embedding_paths, text_dim: int, problem: Problem,
                 latent_shape=dense_sampler.wan_latent_shape):
  """(noise (S, C, F, H, W), contexts (S, L, D), negatives (S, L', D)).

  Sample j uses prompt j mod len(paths) and noise from seed + j (sample 0
  is the noise `astraea generate --seed SEED` draws). latent_shape:
  (height, width, frames) -> (1, C, F, H, W) (default Wan2.1's).
  """
  if not embedding_paths:
    raise ValueError("no prompts: pass --text-embeddings with one "
                     "safetensors file (`context`) per prompt")
  if problem.samples < len(embedding_paths):
    raise ValueError(f"{problem.samples=} must be >= the "
                     f"{len(embedding_paths)} prompts given")
  pairs = [read_text_embeddings(p, text_dim)
           for p in embedding_paths]
  shape = tuple(latent_shape(problem.height, problem.width,
                             problem.frames))[1:]

  def stack(arrays):
    length = max(a.shape[1] for a in arrays)
    return jnp.concatenate([jnp.pad(a, ((0, 0), (0, length - a.shape[1]),
                                        (0, 0))) for a in arrays])

  idx = [j % len(pairs) for j in range(problem.samples)]
  noise = jnp.stack([dense_sampler.draw_noise(
      jax.random.key(problem.seed + j), (1,) + shape)[0]
                     for j in range(problem.samples)])
  return (noise, stack([pairs[i][0] for i in idx]),
          stack([pairs[i][1] for i in idx]))


def problem_fitness(model: SearchModel, embedding_paths, problem: Problem, *,
                    steps: int, eval_config: EvalConfig) -> TreeFitness:
  """The `TreeFitness` of `model` on `problem`'s samples (`load_samples`,
  `SearchModel.problem_inputs`): what `run_files` searches with."""
  noise, contexts, negatives = load_samples(
      embedding_paths, model.text_dim, problem, model.latent_shape)
  noise, hooks = model.problem_inputs(noise, problem.frames)
  return TreeFitness(model.graphdef, model.params, noise, contexts,
                     negatives, steps=steps, config=eval_config,
                     boundary_ratio=model.boundary_ratio, **hooks)


def run_files(model_path, embedding_paths, out, *, config: SearchConfig,
              problem: Problem = Problem(), eval_config: EvalConfig =
              EvalConfig(), proxy: Problem | None = None,
              proxy_check: int = 8, min_rank_correlation: float = 0.9,
              dtype: str | None = None, resume: bool = False,
              progress: bool = True, method: str = "ga",
              dp_config: separable.DPConfig = separable.DPConfig(),
              install: tuple[pathlib.Path, str] | None = None,
              model: SearchModel | None = None) -> dict:
  """`astraea search`: the budget schedule of one converted checkpoint.

  Writes into `out`: search_state.json (after every generation),
  schedule.json (for `astraea generate --schedule`), report.json and
  search.png. With `proxy` (a cheaper Problem: fewer frames, lower
  resolution, fewer samples) the search runs on the proxy after measuring
  its Spearman rank correlation with the full fitness on `proxy_check`
  random feasible genomes; below `min_rank_correlation` (default 0.9, the
  bar of issue #22) it stops. A proxy of fewer samples than prompts keeps
  the first prompts: its samples are the full problem's first ones (the
  measured proxy of benchmarks/results/search_proxy_demo.json).

  method: "ga" (the paper's evolutionary search) or "dp" (`separable`:
  step costs measured one step at a time, optimised exactly).
  install: (folder, model id): also write the schedule there as the
  searched schedule of its target budget (`schedule.save_searched`).
  model: the model to search with (default: `SearchModel.load` of
  `model_path`, a converted transformer; the Wan2.2 pipelines' for their
  folders: two experts, image to video).
  """
  if method not in METHODS:
    raise ValueError(f"{method=} must be one of {METHODS}")
  out = pathlib.Path(out)
  state_path = out / STATE_FILE
  if resume and not state_path.exists():
    raise FileNotFoundError(f"--resume: {state_path} does not exist")
  if not resume and state_path.exists():
    raise ValueError(f"{out} holds a search already ({STATE_FILE}); pass "
                     "--resume to continue it or choose another --out")
  if not embedding_paths:
    raise ValueError("no prompts: pass --text-embeddings with one "
                     "safetensors file (`context`) per prompt")
  for p in (problem,) + ((proxy,) if proxy else ()):
    (dense_sampler.wan_latent_shape if model is None
     else model.latent_shape)(p.height, p.width, p.frames)
  # Not a checkpoint, or a damaged one: checkpoint.CheckpointReadError.
  model = model or SearchModel.load(model_path, dtype=dtype)
  outputs.mark_folder(out, command="search")

  def fitness_of(p, paths=embedding_paths):
    return problem_fitness(model, paths, p, steps=config.steps,
                           eval_config=eval_config)

  full = fitness_of(problem)
  report = {"config": config.to_dict(),
            "problem": dataclasses.asdict(problem),
            "eval_config": {k: v for k, v in dataclasses.asdict(
                eval_config).items() if k != "selection"},
            "model": str(model_path),
            "boundary_ratio": model.boundary_ratio,
            "image_to_video": model.image_input is not None,
            "prompts": [str(p) for p in embedding_paths],
            "fingerprint": full.fingerprint}
  fitness_fn = full
  if proxy is not None:
    # Sample j is prompt j mod #prompts with noise seed + j, so the first
    # proxy.samples prompts give the full problem's first samples.
    fitness_fn = fitness_of(proxy, embedding_paths[:proxy.samples])
    check_path = out / "proxy_check.json"
    check = None
    if check_path.exists():
      check = json.loads(check_path.read_text())
      if check.get("fingerprints") != [full.fingerprint,
                                       fitness_fn.fingerprint]:
        check = None
    if check is None:
      # Random feasible genomes (and the default schedule), drawn apart
      # from the search's own stream.
      check_config = config if proxy_check <= config.population else (
          dataclasses.replace(config, population=proxy_check))
      genomes = np.asarray(initial_population(
          jax.random.key(config.seed + 1), config=check_config))[:proxy_check]
      check = {**rank_correlation(fitness_fn, full, genomes),
               "fingerprints": [full.fingerprint, fitness_fn.fingerprint]}
      outputs.write_json(check_path, check)
    report["proxy"] = {**dataclasses.asdict(proxy),
                       "spearman": check["spearman"],
                       "check_genomes": len(check["genomes"])}
    print(f"proxy {proxy}: Spearman rank correlation with the full fitness "
          f"over {len(check['genomes'])} genomes: {check['spearman']:.3f}")
    if not check["spearman"] >= min_rank_correlation:
      raise ValueError(
          f"the proxy ranks candidates unlike the full fitness: Spearman "
          f"rho={check['spearman']:.3f} < {min_rank_correlation=}; use a "
          "closer proxy or none")
  report["method"] = method
  if method == "dp":
    result = separable.search(fitness_fn, config, dp_config,
                              state_path=state_path, resume=resume,
                              progress=progress)
    report.update(dp_config=dp_config.to_dict(),
                  predicted_fitness=result.predicted,
                  step_costs=result.costs.tolist(), history=[],
                  genomes_requested=result.genomes_evaluated)
  else:
    result = search(fitness_fn, config, state_path=state_path,
                    resume=resume, progress=progress)
    report.update(history=result.history,
                  genomes_requested=result.genomes_requested)
  report.update(
      schedule=result.schedule.tolist(),
      mean_budget=float(np.mean(result.schedule)),
      fitness=result.fitness,
      genomes_evaluated=result.genomes_evaluated,
      # This process's work (a resumed run counts only what it did).
      row_steps=dict(fitness_fn.counts),
      row_steps_by_gene=fitness_fn.row_steps_by_gene.tolist(),
      naive_row_steps=(report["genomes_requested"] + 1) * config.steps
      * fitness_fn.num_samples)
  if proxy is not None:
    report["fitness_full"] = float(full(result.genome[None])[0])
  schedule_lib.save(out / "schedule.json", result.schedule,
                    target_budget=config.target_budget,
                    fitness_mse=report.get("fitness_full", result.fitness),
                    steps=config.steps, searched_with=str(model_path),
                    method=method)
  if install is not None:
    folder, model_id = install
    folder = pathlib.Path(folder)
    folder.mkdir(exist_ok=True)
    path = folder / schedule_lib.searched_name(config.target_budget)
    schedule_lib.save_searched(
        path, result.schedule, model=model_id,
        target_budget=config.target_budget, steps=config.steps,
        method=method, fitness_mse=report.get("fitness_full",
                                              result.fitness),
        prompts=[str(p) for p in embedding_paths])
    report["installed"] = str(path)
  outputs.write_json(out / "report.json", report)
  if method == "ga":
    plot(out / "search.png", result.history, result.schedule,
         config.target_budget)
  return report

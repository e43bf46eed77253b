"""The evolutionary budget search: operators, search, fitness, resume, CLI.

Model tests use a tiny random Wan converted like a real checkpoint, video
32 x 48 x 5 frames (latent 2 x 4 x 6 -> 12 tokens), 4 steps, 2 samples.
"""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax import checkpoint, cli, testing
from astraea_jax.astraea import wan_tokenwise as astraea
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import search
from astraea_jax.astraea import selection
from astraea_jax.configs import WanConfig
from astraea_jax.pipelines import wan22_pipeline
from astraea_jax.sampling import sampler as dense
from converters.safetensors_io import save_file
from _parallel_reference import random_model

# GA tests: 8 steps, the paper's population sizes.
GA = search.SearchConfig(target_budget=0.45, steps=8)
# Model tests.
MODEL = WanConfig.tiny(num_layers=2, dim=64, ffn_dim=96, num_heads=2,
                       text_dim=24, text_len=8, freq_dim=16)
STEPS, SAMPLES = 4, 2
VIDEO = ["--height", "32", "--width", "48", "--frames", "5"]
PROBLEM = search.Problem(height=32, width=48, frames=5, samples=SAMPLES)
SMALL = search.SearchConfig(target_budget=0.5, steps=STEPS, population=6,
                            children=4, generations=3)
# The exact state (float32 update, full last input): the 1e-6 agreements
# below are float32 rounding; a bfloat16 state would round them further.
EVAL = search.EvalConfig(batch_nodes=4, selection=selection.EXACT)


def in_band(genomes, config):
  lo, hi = config.budget_band()
  genomes = np.asarray(genomes)
  return bool(((genomes >= 0) & (genomes <= 10)).all()
              and (genomes[:, 0] == 10).all()
              and (genomes.sum(1) >= lo).all()
              and (genomes.sum(1) <= hi).all())


# Operators -------------------------------------------------------------------


def test_repair_puts_any_genome_on_the_grid_and_in_the_band():
  lo, hi = GA.budget_band()
  assert (lo, hi) == (33, 39)  # 0.45 x 8 steps = 36 tenths, +-10%
  rng = np.random.default_rng(0)
  genomes = np.concatenate([
      rng.integers(-3, 15, (40, 8)), np.zeros((1, 8)),
      np.full((1, 8), 10), rng.integers(0, 3, (10, 8)),
      rng.integers(8, 11, (10, 8))]).astype(np.int32)
  keys = jax.random.split(jax.random.key(0), len(genomes))
  repaired = np.asarray(jax.vmap(lambda k, g: search.repair(
      k, g, lo=lo, hi=hi))(keys, jnp.asarray(genomes)))
  assert in_band(repaired, GA)
  # Genomes already feasible come back unchanged.
  feasible = np.clip(genomes, 0, 10)
  feasible[:, 0] = 10
  ok = (feasible.sum(1) >= lo) & (feasible.sum(1) <= hi)
  assert ok.sum() >= 3
  np.testing.assert_array_equal(repaired[ok], feasible[ok])
  # Repair moves the sum only to the nearest band edge.
  total = feasible.sum(1)
  np.testing.assert_array_equal(repaired.sum(1), np.clip(total, lo, hi))


def test_children_are_feasible_and_reproducible():
  population = np.asarray(search.initial_population(jax.random.key(1),
                                                    config=GA))
  assert population.shape == (50, 8) and in_band(population, GA)
  np.testing.assert_array_equal(
      population[0], search.from_schedule(schedule_lib.default_schedule(
          0.45, 8)))
  fitness = np.random.default_rng(0).random(50)
  kids = [np.asarray(search.make_children(k, population, fitness, rate,
                                          config=GA))
          for k, rate in [(jax.random.key(2), 0.1), (jax.random.key(2), 0.1),
                          (jax.random.key(3), 0.1), (jax.random.key(2), 0.5)]]
  assert kids[0].shape == (30, 8)
  for k in kids:
    assert in_band(k, GA)
  np.testing.assert_array_equal(kids[0], kids[1])       # one key, one result
  assert not np.array_equal(kids[0], kids[2])
  assert not np.array_equal(kids[0], kids[3])


def test_crossover_and_mutation():
  a = jnp.arange(10, dtype=jnp.int32)
  b = a + 100
  for i in range(6):
    key = jax.random.key(i)
    u = np.asarray(search.uniform_crossover(key, a, b))
    assert ((u == a) | (u == b)).all()
    blk = np.asarray(search.block_crossover(key, a, b))
    from_b = np.flatnonzero(blk == b)
    assert ((blk == a) | (blk == b)).all()
    if from_b.size:  # one contiguous block
      assert from_b.size == from_b[-1] - from_b[0] + 1
  g = jnp.asarray([10, 3, 0, 10, 5, 5, 7, 2], jnp.int32)
  np.testing.assert_array_equal(search.mutate(jax.random.key(0), g, 0.0), g)
  m = np.asarray(search.mutate(jax.random.key(0), g, 1.0))
  assert m[0] == 10 and (m[1:] != np.asarray(g)[1:]).all()
  assert ((m >= 0) & (m <= 10)).all()


def test_survivors_are_the_best_distinct_genomes():
  genomes = np.array([[10, 1], [10, 2], [10, 1], [10, 3], [10, 4]])
  fitness = np.array([0.5, 0.2, 0.5, 0.1, np.nan])
  np.testing.assert_array_equal(search.select_survivors(genomes, fitness, 3),
                                [3, 1, 0])
  # A repeat only fills in when distinct genomes run out.
  np.testing.assert_array_equal(search.select_survivors(genomes, fitness, 5),
                                [3, 1, 0, 4, 2])


def test_mutation_rate_decays_from_start_to_end():
  rates = [GA.mutation_rate(g) for g in range(1, 31)]
  assert rates[0] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.01)
  assert all(x > y for x, y in itertools.pairwise(rates))


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_budget=0.0), "must lie in (0, 1]"),
    (dict(target_budget=1.5), "must lie in (0, 1]"),
    (dict(target_budget=0.05, steps=4), "no feasible schedule"),
    (dict(mutation_end=0.2), "mutation_end"),
    (dict(tournament=60), "tournament"),
])
def test_bad_search_settings(kwargs, message):
  with pytest.raises(ValueError) as e:
    search.SearchConfig(**kwargs)
  assert message in str(e.value)


def test_search_finds_a_known_optimum():
  """Synthetic fitness ||g - g*||^2 with g* feasible: found exactly."""
  star = np.array([10, 8, 6, 5, 3, 2, 2, 0])
  assert GA.budget_band()[0] <= star.sum() <= GA.budget_band()[1]
  result = search.search(lambda g: ((g - star) ** 2).sum(1).astype(float),
                         GA, progress=False)
  np.testing.assert_array_equal(result.genome, star)
  assert result.fitness == 0.0
  best = [h["best"] for h in result.history]
  assert best[0] > 0 and all(x >= y for x, y in itertools.pairwise(best))
  assert result.genomes_requested == 50 + 30 * 30
  # Repeats come from the fitness cache, never re-evaluated.
  assert result.genomes_evaluated == sum(h["new_genomes"]
                                         for h in result.history)


# Model fitness ---------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A converted tiny checkpoint and two prompt embedding files."""
  root = tmp_path_factory.mktemp("search")
  src = testing.write_wan_checkpoint(root / "src", MODEL, seed=3)
  assert cli.main(["convert", str(src), str(root / "ckpt"), "--quiet"]) == 0
  rng = np.random.default_rng(0)
  for i in range(SAMPLES):
    save_file({"context": rng.standard_normal((5, 24)).astype(np.float32)},
              root / f"p{i}.safetensors")
  return root


def embeddings(files):
  return [files / f"p{i}.safetensors" for i in range(SAMPLES)]


@pytest.fixture(scope="module")
def problem(files):
  graphdef, params = nnx.split(checkpoint.load_model(files / "ckpt"))
  samples = search.load_samples(embeddings(files), MODEL.text_dim, PROBLEM)
  return graphdef, params, samples


def make_fitness(problem, config=EVAL, **kwargs):
  graphdef, params, samples = problem
  return search.TreeFitness(graphdef, params, *samples, steps=STEPS,
                            config=config, **kwargs)


@pytest.fixture(scope="module")
def fitness(problem):
  return make_fitness(problem)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


GENOMES = np.array([[10, 10, 10, 0], [10, 10, 5, 0], [10, 10, 5, 5],
                    [10, 5, 5, 0], [10, 5, 0, 5], [10, 0, 5, 5],
                    [10, 0, 0, 10]], np.int32)


def distinct_prefixes(genomes, skip=()):
  return len({tuple(g[:d]) for g in genomes.tolist()
              for d in range(1, len(g) + 1)} - set(skip))


def test_fitness_is_mse_of_the_sparse_sampler_vs_the_full_model(problem,
                                                                fitness):
  graphdef, params, (noise, ctx, neg) = problem
  genome = GENOMES[3]
  mse = []
  for s in range(SAMPLES):
    args = (graphdef, params, noise[s:s + 1], ctx[s:s + 1], neg[s:s + 1])
    full = dense.sample(*args, steps=STEPS, progress=False)
    # The tree's full-model trajectory is the dense sampler's (<= 1e-5:
    # the same float32 math through a masked block).
    assert rel_err(fitness.reference[s], full) <= 1e-5
    fast = astraea.sample(*args, schedule=search.to_schedule(genome),
                          steps=STEPS, progress=False,
                          selection_config=EVAL.selection)
    mse.append(float(jnp.mean(jnp.square(fast - full))))
  assert np.mean(mse) > 0
  # The masked simulation gives the sparse sampler's numbers (rel 1e-5,
  # as tests/test_astraea.py).
  assert rel_err(fitness(genome[None]), np.mean(mse)) <= 1e-5


def test_a_truncated_fitness_is_the_samplers_x0_estimate(problem):
  """run_steps=M: the MSE of the x0 estimate after the first M of STEPS
  steps, equal to the samplers run on those M steps with the last one
  landing on its x0 estimate (UniPC predictor (0, 1, 0), as at sigma = 0);
  genes from M on do not enter."""
  graphdef, params, (noise, ctx, neg) = problem
  m, genome = 2, GENOMES[4]                          # [10, 5, 0, 5]
  truncated = make_fitness(problem, run_steps=m)
  sched = dense.resolve_scheduler("unipc", STEPS, None, noise.shape)
  first_m = sched.replace(
      timesteps=sched.timesteps[:m], sigmas=sched.sigmas[:m + 1],
      corrector=sched.corrector[:m],
      predictor=sched.predictor[:m].at[-1].set(jnp.asarray([0., 1., 0.])))
  args = (graphdef, params, noise[1:], ctx[1:], neg[1:])   # sample 1
  full = dense.sample(*args, scheduler=first_m, steps=m, progress=False)
  fast = astraea.sample(*args, schedule=search.to_schedule(genome[:m]),
                        scheduler=first_m, steps=m, progress=False,
                        selection_config=EVAL.selection)
  mse = float(jnp.mean(jnp.square(fast - full)))
  assert mse > 0
  values = truncated.per_sample(np.stack([genome, [10, 5, 10, 10]]))
  assert rel_err(values[0, 1], mse) <= 1e-5
  np.testing.assert_array_equal(values[1], values[0])
  with pytest.raises(ValueError, match="keeps none"):
    make_fitness(problem, dataclasses_replace(EVAL, scheduler="euler"),
                 run_steps=m)


def test_a_proxy_of_fewer_samples_than_prompts_is_the_first_samples(
    files, tmp_path, fitness):
  """--proxy-samples 1 with 2 prompts: the full problem's first sample
  (prompt 0, noise seed), checked against the full fitness's own
  per-sample values."""
  report = search.run_files(
      files / "ckpt", embeddings(files), tmp_path / "a",
      config=dataclasses_replace(SMALL, population=4, generations=0),
      problem=PROBLEM, eval_config=EVAL,
      proxy=dataclasses_replace(PROBLEM, samples=1), proxy_check=4,
      min_rank_correlation=-1.0, progress=False)
  check = json.loads((tmp_path / "a" / "proxy_check.json").read_text())
  genomes = np.asarray(check["genomes"], np.int32)
  per_sample = fitness.per_sample(genomes)
  assert rel_err(check["proxy_fitness"], per_sample[:, 0]) <= 1e-5
  assert rel_err(check["full_fitness"], per_sample.mean(1)) <= 1e-5
  assert report["proxy"]["samples"] == 1


# Wan2.2 TI2V image-to-video: the image's tokens at t = 0 (token mask), its
# latent put back after every step (post-step, one image per sample).
TI2V = WanConfig.tiny(in_dim=48, out_dim=48, num_layers=2, dim=32,
                      ffn_dim=48, num_heads=2, text_dim=24, text_len=8,
                      freq_dim=16)
TI2V_LATENTS = (SAMPLES, 48, 3, 4, 4)  # 12 tokens, 4 of them the image's


@pytest.mark.parametrize("evaluator", ["masked", "sparse"])
def test_ti2v_image_fitness_is_the_sparse_samplers(evaluator):
  """The fitness of a TI2V image-to-video problem (per-token timesteps and
  the image frame through `token_mask` / `post_steps`) is the MSE of the
  sparse sampler with the same hooks against the dense one (rel 1e-5, as
  the text-to-video test above)."""
  graphdef, params = random_model(seed=4, config=TI2V)
  rng = np.random.default_rng(5)
  images = rng.standard_normal(TI2V_LATENTS[:2] + (1, 4, 4)).astype(
      np.float32)
  noise = wan22_pipeline.put_first_frame(
      jnp.asarray(rng.standard_normal(TI2V_LATENTS), jnp.float32), images)
  ctx = rng.standard_normal((SAMPLES, 5, 24)).astype(np.float32)
  neg = np.zeros((1, 1, 24), np.float32)
  mask = wan22_pipeline.first_frame_token_mask(TI2V_LATENTS, (1, 2, 2))
  fitness = search.TreeFitness(
      graphdef, params, noise, ctx, neg, steps=STEPS,
      config=dataclasses_replace(EVAL, evaluator=evaluator),
      token_mask=mask,
      post_steps=wan22_pipeline.first_frame_post_step(images[:, None]))
  genome = GENOMES[3]
  mse = []
  for s in range(SAMPLES):
    args = (graphdef, params, noise[s:s + 1], ctx[s:s + 1], neg)
    hooks = {"token_mask": mask, "post_step":
             wan22_pipeline.first_frame_post_step(images[s:s + 1])}
    full = dense.sample(*args, steps=STEPS, progress=False, **hooks)
    np.testing.assert_array_equal(full[:, :, :1], images[s:s + 1])
    assert rel_err(fitness.reference[s], full) <= 1e-5
    fast = astraea.sample(*args, schedule=search.to_schedule(genome),
                          steps=STEPS, progress=False,
                          selection_config=EVAL.selection, **hooks)
    mse.append(float(jnp.mean(jnp.square(fast - full))))
  assert np.mean(mse) > 0
  assert rel_err(fitness(genome[None]), np.mean(mse)) <= 1e-5
  if evaluator == "masked":  # the mask counts (its absence changes x_T)
    no_mask = dense.sample(*args, steps=STEPS, progress=False,
                           post_step=hooks["post_step"])
    assert rel_err(no_mask, full) > 1e-3
  with pytest.raises(ValueError, match="one entry per sample"):
    search.TreeFitness(graphdef, params, noise, ctx, neg, steps=STEPS,
                       post_steps=wan22_pipeline.first_frame_post_step(
                           images[:1, None]))


def test_prefix_tree_equals_naive_evaluation_and_saves_steps(problem):
  tree = make_fitness(problem)
  naive = make_fitness(problem, dataclasses_replace(EVAL, share_prefixes=False,
                                                    memo_nodes=0))
  for f in (tree, naive):
    assert f.counts["node_steps"] == 0       # nothing runs before it is used
    assert f.reference.shape == (SAMPLES, 1, 16, 2, 4, 6)
    assert f.counts["node_steps"] == STEPS   # the full model, once
    f.counts.clear()
  first, second = GENOMES[:4], GENOMES[4:]
  np.testing.assert_array_equal(tree(first), naive(first))  # bit for bit
  # Naive: every genome from scratch. Tree: each distinct prefix once, the
  # full model's prefixes (10,), (10, 10), (10, 10, 10) came memoised.
  assert naive.counts["node_steps"] == 4 * STEPS
  full = [(10,) * d for d in range(1, STEPS)]
  assert tree.counts["node_steps"] == distinct_prefixes(first, full) == 7
  # The next generation starts from the memoised prefixes.
  before = tree.counts["node_steps"]
  np.testing.assert_array_equal(tree(second), naive(second))
  seen = {tuple(g[:d]) for g in first.tolist() for d in range(1, STEPS)}
  assert tree.counts["node_steps"] - before == distinct_prefixes(
      second, seen | set(full)) == 7
  assert naive.counts["node_steps"] == 7 * STEPS
  assert tree.counts["row_steps"] == SAMPLES * 14
  print(f"prefix tree: {tree.counts['row_steps']} row-steps, naive: "
        f"{naive.counts['row_steps']}")


def dataclasses_replace(obj, **kw):
  import dataclasses
  return dataclasses.replace(obj, **kw)


def test_passes_lanes_and_a_small_memo_change_cost_not_fitness(problem,
                                                               fitness):
  # One row per call (the unbatched path a full-size model takes), one
  # genome at a time, one memoised state per pass.
  config = dataclasses_replace(EVAL, samples_per_pass=1, lanes=1,
                               memo_nodes=2, batch_nodes=1)
  small = search.RecordingFitness(make_fitness(problem, config))
  population = np.asarray(search.initial_population(jax.random.key(0),
                                                    config=SMALL))
  values = small(population)
  small.retain(population)
  values2 = small(GENOMES)
  # Another batch shape rounds differently: 1e-6 relative.
  assert rel_err(values, fitness(population)) <= 1e-6
  assert rel_err(values2, fitness(GENOMES)) <= 1e-6
  # The counter replays the planner without the model: same counts.
  counter = search.TreeCounter(steps=STEPS, num_samples=SAMPLES,
                               config=config)
  assert counter.replay(small.events) == small.inner.counts
  np.testing.assert_array_equal(counter.row_steps_by_gene,
                                small.inner.row_steps_by_gene)
  # Cost: between the unbounded tree and the naive evaluation.
  rows = {}
  for name, kw in [("naive", dict(share_prefixes=False, memo_nodes=0)),
                   ("tree", dict(memo_nodes=10**6)), ("small", {})]:
    rows[name] = search.TreeCounter(
        steps=STEPS, num_samples=SAMPLES,
        config=dataclasses_replace(config, **kw)).replay(
            small.events)["row_steps"]
  assert rows["tree"] < rows["small"] < rows["naive"]


def test_sizes_follow_device_memory():
  gib = 2**30
  # Wan2.1-1.3B at 480p, float32 cache: a 24 GiB row on a 141 GiB H200.
  assert search.resolve_sizes(search.EvalConfig(), 4, 24 * gib,
                              141 * gib) == (1, 1, 1, 1)
  per_pass, nodes, lanes, memo = search.resolve_sizes(
      search.EvalConfig(), 4, 2**20, 141 * gib)
  assert (per_pass, nodes) == (4, 16) and lanes > 1000 and memo > 1000
  # No memory report (CPU): everything at once.
  assert search.resolve_sizes(search.EvalConfig(), 4, 2**20, None) == (
      4, 4, None, 4096)
  # Set sizes win.
  assert search.resolve_sizes(
      search.EvalConfig(samples_per_pass=2, batch_nodes=3, lanes=5,
                        memo_nodes=7), 4, 24 * gib, 141 * gib) == (2, 3, 5, 7)


def test_sparse_evaluator_matches_the_masked_simulation(problem, fitness):
  sparse = make_fitness(problem, dataclasses_replace(EVAL,
                                                     evaluator="sparse"))
  assert rel_err(sparse(GENOMES), fitness(GENOMES)) <= 1e-5
  # Budget 0.5 and 0 steps were computed (and counted) by budget.
  assert sparse.row_steps_by_gene[[0, 5, 10]].sum() == sparse.counts[
      "row_steps"]


WORKER = textwrap.dedent("""
    import json, os, signal, sys
    import numpy as np
    from flax import nnx
    from astraea_jax import checkpoint
    from astraea_jax.astraea import search
    from astraea_jax.astraea.selection import SelectionConfig
    mode, root, out = sys.argv[1:4]
    root = __import__("pathlib").Path(root)
    embeddings = [root / f"p{{i}}.safetensors" for i in range({samples})]
    problem = search.{problem!r}
    if mode == "devices":
      import jax
      assert jax.device_count() == 2, jax.devices()
      graphdef, params = nnx.split(checkpoint.load_model(root / "ckpt"))
      samples = search.load_samples(embeddings, 24, problem)
      f = search.TreeFitness(graphdef, params, *samples, steps={steps},
                             config=search.{eval!r})
      genomes = np.asarray(json.loads(sys.argv[4]), np.int32)
      print("FITNESS", json.dumps(f(genomes).tolist()))
    else:  # killed in the middle of generation 2
      call = search.TreeFitness.__call__
      calls = [0]
      def dying_call(self, genomes):
        calls[0] += 1
        if calls[0] == 3:
          call(self, genomes[:len(genomes) // 2])
          os.kill(os.getpid(), signal.SIGKILL)
        return call(self, genomes)
      search.TreeFitness.__call__ = dying_call
      search.run_files(root / "ckpt", embeddings, out,
                       config=search.{small!r}, problem=problem,
                       eval_config=search.{eval!r}, progress=False)
""").format(samples=SAMPLES, problem=PROBLEM, steps=STEPS, eval=EVAL,
            small=SMALL)


def run_worker(tmp_path, *args, devices=1):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = dict(os.environ, PYTHONPATH=str(testing.REPO_ROOT),
             JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + f" --xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, str(script), *map(str, args)],
                        capture_output=True, text=True, env=env, timeout=300,
                        check=False)


def test_rows_shard_over_two_devices(files, tmp_path, fitness):
  proc = run_worker(tmp_path, "devices", files, tmp_path / "unused",
                    json.dumps(GENOMES.tolist()), devices=2)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [x for x in proc.stdout.splitlines() if x.startswith("FITNESS")]
  two = np.asarray(json.loads(line[0].split(" ", 1)[1]))
  # Each device compiles half the batch: rounding may differ, 1e-6 rel.
  assert rel_err(two, fitness(GENOMES)) <= 1e-6


def test_kill_mid_generation_then_resume_is_bit_exact(files, tmp_path):
  killed = tmp_path / "killed"
  proc = run_worker(tmp_path, "kill", files, killed)
  assert proc.returncode == -9, proc.stderr[-3000:]   # SIGKILL
  state = json.loads((killed / search.STATE_FILE).read_text())
  assert state["generation"] == 1            # died during generation 2
  assert not (killed / "schedule.json").exists()
  resumed = search.run_files(files / "ckpt", embeddings(files), killed,
                             config=SMALL, problem=PROBLEM, eval_config=EVAL,
                             resume=True, progress=False)
  straight = search.run_files(files / "ckpt", embeddings(files),
                              tmp_path / "straight", config=SMALL,
                              problem=PROBLEM, eval_config=EVAL,
                              progress=False)
  a = json.loads((killed / search.STATE_FILE).read_text())
  b = json.loads((tmp_path / "straight" / search.STATE_FILE).read_text())
  assert a["generation"] == b["generation"] == SMALL.generations
  assert a == b                          # population, fitness, key, history
  assert (killed / "schedule.json").read_text() == (
      tmp_path / "straight" / "schedule.json").read_text()
  assert resumed["schedule"] == straight["schedule"]
  assert resumed["fitness"] == straight["fitness"]
  # The resumed process evaluated only generations 2 and 3.
  assert resumed["row_steps"]["row_steps"] < straight["row_steps"][
      "row_steps"]


def test_spearman_rank_correlation():
  assert search.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1)
  assert search.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
  # Ties share their mean rank: ranks (0, 1.5, 1.5, 3) vs (0, 1, 2, 3).
  expected = np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
  assert search.spearman([1, 2, 2, 3], [5, 6, 7, 8]) == pytest.approx(
      expected)
  assert np.isnan(search.spearman([1, 1, 1], [1, 2, 3]))


def test_a_proxy_is_used_only_with_its_rank_correlation(files, tmp_path):
  proxy = dataclasses_replace(PROBLEM, samples=1)
  common = dict(config=SMALL, problem=PROBLEM, eval_config=EVAL, proxy=proxy,
                proxy_check=4, progress=False)
  report = search.run_files(files / "ckpt", embeddings(files)[:1],
                            tmp_path / "a", min_rank_correlation=-1.0,
                            **common)
  check = json.loads((tmp_path / "a" / "proxy_check.json").read_text())
  assert len(check["genomes"]) == 4
  rho = report["proxy"]["spearman"]
  assert rho == check["spearman"] and -1 <= rho <= 1
  assert rho == pytest.approx(search.spearman(check["proxy_fitness"],
                                              check["full_fitness"]))
  # The searched schedule is also scored with the full fitness.
  assert report["fitness_full"] > 0 and report["fitness"] > 0
  with pytest.raises(ValueError, match="ranks candidates unlike"):
    search.run_files(files / "ckpt", embeddings(files)[:1], tmp_path / "b",
                     min_rank_correlation=1.01, **common)
  assert not (tmp_path / "b" / search.STATE_FILE).exists()


# Command line ----------------------------------------------------------------


def search_args(files, out, *extra):
  return ["search", "--model", str(files / "ckpt"), "--target-budget", "0.5",
          "--text-embeddings", *map(str, embeddings(files)), "--out",
          str(out), "--steps", str(STEPS), *VIDEO, "--samples", str(SAMPLES),
          "--population", "6", "--children", "4", "--generations", "3",
          "--quiet", *extra]


def test_cli_search_writes_a_schedule_generate_reads(files, tmp_path,
                                                     capsys):
  out = tmp_path / "out"
  assert cli.main(search_args(files, out)) == 0
  printed = capsys.readouterr().out
  assert "schedule (mean budget" in printed
  doc = json.loads((out / "schedule.json").read_text())
  budgets = np.asarray(doc["schedule"])
  assert budgets.shape == (STEPS,) and budgets[0] == 1.0
  assert 0.45 - 1e-9 <= budgets.mean() <= 0.55 + 1e-9
  report = json.loads((out / "report.json").read_text())
  assert report["fitness"] == doc["fitness_mse"] > 0
  assert report["naive_row_steps"] == (6 + 4 * 3 + 1) * STEPS * SAMPLES
  assert 0 < report["row_steps"]["row_steps"] < report["naive_row_steps"]
  try:
    import matplotlib  # noqa: F401  pylint: disable=unused-import
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  except ImportError:
    assert "matplotlib is not installed" in printed
  # `astraea generate --schedule` runs the searched schedule.
  gen = tmp_path / "gen"
  assert cli.main(["generate", str(files / "ckpt"), "--text-embeddings",
                   str(embeddings(files)[0]), "--out", str(gen), "--steps",
                   str(STEPS), *VIDEO, "--schedule",
                   str(out / "schedule.json")]) == 0
  assert json.loads((gen / "report.json").read_text())["astraea"][
      "schedule"] == doc["schedule"]
  # Resuming a finished search gives its result again.
  assert cli.main(search_args(files, out, "--resume")) == 0
  assert json.loads((out / "schedule.json").read_text()) == doc


def test_plot_without_matplotlib_prints_a_note(tmp_path, monkeypatch,
                                               capsys):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  assert not search.plot(tmp_path / "x.png", [{"generation": 0, "best": 1.0,
                                               "mean": 2.0}], [1.0, 0.5], 0.7)
  assert "matplotlib is not installed" in capsys.readouterr().out
  assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_cli_target_budget_is_checked_with_the_command_line(files, tmp_path,
                                                           capsys, value):
  args = search_args(files, tmp_path / "out")
  args[args.index("--target-budget") + 1] = value
  with pytest.raises(SystemExit) as exit_info:
    cli.main(args)
  assert exit_info.value.code == 2
  assert f"argument --target-budget: {value} is out of range: must be in " \
      "(0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("change,message", [
    ({"--text-embeddings": None}, "no prompts"),
    ({"--text-embeddings": None, "--prompts": "PROMPTS"},
     "--prompts needs a converted whole-model folder"),
    ({"--text-embeddings": None, "--prompts": "EMPTY"}, "no prompts"),
    ({"--model": "MISSING"}, "nowhere: no such folder"),
    ({"--model": "BROKEN"}, "the converted checkpoint is damaged"),
    ({"--resume": True}, "does not exist"),
    ({"--height": "36"}, "multiples of 16"),
    ({"--samples": "1"}, "must be >= the 2 prompts"),
    ({"--proxy-samples": "3"}, "a proxy must be cheaper"),
])
def test_cli_bad_input(files, tmp_path, capsys, change, message):
  (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
  (tmp_path / "empty.txt").write_text("\n \n")
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text((files / "ckpt" / "config.json")
                                      .read_text())
  (broken / "params").mkdir()
  (broken / "params" / "garbage").write_text("not orbax")
  subst = {"PROMPTS": tmp_path / "prompts.txt",
           "EMPTY": tmp_path / "empty.txt",
           "MISSING": tmp_path / "nowhere", "BROKEN": broken}
  args = search_args(files, tmp_path / "out")
  for flag, value in change.items():
    if flag == "--text-embeddings":
      i = args.index(flag)
      del args[i:i + 1 + SAMPLES]
    elif value is True:
      args.append(flag)
    elif flag in args:
      args[args.index(flag) + 1] = str(subst.get(value, value))
    if value is not True and value is not None and flag not in args:
      args += [flag, str(subst.get(value, value))]
  assert cli.main(args) == 1
  assert message in capsys.readouterr().err


def test_cli_refuses_to_overwrite_a_search(files, tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / search.STATE_FILE).write_text("{}")
  assert cli.main(search_args(files, out)) == 1
  assert "pass --resume" in capsys.readouterr().err
  # A state written by other settings is refused, naming the difference.
  assert cli.main(search_args(files, out, "--resume")) == 1
  assert "search state version" in capsys.readouterr().err

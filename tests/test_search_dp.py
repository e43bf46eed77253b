"""The separable (DP) budget search, searched-schedule lookup, the shipped
demo schedules (issue #22).

Model tests use a tiny random Wan converted like a real checkpoint (as
tests/test_search.py): video 32 x 48 x 5 frames (12 tokens), 4 steps, 2
samples.
"""

import json

import numpy as np
import pytest

from astraea_jax import cli
from astraea_jax import demo as demo_lib
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import search
from astraea_jax.astraea.search import separable
from astraea_jax.commands import common

# The tiny model's converted checkpoint and prompt files: test_search's.
from test_search import SAMPLES, STEPS, VIDEO
from test_search import files  # noqa: F401 (fixture)


# The exact optimum -----------------------------------------------------------


@pytest.mark.parametrize("steps", [3, 4, 5])
def test_dp_equals_brute_force_on_random_separable_problems(steps):
  rng = np.random.default_rng(steps)
  for _ in range(6):
    costs = rng.random((steps, 11))
    lo = int(rng.integers(10, 10 * steps))
    hi = int(rng.integers(lo, 10 * steps + 1))
    genome, value = separable.solve(costs, lo, hi)
    best, best_value = separable.brute_force(costs, lo, hi)
    # Same summation order: bit-equal totals; random costs: one optimum.
    assert value == best_value
    np.testing.assert_array_equal(genome, best)
    assert genome[0] == 10 and lo <= genome.sum() <= hi


def test_dp_refuses_an_empty_band_and_unfilled_costs():
  with pytest.raises(ValueError, match="no genome of 3 steps"):
    separable.solve(np.zeros((3, 11)), 31, 40)
  costs = np.zeros((3, 11))
  costs[1, 4] = np.nan
  with pytest.raises(ValueError, match="finite"):
    separable.solve(costs, 10, 30)


def synthetic(steps, seed=0, profile=False):
  """A separable fitness F(g) = sum_t table[t, g_t], table[t, 10] = 0
  (optionally of the profile form a_t * phi(g))."""
  rng = np.random.default_rng(seed)
  if profile:
    phi = np.sort(rng.random(11))[::-1].copy()
    phi[10] = 0.0
    phi /= phi[0]
    table = rng.random((steps, 1)) * phi[None]
  else:
    table = rng.random((steps, 11)) * (10 - np.arange(11))[None]
  table[0] = 0.0

  def fitness(genomes):
    genomes = np.asarray(genomes)
    return table[np.arange(steps)[None], genomes].sum(1)

  return fitness, table


@pytest.mark.parametrize("plan,profile", [
    (separable.DPConfig(genes=tuple(range(10))), False),
    (separable.DPConfig(genes=(0,), profile_count=2), True),
    (separable.DPConfig(), True),
    (separable.DPConfig(genes=tuple(range(10)), base="default"), False)])
def test_dp_search_finds_the_optimum_of_a_separable_fitness(plan, profile):
  steps = 5
  fitness, table = synthetic(steps, profile=profile)
  config = search.SearchConfig(target_budget=0.5, steps=steps)
  result = separable.search(fitness, config, plan, progress=False)
  lo, hi = config.budget_band()
  best, best_value = separable.brute_force(table, lo, hi)
  # Costs relative to the base's own genes (0 for the full model).
  offset = table[np.arange(steps), plan.base_genome(config)][:, None]
  np.testing.assert_allclose(result.costs[1:], (table - offset)[1:],
                             rtol=1e-9, atol=1e-12)
  np.testing.assert_array_equal(result.genome, best)
  assert result.fitness == pytest.approx(best_value, rel=1e-12)
  assert result.predicted == pytest.approx(best_value, rel=1e-9)
  # Measured: the base, one genome per planned (step, gene), the result
  # and (where it differs) the default schedule, which cannot win here.
  base = plan.base_genome(config)
  default = search.from_schedule(schedule_lib.default_schedule(0.5, steps))
  assert result.chosen == "dp"
  assert result.genomes_evaluated == 2 + sum(
      len(g) for g in plan.plan(steps, base).values()) + (
          not np.array_equal(result.genome, default))


def test_dp_returns_the_default_where_it_measures_better():
  """A fitness the separable model gets wrong (every schedule but the
  default is worse than it predicts): the search keeps the default."""
  steps = 5
  separable_part, _ = synthetic(steps, seed=1)
  default = search.from_schedule(schedule_lib.default_schedule(0.5, steps))

  def fitness(genomes):
    genomes = np.asarray(genomes)
    penalty = (genomes != default[None]).any(1) & (genomes != 10).any(1)
    return separable_part(genomes) + 100.0 * penalty

  config = search.SearchConfig(target_budget=0.5, steps=steps)
  result = separable.search(fitness, config, progress=False)
  assert result.chosen == "default"
  np.testing.assert_array_equal(result.genome, default)
  off = separable.search(fitness, config, separable.DPConfig(
      include_default=False), progress=False)
  assert off.chosen == "dp" and off.fitness > result.fitness


def test_profile_fill():
  plan = separable.DPConfig(genes=(0, 5), profile_steps=(3,))
  measured = {(t, g): 2.0 * t * (1 - g / 10) for t in (1, 2)
              for g in (0, 5)}
  measured.update({(3, g): 6.0 * (1 - g / 10) ** 2 for g in range(10)})
  table = separable.fill_costs(measured, 4, plan)
  # Step 3 as measured, steps 1-2: c_t(0) * c_3(g) / c_3(0) where unmeasured.
  np.testing.assert_allclose(table[3, :10], [6 * (1 - g / 10) ** 2
                                             for g in range(10)])
  np.testing.assert_allclose(table[1, [1, 7]], [2 * 0.81, 2 * 0.09])
  assert table[2, 5] == measured[(2, 5)] and (table[:, 10] == 0).all()
  with pytest.raises(ValueError, match="ref_gene"):
    separable.DPConfig(genes=(3,), ref_gene=0)


def test_dp_cost_formula_bounds_the_prefix_tree_count():
  """count_row_steps at the paper's settings bounds replaying the DP's
  calls through TreeCounter (no model), far below the GA's 187,200."""
  paper = search.SearchConfig(target_budget=0.4, steps=50)
  for plan in (separable.DPConfig(), separable.DPConfig(genes=(0,))):
    recording = search.RecordingFitness(
        lambda g: np.zeros(len(g)))
    separable.search(recording, paper, plan, progress=False)
    counter = search.TreeCounter(steps=50, num_samples=4,
                                 config=search.EvalConfig(
                                     memo_nodes=1 << 30, batch_nodes=1,
                                     samples_per_pass=1))
    counter.replay(recording.events)
    total = int(counter.row_steps_by_gene.sum())
    # The formula is a bound: the chosen and default schedules may share
    # more than the first step with the base (5 warm-up steps here).
    bound = separable.count_row_steps(50, 4, plan)
    assert bound - 2 * 4 * 5 <= total <= bound
    assert 187_200 / bound >= 12


def test_dp_resume_after_a_kill_is_exact(tmp_path):
  steps = 6
  fitness, _ = synthetic(steps, seed=3)
  config = search.SearchConfig(target_budget=0.4, steps=steps,
                               band=(1.0, 1.0))
  plan = separable.DPConfig(genes=(0, 5), profile_count=2)
  whole = separable.search(fitness, config, plan, progress=False)
  calls = [0]

  def dying(genomes):
    calls[0] += 1
    if calls[0] == 4:
      raise KeyboardInterrupt
    return fitness(genomes)

  state = tmp_path / "search_state.json"
  with pytest.raises(KeyboardInterrupt):
    separable.search(dying, config, plan, state_path=state, progress=False)
  assert len(separable.load_state(state, config, plan, None)[0]) == 4
  resumed = separable.search(fitness, config, plan, state_path=state,
                             resume=True, progress=False)
  np.testing.assert_array_equal(resumed.genome, whole.genome)
  assert resumed.fitness == whole.fitness
  np.testing.assert_array_equal(resumed.costs, whole.costs)
  # The GA refuses the DP's state, and the DP another plan's.
  with pytest.raises(ValueError, match="--method dp search state"):
    search.load_state(state, config, None)
  with pytest.raises(ValueError, match="other settings"):
    separable.load_state(state, config, separable.DPConfig(), None)


# Searched schedules: lookup -------------------------------------------------


def test_find_searched_schedule(tmp_path):
  budgets = [1.0, 1.0, 0.2, 0.2]
  path = tmp_path / schedule_lib.searched_name(0.6)
  assert path.name == "budget_0.60.json"
  found, note = schedule_lib.find_searched(tmp_path, 0.6, 4, model="m")
  assert found is None and "no searched schedule for mean budget 0.6" in note
  schedule_lib.save_searched(path, budgets, model="m", target_budget=0.6,
                             steps=4, method="dp")
  found, note = schedule_lib.find_searched(tmp_path, 0.6, 4, model="m")
  np.testing.assert_array_equal(found, budgets)
  assert str(path) in note
  found, note = schedule_lib.find_searched(tmp_path, 0.6, 5, model="m")
  assert found is None and "has 4 steps, but sampling runs 5" in note
  with pytest.raises(ValueError, match="searched for another model"):
    schedule_lib.find_searched(tmp_path, 0.6, 4, model="other")
  doc = json.loads(path.read_text())
  path.write_text(json.dumps({**doc, "version": 0}))
  with pytest.raises(ValueError, match="format version 0; this version"):
    schedule_lib.find_searched(tmp_path, 0.6, 4, model="m")
  path.write_text(json.dumps({"schedule": budgets}))
  with pytest.raises(ValueError, match="not a searched schedule"):
    schedule_lib.find_searched(tmp_path, 0.6, 4, model="m")
  path.write_text(json.dumps({**doc, "schedule": [1.0, 1.0, 1.0, 0.2]}))
  with pytest.raises(ValueError, match="mean budget 0.8000 is not 0.6"):
    schedule_lib.find_searched(tmp_path, 0.6, 4, model="m")
  with pytest.raises(ValueError, match="not the target"):
    schedule_lib.save_searched(path, budgets, model="m", target_budget=0.5,
                               steps=4)


def test_the_demo_ships_searched_schedules():
  from astraea_jax.demo_model import model as demo_model
  config, _ = demo_model.load_config()
  model_id = demo_model.model_id()
  for budget in (0.3, 0.4, 0.5, 0.7):
    found, note = schedule_lib.find_searched(
        demo_model.SCHEDULES_DIR, budget, config.steps, model=model_id)
    assert found is not None, note
    assert abs(found.mean() - budget) <= 1e-9 and found[0] == 1.0
    doc = json.loads((demo_model.SCHEDULES_DIR / schedule_lib.searched_name(
        budget)).read_text())
    assert doc["method"] == "dp" and doc["fitness_mse"] > 0


def test_demo_uses_the_searched_schedule_of_its_budget(tmp_path, capsys):
  """A demo weights folder with WEIGHTS/schedules/: used by default, and
  --default-schedule turns it off (random small weights: only the choice
  of schedule is checked here)."""
  from astraea_jax.demo_model import model as demo_model
  small = demo_model.DemoConfig.small()
  _, params = demo_model.split(demo_model.init(small, seed=0))
  weights = demo_model.export(tmp_path / "weights", small, params)
  searched = [1.0, 0.6, 0.2, 0.2]
  (weights / "schedules").mkdir()
  schedule_lib.save_searched(
      weights / "schedules" / "budget_0.50.json", searched,
      model=demo_model.model_id(weights), target_budget=0.5, steps=4)
  out = tmp_path / "demo"
  assert cli.main(["demo", "--weights", str(weights), "--out", str(out),
                   "--quiet"]) == 0
  printed = capsys.readouterr().out
  assert "schedule: the searched schedule" in printed
  report = json.loads((out / "report.json").read_text())
  assert report["budget_schedule"] == searched
  assert report["schedule_source"] == "searched"
  # --default-schedule: the choice the demo then makes (not run again).
  found, note = demo_lib.common_searched(0.5, 4, weights, True)
  assert found is None and "as --default-schedule asks" in note
  found, _ = demo_lib.common_searched(0.5, 4, weights, False)
  assert found.tolist() == searched
  # Another model's schedule is refused, by its flag.
  schedule_lib.save_searched(
      weights / "schedules" / "budget_0.50.json", searched, model="other",
      target_budget=0.5, steps=4)
  assert cli.main(["demo", "--weights", str(weights), "--out", str(out),
                   "--quiet"]) == 1
  err = capsys.readouterr().err
  assert "--budget 0.5" in err and "another model" in err


# The command line ------------------------------------------------------------


def test_cli_dp_search_installs_a_schedule_generate_finds(files, tmp_path,
                                                          capsys):
  out = tmp_path / "out"
  ckpt = files / "ckpt"
  args = ["search", "--method", "dp", "--model", str(ckpt),
          "--target-budget", "0.5", "--text-embeddings",
          *(str(files / f"p{i}.safetensors") for i in range(SAMPLES)),
          "--out", str(out), "--steps", str(STEPS), *VIDEO, "--samples",
          str(SAMPLES), "--quiet", "--install"]
  assert cli.main(args) == 0
  printed = capsys.readouterr().out
  assert "installed" in printed
  report = json.loads((out / "report.json").read_text())
  assert report["method"] == "dp"
  # Prefix sharing: exactly the formula's row-steps (the chosen schedule
  # may share more of the base's prefix: at most).
  plan = separable.DPConfig()
  assert 0 < report["row_steps"]["row_steps"] <= separable.count_row_steps(
      STEPS, SAMPLES, plan)
  installed = ckpt / "schedules" / "budget_0.50.json"
  doc = json.loads(installed.read_text())
  assert doc["schedule"] == report["schedule"] and doc["mean_budget"] == 0.5
  assert doc["model"] == common.model_schedule_id(ckpt)
  gen = tmp_path / "gen"
  gen_args = ["generate", str(ckpt), "--text-embeddings",
              str(files / "p0.safetensors"), "--steps", str(STEPS), *VIDEO,
              "--budget", "0.5"]
  assert cli.main([*gen_args, "--out", str(gen)]) == 0
  printed = capsys.readouterr().out
  assert f"schedule: the searched schedule {installed}" in printed
  assert json.loads((gen / "report.json").read_text())["astraea"][
      "schedule"] == doc["schedule"]
  # Another number of steps: the default schedule, and why.
  assert cli.main([*gen_args[:4], "--steps", "5", *VIDEO, "--budget", "0.5",
                   "--out", str(tmp_path / "gen5")]) == 0
  assert "has 4 steps, but sampling runs 5" in capsys.readouterr().out
  # --install needs the exact mean; --band is checked by its flag.
  assert cli.main([*args[:-1], "--install", "--method", "ga", "--out",
                   str(tmp_path / "o2")]) == 1
  assert "--install" in capsys.readouterr().err
  assert cli.main([*args[:-1], "--band", "1.2", "1.3", "--out",
                   str(tmp_path / "o3")]) == 1
  assert "--band 1.2 1.3" in capsys.readouterr().err

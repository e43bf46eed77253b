"""Budget schedules: one token budget theta_t in [0, 1] per denoising step.

The search's genome lives on the grid {0, 0.1, ..., 1.0} (Astraea sec. 3.3);
a schedule read from a file may hold any value in [0, 1].
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile

import numpy as np

GRID = np.round(np.arange(11) / 10, 1)


def validate(schedule, steps: int) -> np.ndarray:
  """The schedule as float64 (steps,), or a ValueError naming the problem."""
  budgets = np.asarray(schedule, np.float64)
  if budgets.ndim != 1 or budgets.shape[0] != steps:
    raise ValueError(
        f"budget schedule has {budgets.shape} entries but sampling runs "
        f"{steps} steps")
  bad = [(i, float(b)) for i, b in enumerate(budgets)
         if not 0.0 <= b <= 1.0 or math.isnan(b)]
  if bad:
    raise ValueError(f"budgets must lie in [0, 1]; got (step, budget) {bad}")
  if budgets[0] != 1.0:
    raise ValueError(
        f"the first step's budget is {budgets[0]}, but it must be 1.0: "
        "nothing is cached before the first step")
  return budgets


def num_selected(budget: float, num_tokens: int) -> int:
  """K = round(theta * N), the tokens each block computes."""
  return int(round(budget * num_tokens))


def default_schedule(mean_budget: float, steps: int,
                     warmup: int | None = None) -> np.ndarray:
  """A grid schedule with mean `mean_budget`: full warm-up, then even.

  warmup: steps at budget 1.0 first (default max(1, round(steps / 10))),
  reduced if the mean budget cannot pay for them. The remaining tenths are
  spread as evenly as the 0.1 grid allows, larger budgets first.
  """
  if not 0.0 < mean_budget <= 1.0:
    raise ValueError(f"{mean_budget=} must lie in (0, 1]")
  if steps < 1:
    raise ValueError(f"{steps=} must be >= 1")
  tenths = int(round(mean_budget * steps * 10))
  if warmup is None:
    warmup = max(1, int(round(steps / 10)))
  warmup = max(1, min(warmup, steps, tenths // 10))
  rest_steps, rest = steps - warmup, tenths - 10 * warmup
  per_step = np.zeros(rest_steps, np.int64)
  if rest_steps:
    per_step[:] = min(rest // rest_steps, 10)
    extra = rest - per_step.sum()
    per_step[:extra] += 1
  return np.concatenate([np.ones(warmup), per_step / 10])


def resolve(budget, schedule, steps: int) -> np.ndarray:
  """The per-step budgets of a sampler given exactly one of a mean `budget`
  (-> `default_schedule`) and a `schedule`, validated."""
  if (budget is None) == (schedule is None):
    raise ValueError("give exactly one of `budget` and `schedule`")
  return validate(default_schedule(budget, steps) if schedule is None
                  else schedule, steps)


def save(path, schedule, **metadata):
  """schedule.json written atomically: {"schedule": [...], ...metadata}."""
  path = pathlib.Path(path)
  doc = {"schedule": [float(b) for b in schedule],
         "mean_budget": float(np.mean(schedule)), **metadata}
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    json.dump(doc, f, indent=2)
  os.replace(tmp, path)


def load(path) -> np.ndarray:
  try:
    doc = json.loads(pathlib.Path(path).read_text())
    return np.asarray(doc["schedule"], np.float64)
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a schedule file ({e}); expected JSON "
                     '{"schedule": [budget per step, ...]}') from e

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


def for_mean_budget(mean_budget: float,
                    steps: int) -> tuple[np.ndarray, str | None]:
  """(`default_schedule`, None), or, where the mean budget cannot pay for
  a single computed token after the warm-up step (every later step would
  get 0 or less), every step dense and a warning that says so."""
  if steps == 1:
    note = (None if mean_budget == 1.0 else "with one step there is only "
            "the first, full step (nothing is cached before it): every step "
            "runs the full model")
    return np.ones(1), note
  tenths = int(round(mean_budget * steps * 10))
  budgets = default_schedule(mean_budget, steps) if tenths > 10 else None
  if budgets is None or ((budgets == 0).any()
                         and not ((budgets > 0) & (budgets < 1)).any()):
    return np.ones(steps), (
        "the full first (warm-up) step(s) use up the whole budget, so every "
        f"other step would compute nothing; all {steps} steps run the full "
        f"model instead (mean budget 1.0). Raise --budget or use more "
        "--steps")
  return budgets, None


def load(path) -> np.ndarray:
  """The budgets of a schedule file: JSON {"schedule": [...], ...} (what
  `save` and `astraea search` write) or a bare JSON list of budgets."""
  try:
    doc = json.loads(pathlib.Path(path).read_text())
  except UnicodeDecodeError:
    raise ValueError(f"{path}: not a schedule file (not text)") from None
  except OSError as e:
    raise ValueError(f"{path}: {e.strerror or e}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a schedule file (invalid JSON at line "
                     f"{e.lineno}, column {e.colno}); expected "
                     '{"schedule": [budget per step, ...]}') from None
  budgets = doc.get("schedule") if isinstance(doc, dict) else doc
  if (not isinstance(budgets, list) or not budgets
      or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                 for b in budgets)):
    raise ValueError(f"{path}: not a schedule file; expected "
                     '{"schedule": [budget per step, ...]} or a list of '
                     "budgets (numbers in [0, 1])")
  return np.asarray(budgets, np.float64)


def load_for_steps(path, steps: int, *, flag: str = "--schedule"):
  """`load` + `validate`, with the messages naming the flags."""
  try:
    budgets = load(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"{flag} {e}") from None
  if budgets.shape[0] != steps:
    raise ValueError(f"{flag} {path} has {budgets.shape[0]} budgets but "
                     f"--steps is {steps}: give --steps {budgets.shape[0]} "
                     "or a schedule with one budget per step")
  try:
    return validate(budgets, steps)
  except ValueError as e:
    raise ValueError(f"{flag} {path}: {e}") from None


# Searched schedules found by model and budget ---------------------------------
#
# A searched schedule is found, not named: `astraea search --install` writes
# it into MODEL/schedules/ (the converted folder it was searched on), and the
# demo model's ship in astraea_jax/demo_model/schedules/. One file per mean
# budget, `searched_name(budget)`; it records the model it was searched for
# (`model`: an id the caller computes) and its format version, and is refused
# when either differs.

SEARCHED_KIND = "astraea-searched-schedule"
SEARCHED_VERSION = 1
SCHEDULES_DIR = "schedules"
MEAN_TOLERANCE = 0.005


def searched_name(budget: float) -> str:
  """The file name of the searched schedule of a mean budget."""
  return f"budget_{budget:.2f}.json"


def save_searched(path, schedule, *, model: str, target_budget: float,
                  steps: int, **metadata):
  """A searched schedule file (atomic), findable by `find_searched`."""
  budgets = validate(schedule, steps)
  if abs(float(np.mean(budgets)) - target_budget) > MEAN_TOLERANCE:
    raise ValueError(f"the schedule's mean budget {np.mean(budgets):.4f} is "
                     f"not the target {target_budget:g}")
  save(path, budgets, kind=SEARCHED_KIND, version=SEARCHED_VERSION,
       model=model, target_budget=float(target_budget), steps=int(steps),
       **metadata)


def find_searched(folder, budget: float, steps: int, *, model: str):
  """(budgets, note) of the searched schedule for `budget` in `folder`.

  budgets is None where there is none to use (no file; or one of another
  length than `steps`), and the note says why; a file of another format
  version or another model, or a broken one, is a ValueError naming it.
  """
  path = pathlib.Path(folder) / searched_name(budget)
  if not path.is_file():
    return None, (f"no searched schedule for mean budget {budget:g} in "
                  f"{path.parent}")
  try:
    doc = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"searched schedule {path} is not readable JSON "
                     f"({e}); remove it or search again") from None
  if not isinstance(doc, dict) or doc.get("kind") != SEARCHED_KIND:
    raise ValueError(f"{path} is not a searched schedule (no \"kind\": "
                     f"\"{SEARCHED_KIND}\"); remove it or search again")
  if doc.get("version") != SEARCHED_VERSION:
    raise ValueError(f"{path} is a searched schedule of format version "
                     f"{doc.get('version')!r}; this version reads "
                     f"{SEARCHED_VERSION}: search again (astraea search "
                     "--install)")
  if doc.get("model") != model:
    raise ValueError(f"{path} was searched for another model "
                     f"({doc.get('model')!r}, this one is {model!r}): "
                     "search again for this model, or remove it")
  budgets = doc.get("schedule")
  if (not isinstance(budgets, list) or not budgets or not all(
      isinstance(b, (int, float)) and not isinstance(b, bool)
      for b in budgets)):
    raise ValueError(f"{path}: \"schedule\" must be a list of budgets")
  if len(budgets) != steps:
    return None, (f"the searched schedule {path} has {len(budgets)} steps, "
                  f"but sampling runs {steps}")
  try:
    budgets = validate(budgets, steps)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  if abs(float(np.mean(budgets)) - budget) > MEAN_TOLERANCE:
    raise ValueError(f"{path}: mean budget {np.mean(budgets):.4f} is not "
                     f"{budget:g}, the budget its name says")
  kept = (": the search measured the default schedule better and kept it"
          if doc.get("chosen") == "default" else "")
  return budgets, f"searched schedule {path}{kept}"

"""Policies by name: "toca:interval=3,ratio=0.3" -> ToCa(interval=3,
ratio=0.3), and the default comparison sweep (docs/baselines.md)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.astraea.policies import (
    PAB,
    Astraea,
    AstraeaAdaptive,
    Dense,
    EasyCache,
    MagCache,
    StepCache,
    ToCa,
)


FAMILIES = {"dense": Dense, "astraea": Astraea, "toca": ToCa, "pab": PAB,
            "step_cache": StepCache, "easycache": EasyCache,
            "magcache": MagCache, "astraea_adaptive": AstraeaAdaptive}
# Settings by their papers' names.
ALIASES = {"self": "self_range", "cross": "cross_range", "K": "max_skip",
           "k": "max_skip"}

# Astraea's ablations by name (the `ablation=` key of an astraea spec).
ABLATIONS = {
    "step_level": {"schedule_kind": "step_level"},
    "uniform": {"schedule_kind": "uniform"},
    "fixed": {"selector": "fixed"},
    "random": {"selector": "random"},
    "no_penalty": {"selection": {"use_penalty": False}},
    "no_lse": {"selection": {"use_lse": False}},
    "no_delta": {"selection": {"use_delta": False}},
}
_SELECTION_FIELDS = {f.name: f for f in dataclasses.fields(
    selection.SelectionConfig)}


def _parse_value(text: str, default: Any):
  text = text.strip()
  if isinstance(default, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{text!r} is not a boolean")
    return text.lower() in ("true", "1")
  if isinstance(default, tuple) or "/" in text:
    return tuple(float(v) for v in text.split("/") if v)
  if isinstance(default, int) and not isinstance(default, bool):
    return int(text)
  if isinstance(default, float) or default is None:
    try:
      return float(text)
    except ValueError:
      return text
  return text


def parse_policy(spec: str):
  """A policy from "family[:key=value,...]".

    dense
    astraea:budget=0.4                    astraea:budget=0.5,ablation=random
    astraea:schedule=search/schedule.json (a searched schedule file)
    astraea:budget=0.5,use_lse=false      (any SelectionConfig field)
    toca:interval=3,ratio=0.3[,importance=lse|random]
    pab:self=2,cross=4[,window=100/800]
    step_cache:threshold=0.1[,indicator=timestep_embedding,reuse=velocity]
    easycache:tau=0.05[,warmup=0.1]
    astraea_adaptive:budget=0.4,tau=0.05  (any astraea setting, + tau)
    magcache:thresh=0.06,K=2[,retention=0.2,ratios=g0/g1/...]
      (without ratios, `astraea eval` calibrates the curve on its first
      sample: MagCache.calibrate)

  Tuples are written with "/" (window=100/800, rescale=a/b/c).
  """
  family, _, rest = spec.strip().partition(":")
  if family not in FAMILIES:
    raise ValueError(f"unknown policy {family!r} in {spec!r}; choose from "
                     f"{sorted(FAMILIES)}")
  cls = FAMILIES[family]
  astraea = issubclass(cls, Astraea)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  aliases = ALIASES
  kwargs, selection_kw = {}, {}
  for item in filter(None, (s.strip() for s in rest.split(","))):
    key, eq, value = item.partition("=")
    key = aliases.get(key.strip(), key.strip())
    if not eq:
      raise ValueError(f"{spec!r}: {item!r} is not key=value")
    if astraea and key == "ablation":
      if value not in ABLATIONS:
        raise ValueError(f"{spec!r}: unknown ablation {value!r}; choose "
                         f"from {sorted(ABLATIONS)}")
      for k, v in ABLATIONS[value].items():
        if k == "selection":
          selection_kw.update(v)
        else:
          kwargs[k] = v
    elif astraea and key == "schedule":
      kwargs["schedule"] = tuple(schedule_lib.load(value))
      kwargs.setdefault("schedule_name", _schedule_name(value))
      kwargs["budget"] = None
    elif "selection" in fields and key in _SELECTION_FIELDS:
      selection_kw[key] = _parse_value(
          value, _SELECTION_FIELDS[key].default)
    elif key in fields and key != "selection":
      kwargs[key] = _parse_value(value, fields[key].default)
    else:
      raise ValueError(f"{spec!r}: {family} has no setting {key!r}; "
                       f"settings: {sorted(set(fields) | set(aliases))}")
  if selection_kw:
    kwargs["selection"] = selection.SelectionConfig(**selection_kw)
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ValueError(f"{spec!r}: {e}") from e


def _schedule_name(path) -> str:
  """"searched" for a file written by `astraea search`, else its stem."""
  try:
    doc = json.loads(pathlib.Path(path).read_text())
  except (OSError, json.JSONDecodeError):
    return pathlib.Path(path).stem
  searched = any(k in doc for k in ("searched_with", "fitness_mse",
                                     "target_budget"))
  return "searched" if searched else pathlib.Path(path).stem


def default_sweep(*, budgets=(0.3, 0.4, 0.5, 0.7), ablation_budget=0.5,
                  schedules=()) -> list:
  """The comparison of docs/baselines.md: each method over a range of
  speeds, the ablations at one mean budget, searched schedules if given."""
  sweep = [Dense()]
  sweep += [Astraea(budget=b) for b in budgets]
  sweep += [Astraea(schedule=tuple(s), schedule_name="searched")
            for s in schedules]
  for name in ABLATIONS:
    sweep.append(parse_policy(
        f"astraea:budget={ablation_budget},ablation={name}"))
  sweep += [StepCache(threshold=t) for t in (0.05, 0.1, 0.2, 0.3, 0.5)]
  sweep += [ToCa(interval=n, ratio=r)
            for n, r in ((2, 0.3), (3, 0.3), (4, 0.2), (5, 0.1))]
  sweep += [PAB(self_range=s, cross_range=c)
            for s, c in ((2, 4), (3, 6), (4, 8))]
  # Beyond PAB's published window, to extend its front to higher speeds.
  sweep.append(PAB(self_range=4, cross_range=8, window=(0.0, 1000.0)))
  return sweep


# The 2025 run-time step caches over their thresholds (docs/baselines.md):
# `astraea eval --policies default frontier`. Around the defaults of the
# authors' Wan code: EasyCache tau 0.05 (0.06 for Wan2.2 T2V), MagCache
# delta 0.12 with K = 2 and retention 0.2 (Wan2.1).
EASYCACHE_TAUS = (0.025, 0.05, 0.1, 0.2)
MAGCACHE_SETTINGS = ((0.06, 2), (0.12, 2), (0.24, 4), (0.5, 6))


def frontier_sweep() -> list:
  """EasyCache and MagCache (uncalibrated: `astraea eval` calibrates)."""
  return ([EasyCache(tau=t) for t in EASYCACHE_TAUS]
          + [MagCache(thresh=d, max_skip=k) for d, k in MAGCACHE_SETTINGS])

"""What the `astraea` subcommands share: the argparse value types (each
checks its range when the command line is read), the option groups that
several commands take, the model check, and the top-level error handler
(one line and an exit code for a user's mistake)."""

from __future__ import annotations

import argparse
import hashlib
import math
import pathlib
import sys
import threading

from astraea_jax import checkpoint
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from converters.common import CheckpointError

# Values ----------------------------------------------------------------------

SEED_MAX = 2**32 - 1


def number(kind, low=None, high=None, *, low_open=False, high_open=False):
  """An argparse `type` for a finite int/float in a range; the message
  says the range (argparse adds the flag's name)."""
  lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
  hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
  if low is not None and high is not None:
    span = f"in {lo}, {hi}"
  elif low is not None:
    span = f"{'>' if low_open else '>='} {low:g}"
  else:
    span = f"{'<' if high_open else '<='} {high:g}"
  noun = "a whole number" if kind is int else "a number"

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"{text!r} is not {noun} ({span})") from None
    if isinstance(value, float) and not math.isfinite(value):
      raise argparse.ArgumentTypeError(f"{text!r} must be finite ({span})")
    bad = ((low is not None and (value < low or low_open and value == low))
           or (high is not None
               and (value > high or high_open and value == high)))
    if bad:
      raise argparse.ArgumentTypeError(f"{text} is out of range: must be "
                                       f"{span}")
    return value

  parse.__name__ = kind.__name__  # argparse names the type in its messages
  return parse


BUDGET = number(float, 0, 1, low_open=True)
SEED = number(int, 0, SEED_MAX)
POSITIVE_INT = number(int, 1)
NONNEGATIVE_INT = number(int, 0)
POSITIVE = number(float, 0, low_open=True)
NONNEGATIVE = number(float, 0)
FRACTION = number(float, 0, 1, high_open=True)
_AT_LEAST_16 = number(int, 16)


def vae_tile(text: str) -> int:
  """--vae-tile: pixels, a multiple of 8 (the Wan VAE's factor), >= 16."""
  value = _AT_LEAST_16(text)
  if value % 8:
    raise argparse.ArgumentTypeError(
        f"{value} is not a multiple of 8 (the VAE's spatial factor); e.g. "
        "256")
  return value


vae_tile.__name__ = "int"


class UsageError(ValueError):
  """A combination of options that cannot work (names the flags)."""


def sources(*pairs):
  """(flag, path) pairs of what a command reads (None: not given)."""
  return [(flag, path) for flag, path in pairs if path is not None]


# Options several commands take ------------------------------------------------


def add_video_size_options(p, *, height=480, width=832, frames=81,
                           prefix="--", help_frames=None):
  """--height, --width and --frames (with `prefix`, e.g. "--proxy-")."""
  p.add_argument(f"{prefix}height", type=POSITIVE_INT, default=height)
  p.add_argument(f"{prefix}width", type=POSITIVE_INT, default=width)
  p.add_argument(f"{prefix}frames", type=POSITIVE_INT, default=frames,
                 help=help_frames)


def add_budget_options(p, help_budget):
  group = p.add_mutually_exclusive_group()
  group.add_argument("--budget", type=BUDGET, default=None, help=help_budget)
  group.add_argument("--schedule", default=None, metavar="FILE",
                     help="schedule.json (astraea search) with one budget "
                          "per step")
  p.add_argument("--default-schedule", action="store_true",
                     help="with --budget: the default schedule (full "
                          "warm-up steps, then even) even where a searched "
                          "schedule of that budget exists")
  return group


def add_token_state_options(p):
  p.add_argument("--cache-dtype", choices=selection.CACHE_DTYPES,
                 default=None,
                 help="Astraea's cached updates: bfloat16 (default), "
                      "float32, or float8 with a per-token scale (the "
                      "compact state of the largest videos)")
  p.add_argument("--delta-sketch", type=int, choices=selection.SKETCH_SIZES,
                 default=None, metavar="R",
                 help="values per token of the Delta sketch: "
                      f"{', '.join(map(str, selection.SKETCH_SIZES))}; 0 "
                      "keeps the full last input (default 64)")


def token_state(args, accelerated: bool):
  """The SelectionConfig of --cache-dtype/--delta-sketch, or None."""
  given = {k: v for k, v in (("cache_dtype", args.cache_dtype),
                             ("delta_sketch", args.delta_sketch))
           if v is not None}
  if not given:
    return None
  if not accelerated:
    flag = "--" + next(iter(given)).replace("_", "-")
    raise UsageError(f"{flag} sets Astraea's token state: give --budget or "
                     "--schedule too")
  return selection.SelectionConfig(**given)


def add_dtype_option(p, help_dtype="compute dtype (default: the "
                     "checkpoint's)"):
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help=help_dtype)


def check_model(path, flag="--model"):
  """Fails (one line) unless `path` is a converted checkpoint: a whole-model
  folder (manifest.json) or a single converted model."""
  if checkpoint.is_model_folder(path):
    checkpoint.read_manifest(path)
    return
  try:
    checkpoint.load_config(path)
  except checkpoint.CheckpointReadError as e:
    raise type(e)(f"{flag}: {e}") from None


def note_empty_prompt(prompt):
  if prompt is not None and not prompt.strip():
    print("note: --prompt is empty: the model samples unconditionally "
          "(the text condition is the empty caption)", file=sys.stderr)


def model_schedule_id(model) -> str:
  """The id searched schedules record for a converted model: a hash of its
  transformer's config.json (the architecture; retrained weights of one
  architecture share it)."""
  path = pathlib.Path(model)
  digest = hashlib.sha256()
  if checkpoint.is_model_folder(path):   # every expert's config (Wan2.2)
    configs = sorted(path.glob(f"transformer*/{checkpoint.CONFIG_FILE}"))
  else:
    configs = [path / checkpoint.CONFIG_FILE]
  for config in configs:
    digest.update(config.read_bytes())
  return "config-sha256:" + digest.hexdigest()[:16]


def searched_schedule(budget, steps, folder, model_id, *, default=False):
  """(budgets or None, what to print): the searched schedule of `budget`
  in `folder` when one fits (`schedule.find_searched`; a file of another
  model or version is a ValueError), else None and why the default."""
  if default:
    return None, ("schedule: the default (full warm-up steps, then even), "
                  "as --default-schedule asks")
  budgets, note = schedule_lib.find_searched(folder, budget, steps,
                                             model=model_id)
  if budgets is None:
    return None, (f"schedule: the default (full warm-up steps, then even): "
                  f"{note}")
  return budgets, (f"schedule: the {note} (--default-schedule uses the "
                   "default one)")


def budget_schedule(args, steps, searched=None):
  """The per-step budgets of --budget / --schedule (None: dense), with a
  warning where the request is degenerate. searched: (folder, model id)
  where a searched schedule of --budget may be (`searched_schedule`)."""
  if args.schedule is not None:
    return tuple(schedule_lib.load_for_steps(args.schedule, steps,
                                             flag="--schedule"))
  if args.budget is None:
    return None
  if searched is not None:
    try:
      found, note = searched_schedule(
          args.budget, steps, *searched,
          default=getattr(args, "default_schedule", False))
    except ValueError as e:
      raise UsageError(f"--budget {args.budget:g}: {e} (or pass "
                       "--default-schedule)") from None
    print(note)
    if found is not None:
      return tuple(float(b) for b in found)
  budgets, warning = schedule_lib.for_mean_budget(args.budget, steps)
  if warning:
    print(f"warning: --budget {args.budget:g} with --steps {steps}: "
          f"{warning}", file=sys.stderr)
  return tuple(float(b) for b in budgets)


# Errors -----------------------------------------------------------------------


def _is_teardown_noise(error) -> bool:
  """tensorstore's I/O threads report into asyncio loops that orbax has
  closed after a failed restore; the error itself was already raised."""
  return (isinstance(error, RuntimeError)
          and "Event loop is closed" in str(error))


def silence_teardown_noise():
  thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

  def on_thread_error(args):
    if not _is_teardown_noise(args.exc_value):
      thread_hook(args)

  def on_unraisable(args):
    if not _is_teardown_noise(args.exc_value):
      unraisable_hook(args)

  threading.excepthook = on_thread_error
  sys.unraisablehook = on_unraisable


def error_message(error: BaseException) -> tuple[str, int]:
  """(one line for the user, exit code) for an error a command raised."""
  text = str(error).strip() or type(error).__name__
  if isinstance(error, KeyboardInterrupt):
    return ("interrupted; outputs are written whole or not at all, so "
            "nothing half-written was left", 130)
  if isinstance(error, (ValueError, CheckpointError)):
    return text, 1
  if isinstance(error, OSError):
    name = getattr(error, "filename", None)
    reason = error.strerror or text
    return (f"{name}: {reason}" if name else reason), 1
  if isinstance(error, ImportError):
    return f"a package is missing: {text}", 1
  if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
    return ("the device ran out of memory: use a smaller --size/--frames, "
            "--dtype bfloat16, or more --devices (details with --debug)"), 1
  return (f"internal error ({type(error).__name__}: {text.splitlines()[0]}); "
          "this is a bug in astraea-jax: rerun with --debug for the "
          "traceback and report it"), 1

"""Know before you run out: a sampling run's device peak, before it runs.

The host loop compiles its step programs ahead of time (`sampler.run`)
and, before it allocates the carry (Astraea's token caches), asks
`check_fits` of the largest:

    peak = the step program's bytes (XLA's memory analysis: arguments +
           outputs - donated aliases + temporaries)
         + every other array alive on the device (not an argument of the
           step: e.g. a VAE waiting to decode)
         + the arguments the program does not read (jit drops them from
           its arguments, but they are on the device: the idle Wan2.2
           expert of a run with both placed, `sampler.run_by_expert`).

A run that would not fit stops with `DoesNotFitError` (a ValueError: the
commands print its one line) naming what would fit, instead of a raw
RESOURCE_EXHAUSTED in the middle of sampling. The device's limit is its
allocator's (`memory_stats()["bytes_limit"]`), or $ASTRAEA_DEVICE_MEMORY
(e.g. "20GiB") where set: a cap for shared GPUs, and how the tests
simulate a small device. CPU backends report no limit: no check there.
"""

from __future__ import annotations

import contextlib
import math
import os
import re

import jax
import jax.numpy as jnp

ENV_LIMIT = "ASTRAEA_DEVICE_MEMORY"
GIB = 2**30
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


class DoesNotFitError(ValueError):
  """The run's estimated peak exceeds the device's memory."""


def parse_bytes(text: str) -> int:
  """"20GiB", "512 MiB", "8e9" -> bytes."""
  m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
  if not m or m.group(2).lower() not in _UNITS:
    raise ValueError(f"{ENV_LIMIT}={text!r}: expected a size such as "
                     "20GiB, 512MiB or 8e9 (bytes)")
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def device_limit(device=None) -> int | None:
  """Bytes the run may use on `device` (default: the first); None where
  the backend does not say (CPU) and no cap is set."""
  if os.environ.get(ENV_LIMIT):
    return parse_bytes(os.environ[ENV_LIMIT])
  device = device or jax.devices()[0]
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit")


def program_bytes(compiled) -> int:
  """Device bytes a compiled program holds while it runs."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes + m.temp_size_in_bytes)


def other_live_bytes(args) -> int:
  """Bytes of live device arrays that are not leaves of `args`."""
  own = {id(x) for x in jax.tree.leaves(args) if isinstance(x, jax.Array)}
  return sum(x.nbytes for x in jax.live_arrays() if id(x) not in own)


def unread_argument_bytes(compiled, args) -> int:
  """Bytes of `args`' leaves (arrays or abstract ones) beyond what the
  compiled program takes as arguments: those it dropped as unused."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  leaves = {id(x): x for x in jax.tree.leaves(args) if hasattr(x, "shape")}
  given = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
              for x in leaves.values())
  return max(0, given - int(m.argument_size_in_bytes))


def gib(n: int) -> str:
  return f"{n / GIB:.1f} GiB"


def check_fits(compiled, args, *, hint=None, device=None) -> int:
  """The estimated peak (bytes) of a run whose largest step is `compiled`
  on `args`; raises DoesNotFitError when it exceeds `device_limit`.

  hint(needed, limit) -> text naming what would fit (the sampler's
  options), appended to the message.
  """
  step = program_bytes(compiled)
  need = step + other_live_bytes(args) + unread_argument_bytes(compiled,
                                                               args)
  limit = device_limit(device)
  if limit is not None and need > limit:
    extra = hint(need, limit) if hint is not None else ""
    raise DoesNotFitError(
        f"this run needs about {gib(need)} of device memory (the compiled "
        f"step {gib(step)}, other arrays {gib(need - step)}) but the "
        f"device has {gib(limit)}; nothing was sampled. "
        + (extra or "Use a smaller video (--size/--frames) or more "
           "devices (--devices)"))
  return need


def is_out_of_memory(error: BaseException) -> bool:
  """True for the device allocator's out-of-memory errors (XLA's
  RESOURCE_EXHAUSTED), which have no exception type of their own."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


@contextlib.contextmanager
def stage(name: str, advice: str):
  """An out-of-memory error inside the block becomes one DoesNotFitError
  naming the stage (`name`, e.g. "decoding") and what would fit
  (`advice`), instead of XLA's RESOURCE_EXHAUSTED text; nothing was
  written (the commands write their outputs only after every stage)."""
  try:
    yield
  except DoesNotFitError:
    raise
  except Exception as e:  # XlaRuntimeError / JaxRuntimeError
    if not is_out_of_memory(e):
      raise
    first = str(e).strip().splitlines()[0][:200]
    raise DoesNotFitError(
        f"{name} ran out of device memory ({first}); nothing was written. "
        f"To fit: {advice}") from e

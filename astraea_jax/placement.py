"""Where a model's parameters live between and during the stages that use
them (issue #26: a pipeline that fits the GPUs users own).

A pipeline runs three models one after another: the text encoder (umT5-XXL,
about 11 GB in bfloat16), the DiT and the VAE. Kept on the accelerator all
the time, their parameters add up although only one computes at a time.
Each component has a placement:

  "accelerator"  on the accelerator all the time (fastest for many videos
                 from one pipeline: nothing is copied per call);
  "offload"      in host memory (NumPy arrays), copied to the accelerator
                 when its stage starts and released when it ends (`placed`);
                 one video pays each copy once, as loading it did;
  "cpu"          on the host's CPU device, and computed there (the text
                 encoder only, as Wan's `t5_cpu`: slow, but no accelerator
                 memory at all); its outputs are moved to the accelerator.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from flax import nnx

PLACEMENTS = ("accelerator", "offload", "cpu")


def check(placement: str, *, what: str = "placement") -> str:
  if placement not in PLACEMENTS:
    raise ValueError(f"{what}={placement!r} must be one of {PLACEMENTS}")
  return placement


def accelerator():
  """The device stages run on: the default backend's first device."""
  return jax.devices()[0]


def cpu():
  return jax.devices("cpu")[0]


def park(module, placement: str):
  """Moves `module`'s state to where `placement` keeps it between stages
  (in place; returns the module)."""
  state = nnx.state(module)
  if placement == "offload":
    nnx.update(module, jax.tree.map(np.asarray, state))
  else:
    target = cpu() if placement == "cpu" else accelerator()
    nnx.update(module, jax.device_put(state, target))
  return module


def is_on_host(module) -> bool:
  """True when the module's arrays are NumPy arrays (offloaded)."""
  leaves = jax.tree.leaves(nnx.state(module))
  return bool(leaves) and all(isinstance(x, np.ndarray) for x in leaves)


@contextlib.contextmanager
def placed(module):
  """Within the block, an offloaded `module` has its state on the
  accelerator; after it, the state is NumPy again and the accelerator's
  copy is freed at once (not whenever Python collects it). A module that
  is not offloaded (on a device, inside a trace, or None) is left as it is,
  so stages nest: the outermost `placed` copies, the inner ones do
  nothing."""
  if module is None or not is_on_host(module):
    yield module
    return
  # A copy of the containers: nnx.state's Variables are the module's own,
  # which `update` overwrites.
  host = jax.tree.map(lambda x: x, nnx.state(module))
  with state_placed(host) as device:
    nnx.update(module, device)
    try:
      yield module
    finally:
      nnx.update(module, host)


@contextlib.contextmanager
def state_placed(state):
  """`placed` for a state pytree (one Wan2.2 expert's params, not a
  module): NumPy leaves are copied to the accelerator for the block and
  that copy is freed at its end; a state with any device array is yielded
  as it is (it is not ours to free)."""
  leaves = jax.tree.leaves(state)
  if not leaves or not all(isinstance(x, np.ndarray) for x in leaves):
    yield state
    return
  device = jax.device_put(state, accelerator())
  try:
    yield device
  finally:
    for x in jax.tree.leaves(device):
      x.delete()  # JAX frees it once running programs no longer read it


def to_accelerator(tree):
  """Arrays computed on the CPU device (a "cpu" text encoder's outputs)
  moved to the accelerator; others unchanged."""
  target = accelerator()
  if target.platform == "cpu":
    return tree
  on_cpu = lambda x: isinstance(x, jax.Array) and all(
      d.platform == "cpu" for d in x.devices())
  return jax.tree.map(
      lambda x: jax.device_put(x, target) if on_cpu(x) else x, tree)

"""Device meshes for multi-GPU sampling, and the `shard_map` compat shim.

A mesh has two axes:
  "data"  data parallelism: the CFG branches / prompts of the batch are
          split over it; no communication inside the model;
  "seq"   sequence parallelism: the tokens of one video are split over it
          (Ulysses all-to-all and/or ring attention, see attention.py).
Devices are laid out data-major, so consecutive devices (one host's GPUs
first) share a `seq` group, where the all-to-all traffic is.

Multi-host: the same code runs on JAX's multi-process runtime. Launch one
process per host (all GPUs of the host visible to it), with the same
command on every host:

  # host 0 of 2 (10.0.0.1), and the same with ASTRAEA_PROCESS_ID=1 on host 1
  ASTRAEA_COORDINATOR=10.0.0.1:12355 ASTRAEA_NUM_PROCESSES=2 \
  ASTRAEA_PROCESS_ID=0 python examples/multi_gpu.py --distributed \
      --devices 16 --seq 8 --data 2

`initialize_distributed()` (called by --distributed) reads these three
variables and calls `jax.distributed.initialize`; without them it calls it
with no arguments, which detects SLURM, Open MPI and Cloud TPU clusters.
It must run before anything else touches JAX. Afterwards `jax.devices()`
lists the devices of all hosts, `make_mesh(16, seq=8, data=2)` spans them
(seq within a host on NVLink, data across hosts), and every process runs
the same program on global arrays. Inputs must be equal on all processes
(same seed, same embeddings); outputs come back replicated.
"""

from __future__ import annotations

import inspect
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, SEQ = "data", "seq"


def make_mesh(num_devices: int | None = None, *, seq: int | None = None,
              data: int | None = None, devices=None) -> Mesh:
  """A ("data", "seq") mesh over the first `num_devices` devices.

  Give any of num_devices, seq, data; the missing ones follow from
  num_devices = seq * data (default: all devices on `seq`, data = 1).
  devices: the device list to take them from (default `jax.devices()`,
  which spans all hosts after `initialize_distributed`).
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is None:
    num_devices = seq * data if (seq and data) else len(devices)
  if seq is None and data is None:
    seq, data = num_devices, 1
  elif seq is None:
    seq = num_devices // data if num_devices % data == 0 else 0
  elif data is None:
    data = num_devices // seq if num_devices % seq == 0 else 0
  if min(num_devices, seq, data) < 1 or seq * data != num_devices:
    raise ValueError(
        f"a mesh needs num_devices = seq * data >= 1; got {num_devices=} "
        f"{seq=} {data=}")
  if num_devices > len(devices):
    raise ValueError(
        f"{num_devices=} devices asked for, but only {len(devices)} exist "
        f"({devices[0].platform}); on CPU set XLA_FLAGS="
        "--xla_force_host_platform_device_count=N before JAX starts")
  grid = np.array(devices[:num_devices], dtype=object).reshape(data, seq)
  return Mesh(grid, (DATA, SEQ))


def default_mesh_shape(num_devices: int, batch: int) -> tuple[int, int]:
  """(data, seq) for a CFG batch of `batch`: data-parallel first.

  Splitting the batch costs no communication, so data takes the largest
  common divisor of num_devices and batch; the rest goes to seq.
  """
  data = math.gcd(num_devices, batch)
  return data, num_devices // data


def shard_map(f, *, mesh, in_specs, out_specs):
  """`jax.shard_map` (new jax) or `jax.experimental.shard_map` (old).

  Replication checks are off: the collectives here (all_to_all, ppermute)
  produce device-varying values by design.
  """
  if hasattr(jax, "shard_map"):
    params = inspect.signature(jax.shard_map).parameters
    check = {"check_vma": False} if "check_vma" in params else {
        "check_rep": False}
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs, **check)
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental import shard_map as legacy
  return legacy.shard_map(f, mesh=mesh, in_specs=in_specs,
                          out_specs=out_specs, check_rep=False)


def put(x, mesh: Mesh, spec: P | None = None):
  """x (host or device array) as a global array on `mesh` with `spec`
  (default: replicated).

  Works on the multi-process runtime: every process passes the same value
  and keeps the shards of its own devices.
  """
  sharding = NamedSharding(mesh, P() if spec is None else spec)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.jit(lambda a: a, out_shardings=sharding)(x)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding,
                                      lambda index: x[index])


def replicate(tree, mesh: Mesh):
  """Every array leaf of `tree` replicated over the mesh (e.g. params)."""
  return jax.tree.map(lambda a: put(a, mesh), tree)


def initialize_distributed(coordinator: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None):
  """`jax.distributed.initialize` from arguments or ASTRAEA_* variables.

  ASTRAEA_COORDINATOR (host:port of process 0), ASTRAEA_NUM_PROCESSES,
  ASTRAEA_PROCESS_ID; all None -> JAX's cluster auto-detection. On CPU
  (tests) the cross-process collectives use gloo.
  """
  env = os.environ
  coordinator = coordinator or env.get("ASTRAEA_COORDINATOR")
  if num_processes is None and "ASTRAEA_NUM_PROCESSES" in env:
    num_processes = int(env["ASTRAEA_NUM_PROCESSES"])
  if process_id is None and "ASTRAEA_PROCESS_ID" in env:
    process_id = int(env["ASTRAEA_PROCESS_ID"])
  given = [coordinator, num_processes, process_id]
  if any(v is not None for v in given) and any(v is None for v in given):
    raise ValueError(
        "give all or none of coordinator, num_processes, process_id; got "
        f"{coordinator=} {num_processes=} {process_id=}")
  if "jax_cpu_collectives_implementation" in jax.config.values:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator,
                             num_processes=num_processes,
                             process_id=process_id)

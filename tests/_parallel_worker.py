"""One process of the 2-process test (tests/test_parallel.py).

  python tests/_parallel_worker.py PROCESS_ID PORT OUT_DIR

Joins a 2-process JAX runtime with a coordinator on 127.0.0.1:PORT (process
0 hosts it), with 2 fake CPU devices per process: a 4-device mesh spanning
both processes (Ulysses pairs inside a process, the ring across them).
Samples with Astraea over it (a dense step, then a sparse one) and writes
OUT_DIR/process_{ID}.npz.
"""

import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")

from astraea_jax import parallel


def main(process_id, port, out_dir):
  parallel.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
  import _parallel_reference as ref  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
  split_model = ref.random_model()
  mesh = parallel.make_mesh(4)
  schedule = list(ref.MULTIPROCESS_SCHEDULE)
  common = {"steps": len(schedule), "shift": 3.0, "progress": False,
            "mesh": mesh}
  latents = parallel.astraea_sample(*split_model, *ref.inputs(),
                                    schedule=schedule,
                                    selection_config=ref.SELECTION, **common)
  np.savez(pathlib.Path(out_dir) / f"process_{process_id}.npz",
           latents=np.asarray(latents))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

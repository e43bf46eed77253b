"""Where a measurement came from: device, versions, commit and date.

Every results file (benchmarks/results/*.json, `astraea eval` output)
records these next to its numbers (../shared/DESIGN.md, results format).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import subprocess

import jax


def environment() -> dict:
  """Device kind, jax/flax versions, git commit (or $ASTRAEA_COMMIT on a
  copy without .git) and today's date."""
  import flax  # pylint: disable=import-outside-toplevel
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=True,
                            cwd=pathlib.Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = os.environ.get("ASTRAEA_COMMIT", "unknown")
  return {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "flax": flax.__version__, "commit": commit,
          "date": datetime.date.today().isoformat()}

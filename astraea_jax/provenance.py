"""Where a measurement came from: device, versions, commit and date.

Every results file (benchmarks/results/*.json, `astraea eval` output)
records these next to its numbers (../shared/DESIGN.md, results format).
The source is identified by the commit plus, when the work tree differs
from it, a hash of the difference ("diff_sha256": SHA-256 of `git diff
HEAD --binary` followed by every untracked, non-ignored file's path and
bytes), never by free text: the same hash means the same source.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pathlib
import subprocess

import jax

REPO = pathlib.Path(__file__).resolve().parent.parent


def _git(*args) -> bytes:
  return subprocess.run(["git", *args], capture_output=True, check=True,
                        cwd=REPO).stdout


def source() -> dict:
  """{"commit": short hash, "dirty": bool, "diff_sha256": hex or None}.

  Without git (a copy without .git): commit from $ASTRAEA_COMMIT or
  "unknown", dirty and diff_sha256 None (not known).
  """
  try:
    commit = _git("rev-parse", "--short", "HEAD").decode().strip()
    diff = _git("diff", "HEAD", "--binary")
    untracked = _git("ls-files", "--others", "--exclude-standard",
                     "-z").split(b"\0")
  except (OSError, subprocess.CalledProcessError):
    return {"commit": os.environ.get("ASTRAEA_COMMIT", "unknown"),
            "dirty": None, "diff_sha256": None}
  untracked = sorted(p for p in untracked if p)
  if not diff and not untracked:
    return {"commit": commit, "dirty": False, "diff_sha256": None}
  h = hashlib.sha256(diff)
  for name in untracked:
    h.update(b"\0" + name + b"\0")
    try:
      h.update((REPO / name.decode()).read_bytes())
    except OSError:
      h.update(b"<unreadable>")
  return {"commit": commit, "dirty": True, "diff_sha256": h.hexdigest()}


def environment() -> dict:
  """Device kind, jax/flax versions, source (`source()`) and today's date."""
  import flax  # pylint: disable=import-outside-toplevel
  return {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "flax": flax.__version__, **source(),
          "date": datetime.date.today().isoformat()}

"""A stored reference output of the shipped demo weights.

  python -m astraea_jax.demo_model.reference --write   # after exporting
  python -m astraea_jax.demo_model.reference           # check (exit 1 if off)

The reference is a 4-step full-model generation of the default prompt from
seed 0 (float32 compute on the CPU), average-pooled 4 x 4 over space to
(3, 16, 12, 12) values (27 KB), stored in weights/reference.npz with the
SHA-256 of the weights and config.json it was made with. tests/test_demo_model.py
regenerates it and compares, so a silent change to the model code, the
sampler or the weight loading shows up as a failure.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import uuid

import jax
import numpy as np

from astraea_jax.demo_model import model as model_lib

REFERENCE_FILE = "reference.npz"
STEPS = 4
SEED = 0
POOL = 4
# Max |difference| allowed against the stored pooled values (videos in
# [-1, 1]). Same code, float32 on a CPU: differences come only from the
# order of float32 accumulations (XLA version, CPU vector width); measured
# ~1e-6 between runs here, amplified at most a few-fold by 4 UniPC steps with
# guidance. 1e-3 leaves room for that and still catches any real change
# (a changed layer, key or schedule moves values by >= 1e-2).
TOLERANCE = 1e-3


def reference_path(folder=None) -> pathlib.Path:
  return pathlib.Path(folder or model_lib.WEIGHTS_DIR) / REFERENCE_FILE


def compute(folder=None) -> np.ndarray:
  """The pooled (3, F, H / 4, W / 4) float32 reference of a weights folder."""
  with jax.default_device(jax.devices("cpu")[0]):
    model = model_lib.load(folder, dtype="float32")
    video = np.asarray(model_lib.sample(
        model, [model_lib.DEFAULT_PROMPT], seed=SEED, steps=STEPS,
        progress=False))[0]
  c, f, h, w = video.shape
  return video.reshape(c, f, h // POOL, POOL, w // POOL, POOL).mean(
      axis=(3, 5)).astype(np.float32)


def write(folder=None) -> pathlib.Path:
  path = reference_path(folder)
  values = compute(folder)
  tmp = path.parent / f".{path.stem}.partial-{uuid.uuid4().hex[:8]}.npz"
  try:
    np.savez(tmp, pooled_video=values,
             weights_sha256=np.array(model_lib.weights_sha256(folder)),
             prompt=np.array(model_lib.DEFAULT_PROMPT),
             steps=np.array(STEPS), seed=np.array(SEED))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


def load(folder=None) -> dict:
  """The stored reference, or FileNotFoundError."""
  path = reference_path(folder)
  if not path.is_file():
    raise FileNotFoundError(
        f"no stored reference {path}; write it with `python -m "
        "astraea_jax.demo_model.reference --write` after exporting weights")
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def check(folder=None) -> float:
  """Max |difference| of a fresh computation from the stored reference;
  ValueError if the reference belongs to other weights."""
  stored = load(folder)
  sha = model_lib.weights_sha256(folder)
  if str(stored["weights_sha256"]) != sha:
    raise ValueError(
        f"{reference_path(folder)} was written for weights with SHA-256 "
        f"{stored['weights_sha256']}, but {model_lib.WEIGHTS_FILE} + "
        f"{model_lib.CONFIG_FILE} now hash to {sha}: rewrite it with "
        "`python -m astraea_jax.demo_model.reference --write`")
  return float(np.max(np.abs(compute(folder) - stored["pooled_video"])))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--write", action="store_true",
                      help="(re)write the reference of the weights")
  parser.add_argument("--weights", default=None,
                      help="weights folder (default: the packaged one)")
  args = parser.parse_args(argv)
  if args.write:
    print(f"wrote {write(args.weights)}")
    return 0
  diff = check(args.weights)
  ok = diff <= TOLERANCE
  print(f"max |difference| {diff:.3g} ({'within' if ok else 'ABOVE'} "
        f"{TOLERANCE})")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

"""Builds tests/fixtures/opensora_vae_temporal/ from the original OpenSora code.

The parity fixture of OpenSora v1.2's temporal VAE (`VAE_Temporal`, the
MAGVIT-style causal 3-D VAE that runs on the image VAE's latents), made the
way ../shared/fixtures were made: a tiny random-weight model of the UPSTREAM
class, run once in float32 on the CPU, its state dict stored under the
original key names and its inputs/outputs beside it.

The upstream file is read straight out of a git checkout of
hpcaitech/Open-Sora at a fixed commit (`git show COMMIT:path`), written into
a temporary package tree and imported from there; nothing of it is copied
into this repository. `vae_temporal.py` imports three things that are not
model code, and only those are stubbed, here:

  * `opensora.registry.MODELS`  - a decorator registry (mmengine); the stub's
    `register_module()` returns the class unchanged;
  * `opensora.utils.ckpt_utils.load_checkpoint` - only called with
    `from_pretrained`, which the fixture never passes; the stub raises;
  * `.utils.DiagonalGaussianDistribution` - NOT stubbed: the real
    `opensora/models/vae/utils.py` of the same commit is loaded.

The packages `opensora`, `opensora.models` and `opensora.models.vae` are
empty module objects, so their `__init__` files (which import every model
and mmengine, colossalai, ...) do not run.

Usage (torch CPU and einops; the test extra has torch, einops is only needed
here):

  python tools/build_opensora_vae_temporal_fixture.py \\
      --opensora-git /path/to/Open-Sora[/.git] \\
      [--commit 3552145f847b5171cd2c85982d116b04eb98c5bf] \\
      [--out tests/fixtures/opensora_vae_temporal]

Files written (the layout of ../shared/fixtures/README.md):
  weights.safetensors  the `VAE_Temporal` state dict, original key names;
  io.safetensors       inputs and outputs, keyed `<case>.<name>`;
  meta.json            config, seed, upstream repo/commit/blob ids, the
                       exact call of each case, shapes and statistics.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import types

import numpy as np

REPO = "hpcaitech/Open-Sora"
COMMIT = "3552145f847b5171cd2c85982d116b04eb98c5bf"  # v1.2 line, as stdit3
FILES = ("opensora/models/vae/vae_temporal.py",
         "opensora/models/vae/utils.py")
SEED = 20240624
# VAE_Temporal_SD's architecture (in_out 4, latent 4, embed 4, channel
# multipliers (1, 2, 2, 4), temporal_downsample (False, True, True)) at a
# tiny width: 2 filters (stages of 2, 4, 4 and 8 channels; ~40k parameters),
# GroupNorm of 2 groups, 2 res blocks per stage (so both a channel-changing
# block with its 1x1x1 `conv3` shortcut and a same-width block appear in
# every direction).
CONFIG = dict(in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=2,
              num_res_blocks=2, channel_multipliers=(1, 2, 2, 4),
              temporal_downsample=(False, True, True), num_groups=2,
              activation_fn="swish")
# (name, encoder input (B, C, T, H, W), latents (B, C, t, H, W), num_frames)
# a: 9 frames, padded at the front to 12 -> 3 latent frames, and back;
# b: 8 frames, no padding; decode with num_frames 6 (2 frames dropped);
# c: v1.2's micro-frame chunk, 17 frames -> 20 -> 5 latent frames.
CASES = (("a", (2, 4, 9, 3, 5), (2, 4, 3, 3, 5), 9),
         ("b", (1, 4, 8, 4, 4), (1, 4, 2, 4, 4), 6),
         ("c", (1, 4, 17, 2, 2), (1, 4, 5, 2, 2), 17))


def git_show(git_dir: pathlib.Path, commit: str, path: str) -> bytes:
  return subprocess.run(["git", f"--git-dir={git_dir}", "show",
                         f"{commit}:{path}"], check=True,
                        capture_output=True).stdout


def git_blob(git_dir: pathlib.Path, commit: str, path: str) -> str:
  return subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse",
                         f"{commit}:{path}"], check=True, capture_output=True,
                        text=True).stdout.strip()


def resolve_git_dir(path: pathlib.Path) -> pathlib.Path:
  out = subprocess.run(["git", "-C", str(path), "rev-parse",
                        "--absolute-git-dir"], check=True,
                       capture_output=True, text=True).stdout.strip()
  return pathlib.Path(out)


def import_upstream(git_dir: pathlib.Path, commit: str, tmp: pathlib.Path):
  """The module `opensora.models.vae.vae_temporal` of `commit`."""
  for path in FILES:
    target = tmp / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(git_show(git_dir, commit, path))

  def package(name, path):
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module
    return module

  package("opensora", tmp / "opensora")
  package("opensora.models", tmp / "opensora/models")
  package("opensora.models.vae", tmp / "opensora/models/vae")
  package("opensora.utils", tmp / "opensora/utils")

  class Registry:  # stub of mmengine's Registry: decorators only
    def register_module(self, name=None, **_):
      return lambda obj: obj

  registry = types.ModuleType("opensora.registry")
  registry.MODELS = Registry()
  sys.modules["opensora.registry"] = registry

  def load_checkpoint(*_, **__):
    raise RuntimeError("the fixture builds random weights; no checkpoint")

  ckpt_utils = types.ModuleType("opensora.utils.ckpt_utils")
  ckpt_utils.load_checkpoint = load_checkpoint
  sys.modules["opensora.utils.ckpt_utils"] = ckpt_utils

  name = "opensora.models.vae.vae_temporal"
  spec = importlib.util.spec_from_file_location(
      name, tmp / "opensora/models/vae/vae_temporal.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def randomise_(model, torch, seed):
  """Every parameter random, also those PyTorch initialises to constants
  (GroupNorm gains 1, biases 0): weights N(0, 1/fan_in), biases
  N(0, 0.1^2), GroupNorm gains 1 + N(0, 0.2^2). Returns {key: rule}."""
  gen = torch.Generator().manual_seed(seed)
  rules = {}
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
      if "norm" in name and name.endswith("weight"):
        value, rules[name] = 1 + 0.2 * noise, "1 + N(0, 0.2^2)"
      elif name.endswith("bias"):
        value, rules[name] = 0.1 * noise, "N(0, 0.1^2)"
      else:
        fan_in = int(np.prod(p.shape[1:]))
        value, rules[name] = noise / np.sqrt(fan_in), "N(0, 1/fan_in)"
      p.copy_(value.to(p.dtype))
  return rules


def stats(array: np.ndarray) -> dict:
  a = np.asarray(array)
  out = {"shape": list(a.shape), "dtype": str(a.dtype)}
  if a.dtype.kind == "f":
    out.update(mean=float(a.mean()), std=float(a.std()),
               absmax=float(np.abs(a).max()))
  return out


def version(name):
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--opensora-git", type=pathlib.Path, required=True,
                      help="a clone (or bare/mirror git dir) of "
                      f"{REPO} that has commit {COMMIT[:12]}")
  parser.add_argument("--commit", default=COMMIT)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(
      __file__).resolve().parent.parent / "tests/fixtures/"
                      "opensora_vae_temporal")
  args = parser.parse_args()

  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  torch.manual_seed(SEED)
  torch.set_num_threads(1)  # one summation order, reproducible
  git_dir = resolve_git_dir(args.opensora_git)
  commit = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse",
                           args.commit], check=True, capture_output=True,
                          text=True).stdout.strip()
  with tempfile.TemporaryDirectory() as tmp:
    upstream = import_upstream(git_dir, commit, pathlib.Path(tmp))
    model = upstream.VAE_Temporal(**CONFIG).eval()
  rules = randomise_(model, torch, SEED)
  weights = {k: v.detach().numpy().copy() for k, v in
             model.state_dict().items()}
  assert set(weights) == set(rules), "buffers in VAE_Temporal's state dict"

  rng = np.random.default_rng(SEED)
  io, cases = {}, {}
  with torch.no_grad():
    for name, x_shape, z_shape, num_frames in CASES:
      x = rng.uniform(-1, 1, x_shape).astype(np.float32)
      z = rng.standard_normal(z_shape).astype(np.float32)
      posterior = model.encode(torch.from_numpy(x))
      decoded = model.decode(torch.from_numpy(z), num_frames=num_frames)
      io[f"{name}.x"] = x
      io[f"{name}.mean"] = posterior.mean.numpy()
      io[f"{name}.logvar"] = posterior.logvar.numpy()
      io[f"{name}.z"] = z
      io[f"{name}.decoded"] = decoded.numpy()
      latent_t = model.get_latent_size([x_shape[2], None, None])[0]
      assert io[f"{name}.mean"].shape[2] == latent_t, (name, latent_t)
      assert decoded.shape[2] == num_frames, (name, decoded.shape)
      cases[name] = {
          "calls": [
              "posterior = model.encode(x); mean = posterior.mean; "
              "logvar = posterior.logvar  (clamped to [-30, 20])",
              f"decoded = model.decode(z, num_frames={num_frames})"],
          "x_shape": list(x_shape), "z_shape": list(z_shape),
          "num_frames": num_frames,
          "inputs": "x ~ U(-1, 1), z ~ N(0, 1), numpy "
                    f"default_rng({SEED}) in case order (x then z)"}
  io = {k: np.ascontiguousarray(v) for k, v in io.items()}

  args.out.mkdir(parents=True, exist_ok=True)
  save_file(weights, str(args.out / "weights.safetensors"))
  save_file(io, str(args.out / "io.safetensors"))
  meta = {
      "fixture": "opensora_vae_temporal",
      "model": "Open-Sora v1.2 temporal VAE (opensora/models/vae/"
               "vae_temporal.py: VAE_Temporal)",
      "reference": {
          "repo": REPO, "commit": commit,
          "files": {p: git_blob(git_dir, commit, p) for p in FILES},
          "stubs": ["opensora.registry.MODELS (register_module returns "
                    "the class)", "opensora.utils.ckpt_utils."
                    "load_checkpoint (never called)"]},
      "generator": "tools/build_opensora_vae_temporal_fixture.py",
      "seed": SEED,
      "config": {k: list(v) if isinstance(v, tuple) else v
                 for k, v in CONFIG.items()},
      "dtype": "float32", "device": "cpu", "torch_threads": 1,
      "init": {"rules": sorted(set(rules.values())),
               "note": "every parameter random, GroupNorm affines "
                       "included; torch.Generator().manual_seed(seed), "
                       "parameters in named_parameters() order"},
      "cases": cases,
      "io": {k: stats(v) for k, v in io.items()},
      "weights": {k: list(v.shape) for k, v in weights.items()},
      "env": {"python": platform.python_version(),
              "torch": torch.__version__, "numpy": np.__version__,
              "einops": version("einops"),
              "safetensors": version("safetensors")},
      "date": datetime.date.today().isoformat(),
  }
  (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
  files = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
  print(json.dumps(files))


if __name__ == "__main__":
  main()

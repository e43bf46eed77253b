"""The demo model: config, weights on disk, text encoding and generation.

  from astraea_jax.demo_model import model as demo
  m = demo.load()                                  # the packaged weights
  videos = demo.generate(m, ["a red circle moving right on a striped "
                             "background"], seed=0)   # (1, 16, 48, 48, 3)
  videos = demo.generate(m, prompts, budget=0.5)   # with Astraea

Pixel space: a video is (B, 3, F, H, W) in [-1, 1], the WanDiT's "latents"
(no VAE: at 48 x 48 a (2, 4, 4) patch gives 1152 tokens of 96 values, cheap
to train and free of a VAE's reconstruction error). The DiT is the project's
`WanDiT` with the `WanConfig.demo()` preset; the text encoder is
`text.TextEncoder`. Sampling is Wan's flow-matching UniPC with
classifier-free guidance; the unconditional context is the empty caption,
which the encoder maps to zeros.

Weights: a folder with `demo.safetensors` (the EMA parameters of both
networks, keys "dit.<path>" and "text.<path>") and `config.json`; the
package ships one in `weights/` (see MODEL_CARD.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax import outputs
from astraea_jax.astraea import wan_tokenwise as astraea_sampler
from astraea_jax.configs import WanConfig
from astraea_jax.demo_model import data
from astraea_jax.demo_model import text as text_lib
from astraea_jax.models.wan import WanDiT
from astraea_jax.sampling import sampler as dense_sampler
from converters import common
from converters.safetensors_io import (
  SafetensorsError,
  SafetensorsFile,
  save_file,
)

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
# The searched budget schedules of the packaged weights (`astraea demo`
# uses the one of its --budget; benchmarks/search_dp_demo.py made them).
SCHEDULES_DIR = pathlib.Path(__file__).resolve().parent / "schedules"
WEIGHTS_FILE = "demo.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
# Weights above this size are exported in bfloat16 (the 25 MB cap
# on what the package ships).
MAX_FLOAT32_BYTES = 25 * 10 ** 6
DEFAULT_PROMPT = "a red circle moving right on a striped background"
RETRAIN_HINT = (
    "train and export it with `astraea train-demo --workdir WORK --minutes M "
    "--export-to astraea_jax/demo_model/weights` (about 8 minutes on one "
    "H200; see astraea_jax/demo_model/MODEL_CARD.md)")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Everything that defines the demo model and its default sampling."""

  wan: WanConfig
  text: text_lib.TextConfig
  frames: int = 16
  height: int = 48
  width: int = 48
  # Flow shift sigma' = shift sigma / (1 + (shift - 1) sigma): the sampler's
  # timestep shift and the training noise-level distribution (train.py).
  shift: float = 3.0
  steps: int = 20
  guidance: float = 5.0

  def __post_init__(self):
    if self.wan.text_dim != self.text.dim:
      raise ValueError(f"DiT text_dim {self.wan.text_dim} != text encoder "
                       f"dim {self.text.dim}")
    if self.wan.text_len != self.text.text_len:
      raise ValueError(f"DiT text_len {self.wan.text_len} != text encoder "
                       f"text_len {self.text.text_len}")
    if self.wan.in_dim != 3 or self.wan.out_dim != 3:
      raise ValueError(f"pixel space needs in_dim = out_dim = 3; got "
                       f"{self.wan.in_dim=} {self.wan.out_dim=}")
    for name, size, p in zip(("frames", "height", "width"),
                             (self.frames, self.height, self.width),
                             self.wan.patch_size):
      if size % p:
        raise ValueError(f"{name}={size} is not divisible by the patch size "
                         f"{p} ({self.wan.patch_size=})")
    data.VideoSpec(self.frames, self.height, self.width)  # validates sizes

  @classmethod
  def default(cls) -> DemoConfig:
    """The shipped model: 16 x 48 x 48 RGB, 1152 tokens, ~4.4M parameters."""
    return cls(wan=WanConfig.demo(dtype="bfloat16"),
               text=text_lib.TextConfig(vocab_size=len(data.VOCAB),
                                        text_len=data.TEXT_LEN))

  @classmethod
  def small(cls) -> DemoConfig:
    """A tiny variant for CPU tests: 4 x 16 x 16 RGB, 32 tokens."""
    return cls(
        wan=WanConfig.demo(dim=32, ffn_dim=64, num_heads=2, num_layers=2,
                           text_dim=32, freq_dim=32, dtype="bfloat16"),
        text=text_lib.TextConfig(vocab_size=len(data.VOCAB),
                                 text_len=data.TEXT_LEN, dim=32, num_heads=2,
                                 mlp_dim=64, num_layers=1),
        frames=4, height=16, width=16, steps=4)

  @property
  def video_spec(self) -> data.VideoSpec:
    return data.VideoSpec(self.frames, self.height, self.width)

  def video_shape(self, batch: int) -> tuple[int, ...]:
    """The DiT's input shape (B, 3, F, H, W)."""
    return (batch, 3, self.frames, self.height, self.width)

  @property
  def num_tokens(self) -> int:
    return int(np.prod([s // p for s, p in zip(
        (self.frames, self.height, self.width), self.wan.patch_size)]))

  def replace(self, **changes) -> DemoConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "wan": self.wan.to_dict(),
            "text": self.text.to_dict(),
            "video": {"frames": self.frames, "height": self.height,
                      "width": self.width},
            "sampling": {"shift": self.shift, "steps": self.steps,
                         "guidance": self.guidance}}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> DemoConfig:
    if d.get("format") != FORMAT_VERSION:
      raise ValueError(f"demo config format {d.get('format')!r}; this "
                       f"version reads format {FORMAT_VERSION}")
    try:
      return cls(wan=WanConfig.from_dict(d["wan"]),
                 text=text_lib.TextConfig.from_dict(d["text"]),
                 **d["video"], **d["sampling"])
    except (KeyError, TypeError) as e:
      raise ValueError(f"not a demo model config ({e!r}): {d}") from e


@dataclasses.dataclass
class DemoModel:
  """The DiT and the text encoder of one demo config."""

  config: DemoConfig
  dit: WanDiT
  text: text_lib.TextEncoder


# Parameters ------------------------------------------------------------------


def init(config: DemoConfig, seed: int = 0) -> DemoModel:
  """A freshly initialised (untrained) model."""
  rngs = nnx.Rngs(seed)
  return DemoModel(config, WanDiT(config.wan, rngs=rngs),
                   text_lib.TextEncoder(config.text, rngs=rngs))


def abstract_model(config: DemoConfig) -> DemoModel:
  """The model with ShapeDtypeStruct leaves (no memory)."""
  dit = nnx.eval_shape(lambda: WanDiT(config.wan, rngs=nnx.Rngs(0)))
  text = nnx.eval_shape(
      lambda: text_lib.TextEncoder(config.text, rngs=nnx.Rngs(0)))
  return DemoModel(config, dit, text)


def split(model: DemoModel):
  """(graphdefs, params): params = {"dit": ..., "text": ...} pure dicts."""
  graphdefs, params = {}, {}
  for name in ("dit", "text"):
    graphdefs[name], state = nnx.split(getattr(model, name))
    params[name] = nnx.to_pure_dict(state)
  return graphdefs, params


def merge(config: DemoConfig, graphdefs, params) -> DemoModel:
  return DemoModel(config, nnx.merge(graphdefs["dit"], params["dit"]),
                   nnx.merge(graphdefs["text"], params["text"]))


def flatten(params) -> dict[str, Any]:
  """{"dit.blocks.ffn.fc1.kernel": array, ...} from nested params."""
  return {".".join(path): value
          for path, value in common.flatten_dict(params).items()}


def expected_shapes(config: DemoConfig) -> dict[str, tuple[int, ...]]:
  """{flat key: shape} of every parameter of a config."""
  _, params = split(abstract_model(config))
  return {k: tuple(v.shape) for k, v in flatten(params).items()}


def _unflatten(flat: dict[str, Any], config: DemoConfig):
  """Nested params with the abstract model's key types (ints stay ints)."""
  _, template = split(abstract_model(config))
  paths = {".".join(map(str, p)): p for p in _key_paths(template)}
  nested = {}
  for key, value in flat.items():
    d = nested
    path = paths[key]
    for part in path[:-1]:
      d = d.setdefault(part, {})
    d[path[-1]] = value
  return nested


def _key_paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _key_paths(v, prefix + (k,))
    else:
      yield prefix + (k,)


def export(folder, config: DemoConfig, params, *, metadata=None,
           overwrite: bool = True) -> pathlib.Path:
  """Writes `demo.safetensors` + `config.json` into `folder`, atomically.

  params: nested {"dit": ..., "text": ...} (normally the EMA weights).
  float32 when the file stays within MAX_FLOAT32_BYTES, else bfloat16.
  metadata: JSON-able facts about the training run (config.json
  "training").
  """
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
  shapes = expected_shapes(config)
  common.check_keys(common.Source.from_arrays(flat), shapes,
                    layout="demo model")
  nbytes = sum(v.nbytes for v in flat.values())
  if nbytes > MAX_FLOAT32_BYTES:
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    flat = {k: v.astype(ml_dtypes.bfloat16) for k, v in flat.items()}
  doc = config.to_dict()
  doc["training"] = dict(metadata or {})
  doc["training"]["weights_dtype"] = str(next(iter(flat.values())).dtype)
  folder = pathlib.Path(folder)
  with outputs.atomic_folder(folder, overwrite=overwrite,
                             command="train-demo") as tmp:
    save_file(flat, tmp / WEIGHTS_FILE, metadata={"format": "astraea-demo"})
    (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    # save_file's temporary file is private (0600): make it readable like
    # any package file.
    os.chmod(tmp / WEIGHTS_FILE, 0o644)
    os.chmod(tmp, 0o755)
  return folder


def weights_sha256(folder=None) -> str:
  """SHA-256 of a weights folder's demo.safetensors followed by its
  config.json (default: the packaged folder): what generation depends on,
  sampling defaults included."""
  folder = pathlib.Path(folder or WEIGHTS_DIR)
  digest = hashlib.sha256()
  for name in (WEIGHTS_FILE, CONFIG_FILE):
    digest.update((folder / name).read_bytes())
  return digest.hexdigest()


def model_id(folder=None) -> str:
  """The id a searched schedule records for these weights (a retrained
  model is another model: its schedules must be searched again)."""
  return f"astraea-demo:{weights_sha256(folder)[:16]}"


def load_config(folder=None) -> tuple[DemoConfig, dict]:
  """(config, training metadata) of a weights folder (default: packaged)."""
  folder = pathlib.Path(folder or WEIGHTS_DIR)
  cfg_path = folder / CONFIG_FILE
  if not cfg_path.is_file() or not (folder / WEIGHTS_FILE).is_file():
    raise FileNotFoundError(
        f"no demo model weights in {folder} (need {WEIGHTS_FILE} and "
        f"{CONFIG_FILE}); {RETRAIN_HINT}")
  try:
    doc = json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise common.CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
  training = doc.pop("training", {})
  return DemoConfig.from_dict(doc), training


def load(folder=None, *, dtype: str = "float32") -> DemoModel:
  """The demo model from a weights folder (default: the packaged one).

  dtype: the DiT's compute dtype ("float32" default: exact on CPUs;
  "bfloat16" as trained). Parameters are float32 in memory.
  Raises FileNotFoundError when the weights are absent and
  converters.common.CheckpointError (KeyMismatch lists missing, unexpected
  and misshapen keys) when they do not fit the config.
  """
  folder = pathlib.Path(folder or WEIGHTS_DIR)
  config, _ = load_config(folder)
  config = config.replace(wan=config.wan.replace(dtype=dtype))
  try:
    source = SafetensorsFile(folder / WEIGHTS_FILE)
  except SafetensorsError as e:
    raise common.CheckpointError(
        f"{folder / WEIGHTS_FILE} is not a readable safetensors file ({e}); "
        f"{RETRAIN_HINT}") from e
  common.check_keys(source, expected_shapes(config),
                    layout=f"demo model {folder / WEIGHTS_FILE}")
  try:
    flat = {k: jnp.asarray(source.get(k).astype(np.float32))
            for k in source.keys()}
  except SafetensorsError as e:
    raise common.CheckpointError(
        f"{folder / WEIGHTS_FILE}: {e}; {RETRAIN_HINT}") from e
  graphdefs, _ = split(abstract_model(config))
  return merge(config, graphdefs, _unflatten(flat, config))


# Text and sampling -----------------------------------------------------------


@nnx.jit
def _encode_tokens(text_encoder, tokens):
  return text_encoder(tokens)


def encode(model: DemoModel, prompts) -> jax.Array:
  """(B, text_len, dim) float32 context of prompts (strings); the empty
  prompt "" encodes to zeros (the unconditional context)."""
  if isinstance(prompts, str):
    prompts = [prompts]
  tokens = data.tokenize(list(prompts))
  return _encode_tokens(model.text, jnp.asarray(tokens))


def to_uint8(videos) -> np.ndarray:
  """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
  videos = np.asarray(videos, np.float32)
  frames = np.clip(np.round((videos + 1.0) * 127.5), 0, 255).astype(np.uint8)
  return np.ascontiguousarray(frames.transpose(0, 2, 3, 4, 1))


def noise(config: DemoConfig, batch: int, seed: int) -> jax.Array:
  """The initial noise of a seed: (B, 3, F, H, W) standard normal."""
  return dense_sampler.draw_noise(jax.random.key(seed),
                                  config.video_shape(batch))


def sample(model: DemoModel, prompts, *, seed: int = 0,
           steps: int | None = None, guidance: float | None = None,
           budget: float | None = None, schedule=None,
           shift: float | None = None, progress: bool = True,
           initial_noise=None, return_stats: bool = False):
  """Videos (B, 3, F, H, W) float32 (about [-1, 1]) for prompts.

  budget / schedule: Astraea's mean token budget or per-step schedule
  (at most one; neither = the full model). steps, guidance, shift default
  to the config's. initial_noise overrides the seed's noise. With
  return_stats, returns (videos, stats): stats is astraea's SampleStats,
  or for the full model a dict {"step_seconds": [...]} (each step waited
  for; the first includes compilation).
  """
  c = model.config
  if isinstance(prompts, str):
    prompts = [prompts]
  steps = c.steps if steps is None else steps
  guidance = c.guidance if guidance is None else guidance
  shift = c.shift if shift is None else shift
  context = encode(model, prompts)
  negative = jnp.zeros((1,) + context.shape[1:], context.dtype)
  x = (noise(c, len(prompts), seed) if initial_noise is None
       else jnp.asarray(initial_noise, jnp.float32))
  graphdef, params = nnx.split(model.dit)
  common_args = dict(steps=steps, guidance_scale=guidance, shift=shift,
                     progress=progress)
  if budget is None and schedule is None:
    step_seconds = [] if return_stats else None
    out = dense_sampler.sample(graphdef, params, x, context, negative,
                               step_seconds=step_seconds, **common_args)
    return (out, {"step_seconds": step_seconds}) if return_stats else out
  return astraea_sampler.sample(graphdef, params, x, context, negative,
                                budget=budget, schedule=schedule,
                                return_stats=return_stats, **common_args)


def generate(model: DemoModel, prompts, *, seed: int = 0,
             steps: int | None = None, guidance: float | None = None,
             budget: float | None = None, schedule=None,
             progress: bool = True) -> np.ndarray:
  """uint8 videos (B, F, H, W, 3) for prompts; see `sample`."""
  return to_uint8(sample(model, prompts, seed=seed, steps=steps,
                         guidance=guidance, budget=budget, schedule=schedule,
                         progress=progress))


def compare(model: DemoModel, prompt: str, *, seed: int = 0,
            steps: int | None = None, guidance: float | None = None,
            budget: float | None = None, schedule=None,
            progress: bool = True, timing_runs: int = 0) -> dict:
  """The full model and Astraea from the SAME noise, timed.

  Steady-state (compiled) time of each sampler, measured in this process:
    timing_runs = 0: from the first run's per-step wall times (each step
      waited for): a step's steady time is the median time of the steps with
      the same token count K that did not compile (the first step of each
      K compiles); a sampling's time is the sum over its steps. Astraea is
      run once more, timed whole, if some K occurs only once.
    timing_runs = n > 0: the median wall time of n further whole runs.
  Returns {"full", "astraea": videos (1, 3, F, H, W), "stats": Astraea's
  SampleStats, "seconds_full", "seconds_astraea": steady seconds per
  sampling, "seconds_full_first", "seconds_astraea_first": first runs incl.
  compilation, "timing": how it was measured}.
  """
  if budget is None and schedule is None:
    raise ValueError("give Astraea a `budget` or a `schedule`")
  args = dict(seed=seed, steps=steps, guidance=guidance)
  x = noise(model.config, 1, seed)
  astraea_args = dict(budget=budget, schedule=schedule)

  def timed(**kw):
    t0 = time.perf_counter()
    out = sample(model, prompt, initial_noise=x, **args, **kw)
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0

  (full, full_stats), first_full = timed(progress=progress,
                                         return_stats=True)
  (fast, stats), first_fast = timed(progress=progress, return_stats=True,
                                    **astraea_args)
  if timing_runs > 0:
    again_full, again_fast = [], []
    for _ in range(timing_runs):  # interleaved: load drifts hit both alike
      again_full.append(timed(progress=False)[1])
      again_fast.append(timed(progress=False, **astraea_args)[1])
    seconds_full = float(np.median(again_full))
    seconds_fast = float(np.median(again_fast))
    how = (f"median wall time of {timing_runs} further whole run(s) of each "
           "sampler after a first, compiling run")
  else:
    n = stats.num_tokens
    seconds_full = dense_sampler.steady_seconds(
        full_stats["step_seconds"], [n] * len(full_stats["step_seconds"]))
    seconds_fast = dense_sampler.steady_seconds(stats.step_seconds,
                                                stats.num_selected)
    how = ("sum over the steps of the median wall time of the non-compiling "
           "steps with the same token count, from the first run (each step "
           "waited for)")
    again = []  # a token count that occurred once: time a second run
    if seconds_full is None:
      seconds_full = timed(progress=False)[1]
      again.append("the full model")
    if seconds_fast is None:
      seconds_fast = timed(progress=False, **astraea_args)[1]
      again.append("Astraea")
    if again:
      how += (f"; {' and '.join(again)} from a second whole run (a token "
              "count occurred once)")
  return {"full": full, "astraea": fast, "stats": stats,
          "seconds_full": seconds_full, "seconds_astraea": seconds_fast,
          "seconds_full_first": first_full,
          "seconds_astraea_first": first_fast, "timing": how}

"""The demo model's procedural world: coloured shapes moving over backgrounds.

Every clip shows one or two objects (a circle, square or triangle of a named
colour) moving in a straight line (left, right, up or down, no bounce) over a
dark achromatic background (black, gray, striped or checkered), with the
caption that describes it:

  "a red circle moving left on a striped background"
  "a green square moving up and a white triangle moving down on a black
   background"

Everything here is pure JAX and deterministic per key, so the training step
draws and renders its batches on the accelerator, with no dataset files:

  scenes = sample_scenes(key, batch)           # dict of (B, ...) arrays
  video = render(scenes)                       # (B, F, H, W, 3) in [0, 1]
  tokens = caption_tokens(scenes)              # (B, TEXT_LEN) int32

A fixed rule (`is_held_out`) keeps ~10% of the (colour, shape, direction)
combinations out of the training split; the "held_out" split draws only those,
so prompt agreement on them measures composition, not recall.
`analysis.py` inverts the renderer (colour masks, shape templates, centroid
tracks) to check that generated clips follow their prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string

import jax
import jax.numpy as jnp
import numpy as np

# Saturated or bright RGB in [0, 1]: every one has a channel >= 0.8, far above
# the backgrounds' <= 0.34, and distinct hues (white: the one unsaturated).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.12, 0.80, 0.15),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.65, 0.15, 0.90),
    "white": (1.00, 1.00, 1.00),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUNDS = ("black", "gray", "striped", "checkered")

# Unit displacement (dy, dx) of each direction; y grows downwards.
DIRECTION_VECTORS = np.array([(0., -1.), (0., 1.), (-1., 0.), (1., 0.)],
                             np.float32)

# Background gray levels (dark, achromatic): flat levels for black and gray,
# (low, high) for the two-level patterns.
_FLAT_LEVEL = {"black": 0.03, "gray": 0.30}
_PATTERN_LEVELS = (0.10, 0.30)
BRIGHTNESS_JITTER = 0.04  # per-clip +- shift of the background level

# At the reference size (48 px, 16 frames); other VideoSpecs scale these.
_RADIUS_RANGE = (5.0, 8.0)  # object half-extent, px
_SPEED_RANGE = (1.0, 1.5)  # px per frame
_PERIOD_RANGE = (6.0, 12.0)  # background pattern period, px
_MARGIN = 1.0  # px kept between an object's box and the frame edge
_PLACEMENT_TRIES = 8  # candidate starts for two-object clips

TEXT_LEN = 16
_TEMPLATE_WORDS = ("a", "moving", "and", "on", "background")
VOCAB: tuple[str, ...] = (("<pad>",) + _TEMPLATE_WORDS + COLOUR_NAMES
                          + SHAPES + DIRECTIONS + BACKGROUNDS)
WORD_INDEX = {word: i for i, word in enumerate(VOCAB)}
PAD = 0


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  """Clip size in pixels and frames (the renderer's output shape)."""
  frames: int = 16
  height: int = 48
  width: int = 48

  def __post_init__(self):
    if self.frames < 2 or self.height < 16 or self.width < 16:
      raise ValueError(f"VideoSpec needs frames >= 2 and height, width >= 16,"
                       f" got {self}")

  @property
  def scale(self) -> float:
    """Pixel scale relative to the reference 48 x 48 clip."""
    return min(self.height, self.width) / 48.0


# Held-out combinations ------------------------------------------------------


def is_held_out(colour, shape, direction):
  """Whether a (colour, shape, direction) index triple is held out.

  The rule (colour + 3 shape + 2 direction) % 11 == 0 holds out 7 of the 72
  combinations (red circle left, green triangle up, blue square down, yellow
  triangle right, purple square up, white circle down, white triangle left):
  each colour, shape and direction is still seen in training with others.
  Works on Python ints, numpy and jax arrays alike.
  """
  return (colour + 3 * shape + 2 * direction) % 11 == 0


def _all_combos() -> np.ndarray:
  """(72, 3) int32 of every (colour, shape, direction)."""
  grid = np.meshgrid(np.arange(len(COLOURS)), np.arange(len(SHAPES)),
                     np.arange(len(DIRECTIONS)), indexing="ij")
  return np.stack([g.ravel() for g in grid], axis=1).astype(np.int32)


ALL_COMBOS = _all_combos()
HELD_OUT_COMBOS = ALL_COMBOS[is_held_out(*ALL_COMBOS.T)]
TRAIN_COMBOS = ALL_COMBOS[~is_held_out(*ALL_COMBOS.T)]


# Sampling -------------------------------------------------------------------


def _pick(u, n):
  """An index uniform in [0, n) from u uniform in [0, 1)."""
  return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def _sample_discrete_one(u, split: str):
  """Discrete attributes of one clip (unbatched) from 4 uniforms u."""
  background = _pick(u[3], len(BACKGROUNDS))
  if split == "held_out":
    first = jnp.asarray(HELD_OUT_COMBOS)[_pick(u[1], len(HELD_OUT_COMBOS))]
    return {"num_objects": jnp.int32(1),
            "colour": jnp.stack([first[0], first[0]]),
            "shape": jnp.stack([first[1], first[1]]),
            "direction": jnp.stack([first[2], first[2]]),
            "background": background}
  combos = jnp.asarray(TRAIN_COMBOS)
  first = combos[_pick(u[1], len(TRAIN_COMBOS))]
  # The second object: uniform over the training combinations of another
  # colour (the k-th of them, k uniform below their count).
  other_colour = combos[:, 0] != first[0]
  k = _pick(u[2], other_colour.sum())
  second = combos[jnp.argmax(jnp.cumsum(other_colour) > k)]
  return {"num_objects": 1 + (u[0] < 0.5).astype(jnp.int32),
          "colour": jnp.stack([first[0], second[0]]),
          "shape": jnp.stack([first[1], second[1]]),
          "direction": jnp.stack([first[2], second[2]]),
          "background": background}


def _centres(start, speed, direction, frames: int):
  """(..., F, 2) object centres over the frames; start (..., 2)."""
  t = jnp.arange(frames, dtype=jnp.float32)
  step = speed[..., None] * jnp.asarray(DIRECTION_VECTORS)[direction]
  return start[..., None, :] + t[:, None] * step[..., None, :]


def _starts(u, size, speed, direction, spec: VideoSpec):
  """(2, 2) starts from (2, 2) uniforms u, so that each object's box stays

  inside the frame throughout: along the motion axis the start leaves room
  for the whole path speed * (F - 1); across it, any position that fits."""
  travel = speed * (spec.frames - 1)  # (2,)
  vec = jnp.asarray(DIRECTION_VECTORS)[direction]  # (2, 2)
  extent = jnp.array([spec.height, spec.width], jnp.float32)
  lo = size[:, None] + _MARGIN  # (2, 1) lowest centre coordinate
  hi = extent - size[:, None] - _MARGIN  # (2, 2)
  # Moving towards +axis: start <= hi - travel; towards -axis: >= lo + travel.
  lo = lo + jnp.where(vec < 0, travel[:, None], 0.0)
  hi = hi - jnp.where(vec > 0, travel[:, None], 0.0)
  return lo + u * (hi - lo)


def _between(u, bounds):
  return bounds[0] + u * (bounds[1] - bounds[0])


_CONTINUOUS_UNIFORMS = 7 + _PLACEMENT_TRIES * 4


def _sample_continuous_one(u, discrete, spec: VideoSpec):
  """Sizes, speeds, starts, pattern and brightness of one clip (unbatched).

  Two-object clips take, of a few candidate placements, the one whose objects
  come least close over the clip, so occlusions stay rare. u: the clip's
  _CONTINUOUS_UNIFORMS uniforms (all randomness is one draw per batch: one
  random-bits computation to compile).
  """
  scale = spec.scale
  size = scale * _between(u[0:2], _RADIUS_RANGE)
  # Speed scales with the frame size and inversely with the frame count,
  # so the path covers the same fraction of the frame at any VideoSpec.
  speed = scale * 15.0 / (spec.frames - 1) * _between(u[2:4], _SPEED_RANGE)
  direction = discrete["direction"]
  starts = jax.vmap(lambda v: _starts(v, size, speed, direction, spec))(
      u[7:].reshape(_PLACEMENT_TRIES, 2, 2))  # (T, 2, 2)
  centres = _centres(starts, speed[None], direction[None], spec.frames)
  gap = jnp.linalg.norm(centres[:, 0] - centres[:, 1], axis=-1)  # (T, F)
  best = jnp.argmax(gap.min(axis=-1))
  start = jnp.where(discrete["num_objects"] == 2, starts[best], starts[0])
  pattern = jnp.stack([u[4], scale * _between(u[5], _PERIOD_RANGE)])
  brightness = _between(u[6], (-BRIGHTNESS_JITTER, BRIGHTNESS_JITTER))
  return {"size": size, "start": start, "speed": speed, "pattern": pattern,
          "brightness": brightness}


def _check_split(split: str):
  if split not in ("train", "held_out"):
    raise ValueError(f"split must be 'train' or 'held_out', got {split=}")


def sample_scenes(key, batch: int, *, split: str = "train",
                  spec: VideoSpec = VideoSpec()) -> dict:
  """Draws `batch` scenes; deterministic per key.

  Returns a dict of arrays with leading axis B = batch:
    num_objects (B,) int32 in {1, 2};
    colour, shape, direction (B, 2) int32 indices into COLOUR_NAMES, SHAPES,
      DIRECTIONS (object 2 ignored when num_objects == 1; the two objects of
      a clip have different colours);
    background (B,) int32 index into BACKGROUNDS;
    size (B, 2) object half-extent (radius) in px;
    start (B, 2, 2) centre (y, x) at frame 0, px;
    speed (B, 2) px per frame;
    pattern (B, 2) background (phase in [0, 1), period in px);
    brightness (B,) background brightness shift.
  split="train" never yields a held-out combination for any object;
  split="held_out" yields single-object scenes of held-out combinations.
  """
  _check_split(split)
  return _sample_scenes(key, batch, split, spec)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _sample_scenes(key, batch: int, split: str, spec: VideoSpec) -> dict:
  uniforms = jax.random.uniform(key, (batch, 4 + _CONTINUOUS_UNIFORMS))

  def one(u):
    discrete = _sample_discrete_one(u[:4], split)
    return {**discrete, **_sample_continuous_one(u[4:], discrete, spec)}

  scenes = jax.vmap(one)(uniforms)
  return {name: value.astype(jnp.int32) if jnp.issubdtype(
      value.dtype, jnp.integer) else value for name, value in scenes.items()}


# Rendering ------------------------------------------------------------------


def _shape_sdf(shape, y, x, cy, cx, r):
  """Signed distance (px, < 0 inside) of pixel centres to a shape.

  circle: radius r; square: half-side r; triangle: upward, apex (cy - r, cx),
  base y = cy + r from cx - r to cx + r (box 2r x 2r, half its area).
  The triangle's distance is the max of the signed distances to the lines of
  its edges and of its box (every one bounds the true distance from below,
  and the box's keep the antialias ramp inside the box, as the exact
  distance does): exact inside and along the edges, slightly sharp corners.
  """
  dy, dx = y - cy, x - cx
  circle = jnp.sqrt(dy * dy + dx * dx) - r
  qy, qx = jnp.abs(dy) - r, jnp.abs(dx) - r
  square = (jnp.sqrt(jnp.maximum(qy, 0.0) ** 2 + jnp.maximum(qx, 0.0) ** 2)
            + jnp.minimum(jnp.maximum(qy, qx), 0.0))
  # Side edges: outward normals (-+2, -1) / sqrt(5) through the apex.
  side = (2.0 * jnp.abs(dx) - (dy + r)) / np.sqrt(5.0)
  triangle = jnp.maximum(jnp.maximum(qy, qx), side)
  return jnp.select([shape == 0, shape == 1], [circle, square], triangle)


def _background(background, pattern, brightness, y, x):
  """(H, W) gray level of a background."""
  phase, period = pattern[0], pattern[1]
  lo, hi = _PATTERN_LEVELS
  # Square waves with ~1 px ramps: clip(0.5 + k * wave) with the wave's
  # slope at its zero crossings ~1 / px.
  ramp = period / (2.0 * np.pi)
  stripes = jnp.clip(0.5 + ramp * jnp.sin(
      2.0 * np.pi * ((x + y) / (np.sqrt(2.0) * period) + phase)), 0.0, 1.0)
  offset = phase * period
  checks = jnp.clip(0.5 + ramp * jnp.sin(
      np.pi * (y + offset) / period) * jnp.sin(
          np.pi * (x + offset) / period), 0.0, 1.0)
  flat = jnp.ones_like(y + x)
  level = jnp.select(
      [background == 0, background == 1, background == 2],
      [flat * _FLAT_LEVEL["black"], flat * _FLAT_LEVEL["gray"],
       lo + (hi - lo) * stripes], lo + (hi - lo) * checks)
  return jnp.clip(level + brightness, 0.0, 1.0)


def render_one(scene: dict, spec: VideoSpec = VideoSpec()):
  """(F, H, W, 3) float32 clip of one (unbatched) scene."""
  y = jnp.arange(spec.height, dtype=jnp.float32)[:, None] + 0.5
  x = jnp.arange(spec.width, dtype=jnp.float32)[None, :] + 0.5
  gray = _background(scene["background"], scene["pattern"],
                     scene.get("brightness", 0.0), y, x)
  video = jnp.broadcast_to(gray[None, :, :, None],
                           (spec.frames, spec.height, spec.width, 3))
  centres = _centres(scene["start"], scene["speed"], scene["direction"],
                     spec.frames)  # (2, F, 2)
  colours = jnp.asarray(np.array(list(COLOURS.values()), np.float32))
  for i in range(2):  # object 2 over object 1
    cy = centres[i, :, 0, None, None]
    cx = centres[i, :, 1, None, None]
    sdf = _shape_sdf(scene["shape"][i], y, x, cy, cx, scene["size"][i])
    alpha = jnp.clip(0.5 - sdf, 0.0, 1.0)  # (F, H, W): 1 px antialias ramp
    alpha = alpha * (i < scene["num_objects"])
    colour = colours[scene["colour"][i]]
    video = video * (1.0 - alpha[..., None]) + alpha[..., None] * colour
  return video.astype(jnp.float32)


def render(scenes: dict, spec: VideoSpec = VideoSpec()):
  """(B, F, H, W, 3) float32 clips in [0, 1] of a batch of scenes; jittable

  (spec is hashable: `jax.jit(render, static_argnums=1)`)."""
  return jax.vmap(lambda scene: render_one(scene, spec))(scenes)


# Captions -------------------------------------------------------------------


def _ids(words) -> np.ndarray:
  return np.array([WORD_INDEX[w] for w in words], np.int32)


_COLOUR_IDS, _SHAPE_IDS = _ids(COLOUR_NAMES), _ids(SHAPES)
_DIRECTION_IDS, _BACKGROUND_IDS = _ids(DIRECTIONS), _ids(BACKGROUNDS)


@jax.jit
def caption_tokens(scenes: dict):
  """(B, TEXT_LEN) int32 caption token ids, zero-padded, computed in JAX.

  One object:  a C S moving D on a BG background              (9 words)
  Two objects: a C1 S1 moving D1 and a C2 S2 moving D2 on a BG background (15)
  """
  w = WORD_INDEX
  colour = jnp.asarray(_COLOUR_IDS)[scenes["colour"]]  # (B, 2)
  shape = jnp.asarray(_SHAPE_IDS)[scenes["shape"]]
  direction = jnp.asarray(_DIRECTION_IDS)[scenes["direction"]]
  background = jnp.asarray(_BACKGROUND_IDS)[scenes["background"]]
  batch = background.shape[0]

  def const(word):
    return jnp.full((batch,), w[word], jnp.int32)

  def obj(i):
    return [const("a"), colour[:, i], shape[:, i], const("moving"),
            direction[:, i]]

  tail = [const("on"), const("a"), background, const("background")]
  one = jnp.stack(obj(0) + tail, axis=1)
  two = jnp.stack(obj(0) + [const("and")] + obj(1) + tail, axis=1)
  one = jnp.pad(one, ((0, 0), (0, TEXT_LEN - one.shape[1])))
  two = jnp.pad(two, ((0, 0), (0, TEXT_LEN - two.shape[1])))
  return jnp.where((scenes["num_objects"] == 2)[:, None], two,
                   one).astype(jnp.int32)


def caption_text(scenes: dict, i: int) -> str:
  """The caption of scene i of a batch."""
  n = int(np.asarray(scenes["num_objects"])[i])
  colour, shape, direction = (np.asarray(scenes[k])[i] for k in
                              ("colour", "shape", "direction"))
  objects = [f"a {COLOUR_NAMES[colour[j]]} {SHAPES[shape[j]]} moving "
             f"{DIRECTIONS[direction[j]]}" for j in range(n)]
  background = BACKGROUNDS[int(np.asarray(scenes["background"])[i])]
  return f"{' and '.join(objects)} on a {background} background"


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def _words(text: str) -> list[str]:
  return _PUNCTUATION.sub(" ", text.lower()).split()


def tokenize(texts: list[str]) -> np.ndarray:
  """(B, TEXT_LEN) int32 token ids of prompts (lower-cased, punctuation

  stripped, zero-padded). Any words of VOCAB are accepted, in any order;
  raises ValueError on unknown words or prompts over TEXT_LEN words."""
  if isinstance(texts, str):
    texts = [texts]
  out = np.zeros((len(texts), TEXT_LEN), np.int32)
  for row, text in enumerate(texts):
    words = _words(text)
    unknown = sorted({wd for wd in words
                      if wd not in WORD_INDEX or wd == VOCAB[PAD]})
    if unknown:
      raise ValueError(
          f"prompt {text!r} has words the demo model does not know: "
          f"{unknown}; known words: {', '.join(VOCAB[1:])}")
    if len(words) > TEXT_LEN:
      raise ValueError(f"prompt {text!r} has {len(words)} words, more than "
                       f"the demo model's {TEXT_LEN=}")
    out[row, :len(words)] = [WORD_INDEX[wd] for wd in words]
  return out


def _expect(words, pos, choices, what, text):
  if pos >= len(words) or words[pos] not in choices:
    got = words[pos] if pos < len(words) else "<end of prompt>"
    raise ValueError(
        f"prompt {text!r} does not follow the demo template "
        f"'a COLOUR SHAPE moving DIRECTION [and a COLOUR SHAPE moving "
        f"DIRECTION] on a BACKGROUND background': word {pos + 1} is {got!r}, "
        f"expected {what} ({', '.join(choices)})")
  return words[pos]


def parse_caption(text: str) -> dict:
  """The discrete attributes of a templated caption, by name:

  {"num_objects": 1 or 2, "colour": [names], "shape": [names],
   "direction": [names], "background": name}, lists of num_objects entries.
  Raises ValueError if the text does not follow the template."""
  words = _words(text)
  out = {"colour": [], "shape": [], "direction": []}
  pos = 0
  while True:
    _expect(words, pos, ("a",), "'a'", text)
    out["colour"].append(_expect(words, pos + 1, COLOUR_NAMES, "a colour",
                                 text))
    out["shape"].append(_expect(words, pos + 2, SHAPES, "a shape", text))
    _expect(words, pos + 3, ("moving",), "'moving'", text)
    out["direction"].append(_expect(words, pos + 4, DIRECTIONS, "a direction",
                                    text))
    pos += 5
    if len(out["colour"]) == 2:
      break
    if _expect(words, pos, ("and", "on"), "'and' or 'on'", text) == "on":
      break
    pos += 1
  _expect(words, pos, ("on",), "'on'", text)
  _expect(words, pos + 1, ("a",), "'a'", text)
  out["background"] = _expect(words, pos + 2, BACKGROUNDS, "a background",
                              text)
  _expect(words, pos + 3, ("background",), "'background'", text)
  if len(words) > pos + 4:
    raise ValueError(f"prompt {text!r} goes on after the template's end: "
                     f"{' '.join(words[pos + 4:])!r}")
  if len(out["colour"]) == 2 and out["colour"][0] == out["colour"][1]:
    raise ValueError(f"prompt {text!r}: the two objects must have different "
                     f"colours (the demo world never shows two of one colour)")
  out["num_objects"] = len(out["colour"])
  return out


def scenes_from_captions(texts: list[str], key, *,
                         spec: VideoSpec = VideoSpec()) -> dict:
  """Scenes with the captions' attributes and sampled continuous parameters

  (sizes, starts, speeds, pattern); deterministic per key."""
  parsed = [parse_caption(t) for t in texts]

  def indices(names, table):
    idx = [table.index(n) for n in names]
    return idx + idx[:1] * (2 - len(idx))

  discrete = {
      "num_objects": jnp.array([p["num_objects"] for p in parsed], jnp.int32),
      "colour": jnp.array([indices(p["colour"], COLOUR_NAMES)
                           for p in parsed], jnp.int32),
      "shape": jnp.array([indices(p["shape"], SHAPES) for p in parsed],
                         jnp.int32),
      "direction": jnp.array([indices(p["direction"], DIRECTIONS)
                              for p in parsed], jnp.int32),
      "background": jnp.array([BACKGROUNDS.index(p["background"])
                               for p in parsed], jnp.int32),
  }
  return {**discrete, **_sample_continuous(key, discrete, spec)}


@functools.partial(jax.jit, static_argnums=2)
def _sample_continuous(key, discrete: dict, spec: VideoSpec) -> dict:
  uniforms = jax.random.uniform(
      key, (discrete["background"].shape[0], _CONTINUOUS_UNIFORMS))
  return jax.vmap(lambda u, d: _sample_continuous_one(u, d, spec))(
      uniforms, discrete)

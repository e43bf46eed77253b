"""Reads colour, shape and direction back from a clip of the demo world.

The inverse of `data.render`, by simple image analysis (numpy), to measure
whether a generative model follows its prompts:

1. Object pixels: brightness (max channel) above OBJECT_BRIGHTNESS; every
   background of the world stays below 0.35 and every named colour has a
   channel >= 0.8. Each object pixel takes a named colour: white when
   unsaturated, else the one of the closest chroma direction
   (`colour_labels`).
2. Colour: one-object prompts take the most frequent colour over the clip;
   two-object prompts the two most frequent, and each expected colour counts
   as found when it is among them.
3. Shape, per frame, of the object's mask (all object pixels for one object,
   the expected colour's pixels for two): the intersection over union with a
   circle, a square and an upward triangle of the mask's area placed on its
   centroid; the best template over the frames' median wins. (Fill ratios of
   the bounding box, circle ~0.785, square 1, triangle 0.5, swing by +-0.15
   at 5 px radii with where the box's edge pixels fall, so they are reported
   but do not decide.)
4. Direction: the centroid's displacement from the first to the last frame
   where the object is seen whole (area >= WHOLE_FRACTION of its median);
   the dominant axis and its sign.

  result = analyse_clip(video, parse_caption(prompt))
  rates = agreement(videos, prompts)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from astraea_jax.demo_model import data

OBJECT_BRIGHTNESS = 0.55  # max channel above which a pixel is an object's
MIN_PIXELS = 6  # an object seen in a frame covers at least this many px
WHOLE_FRACTION = 0.8  # of the median area: the object is not occluded
MIN_TRAVEL = 2.0  # px; less displacement over the clip reads as "static"
MIN_NEIGHBOURS = 3  # of 8, for an object pixel to count (see despeckle)

WHITE_SATURATION = 0.3  # below: white (blends of white with gray stay at 0)

_PALETTE = np.array(list(data.COLOURS.values()), np.float32)  # (6, 3)
_WHITE = data.COLOUR_NAMES.index("white")
_CHROMATIC = np.array([i for i, c in enumerate(_PALETTE) if np.ptp(c) > 0.5])
_CHROMA = _PALETTE[_CHROMATIC] - _PALETTE[_CHROMATIC].mean(-1, keepdims=True)
_CHROMA /= np.linalg.norm(_CHROMA, axis=-1, keepdims=True)
ATTRIBUTES = ("colour", "shape", "direction")


def _as_float(video) -> np.ndarray:
  video = np.asarray(video)
  if video.dtype == np.uint8:
    return video.astype(np.float32) / 255.0
  return video.astype(np.float32)


def colour_labels(video) -> np.ndarray:
  """(F, H, W) int: index of the pixel's named colour, -1 for background.

  An edge pixel is a blend a c + (1 - a) g of the colour c with a gray g, so
  its chroma p - mean(p) = a (c - mean(c)) points the way c's does: pixels of
  saturation (max - min) / max below WHITE_SATURATION are white, the others
  take the colour of the most similar chroma direction (cosine). Nearest RGB
  would call the white-on-black blends of mid gray purple."""
  video = _as_float(video)
  value = video.max(axis=-1)
  saturation = (value - video.min(axis=-1)) / np.maximum(value, 1e-6)
  chroma = video - video.mean(axis=-1, keepdims=True)
  similarity = (chroma @ _CHROMA.T) / np.maximum(
      np.linalg.norm(chroma, axis=-1, keepdims=True), 1e-6)
  hue = _CHROMATIC[np.argmax(similarity, axis=-1)]
  labels = np.where(saturation < WHITE_SATURATION, _WHITE, hue)
  return np.where(value > OBJECT_BRIGHTNESS, labels, -1)


def despeckle(masks: np.ndarray) -> np.ndarray:
  """(F, H, W) bool masks without pixels that have < MIN_NEIGHBOURS of their

  8 neighbours in the mask: drops isolated noise pixels (a generated clip's
  speckles above OBJECT_BRIGHTNESS), keeps shapes' edges and corners."""
  padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
  h, w = masks.shape[1:]
  neighbours = sum(padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                   .astype(np.int8) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if dy or dx)
  return masks & (neighbours >= MIN_NEIGHBOURS)


def _templates(mask: np.ndarray) -> dict:
  """IoU of a (H, W) mask with each shape of its area on its centroid."""
  ys, xs = np.nonzero(mask)
  area = float(len(ys))
  cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
  y = np.arange(mask.shape[0])[:, None] + 0.5
  x = np.arange(mask.shape[1])[None, :] + 0.5
  dy, dx = y - cy, x - cx
  # Areas: circle pi r^2, square 4 r^2 (half-side r), triangle 2 r^2 with
  # its centroid r / 3 below its box centre (apex at -r, base at +r).
  r_circle = np.sqrt(area / np.pi)
  r_square = np.sqrt(area) / 2.0
  r_tri = np.sqrt(area / 2.0)
  ty = dy + r_tri / 3.0
  shapes = {
      "circle": dy ** 2 + dx ** 2 <= r_circle ** 2,
      "square": (np.abs(dy) <= r_square) & (np.abs(dx) <= r_square),
      "triangle": (ty <= r_tri) & (2.0 * np.abs(dx) <= ty + r_tri),
  }
  return {name: (mask & t).sum() / max((mask | t).sum(), 1)
          for name, t in shapes.items()}


def _fill_ratio(mask: np.ndarray) -> float:
  ys, xs = np.nonzero(mask)
  box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
  return len(ys) / box


def analyse_object(masks: np.ndarray) -> dict:
  """Shape and direction of one object from its (F, H, W) bool masks.

  Returns {"shape", "direction"} (None when the object is not seen in two
  frames, or for a direction, when it moves less than MIN_TRAVEL px) and
  the measurements behind them: "iou" (median per template), "fill_ratio",
  "displacement" (dy, dx) px, "frames_seen"."""
  areas = masks.sum(axis=(1, 2))
  seen = np.nonzero(areas >= MIN_PIXELS)[0]
  out = {"shape": None, "direction": None, "iou": None, "fill_ratio": None,
         "displacement": None, "frames_seen": len(seen)}
  if len(seen) == 0:
    return out
  whole = seen[areas[seen] >= WHOLE_FRACTION * np.median(areas[seen])]
  ious = [_templates(masks[f]) for f in whole]
  out["iou"] = {s: float(np.median([i[s] for i in ious])) for s in data.SHAPES}
  out["shape"] = max(out["iou"], key=out["iou"].get)
  out["fill_ratio"] = float(np.median([_fill_ratio(masks[f]) for f in whole]))
  if len(whole) < 2:
    return out
  first, last = (np.stack(np.nonzero(masks[f]), -1).mean(0)
                 for f in (whole[0], whole[-1]))
  dy, dx = last - first
  out["displacement"] = (float(dy), float(dx))
  if max(abs(dy), abs(dx)) >= MIN_TRAVEL:
    if abs(dx) >= abs(dy):
      out["direction"] = "right" if dx > 0 else "left"
    else:
      out["direction"] = "down" if dy > 0 else "up"
  return out


def analyse_clip(video, expected: dict) -> dict:
  """Detected attributes of a clip against a prompt's (`parse_caption`).

  video: (F, H, W, 3) float in [0, 1] or uint8. Returns
    {"objects": [per expected object: {"colour", "shape", "direction"}
      detected, "expected": {...}, "ok": {"colour", "shape", "direction"}
      bools, plus the measurements of `analyse_object`],
     "colour_pixels": {colour name: object pixels over the clip},
     "all_ok": every attribute of every object matches}."""
  labels = colour_labels(video)
  labels = np.where(despeckle(labels >= 0), labels, -1)
  counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(_PALETTE))
  ranked = [data.COLOUR_NAMES[c] for c in np.argsort(-counts, kind="stable")
            if counts[c] >= MIN_PIXELS]
  n = expected["num_objects"]
  objects = []
  for i in range(n):
    want = {a: expected[a][i] for a in ATTRIBUTES}
    if n == 1:
      colour = ranked[0] if ranked else None
      found = analyse_object(labels >= 0)
      colour_ok = colour == want["colour"]
    else:
      # Each expected colour's own mask; found if among the top two colours.
      index = data.COLOUR_NAMES.index(want["colour"])
      found = analyse_object(despeckle(labels == index))
      colour_ok = want["colour"] in ranked[:2]
      colour = want["colour"] if colour_ok else None
    detected = {"colour": colour, "shape": found.pop("shape"),
                "direction": found.pop("direction")}
    ok = {"colour": colour_ok,
          "shape": detected["shape"] == want["shape"],
          "direction": detected["direction"] == want["direction"]}
    objects.append({**detected, "expected": want, "ok": ok, **found})
  return {"objects": objects,
          "colour_pixels": {data.COLOUR_NAMES[c]: int(counts[c])
                            for c in range(len(counts)) if counts[c]},
          "all_ok": all(all(o["ok"].values()) for o in objects)}


def combination(expected: dict) -> str:
  """"colour shape direction" of each object of a `parse_caption` dict,
  joined by " and " (the background is not part of it)."""
  return " and ".join(
      f"{expected['colour'][i]} {expected['shape'][i]} "
      f"{expected['direction'][i]}" for i in range(expected["num_objects"]))


def agreement(videos, captions: Sequence[str], *,
              return_clips: bool = False) -> dict:
  """Prompt agreement of clips with their captions.

  videos: (N, F, H, W, 3) float in [0, 1] or uint8. Returns {"n": N,
  "colour"/"shape"/"direction": fraction of objects whose attribute matches,
  "all": fraction of clips whose every attribute of every object matches,
  "failures": indices of the clips that do not, "by_combination": {the
  caption's (colour shape direction) combination(s), e.g. "red circle left"
  or "red circle left and blue square up": {"n": clips, "all": their
  all-attributes rate}}}, plus "clips" (each clip's `analyse_clip`) when
  return_clips."""
  if len(videos) != len(captions):
    raise ValueError(f"{len(videos)} videos but {len(captions)} captions")
  expected = [data.parse_caption(c) for c in captions]
  clips = [analyse_clip(v, e) for v, e in zip(videos, expected)]
  objects = [o for clip in clips for o in clip["objects"]]
  out = {"n": len(clips)}
  for attribute in ATTRIBUTES:
    out[attribute] = float(np.mean([o["ok"][attribute] for o in objects]))
  out["all"] = float(np.mean([clip["all_ok"] for clip in clips]))
  out["failures"] = [i for i, clip in enumerate(clips) if not clip["all_ok"]]
  groups = {}
  for e, clip in zip(expected, clips):
    groups.setdefault(combination(e), []).append(clip["all_ok"])
  out["by_combination"] = {k: {"n": len(v), "all": float(np.mean(v))}
                           for k, v in sorted(groups.items())}
  if return_clips:
    out["clips"] = clips
  return out


# Measuring a generative model -----------------------------------------------

GenerateFn = Callable[[list[str], int], np.ndarray]
_render = jax.jit(data.render, static_argnums=1)
DEFAULT_SPEC = data.VideoSpec()


def prompt_captions(n: int, *, split: str = "held_out", seed: int = 0,
                    spec: data.VideoSpec = DEFAULT_SPEC) -> list[str]:
  """n captions of a split, deterministic per seed."""
  scenes = data.sample_scenes(jax.random.key(seed), n, split=split, spec=spec)
  return [data.caption_text(scenes, i) for i in range(n)]


def ground_truth_generate(spec: data.VideoSpec = DEFAULT_SPEC) -> GenerateFn:
  """A generate_fn that renders the captions' scenes: the perfect model.

  Measures the analyser itself (and the pipeline around it)."""
  def generate(captions, seed):
    scenes = data.scenes_from_captions(list(captions), jax.random.key(seed),
                                       spec=spec)
    return np.asarray(_render(scenes, spec))

  return generate


def measure_agreement(generate_fn: GenerateFn, *, n: int,
                      split: str = "held_out", seed: int = 0,
                      batch: int | None = None,
                      spec: data.VideoSpec = DEFAULT_SPEC) -> dict:
  """Agreement of generate_fn(captions, seed) -> (N, F, H, W, 3) videos

  with n captions of a split (seed draws the captions; batch b calls
  generate_fn with seed + b). Returns `agreement`'s dict plus "split",
  "seed", "captions"."""
  captions = prompt_captions(n, split=split, seed=seed, spec=spec)
  batch = batch or n
  videos = [np.asarray(generate_fn(captions[i:i + batch], seed + b))
            for b, i in enumerate(range(0, n, batch))]
  videos = np.concatenate(videos, axis=0)
  if videos.shape[0] != n or videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f"generate_fn must return (N, F, H, W, 3) videos for "
                     f"{n=} captions, got {videos.shape}")
  result = agreement(videos, captions)
  return {**result, "split": split, "seed": seed, "captions": captions}


def check_agreement(generate_fn: GenerateFn, *, n: int, min_rate: float,
                    split: str = "held_out", seed: int = 0,
                    batch: int | None = None,
                    spec: data.VideoSpec = DEFAULT_SPEC) -> dict:
  """measure_agreement, raising AssertionError when the all-attributes rate

  is below min_rate (a CI check at small n). Returns the measurement."""
  result = measure_agreement(generate_fn, n=n, split=split, seed=seed,
                             batch=batch, spec=spec)
  if result["all"] < min_rate:
    failed = [result["captions"][i] for i in result["failures"]]
    raise AssertionError(
        f"prompt agreement {result['all']:.3f} < {min_rate=} on {n} {split} "
        f"captions (colour {result['colour']:.3f}, shape "
        f"{result['shape']:.3f}, direction {result['direction']:.3f}); "
        f"by combination: {result['by_combination']}; failed: {failed}")
  return result

"""Video files: decoded videos -> 8-bit frames -> H.264 MP4, atomically.

  video = pipe("a cat baking a cake")           # (1, 3, T, H, W) in [-1, 1]
  astraea_jax.video.write_mp4("cat.mp4", video, fps=16)

The encoder is the ffmpeg binary that the `imageio-ffmpeg` wheel ships
(nothing else to install), fed raw RGB frames on its standard input: codec
libx264, pixel format yuv420p (what players expect), 16 fps by default
(Wan2.1 samples at 16 fps). ffmpeg is started without a pre-exec hook, so
no Python runs between fork and exec in this multithreaded (JAX) process.
The file appears only when complete: ffmpeg writes a hidden temporary file
in the same folder, renamed into place at the end (a failure or an
interrupt leaves nothing under the name). The file's metadata comment says
astraea-jax wrote it (how `outputs.check_destination` recognises an earlier
output that --overwrite may replace).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import uuid

import numpy as np

from astraea_jax import outputs

WAN_FPS = 16
# x264 constant rate factor: 0 = lossless ... 51 = worst; 10 is imageio's
# "quality 8" (visually lossless for natural video).
DEFAULT_CRF = 10


def to_frames(video) -> np.ndarray:
  """A video in [-1, 1] -> (T, H, W, 3) uint8 frames.

  video: (3, T, H, W) or (1, 3, T, H, W) float (what `WanVAE.decode` and
  `WanPipeline` return), or (T, H, W, 3) uint8 frames (returned as is).
  Values map as round((x + 1) * 127.5), clipped to [0, 255].
  """
  video = np.asarray(video)
  if video.dtype == np.uint8:
    if video.ndim != 4 or video.shape[-1] != 3:
      raise ValueError(f"uint8 frames must be (T, H, W, 3); got {video.shape}")
    return video
  if video.ndim == 5:
    if video.shape[0] != 1:
      raise ValueError(f"{video.shape=}: write one video at a time "
                       "(index the batch axis)")
    video = video[0]
  if video.ndim != 4 or video.shape[0] != 3:
    raise ValueError(f"{video.shape=} must be (3, T, H, W) or (1, 3, T, H, W)"
                     " in [-1, 1], or (T, H, W, 3) uint8")
  if not np.isfinite(video).all():
    raise ValueError("the video has NaN or infinite values")
  frames = np.clip(np.round((video.astype(np.float32) + 1) * 127.5), 0, 255)
  return np.ascontiguousarray(frames.astype(np.uint8).transpose(1, 2, 3, 0))


def ffmpeg_executable() -> str:
  """The ffmpeg binary of the imageio-ffmpeg wheel (or IMAGEIO_FFMPEG_EXE)."""
  try:
    import imageio_ffmpeg  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("writing MP4 needs imageio-ffmpeg (it ships ffmpeg): "
                      "pip install imageio-ffmpeg") from e
  return imageio_ffmpeg.get_ffmpeg_exe()


def write_mp4(path, video, *, fps: float = WAN_FPS, crf: int = DEFAULT_CRF,
              overwrite: bool = True) -> pathlib.Path:
  """Writes `video` (see `to_frames`) as an H.264 MP4, atomically.

  crf: x264 constant rate factor (lower = closer to the frames, larger
  file). Height and width must be even (yuv420p halves the chroma planes).
  """
  path = pathlib.Path(path)
  frames = to_frames(video)
  t, h, w, _ = frames.shape
  if h % 2 or w % 2:
    raise ValueError(f"frame size {w}x{h} must be even in both dimensions "
                     "for yuv420p H.264")
  if not fps > 0:
    raise ValueError(f"{fps=} must be positive")
  if not 0 <= crf <= 51:
    raise ValueError(f"{crf=} must lie in [0, 51]")
  if not overwrite and path.exists():
    raise FileExistsError(f"{path} already exists; pass --overwrite "
                          "(overwrite=True) to replace it")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
  command = [
      ffmpeg_executable(), "-y", "-loglevel", "error",
      "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
      "-framerate", f"{fps:g}", "-i", "pipe:0", "-an", "-c:v", "libx264",
      "-pix_fmt", "yuv420p", "-crf", str(int(crf)),
      "-metadata", f"comment={outputs.VIDEO_COMMENT}",
      "-movflags", "+faststart", "-f", "mp4", str(tmp)]
  try:
    result = subprocess.run(command, input=frames.tobytes(),
                            capture_output=True, check=False)
    if result.returncode != 0:
      raise RuntimeError(
          f"ffmpeg could not write {path} ({t} frames of {w}x{h}), exit "
          f"{result.returncode}: {result.stderr.decode(errors='replace')}")
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path

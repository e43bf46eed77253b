"""What the commands write, and the rule that keeps everything else safe.

Every command that writes (convert, generate, demo, search, eval,
train-demo) calls `check_destination` for each of its outputs before it
reads a byte of its inputs, and writes through `atomic_folder` /
`atomic_file` (a hidden temporary sibling, renamed into place when
complete: an error or an interrupt leaves nothing under the name).

The rule:
  * a destination that is, contains, or lies inside any of the command's
    sources is refused, with or without --overwrite;
  * an absent destination (or an empty folder) is written;
  * an existing one is replaced only with --overwrite, and only when it is
    an earlier astraea-jax output: a folder that carries the `MARKER` file
    that `atomic_folder` writes (or, for outputs of earlier versions, a
    converted checkpoint's manifest/config), an MP4 whose metadata says
    astraea-jax wrote it, a latents file with our safetensors metadata.
    Anything else (a file where a folder goes, a folder of the user's, a
    video from elsewhere) is refused with a message that says what it is.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import uuid
from typing import Iterable

MARKER = ".astraea-output.json"
WRITER = "astraea-jax"
# MP4 metadata comment of our videos (video.write_mp4) and the key/value of
# our safetensors files' metadata: how a single file says who wrote it.
VIDEO_COMMENT = f"written by {WRITER}"
SAFETENSORS_METADATA = {"written_by": WRITER}


class OutputRefusedError(ValueError):
  """A destination that the rule above does not let a command write."""


def _resolve(path) -> pathlib.Path:
  return pathlib.Path(path).expanduser().resolve()


def overlap(dst, src) -> str | None:
  """How `dst` overlaps the source `src` ("is", "lies inside",
  "contains"), or None. Symbolic links are followed on both sides."""
  dst, src = _resolve(dst), _resolve(src)
  if dst == src:
    return "is"
  if src in dst.parents:
    return "lies inside"
  if dst in src.parents:
    return "contains"
  return None


# Who wrote a folder or a file -------------------------------------------------


def _read_json(path) -> dict | None:
  try:
    doc = json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError):
    return None
  return doc if isinstance(doc, dict) else None


def _legacy_own_folder(folder: pathlib.Path) -> bool:
  """Outputs of versions that wrote no MARKER, by their signature files: a
  converted whole model (manifest format "astraea-jax/..."), a converted
  single model (our config.json beside an orbax params/), exported demo
  weights, and the folders of demo, search, eval and train-demo."""
  manifest = _read_json(folder / "manifest.json")
  if manifest and str(manifest.get("format", "")).startswith(WRITER + "/"):
    return True
  has = lambda *names: all((folder / n).exists() for n in names)
  if has("config.json", "params/_CHECKPOINT_METADATA"):
    return True
  if has("config.json", "demo.safetensors"):
    return True
  report = _read_json(folder / "report.json")
  if report and str(report.get("model", "")).startswith("astraea demo model"):
    return True
  return has("search_state.json") or has("run.json", "checkpoints") or bool(
      (_read_json(folder / "eval.json") or {}).get("benchmark"))


def is_own_folder(folder) -> bool:
  folder = pathlib.Path(folder)
  marker = _read_json(folder / MARKER)
  if marker is not None:
    return marker.get("written_by") == WRITER
  return _legacy_own_folder(folder)


def _head(path, size=1 << 16) -> bytes:
  with open(path, "rb") as f:
    return f.read(size)


def is_own_file(path) -> bool:
  """An MP4 with our metadata comment (the `moov` atom sits at the front:
  write_mp4 asks ffmpeg for +faststart), or a safetensors file with our
  metadata."""
  path = pathlib.Path(path)
  try:
    head = _head(path)
  except OSError:
    return False
  if path.suffix.lower() == ".mp4":
    return VIDEO_COMMENT.encode() in head
  if path.suffix.lower() == ".safetensors" and len(head) >= 8:
    n = int.from_bytes(head[:8], "little")
    try:
      header = json.loads(_head(path, 8 + n)[8:])
    except (OSError, ValueError):
      return False
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return meta.get("written_by") == WRITER
  if path.suffix.lower() == ".json":
    doc = _read_json(path)
    return bool(doc) and doc.get("written_by") == WRITER
  return False


# The check ------------------------------------------------------------------


def check_destination(dst, *, flag: str, sources: Iterable = (),
                      overwrite: bool = False, kind: str = "folder",
                      overwrite_flag: str | None = "--overwrite"):
  """Raises OutputRefusedError unless the command may write `dst`.

  flag: how the user named dst (e.g. "DST", "--out"), for the message.
  sources: (flag, path) pairs of everything the command reads.
  kind: "folder" or "file" (what the command writes at dst).
  overwrite_flag: the option that allows replacing an earlier output
    (None: the command never replaces one).
  """
  if kind not in ("folder", "file"):
    raise ValueError(f"{kind=} must be 'folder' or 'file'")
  path = pathlib.Path(dst)
  for src_flag, src in sources:
    if src is None:
      continue
    how = overlap(path, src)
    if how is not None:
      raise OutputRefusedError(
          f"{flag} {dst} {how} the input {src_flag} {src}: astraea never "
          "writes over, into or around what it reads; choose an output "
          "outside it")
  parent = path.expanduser().absolute().parent
  for p in (parent, *parent.parents):
    if p.exists():
      if not p.is_dir():
        raise OutputRefusedError(f"{flag} {dst}: {p} is a file, not a folder")
      break
  if not path.exists() and not path.is_symlink():
    return
  if kind == "folder":
    if not path.is_dir():
      raise OutputRefusedError(
          f"{flag} {dst} is a file; the output is a folder: choose a new "
          "name (astraea never replaces a file with a folder)")
    if not any(path.iterdir()):
      return  # an empty folder holds nothing to lose
    own = is_own_folder(path)
  else:
    if path.is_dir():
      raise OutputRefusedError(
          f"{flag} {dst} is a folder; the output is a file: choose a new "
          "name")
    own = is_own_file(path)
  if not own:
    what = "folder" if kind == "folder" else "file"
    raise OutputRefusedError(
        f"{flag} {dst} exists and is not an astraea-jax output (a {what} "
        "astraea did not write): astraea never replaces it; choose a new "
        "name, or move it away yourself")
  if not overwrite:
    hint = ("choose a new name" if not overwrite_flag
            else f"pass {overwrite_flag} to replace it"
            if overwrite_flag == "--overwrite" else f"pass {overwrite_flag}")
    raise OutputRefusedError(
        f"{flag} {dst} already exists (an earlier astraea-jax output); "
        f"{hint}")


# Atomic writes ----------------------------------------------------------------


def _marker(command: str | None) -> str:
  return json.dumps({"written_by": WRITER, "command": command}) + "\n"


@contextlib.contextmanager
def atomic_folder(dst, *, overwrite=False, command: str | None = None):
  """Yields a temporary folder that becomes `dst` when the block succeeds.

  The folder gets the MARKER file (so that a later --overwrite may replace
  it). An existing `dst` (an empty folder, or with overwrite=True a folder
  the caller checked with `check_destination`) is replaced only after the
  new one is complete.
  """
  dst = pathlib.Path(dst).absolute()
  if dst.exists() and not overwrite and not (
      dst.is_dir() and not any(dst.iterdir())):
    raise OutputRefusedError(
        f"{dst} already exists; pass --overwrite (overwrite=True) to replace")
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    yield tmp
    (tmp / MARKER).write_text(_marker(command))
    if dst.exists():
      old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(dst, old)
      os.rename(tmp, dst)
      shutil.rmtree(old)
    else:
      os.rename(tmp, dst)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


def mark_folder(folder, *, command: str | None = None):
  """Marks a folder that a command fills file by file (search, eval,
  train-demo) as an astraea-jax output."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  if not (folder / MARKER).exists():
    write_bytes(folder / MARKER, _marker(command).encode())


def write_bytes(path, blob: bytes, *, durable: bool = False) -> pathlib.Path:
  """Atomic write (temporary name, then rename); permissions per umask.

  durable: fsync the data before the rename (checkpoints that a kill or a
  power cut must leave either old or new, never empty)."""
  path = pathlib.Path(path)
  tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "wb") as f:
      f.write(blob)
      if durable:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def write_text(path, text: str, *, durable: bool = False) -> pathlib.Path:
  return write_bytes(path, text.encode(), durable=durable)


def write_json(path, doc, *, indent: int | None = 2,
               durable: bool = False) -> pathlib.Path:
  return write_text(path, json.dumps(doc, indent=indent) + "\n",
                    durable=durable)


def write_figure(path, fig, **savefig) -> pathlib.Path:
  """A matplotlib figure as PNG, written atomically (write_bytes);
  savefig: its options (dpi, bbox_inches, ...)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **savefig)
  return write_bytes(path, buf.getvalue())

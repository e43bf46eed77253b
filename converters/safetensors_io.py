"""A small, strict safetensors reader/writer on numpy (bfloat16 included).

The format: 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"?},
then the raw little-endian tensor bytes. Tensors are memory-mapped, so a
converter streams them one at a time; every offset is checked against the
file size first, so a truncated or corrupt file fails with a clear error
instead of a crash or silent garbage.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
  """A safetensors file is corrupt, truncated or not safetensors at all."""


class SafetensorsFile:
  """Read-only view of one .safetensors file; tensors are memory-mapped."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise SafetensorsError(f"{self.path}: file too short ({size} bytes) "
                               "to be safetensors")
      n = int.from_bytes(raw, "little")
      if n > min(size - 8, _MAX_HEADER):
        raise SafetensorsError(
            f"{self.path}: header length {n} exceeds the file size {size}: "
            "not a safetensors file, or truncated")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{self.path}: corrupt header ({e})") from e
    if not isinstance(header, dict):
      raise SafetensorsError(f"{self.path}: header is not a JSON object")
    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + n
    data_size = size - self._data_start
    self.entries = {}
    for name, info in header.items():
      try:
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
      except (KeyError, TypeError, ValueError) as e:
        raise SafetensorsError(
            f"{self.path}: bad header entry for tensor {name!r}: {info!r}") from e
      nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      if end - begin != nbytes or begin < 0:
        raise SafetensorsError(
            f"{self.path}: tensor {name!r} has {end - begin} bytes but shape "
            f"{shape} x {dtype} needs {nbytes}")
      if end > data_size:
        raise SafetensorsError(
            f"{self.path}: tensor {name!r} ends at byte {end} but the data "
            f"section has {data_size} bytes: the file is truncated")
      self.entries[name] = (dtype, shape, begin)
    self._mmap = None

  def keys(self):
    return list(self.entries)

  def shape(self, name):
    return self.entries[name][1]

  def get(self, name) -> np.ndarray:
    """The tensor as a read-only array backed by the file (no copy)."""
    dtype, shape, begin = self.entries[name]
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    start = self._data_start + begin
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(self._mmap, dtype=dtype, count=count,
                         offset=start).reshape(shape)


def save_file(tensors: dict[str, np.ndarray], path, metadata=None):
  """Write tensors as safetensors atomically (temp file, then rename)."""
  path = pathlib.Path(path)
  header, offset = {}, 0
  arrays = {}
  for name, arr in tensors.items():
    arr = np.ascontiguousarray(arr)
    if arr.dtype not in _NAMES:
      raise ValueError(f"tensor {name!r}: unsupported dtype {arr.dtype}")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    arrays[name] = arr
    offset += arr.nbytes
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(len(blob).to_bytes(8, "little"))
      f.write(blob)
      for arr in arrays.values():
        f.write(arr.tobytes())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise

"""What every converter shares: errors, checkpoint folders, flat dicts."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import numpy as np
import tqdm
from flax import nnx

from converters.safetensors_io import SafetensorsError, SafetensorsFile


class CheckpointError(ValueError):
  """A checkpoint cannot be converted; the message says why."""


class KeyMismatch(CheckpointError):
  """Checkpoint keys do not match the model; lists every offending key."""

  def __init__(self, *, missing, unexpected, misshapen, layout, limit=50):
    self.missing, self.unexpected, self.misshapen = (missing, unexpected,
                                                     misshapen)
    parts = [f"checkpoint does not match the model ({layout} layout):"]
    for title, names in (("missing keys", missing),
                         ("unexpected keys", unexpected),
                         ("wrong shapes", misshapen)):
      if names:
        shown = "\n    ".join(names[:limit])
        more = (f"\n    ... and {len(names) - limit} more"
                if len(names) > limit else "")
        parts.append(f"  {len(names)} {title}:\n    {shown}{more}")
    super().__init__("\n".join(parts))


class Source:
  """Tensors of one checkpoint spread over one or more safetensors files."""

  def __init__(self, files: list[SafetensorsFile]):
    self._where = {}
    self._arrays = None
    for f in files:
      for k in f.keys():
        if k in self._where:
          raise CheckpointError(
              f"tensor {k!r} appears in both {self._where[k].path} and "
              f"{f.path}")
        self._where[k] = f

  @classmethod
  def from_arrays(cls, arrays: dict):
    """A Source over in-memory arrays (tests, other frameworks' weights)."""
    source = cls([])
    source._arrays = dict(arrays)
    return source

  def keys(self):
    return list(self._arrays if self._arrays is not None else self._where)

  def shape(self, key):
    if self._arrays is not None:
      return tuple(np.shape(self._arrays[key]))
    return self._where[key].shape(key)

  def get(self, key):
    if self._arrays is not None:
      return np.asarray(self._arrays[key])
    return self._where[key].get(key)


class MeteredSource:
  """A tensor source that advances a progress bar by each tensor's bytes
  (the whole-model converters meter one bar over all components)."""

  def __init__(self, source, bar):
    self._source, self._bar = source, bar

  def keys(self):
    return self._source.keys()

  def shape(self, key):
    return self._source.shape(key)

  def get(self, key):
    value = self._source.get(key)
    self._bar.update(value.nbytes)
    return value


def pth_refused(path) -> CheckpointError:
  return CheckpointError(
      f"{path} is a PyTorch pickle; loading a pickle can execute code, so it "
      "is refused by default. Pass --allow-pth (Python: allow_pth=True) to "
      "read it with torch.load(weights_only=True), or convert it to "
      "safetensors first.")


class PthSource:
  """The tensors of a PyTorch `.pth` state dict, read lazily.

  Refused unless allow_pth (unpickling can run code). Then needs torch and
  loads with weights_only=True (tensors and containers only) and
  mmap=True, so tensors are paged in one at a time as they are read.
  """

  def __init__(self, path, *, allow_pth: bool = False):
    self.path = pathlib.Path(path)
    if not allow_pth:
      raise pth_refused(self.path)
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise CheckpointError(
          f"{self.path}: reading a .pth needs PyTorch (pip install torch), "
          "or convert the file to safetensors where torch is installed") from e
    self._torch = torch
    try:
      try:
        obj = torch.load(self.path, map_location="cpu", weights_only=True,
                         mmap=True)
      except RuntimeError as e:  # legacy (non-zip) files cannot be mapped
        if "mmap" not in str(e):
          raise
        obj = torch.load(self.path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds
      raise CheckpointError(f"{self.path}: torch.load(weights_only=True) "
                            f"failed: {type(e).__name__}: {e}") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"),
                                               Mapping):
      obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor)
        for k, v in obj.items()):
      raise CheckpointError(f"{self.path}: not a state dict of tensors "
                            f"(got {type(obj).__name__})")
    self._tensors = dict(obj)

  def keys(self):
    return list(self._tensors)

  def shape(self, key):
    return tuple(self._tensors[key].shape)

  def get(self, key) -> np.ndarray:
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    tensor = self._tensors[key].detach().contiguous()
    if tensor.dtype == self._torch.bfloat16:  # numpy has no bfloat16: bits
      return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def as_source(tensors):
  """A Source over a mapping of arrays; anything with keys/shape/get as is."""
  if isinstance(tensors, Mapping):
    return Source.from_arrays(tensors)
  if all(hasattr(tensors, a) for a in ("keys", "shape", "get")):
    return tensors  # SafetensorsFile, Source, ...
  raise TypeError(f"expected a mapping of arrays or a tensor source, got "
                  f"{type(tensors).__name__}")


def open_safetensors_folder(folder, stem: str) -> Source:
  """`{stem}.safetensors`, or the shards listed by `{stem}.safetensors.index.json`."""
  folder = pathlib.Path(folder)
  single = folder / f"{stem}.safetensors"
  index = folder / f"{stem}.safetensors.index.json"
  try:
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
      shard_names = sorted(set(weight_map.values()))
      absent = [n for n in shard_names if not (folder / n).exists()]
      if absent:
        raise CheckpointError(f"{index} lists shards that are absent: {absent}")
      source = Source([SafetensorsFile(folder / n) for n in shard_names])
      stray = sorted(set(source.keys()) ^ set(weight_map))
      if stray:
        raise CheckpointError(
            f"{index}: the index and the shards disagree on keys: {stray[:20]}")
      return source
    if single.exists():
      return Source([SafetensorsFile(single)])
  except SafetensorsError as e:
    raise CheckpointError(str(e)) from e
  found = sorted(p.name for p in folder.iterdir())
  raise CheckpointError(
      f"{folder}: no {single.name} nor {index.name}; found {found}")


def weights_file(folder, name: str, what: str) -> pathlib.Path:
  """folder/name, a checkpoint folder's weights file; when it is absent,
  CheckpointError saying what the folder should be and what it holds."""
  folder = pathlib.Path(folder)
  weights = folder / name
  if not weights.exists():
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(f"{folder}: no {name} ({what}); found {found}")
  return weights


def read_json(path) -> dict:
  """A checkpoint's JSON file (config.json, a shard index, ...), parsed;
  CheckpointError naming the file when it cannot be read or parsed."""
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read it as JSON ({e})") from e


def flatten_dict(d, prefix=()):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten_dict(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def unflatten_dict(flat):
  out = {}
  for path, value in flat.items():
    d = out
    for p in path[:-1]:
      d = d.setdefault(p, {})
    d[path[-1]] = value
  return out


def to_ours(array: np.ndarray, transform: str) -> np.ndarray:
  """A PyTorch tensor in our layout: "linear" = (out, in) weight to our
  (in, out) kernel; "patch" = Conv3d weight (dim, C, pt, ph, pw) with
  kernel == stride to the (pt*ph*pw*C, dim) patch matmul; else as is."""
  if transform == "linear":
    return array.T
  if transform == "patch":
    return array.transpose(2, 3, 4, 1, 0).reshape(-1, array.shape[0])
  return array


def checkpoint_shape(our_shape, transform: str, patch_shape=None) -> tuple:
  """The checkpoint tensor shape that `to_ours(tensor, transform)` turns
  into `our_shape`; patch_shape: the Conv3d weight's, for "patch"."""
  if transform == "linear":
    return tuple(reversed(our_shape))
  if transform == "patch":
    return tuple(patch_shape)
  return tuple(our_shape)


def param_shapes(abstract_module) -> dict[tuple, tuple]:
  """Our parameter paths -> shapes, by abstract evaluation (no memory)."""
  state = nnx.state(abstract_module, nnx.Param)
  return {path: tuple(v.shape)
          for path, v in flatten_dict(nnx.to_pure_dict(state)).items()}


def checkpoint_shapes(params: dict, top_level: dict, block_keys: dict,
                      num_layers: int, stacks: dict,
                      patch_shape=None) -> dict:
  """{checkpoint key: shape} of a model with {our path: shape} `params`.

  top_level: {key: (our path, transform)}; block_keys: {suffix: (our path
  in a layer, transform)}; stacks: {key prefix: our stacked layers' path
  part}, giving `{prefix}.{i}.{suffix}` for every layer i.
  """
  shapes = {key: checkpoint_shape(params[path], transform, patch_shape)
            for key, (path, transform) in top_level.items()}
  for prefix, stack in stacks.items():
    for i in range(num_layers):
      for suffix, (path, transform) in block_keys.items():
        shapes[f"{prefix}.{i}.{suffix}"] = checkpoint_shape(
            params[(stack,) + path][1:], transform, patch_shape)
  return shapes


def locate_key(key: str, top_level: dict, block_re, block_keys: dict,
               num_layers: int):
  """A checkpoint key -> (our path, layer index or None, transform), or
  None where the model has no such parameter.

  top_level: {key: (our path, transform)} outside the stacked layers;
  block_re: matches a layer's key, with the groups `layer` (its index),
  `suffix` (a key of block_keys: {suffix: (our path in a layer,
  transform)}) and, where there are several stacks, `stack` (our path's
  first part; else "blocks").
  """
  if key in top_level:
    path, transform = top_level[key]
    return path, None, transform
  m = block_re.match(key)
  if m and m["suffix"] in block_keys and int(m["layer"]) < num_layers:
    path, transform = block_keys[m["suffix"]]
    stack = m.groupdict().get("stack", "blocks")
    return (stack,) + path, int(m["layer"]), transform
  return None


def rename_key(key: str, top_level: dict, block_re, block: dict,
               block_prefix: str) -> str | None:
  """`key` in another layout's names, or None where it has none: a
  top-level key through top_level {name: other name}; a layer's key
  (block_re groups `layer`, `suffix`) to `{block_prefix}.{layer}.{other
  name of the suffix by block}`."""
  if key in top_level:
    return top_level[key]
  m = block_re.match(key)
  if m and m["suffix"] in block:
    return f"{block_prefix}.{m['layer']}.{block[m['suffix']]}"
  return None


def inverted(names: dict) -> dict:
  """{other name: name} of a one-to-one {name: other name}."""
  return {v: k for k, v in names.items()}


def check_keys(source, expected: dict, *, layout: str, ignored=()):
  """Raises KeyMismatch naming every missing, unexpected (not in `ignored`)
  and misshapen key of `source` against {key: expected shape}."""
  present = set(source.keys())
  missing = sorted(set(expected) - present)
  unexpected = sorted(present - set(expected) - set(ignored))
  misshapen = sorted(
      f"{k}: checkpoint {tuple(source.shape(k))}, expected "
      f"{tuple(expected[k])}"
      for k in present & set(expected)
      if tuple(source.shape(k)) != tuple(expected[k]))
  if missing or unexpected or misshapen:
    raise KeyMismatch(missing=missing, unexpected=unexpected,
                      misshapen=misshapen, layout=layout)


def stream_params(source, keys, shapes: dict, dtype, place, *,
                  progress=False, desc="converting"):
  """Our nested params, filled one checkpoint tensor at a time.

  shapes: {our path: shape} of the preallocated buffers (stacked layers
  share one buffer); place(key, array) -> (path, layer index or None, value
  in our layout). Peak memory: the buffers plus one tensor.
  """
  buffers = {path: np.empty(shape, dtype) for path, shape in shapes.items()}
  if progress:
    keys = tqdm.tqdm(keys, desc=desc, unit="tensor")
  for key in keys:
    path, layer, value = place(key, source.get(key))
    if layer is None:
      buffers[path][...] = value.astype(dtype)
    else:
      buffers[path][layer] = value.astype(dtype)
  return unflatten_dict(buffers)

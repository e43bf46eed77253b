"""Converted checkpoints on disk: a folder with `config.json` + `params/`,
and whole-model folders: `manifest.json` + one such folder per component.

`params/` is an orbax checkpoint of the nested dict of parameter arrays
(our layout). Writes are atomic (`outputs.atomic_folder`). Reading a
folder that is not a converted checkpoint (a download that was never
converted, the demo model's weights, a missing folder) or a damaged one
raises CheckpointReadError with one line that says which and what to do.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from astraea_jax import configs, outputs
from astraea_jax import placement as placement_lib
from astraea_jax.models import stdit3, wan
from astraea_jax.models.text import umt5
from astraea_jax.vae import opensora_vae, wan22_vae, wan_vae

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# A converted whole-model folder (converters/model_folder.py for Wan2.1,
# converters/opensora_folder.py for OpenSora v1.2): the manifest names the
# model and its component folders.
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "astraea-jax/wan2.1-t2v"
OPENSORA_MANIFEST_FORMAT = "astraea-jax/opensora-v1.2"
MANIFEST_VERSION = 1
# Wan2.2 (converters/model_folder.py): the two-expert A14B models add a
# `transformer_2` component (the low-noise expert) and `boundary_ratio`.
WAN22_MODELS = ("wan2.2-ti2v-5b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b")
WAN_MANIFEST_FORMATS = {model: f"astraea-jax/{model}"
                        for model in ("wan2.1-t2v", *WAN22_MODELS)}
MANIFEST_MODELS = {**{f: m for m, f in WAN_MANIFEST_FORMATS.items()},
                   OPENSORA_MANIFEST_FORMAT: "opensora-v1.2"}
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")


# The config classes a `config.json` can hold, by its "model" tag, and the
# module whose `abstract_model` builds each.
CONFIG_CLASSES = {cls.MODEL: (cls, module) for cls, module in (
    (configs.WanConfig, wan), (configs.STDiT3Config, stdit3),
    (umt5.UMT5Config, umt5), (wan_vae.WanVAEConfig, wan_vae),
    (wan22_vae.Wan22VAEConfig, wan22_vae),
    (opensora_vae.OpenSoraVAEConfig, opensora_vae))}


def config_from_dict(d: dict):
  """Any model config from its `to_dict()` form, by its "model" tag
  (a dict without one is a Wan config)."""
  model = d.get("model", "wan")
  if model not in CONFIG_CLASSES:
    raise ValueError(f"unknown model {model!r} in config; expected one of "
                     f"{', '.join(CONFIG_CLASSES)}")
  return CONFIG_CLASSES[model][0].from_dict(d)


class CheckpointReadError(ValueError):
  """A converted checkpoint that cannot be read: damaged, truncated, or not
  a converted checkpoint at all."""


class NotACheckpointError(CheckpointReadError, FileNotFoundError):
  """A path that holds no converted checkpoint."""


def save(dst, config, params: dict, *, overwrite=False,
         metadata: dict | None = None):
  """Writes `config.json` and the orbax `params/` atomically."""
  with outputs.atomic_folder(dst, overwrite=overwrite,
                             command="convert") as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    doc = config.to_dict()
    if metadata:
      doc["metadata"] = metadata
    (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")


def _not_converted(path: pathlib.Path) -> str | None:
  """What a folder that is not a converted checkpoint holds, if known."""
  doc = {}
  try:
    doc = json.loads((path / CONFIG_FILE).read_text())
  except (OSError, ValueError):
    pass
  if not isinstance(doc, dict):
    doc = {}
  if "_class_name" in doc or "_diffusers_version" in doc:
    return (f"a model as published ({doc.get('_class_name', 'diffusers')} "
            "config.json), not converted yet")
  if (path / "transformer").is_dir() or (path / "model_index.json").is_file():
    return "a model download as published, not converted yet"
  if (path / "demo.safetensors").is_file():
    return ("the demo model's weights folder, which only `astraea demo "
            "--weights` and `astraea eval --model demo --demo-weights` read")
  if any(path.glob("*.safetensors")) or any(path.glob("*.pth")):
    return "weights as published, not converted yet"
  return None


def load_config(path):
  """The config of a converted checkpoint folder (CheckpointReadError if
  the folder is not one)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise NotACheckpointError(f"{path}: no such folder")
  if not path.is_dir():
    raise NotACheckpointError(
        f"{path} is a file; a converted checkpoint is a folder (create one "
        "with `astraea convert SRC DST`)")
  what = _not_converted(path)
  if what is not None:
    cure = ("" if "demo" in what else f"; convert it first: `astraea "
            f"convert {path} DST`, then pass DST")
    raise NotACheckpointError(f"{path} is {what}{cure}")
  cfg_file = path / CONFIG_FILE
  if not cfg_file.exists():
    raise NotACheckpointError(
        f"{path} is not a converted astraea-jax checkpoint (no {CONFIG_FILE}); "
        "create one with `astraea convert SRC DST`")
  try:
    doc = json.loads(cfg_file.read_text())
  except ValueError as e:
    raise CheckpointReadError(
        f"{cfg_file} is damaged (not JSON: {e}); convert the model again") \
        from e
  if not isinstance(doc, dict):
    raise CheckpointReadError(f"{cfg_file} is damaged (not a JSON object); "
                              "convert the model again")
  doc.pop("metadata", None)
  try:
    return config_from_dict(doc)
  except (TypeError, ValueError) as e:
    raise CheckpointReadError(
        f"{cfg_file} is not the config of a converted checkpoint ({e}); "
        "convert the model again with `astraea convert SRC DST`") from e


# tensorstore's error texts name the damaged array and file like this.
_TS_ARRAY = re.compile(r'Error reading "([^"/]+)')
_TS_FILE = re.compile(r'local file "([^"]+)"')


def damaged_checkpoint_message(path, error: BaseException) -> str:
  """One line for an orbax/tensorstore read failure: which parameter, which
  file, and the cure (convert again)."""
  text = str(error).split(" [tensorstore_spec=")[0]
  array = _TS_ARRAY.search(text)
  files = _TS_FILE.findall(text)
  parts = ([f"parameter {array.group(1)}"] if array else []) + (
      [f"file {files[-1]}"] if files else [])
  where = f" ({', '.join(parts)})" if parts else ""
  first = text.splitlines()[0] if text else type(error).__name__
  reason = first.rsplit('": ', 1)[-1]  # after the array and file names
  return (f"{path}: the converted checkpoint is damaged or incomplete"
          f"{where}: {reason[:200]}. Convert the model "
          "again: `astraea convert SRC "
          f"{path} --overwrite`")


def _abstract_model(config):
  """The model of a config, with ShapeDtypeStruct leaves."""
  return CONFIG_CLASSES[config.MODEL][1].abstract_model(config)


def load_model(path, *, dtype: str | None = None,
               placement: str = "accelerator"):
  """The ready model (WanDiT, STDiT3, UMT5Encoder, WanVAE, Wan22VAE or
  OpenSoraVAE) from a converted checkpoint folder.

  dtype: optional compute dtype override ("float32" / "bfloat16"); the
  parameters stay in the dtype they were converted to. placement: where
  the parameters live (`astraea_jax.placement`): "accelerator" (default),
  "offload" (host memory, placed per stage by a pipeline) or "cpu".
  """
  placement_lib.check(placement)
  path = pathlib.Path(path).absolute()
  config = load_config(path)
  if dtype is not None:
    config = dataclasses.replace(config, dtype=dtype)
  graphdef, state = nnx.split(_abstract_model(config))
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
      nnx.to_pure_dict(state))
  if not (path / PARAMS_DIR).is_dir():
    raise CheckpointReadError(
        f"{path}: {PARAMS_DIR}/ is missing: the conversion did not finish or "
        "the folder was changed; convert the model again")
  try:
    params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
  except Exception as e:  # orbax/tensorstore errors have no common base
    raise CheckpointReadError(damaged_checkpoint_message(path, e)) from e
  # orbax returns NumPy arrays here: put them on the device once (unless
  # offloaded: a pipeline then places them per stage), or every jitted step
  # copies all parameters host -> device again (about the 6 s by which a
  # 50-step Wan2.1-1.3B run through `astraea generate` trailed the
  # in-process one, #25).
  nnx.replace_by_pure_dict(state, params)
  return placement_lib.park(nnx.merge(graphdef, state), placement)


def params_of(model) -> dict:
  """The nested dict of parameter arrays of a model (what `save` writes)."""
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model,
                                                              nnx.Param)))


# Whole-model folders ----------------------------------------------------------


def read_manifest(path, formats=tuple(MANIFEST_MODELS)) -> dict:
  """The manifest.json of a converted whole-model folder, validated.

  formats: the manifest formats accepted (default: Wan2.1 and OpenSora).
  """
  path = pathlib.Path(path)
  file = path / MANIFEST_FILE
  if not file.is_file():
    hint = (" (it holds a single converted model: use it as the transformer "
            "with --text-embeddings, or convert the whole Wan2.1 folder)"
            if (path / CONFIG_FILE).is_file() else "")
    raise FileNotFoundError(
        f"{path} is not a converted Wan2.1 model folder: no {MANIFEST_FILE}"
        f"{hint}. Create one with `astraea convert SRC DST` on the full "
        "Wan2.1 download (transformer, VAE, text encoder, tokenizer).")
  try:
    manifest = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: invalid JSON ({e})") from e
  if manifest.get("format") not in formats:
    raise ValueError(f"{file}: format={manifest.get('format')!r}, expected "
                     f"{' or '.join(map(repr, formats))}")
  if manifest.get("version") != MANIFEST_VERSION:
    raise ValueError(f"{file}: version={manifest.get('version')!r}; this "
                     f"astraea-jax reads version {MANIFEST_VERSION}")
  components = manifest.get("components", {})
  missing = [c for c in dict.fromkeys([*COMPONENTS, *components])
             if not (path / components.get(c, c)).is_dir()]
  if missing:
    raise FileNotFoundError(f"{path}: the manifest's components {missing} "
                            "are absent; convert the folder again")
  return manifest


def is_model_folder(path) -> bool:
  return (pathlib.Path(path) / MANIFEST_FILE).is_file()


def manifest_model(path) -> str:
  """"wan2.1-t2v", "opensora-v1.2" or a Wan2.2 model (WAN22_MODELS): which
  model a converted whole-model folder holds (after validating its
  manifest)."""
  return MANIFEST_MODELS[read_manifest(path)["format"]]


def component_path(path, manifest: dict, name: str) -> pathlib.Path:
  """The folder of component `name` of a whole-model folder."""
  return pathlib.Path(path) / manifest["components"].get(name, name)

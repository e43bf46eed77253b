"""Converted checkpoints on disk: a folder with `config.json` + `params/`.

`params/` is an orbax checkpoint of the nested dict of parameter arrays
(our layout). Writes are atomic: everything goes into a hidden sibling
folder that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import uuid

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from astraea_jax import configs

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


class CheckpointExistsError(FileExistsError):
  pass


@contextlib.contextmanager
def atomic_folder(dst, *, overwrite=False):
  """Yields a temporary folder that becomes `dst` if the block succeeds."""
  dst = pathlib.Path(dst).absolute()
  if dst.exists() and not overwrite:
    raise CheckpointExistsError(
        f"{dst} already exists; pass --overwrite (overwrite=True) to replace")
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    yield tmp
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


def save(dst, config, params: dict, *, overwrite=False,
         metadata: dict | None = None):
  """Writes `config.json` and the orbax `params/` atomically."""
  with atomic_folder(dst, overwrite=overwrite) as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    doc = config.to_dict()
    if metadata:
      doc["metadata"] = metadata
    (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")


def load_config(path):
  path = pathlib.Path(path)
  cfg_file = path / CONFIG_FILE
  if not cfg_file.exists():
    raise FileNotFoundError(
        f"{path} is not a converted astraea-jax checkpoint (no {CONFIG_FILE}); "
        "create one with `astraea convert SRC DST`")
  doc = json.loads(cfg_file.read_text())
  doc.pop("metadata", None)
  if doc.get("model") == "opensora_vae":
    # pylint: disable-next=g-import-not-at-top
    from astraea_jax.vae.opensora_vae import OpenSoraVAEConfig
    return OpenSoraVAEConfig.from_dict(doc)
  return configs.config_from_dict(doc)


def _abstract_model(config):
  """The model of a config, with ShapeDtypeStruct leaves."""
  # pylint: disable=g-import-not-at-top
  if isinstance(config, configs.WanConfig):
    from astraea_jax.models import wan
    return wan.abstract_model(config)
  if isinstance(config, configs.STDiT3Config):
    from astraea_jax.models import stdit3
    return stdit3.abstract_model(config)
  from astraea_jax.vae import opensora_vae, wan_vae
  if isinstance(config, wan_vae.WanVAEConfig):
    return wan_vae.abstract_model(config)
  if isinstance(config, opensora_vae.OpenSoraVAEConfig):
    return opensora_vae.abstract_model(config)
  from astraea_jax.models.text import umt5
  return umt5.abstract_model(config)


def load_model(path, *, dtype: str | None = None):
  """The ready model (WanDiT, STDiT3, UMT5Encoder, WanVAE or OpenSoraVAE)
  from a converted checkpoint folder.

  dtype: optional compute dtype override ("float32" / "bfloat16"); the
  parameters stay in the dtype they were converted to.
  """
  path = pathlib.Path(path).absolute()
  config = load_config(path)
  if dtype is not None:
    config = dataclasses.replace(config, dtype=dtype)
  graphdef, state = nnx.split(_abstract_model(config))
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
      nnx.to_pure_dict(state))
  params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def params_of(model) -> dict:
  """The nested dict of parameter arrays of a model (what `save` writes)."""
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model,
                                                              nnx.Param)))

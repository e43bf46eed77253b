"""A whole Wan2.1 T2V or Wan2.2 download -> one converted model folder.

(A whole OpenSora v1.2 download is found here too and converted by
converters/opensora_folder.py, which documents its layout.)

  astraea convert Wan2.1-T2V-1.3B/ wan-1.3b/ --allow-pth      # original
  astraea convert Wan2.1-T2V-1.3B-Diffusers/ wan-1.3b/        # diffusers
  astraea convert Wan-AI/Wan2.1-T2V-1.3B-Diffusers wan-1.3b/  # hub repo id
  astraea convert Wan2.2-T2V-A14B/ wan22-t2v/ --allow-pth     # two experts

Wan2.2 (which model: from the files, `MODELS`):
  TI2V-5B    one DiT over the Wan2.2 VAE: original `Wan2.2_VAE.pth` beside
             the DiT; diffusers `expand_timesteps` / a VAE with
             `is_residual`.
  T2V-A14B,  two experts over the Wan2.1 VAE: original high_noise_model/
  I2V-A14B   and low_noise_model/ (each config.json + safetensors shards);
             diffusers transformer/ (high noise) + transformer_2/ (low
             noise) with `boundary_ratio` in model_index.json. Converted
             to DST/transformer/ (high noise) + DST/transformer_2/ (low
             noise); manifest.json records `boundary_ratio` (the original
             folders do not carry it: the wan22 configs' values are used)
             and `experts`. I2V: in_dim 36, `WanImageToVideoPipeline`.

Layouts (detected from the files):
  original   config.json (`dim`, ...) + diffusion_pytorch_model*.safetensors
             (transformer), Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth
             (umT5 encoder, the original `T5Encoder` state dict) and
             google/umt5-xxl/ (tokenizer files). The two .pth files are
             PyTorch pickles: read only with allow_pth (--allow-pth), with
             `torch.load(weights_only=True, mmap=True)`; a `.safetensors`
             file of the same name and keys is read without torch.
  diffusers  model_index.json, transformer/, vae/, text_encoder/,
             tokenizer/ (and scheduler/, not needed: the sampler is ours).

The output, written atomically (nothing appears at DST unless all of it
converted):
  DST/manifest.json      what was converted, from where, text length
  DST/transformer/       config.json + orbax params/  (checkpoint.save)
  DST/vae/               config.json + params/ (float32 parameters)
  DST/text_encoder/      config.json + params/
  DST/tokenizer/         tokenizer.json / spiece.model + their settings
Tensors stream one at a time from memory-mapped files into the converted
buffers, one component at a time, with one progress bar in bytes.

A folder with one model only (original config.json + weights, a diffusers
folder with transformer/ or text_encoder/ alone) is not a whole model:
`astraea convert` converts that model alone, as before; so does `--format
wan|diffusers|umt5` on a whole folder.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re

from astraea_jax import checkpoint
from astraea_jax.models.text import tokenizer as tokenizer_lib
from astraea_jax.models.text.umt5 import UMT5Config
from astraea_jax.vae.wan22_vae import Wan22VAEConfig
from converters import manifest as manifest_lib
from converters import opensora_folder
from converters import umt5 as umt5_converter
from converters import wan as wan_converter
from converters import wan_vae as vae_converter
from converters.common import (CheckpointError, MeteredSource, PthSource,
                               open_safetensors_folder, pth_refused,
                               read_json)
from converters.safetensors_io import SafetensorsError, SafetensorsFile

# Names in the original Wan2.1 release (Wan-AI/Wan2.1-T2V-1.3B and -14B).
ORIGINAL_VAE = "Wan2.1_VAE"
# ... and in the Wan2.2 releases (Wan-AI/Wan2.2-TI2V-5B, -T2V-A14B, -I2V-A14B).
WAN22_VAE = "Wan2.2_VAE"
EXPERT_FOLDERS = ("high_noise_model", "low_noise_model")
# The step at which sampling switches from the high-noise to the low-noise
# expert, as a fraction of the 1000 training timesteps. Reference: `boundary`
# in wan22's wan/configs/wan_t2v_A14B.py and wan_i2v_A14B.py (the diffusers
# folders write the same as model_index.json `boundary_ratio`).
BOUNDARY_RATIOS = {"wan2.2-t2v-a14b": 0.875, "wan2.2-i2v-a14b": 0.900}
PIPELINE_CLASSES = ("WanPipeline", "WanImageToVideoPipeline")
ORIGINAL_TEXT_ENCODER = "models_t5_umt5-xxl-enc-bf16"
ORIGINAL_TOKENIZER = "google/umt5-xxl"
WEIGHT_SUFFIXES = (".safetensors", ".pth")
# The original `T5RelativeEmbedding` default, not stored in the state dict.
ORIGINAL_T5_MAX_DISTANCE = 128
# What a hub download fetches: weights, configs, tokenizer files (not the
# example videos and images of the original repos). .pth only when allowed.
DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "*.model")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclasses.dataclass(frozen=True)
class ModelFolder:
  """Where each component of a whole Wan download lives."""
  layout: str                  # "original" or "diffusers"
  root: pathlib.Path
  vae: pathlib.Path            # vae/ folder, or Wan2.x_VAE.{pth,safetensors}
  text_encoder: pathlib.Path   # text_encoder/ folder, or models_t5_*.{...}
  tokenizer: pathlib.Path      # folder with tokenizer.json / spiece.model
  transformer: pathlib.Path    # folder of config.json + weights (high noise)
  model: str = "wan2.1-t2v"    # a key of checkpoint.WAN_MANIFEST_FORMATS
  transformer_2: pathlib.Path | None = None  # the low-noise expert (A14B)
  boundary_ratio: float | None = None        # where the experts switch

  def pth_files(self) -> list[pathlib.Path]:
    return [p for p in (self.vae, self.text_encoder) if p.suffix == ".pth"]


# Finding the parts ------------------------------------------------------------


def _weights_file(root: pathlib.Path, stem: str):
  for suffix in WEIGHT_SUFFIXES:
    if (root / f"{stem}{suffix}").is_file():
      return root / f"{stem}{suffix}"
  return None


def _has_tokenizer(folder: pathlib.Path) -> bool:
  return any((folder / n).is_file() for n in (
      tokenizer_lib.TOKENIZER_JSON, tokenizer_lib.SENTENCEPIECE_MODEL))


def find_model_folder(src) -> ModelFolder | None:
  """The components of a whole-model folder; None for a single model.

  A whole model: model_index.json, or transformer/ beside another diffusers
  part, or an original transformer beside another original part. Raises
  CheckpointError naming every missing part when one is incomplete. A
  single model (a transformer alone, a text_encoder/ alone) gives None.
  """
  root = pathlib.Path(src)
  if not root.is_dir():
    raise CheckpointError(f"{root} is not a checkpoint folder")
  opensora = opensora_folder.find_opensora_folder(root)
  if opensora is not None:  # OpenSora v1.2 (converters/opensora_folder.py)
    return opensora
  index = root / "model_index.json"
  diffusers_parts = [d for d in ("vae", "text_encoder", "tokenizer")
                     if (root / d).is_dir()]
  if index.is_file() or ((root / "transformer").is_dir() and diffusers_parts):
    return _diffusers_folder(root, index)
  experts = [root / name for name in EXPERT_FOLDERS]
  two = any((e / "config.json").is_file() for e in experts)
  original = {
      "vae": _weights_file(root, WAN22_VAE) or _weights_file(root,
                                                             ORIGINAL_VAE),
      "text_encoder": _weights_file(root, ORIGINAL_TEXT_ENCODER),
      "tokenizer": (root / ORIGINAL_TOKENIZER
                    if (root / ORIGINAL_TOKENIZER).is_dir() else None)}
  if not any(original.values()) and not two:
    return None
  missing = []
  if two:
    missing += [f"no {e.name}/config.json: the two-expert Wan2.2 models "
                f"need {' and '.join(EXPERT_FOLDERS)}/, each config.json + "
                "diffusion_pytorch_model*.safetensors"
                for e in experts if not (e / "config.json").is_file()]
  elif not (root / "config.json").is_file():
    missing.append("no transformer: expected config.json + "
                   "diffusion_pytorch_model*.safetensors (or Wan2.2's "
                   f"{' and '.join(EXPERT_FOLDERS)}/)")
  if original["vae"] is None:
    missing.append(f"no VAE: expected {ORIGINAL_VAE}.pth or {WAN22_VAE}.pth "
                   f"(needs --allow-pth), or the same name .safetensors")
  if original["text_encoder"] is None:
    missing.append(f"no text encoder: expected {ORIGINAL_TEXT_ENCODER}.pth "
                   f"(needs --allow-pth) or {ORIGINAL_TEXT_ENCODER}"
                   ".safetensors")
  if original["tokenizer"] is None or not _has_tokenizer(
      original["tokenizer"]):
    missing.append(f"no tokenizer: expected {ORIGINAL_TOKENIZER}/ with "
                   f"{tokenizer_lib.TOKENIZER_JSON} or "
                   f"{tokenizer_lib.SENTENCEPIECE_MODEL}")
  _raise_missing(root, "original", missing)
  transformer = experts[0] if two else root
  model = _original_model(read_json(transformer / "config.json"), two,
                          original["vae"])
  return ModelFolder("original", root, **original, transformer=transformer,
                     model=model, transformer_2=experts[1] if two else None,
                     boundary_ratio=BOUNDARY_RATIOS.get(model))


def _original_model(cfg: dict, two_experts: bool, vae: pathlib.Path) -> str:
  """Which Wan model an original-layout folder holds: two experts are
  A14B (I2V when the DiT takes more channels than it returns), one DiT
  beside the Wan2.2 VAE is TI2V-5B, else Wan2.1 T2V."""
  if two_experts:
    i2v = cfg.get("in_dim", 16) != cfg.get("out_dim", 16)
    return "wan2.2-i2v-a14b" if i2v else "wan2.2-t2v-a14b"
  if vae.stem == WAN22_VAE or cfg.get("model_type") == "ti2v":
    return "wan2.2-ti2v-5b"
  return "wan2.1-t2v"


def _diffusers_folder(root: pathlib.Path, index: pathlib.Path):
  doc = read_json(index) if index.is_file() else {}
  name = doc.get("_class_name", "WanPipeline")
  if name not in PIPELINE_CLASSES:
    raise CheckpointError(f"{index}: _class_name={name!r}; supported are "
                          f"{PIPELINE_CLASSES}")
  second = doc.get("transformer_2")
  two = isinstance(second, list) and any(second)
  boundary = doc.get("boundary_ratio")
  if name == "WanImageToVideoPipeline" and not two:
    raise CheckpointError(
        f"{index}: a WanImageToVideoPipeline with one transformer is Wan2.1 "
        "image-to-video (CLIP image encoder), which is not supported; "
        "Wan2.2 I2V-A14B (transformer_2) is")
  if two and not isinstance(boundary, (int, float)):
    raise CheckpointError(f"{index}: transformer_2={second} but "
                          f"boundary_ratio={boundary!r}: the step at which "
                          "the experts switch is unknown")
  missing = []
  if not (root / "transformer" / "config.json").is_file():
    missing.append("no transformer: expected transformer/ with config.json "
                   "(diffusers) or config.json + diffusion_pytorch_model"
                   "*.safetensors (original)")
  if two and not (root / "transformer_2" / "config.json").is_file():
    missing.append(f"no transformer_2/ with config.json: model_index.json "
                   f"names a second expert ({second})")
  if not (root / "vae").is_dir():
    missing.append(f"no VAE: expected vae/ (diffusers) or {ORIGINAL_VAE}.pth"
                   " (original, needs --allow-pth)")
  if not (root / "text_encoder" / "config.json").is_file():
    missing.append("no text encoder: expected text_encoder/ with "
                   f"config.json (diffusers) or {ORIGINAL_TEXT_ENCODER}.pth "
                   "(original, needs --allow-pth)")
  if not _has_tokenizer(root / "tokenizer"):
    missing.append(f"no tokenizer: expected tokenizer/ with "
                   f"{tokenizer_lib.TOKENIZER_JSON} or "
                   f"{tokenizer_lib.SENTENCEPIECE_MODEL} (diffusers) or "
                   f"{ORIGINAL_TOKENIZER}/ (original)")
  _raise_missing(root, "diffusers", missing)
  if two:
    model = ("wan2.2-i2v-a14b" if name == "WanImageToVideoPipeline"
             else "wan2.2-t2v-a14b")
  elif doc.get("expand_timesteps") or _residual_vae(root / "vae"):
    model = "wan2.2-ti2v-5b"
  else:
    model = "wan2.1-t2v"
  return ModelFolder(
      "diffusers", root, root / "vae", root / "text_encoder",
      root / "tokenizer", transformer=root / "transformer", model=model,
      transformer_2=root / "transformer_2" if two else None,
      boundary_ratio=float(boundary) if two else None)


def _residual_vae(folder: pathlib.Path) -> bool:
  """Whether a diffusers vae/ holds the Wan2.2 VAE (`is_residual`)."""
  cfg = folder / "config.json"
  return cfg.is_file() and bool(read_json(cfg).get("is_residual"))


def _raise_missing(root, layout, missing):
  manifest_lib.check_complete(
      root, f"Wan model folder ({layout} layout)", missing,
      "to convert one part alone, name it with --format wan|diffusers|umt5")


# Sources ----------------------------------------------------------------------


def open_weights(path, *, allow_pth: bool):
  """A tensor source over one .pth (allow_pth) or .safetensors file."""
  path = pathlib.Path(path)
  if path.suffix == ".pth":
    return PthSource(path, allow_pth=allow_pth)
  try:
    return SafetensorsFile(path)
  except (OSError, SafetensorsError) as e:
    raise CheckpointError(f"{path}: {e}") from e


def _input_bytes(folder: ModelFolder) -> int:
  files = [f for d in (folder.transformer, folder.transformer_2) if d
           for f in d.glob("diffusion_pytorch_model*.safetensors")]
  for part in (folder.vae, folder.text_encoder):
    files += [part] if part.is_file() else [*part.glob("*.safetensors")]
  return sum(f.stat().st_size for f in files)


# Components -------------------------------------------------------------------


def umt5_config_from_original(source, **overrides) -> UMT5Config:
  """The encoder's config from the shapes of an original Wan `T5Encoder`
  state dict (the .pth carries no config; umT5-XXL gives the preset)."""
  keys = set(source.keys())
  needed = ("token_embedding.weight", "blocks.0.attn.q.weight",
            "blocks.0.ffn.fc1.weight",
            "blocks.0.pos_embedding.embedding.weight")
  absent = [k for k in needed if k not in keys]
  if absent:
    hint = (" (one position table shared by all layers: a T5, not umT5)"
            if "pos_embedding.embedding.weight" in keys else "")
    raise CheckpointError(f"not an original Wan umT5 encoder state dict: no "
                          f"{absent}{hint}")
  vocab, d_model = source.shape("token_embedding.weight")
  inner = source.shape("blocks.0.attn.q.weight")[0]
  d_ff = source.shape("blocks.0.ffn.fc1.weight")[0]
  buckets, heads = source.shape("blocks.0.pos_embedding.embedding.weight")
  layers = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
  if inner % heads:
    raise CheckpointError(f"attention width {inner} is not a multiple of "
                          f"{heads} heads")
  return UMT5Config(
      vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff,
      num_layers=layers, num_heads=heads,
      relative_attention_num_buckets=buckets,
      relative_attention_max_distance=ORIGINAL_T5_MAX_DISTANCE, **overrides)


def read_transformer(transformer: pathlib.Path, *, dtype, text_len, bar):
  """One DiT (a Wan2.2 expert is one) from its folder."""
  layout, transformer_dir = wan_converter.detect_layout(transformer)
  cfg = read_json(transformer_dir / "config.json")
  try:
    config = wan_converter.config_from_checkpoint(
        layout, cfg, text_len=text_len, param_dtype=dtype, dtype=dtype)
  except KeyError as e:
    raise CheckpointError(f"{transformer_dir / 'config.json'}: missing field"
                          f" {e.args[0]!r}") from e
  source = open_safetensors_folder(transformer_dir, "diffusion_pytorch_model")
  params = wan_converter.load_params(MeteredSource(source, bar), layout, config)
  return config, params


def read_vae(folder: ModelFolder, *, allow_pth, bar):
  """VAE parameters, float32 (it is small; Wan runs it in float32)."""
  if folder.vae.is_dir():
    source, layout, cfg = vae_converter.open_checkpoint(folder.vae)
  else:
    source = open_weights(folder.vae, allow_pth=allow_pth)
    layout, cfg = vae_converter.detect_layout(source.keys()), None
  config = (vae_converter.config_from_diffusers(cfg) if cfg is not None
            else vae_converter.infer_config(source, layout))
  params = vae_converter.load_params(MeteredSource(source, bar), config, layout)
  return config, params


def read_text_encoder(folder: ModelFolder, *, dtype, allow_pth, bar):
  if folder.text_encoder.is_dir():
    te_dir = umt5_converter.find_folder(folder.text_encoder)
    config = umt5_converter.config_from_checkpoint(
        read_json(te_dir / "config.json"), dtype=dtype, param_dtype=dtype)
    source, layout = open_safetensors_folder(te_dir, "model"), "diffusers"
  else:
    source = open_weights(folder.text_encoder, allow_pth=allow_pth)
    config = umt5_config_from_original(source, dtype=dtype,
                                       param_dtype=dtype)
    layout = "wan"
  metered = MeteredSource(source, bar)
  params = umt5_converter.load_params(metered, config, layout)
  return config, params


# Conversion -------------------------------------------------------------------


def convert(folder: ModelFolder, dst, *, dtype: str = "float32",
            text_len: int | None = None, allow_pth: bool = False,
            overwrite: bool = False, progress: bool = True,
            source_name: str | None = None) -> dict:
  """Converts every component into DST (atomically); returns the manifest.

  dtype: parameter dtype of the transformer and the text encoder (the VAE
  stays float32). text_len: text tokens the DiT pads its context to
  (default: the checkpoint's, 512 for diffusers). An OpenSora v1.2 folder
  (`find_model_folder` found one) converts with `opensora_folder.convert`.
  """
  if isinstance(folder, opensora_folder.OpenSoraFolder):
    if text_len is not None:
      raise CheckpointError("--text-len applies to Wan models; OpenSora's "
                            "STDiT3 sets its own (model_max_length)")
    return opensora_folder.convert(folder, dst, dtype=dtype,
                                   overwrite=overwrite, progress=progress,
                                   source_name=source_name)
  if folder.pth_files() and not allow_pth:  # before converting anything
    raise pth_refused(folder.pth_files()[0])
  rel = lambda p: str(p.relative_to(folder.root)) + ("/" if p.is_dir()
                                                     else "")
  dits = {"transformer": folder.transformer}
  if folder.transformer_2 is not None:
    dits["transformer_2"] = folder.transformer_2
  parts = {part: functools.partial(read_transformer, path, dtype=dtype,
                                   text_len=text_len)
           for part, path in dits.items()}
  parts["vae"] = functools.partial(read_vae, folder, allow_pth=allow_pth)
  parts["text_encoder"] = functools.partial(
      read_text_encoder, folder, dtype=dtype, allow_pth=allow_pth)
  extra = {}
  if folder.transformer_2 is not None:
    extra = {"boundary_ratio": folder.boundary_ratio,
             "experts": {"high_noise": "transformer",
                         "low_noise": "transformer_2"}}
  return manifest_lib.convert_parts(
      dst, parts,
      check_fit=functools.partial(_check_fit, model=folder.model),
      tokenizer=folder.tokenizer, input_bytes=_input_bytes(folder),
      overwrite=overwrite, progress=progress,
      text_len=lambda config: config.text_len,
      manifest_format=checkpoint.WAN_MANIFEST_FORMATS[folder.model],
      source=source_name or str(folder.root), layout=folder.layout,
      converted_from={
          **{part: rel(path) for part, path in dits.items()},
          "vae": rel(folder.vae), "text_encoder": rel(folder.text_encoder),
          "tokenizer": rel(folder.tokenizer)}, extra=extra)


def _check_fit(transformer, vae, text_encoder, transformer_2=None, *,
               model="wan2.1-t2v"):
  """The parts must fit together: the text encoder's width is the DiT's
  text_dim, the VAE's latent channels are the DiT's output channels, the
  VAE is Wan2.2's exactly for TI2V-5B, and two experts share one config."""
  if text_encoder.d_model != transformer.text_dim:
    raise CheckpointError(
        f"the text encoder's width {text_encoder.d_model} != the "
        f"transformer's text_dim={transformer.text_dim}")
  if vae.z_dim != transformer.out_dim:
    raise CheckpointError(f"the VAE's z_dim={vae.z_dim} != the transformer's"
                          f" out_dim={transformer.out_dim}")
  wan22_vae = isinstance(vae, Wan22VAEConfig)
  if wan22_vae != (model == "wan2.2-ti2v-5b"):
    raise CheckpointError(
        f"{model} with the {'Wan2.2' if wan22_vae else 'Wan2.1'} VAE: "
        "TI2V-5B uses the Wan2.2 VAE, the other Wan models the Wan2.1 VAE")
  if transformer_2 is not None and transformer_2 != transformer:
    diff = {k: (v, getattr(transformer_2, k))
            for k, v in vars(transformer).items()
            if getattr(transformer_2, k) != v}
    raise CheckpointError(f"the two experts differ in their configs: {diff} "
                          "(high noise, low noise)")


# Sources on the Hugging Face hub ----------------------------------------------


def looks_like_repo_id(src: str) -> bool:
  return bool(_REPO_ID.match(str(src)))


def resolve_source(src, *, revision: str | None = None,
                   allow_pth: bool = False) -> pathlib.Path:
  """A local folder as is; else a hub repo id (`org/name`) downloaded with
  huggingface_hub into its cache (HF_HUB_CACHE; offline with
  HF_HUB_OFFLINE=1 it resolves the cached snapshot)."""
  path = pathlib.Path(src)
  if path.exists():
    if revision is not None:
      raise CheckpointError(f"--revision applies to hub repo ids, but {src} "
                            "is a local path")
    return path
  if not looks_like_repo_id(str(src)):
    raise CheckpointError(f"{src}: no such folder (nor a Hugging Face repo "
                          "id of the form org/name)")
  return download(str(src), revision=revision, allow_pth=allow_pth)


def download(repo_id: str, *, revision: str | None = None,
             allow_pth: bool = False) -> pathlib.Path:
  """`huggingface_hub.snapshot_download` of the files a conversion reads
  (.pth files only with allow_pth); returns the snapshot folder."""
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(
        f"{repo_id!r} is not a local folder and looks like a Hugging Face "
        "repo id; fetching it needs huggingface_hub (pip install "
        "huggingface_hub), or download it yourself and pass the folder") \
        from e
  patterns = [*DOWNLOAD_PATTERNS, *(["*.pth"] if allow_pth else [])]
  try:
    folder = huggingface_hub.snapshot_download(
        repo_id, revision=revision, allow_patterns=patterns)
  except Exception as e:  # network, auth, offline cache miss, bad id ...
    raise CheckpointError(
        f"{repo_id!r} is not a local folder, and fetching it from the "
        f"Hugging Face hub failed: {type(e).__name__}: {e}") from e
  return pathlib.Path(folder)

"""Dense Wan2.1 forward: ours (JAX) vs diffusers (PyTorch), same GPU.

  PYTHONPATH=. python benchmarks/dense_wan.py              # H200, ~7 min
  PYTHONPATH=. python benchmarks/dense_wan.py --shapes 14b_480p --merge
  PYTHONPATH=. python benchmarks/dense_wan.py --small      # CPU smoke run

One process, one GPU. For each model size, diffusers' `WanTransformer3DModel`
is built on the GPU with random weights (drawn on the device, rounded to
bfloat16 values, the modules diffusers keeps in float32 kept in float32 as
`from_pretrained(torch_dtype=torch.bfloat16)` does), and OUR converter turns
its state dict (diffusers layout) into our parameters. Then, at each shape,
one CFG forward (batch 2) of:
  ours                the jitted `WanDiT` (blocks under `lax.scan`, the
                      library default), bfloat16;
  ours_unrolled       the same with `scan_unroll=True` (first 1.3B shape);
  diffusers_eager     `WanTransformer3DModel` bfloat16, SDPA attention;
  diffusers_compiled  the same after `compile_repeated_blocks` (regional
                      `torch.compile`, as diffusers recommends; or
                      `--torch-compile full`), with its compile time; by
                      default for the 1.3B only (`--torch-compile-models`).
Both run CFG as one batch-2 call, as the issue sets it (diffusers'
`WanPipeline` makes two batch-1 calls instead; not timed here).
Shapes (latent C x F x H x W; tokens = F x H/2 x W/2; text 512 x 4096):
  1.3b_480p  Wan2.1-T2V-1.3B, 480p x 81 frames: 16x21x60x104, 32,760 tokens
  1.3b_720p  Wan2.1-T2V-1.3B, 720p x 81 frames: 16x21x90x160, 75,600 tokens
  14b_480p   Wan2.1-T2V-14B,  480p x 81 frames: 16x21x60x104, 32,760 tokens

Recorded per method and shape: ms per forward (median of `--repeats` after a
warm-up; the clock stops after the device finished), TFLOP/s from the
analytic matmul count of `forward_flops` (below), peak device memory (torch:
`max_memory_allocated` since a reset before the calls; ours: the executable's
arguments + outputs + temporaries from `memory_analysis`, and the process
peak `memory_stats()`), compile time (ours: trace + XLA compile; diffusers
compiled: first call minus one eager call), and the relative error
||a - b|| / ||b|| of our output against each diffusers output.

Numerics (per model, after the timings, at a small shape: latent 16x9x30x52,
3,510 tokens): our bf16 output and diffusers' bf16 output against diffusers
in float32 (TF32 off), and our float32 model (Precision.HIGHEST) against the
same reference, which checks the converted weights. The full-shape bound on
ours vs diffusers is derived from those errors (see `numerics_bound`).

Where time goes: one traced forward of ours at each model's first shape,
device kernel time summed by kind (`--no-profile` to skip). XLA flags:
`--xla-variants 'NAME=FLAGS;...'` times ours at the first shape again in a
child process per variant (`--ours-only`: random weights, no torch). The
run keeps to `--budget-s` seconds: an optional stage (diffusers compiled,
ours unrolled, numerics, XLA variants) that would not end in time, with
the essential stages still to come, is skipped and a row says why.
Results: benchmarks/results/dense_wan_h200.json (DESIGN.md format), rewritten
after every shape; `--merge` keeps the other shapes' rows of an earlier run.
diffusers is not installed on the GPU machine: carry its wheel (.whl/).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import common
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from astraea_jax.configs import WanConfig
from astraea_jax.models import wan
from converters import wan as wan_converter

BATCH = 2  # CFG: conditional + unconditional in one batch.
TIMESTEP = 700.0
DEFAULT_OUT = common.RESULTS / "dense_wan_h200.json"


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  model: str  # a key of MODELS
  latent: tuple[int, int, int, int]  # (C, F, H, W)

  def tokens(self, config: WanConfig) -> int:
    return math.prod(s // p for s, p in zip(self.latent[1:],
                                             config.patch_size))


MODELS = {
    "1.3b": ("wan2.1-t2v-1.3b", WanConfig.wan21_t2v_1_3b),
    "14b": ("wan2.1-t2v-14b", WanConfig.wan21_t2v_14b),
    # --small: two tiny models, so that the per-model loop runs twice.
    "tiny": ("tiny", lambda **kw: WanConfig.tiny(
        dim=64, ffn_dim=128, num_heads=2, num_layers=2, **kw)),
    "tiny_wide": ("tiny-wide", lambda **kw: WanConfig.tiny(
        dim=96, ffn_dim=160, num_heads=2, num_layers=3, **kw)),
}
SHAPES = {s.name: s for s in (
    Shape("1.3b_480p", "1.3b", (16, 21, 60, 104)),
    Shape("1.3b_720p", "1.3b", (16, 21, 90, 160)),
    Shape("14b_480p", "14b", (16, 21, 60, 104)),
    Shape("tiny_a", "tiny", (16, 3, 8, 12)),
    Shape("tiny_b", "tiny", (16, 5, 8, 16)),
    Shape("tiny_wide_a", "tiny_wide", (16, 3, 8, 12)),
)}
FULL_SHAPES = ("1.3b_480p", "1.3b_720p", "14b_480p")
SMALL_SHAPES = ("tiny_a", "tiny_b", "tiny_wide_a")
NUMERICS_LATENT = (16, 9, 30, 52)  # 3,510 tokens
SMALL_NUMERICS_LATENT = (16, 2, 4, 6)

# H200 estimates in seconds, used only to plan within --budget-s: optional
# stages (diffusers compiled, ours unrolled, numerics, profile) run only if
# they would end, with the essential stages of the shapes still to come
# (ours + diffusers eager), inside the budget.
TORCH_COMPILE_ESTIMATE_S = 60.0  # plus the forwards
UNROLLED_COMPILE_ESTIMATE_S = 60.0  # plus the forwards
NUMERICS_ESTIMATE_S = {"1.3b": 30.0, "14b": 45.0}
MODEL_SETUP_S = {"1.3b": 10.0, "14b": 50.0}  # build, convert, device_put
XLA_VARIANT_ESTIMATE_S = 45.0  # start, random weights, compile, forwards
ESSENTIAL_S = {"1.3b_480p": 25.0, "1.3b_720p": 55.0, "14b_480p": 70.0}


# FLOPs ---------------------------------------------------------------------


def forward_flops(config: WanConfig, batch: int, tokens: int,
                  text_len: int) -> int:
  """Matmul FLOPs (2 per multiply-add) of one WanDiT forward.

  With d = dim, f = ffn_dim, N = video tokens, L = text tokens, per sample:
    per block  self-attention q, k, v, o projections  4 * 2 N d^2
               self-attention QK^T and PV (all heads)  2 * 2 N^2 d
               cross-attention q, o projections        2 * 2 N d^2
               cross-attention k, v on the text        2 * 2 L d^2
               cross-attention QK^T and PV             2 * 2 N L d
               FFN fc1, fc2                            2 * 2 N d f
    once       patch embedding                         2 N (pt ph pw C_in) d
               text embedding (2 layers)               2 L (text_dim d + d^2)
               time MLP and projection                 2 (freq d + d^2 + 6 d^2)
               head                                    2 N d (C_out pt ph pw)
  Norms, RoPE, softmax exponentials and other elementwise work are not
  counted (they are memory-bound, a few GFLOP). Attention counts every
  logit (no causal halving: Wan attends bidirectionally).
  """
  c = config
  d, f, n, l = c.dim, c.ffn_dim, tokens, text_len
  patch = math.prod(c.patch_size)
  per_block = (8 * n * d * d + 4 * n * n * d + 4 * n * d * d
               + 4 * l * d * d + 4 * n * l * d + 4 * n * d * f)
  once = (2 * n * patch * c.in_dim * d + 2 * l * (c.text_dim * d + d * d)
          + 2 * (c.freq_dim * d + d * d + 6 * d * d)
          + 2 * n * d * c.out_dim * patch)
  return batch * (c.num_layers * per_block + once)


# The diffusers model ------------------------------------------------------


def diffusers_kwargs(config: WanConfig) -> dict:
  return {"patch_size": config.patch_size,
          "num_attention_heads": config.num_heads,
          "attention_head_dim": config.head_dim,
          "in_channels": config.in_dim, "out_channels": config.out_dim,
          "text_dim": config.text_dim, "freq_dim": config.freq_dim,
          "ffn_dim": config.ffn_dim, "num_layers": config.num_layers,
          "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
          "eps": config.eps, "rope_max_seq_len": 1024}


def build_diffusers(config: WanConfig, *, device, dtype, seed: int):
  """`WanTransformer3DModel` on `device`, every parameter random.

  Built directly on the device in `dtype` (no host initialisation: the 14B
  model is 28 GB), then the parameters of `_keep_in_fp32_modules` are made
  float32, as `from_pretrained(torch_dtype=...)` leaves them. Values follow
  `astraea_jax.testing.random_wan_tensors` (weights N(0, 1/fan_in), biases
  N(0, 0.1^2), norm gains 1 + N(0, 0.1^2), modulation N(0, 0.5^2)), drawn
  on the device and rounded to bfloat16 values, so that the bfloat16 copy
  ours converts holds exactly the numbers diffusers computes with.
  """
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  previous = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    with torch.device(device):
      model = diffusers.WanTransformer3DModel(**diffusers_kwargs(config))
  finally:
    torch.set_default_dtype(previous)
  keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
  gen = torch.Generator(device).manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if any(m in name.split(".") for m in keep_fp32):
        p.data = p.data.float()
      p.copy_(random_value(name, p, gen))
  return model.eval().requires_grad_(False)


def random_value(name: str, p, gen):
  """A random tensor like parameter `p` (diffusers name), bf16 values."""
  import torch  # pylint: disable=g-import-not-at-top
  original = wan_converter.to_original_key(name, "diffusers") or name
  x = torch.randn(p.shape, generator=gen, device=p.device,
                  dtype=torch.float32)
  if "modulation" in original:
    x = 0.5 * x
  elif "norm" in original and original.endswith("weight"):
    x = 1 + 0.1 * x
  elif original.endswith("bias"):
    x = 0.1 * x
  else:
    x = x / math.sqrt(math.prod(p.shape[1:]))
  return x.to(torch.bfloat16).to(p.dtype)


class TorchStateSource:
  """Our converter's tensor source (keys / shape / get) over a torch module.

  Tensors go to the host one at a time, in `get`. A 2-D weight is handed
  over in its PyTorch shape (out, in) but in Fortran order (transposed on
  the device first): the converter's (out, in) -> (in, out) transpose is
  then a view, and its copy into the stacked buffer runs contiguously
  (one core transposing 28 GB of 14B bf16 weights would take minutes).
  The values the converter sees are exactly the module's.
  """

  def __init__(self, module):
    self._tensors = dict(module.state_dict())

  def keys(self):
    return list(self._tensors)

  def shape(self, key):
    return tuple(self._tensors[key].shape)

  def get(self, key):
    t = self._tensors[key].detach()
    if t.ndim == 2:
      return torch_to_numpy(t.t().contiguous()).T
    return torch_to_numpy(t)


def torch_to_numpy(t):
  """A torch tensor on any device -> numpy (bfloat16 via ml_dtypes)."""
  import torch  # pylint: disable=g-import-not-at-top
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def convert(torch_model, *, dtype: str, progress: bool):
  """(config, nested numpy params) through converters.wan, diffusers layout."""
  config = wan_converter.config_from_checkpoint(
      "diffusers", dict(torch_model.config), text_len=512, dtype=dtype,
      param_dtype=dtype)
  params = wan_converter.load_params(TorchStateSource(torch_model),
                                     "diffusers", config, progress=progress)
  return config, params


def to_device_state(config: WanConfig, params: dict):
  """(graphdef, nnx.State on the default device) from nested numpy params."""
  graphdef, state = nnx.split(wan.abstract_model(config))
  nnx.replace_by_pure_dict(state, jax.device_put(params))
  return graphdef, state


# Timing -------------------------------------------------------------------


def time_runs(call, sync, *, repeats: int, warmup: int):
  """([seconds of each timed call], last output): `warmup` untimed calls,
  then `repeats` calls, each timed until the device finished it."""
  out = None
  for _ in range(warmup):
    out = call()
    sync(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = call()
    sync(out)
    times.append(time.perf_counter() - t0)
  return times, out


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| in float64."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_inputs(config: WanConfig, latent, seed: int):
  """latents (B, C, F, H, W), timestep (B,), context (B, text_len,
  text_dim): float32 numpy arrays holding bfloat16 values (what a bf16
  pipeline hands the transformer), the same for both frameworks."""
  rng = np.random.default_rng(seed)

  def bf16_values(x):
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)

  latents = bf16_values(rng.standard_normal((BATCH, *latent), np.float32))
  context = bf16_values(rng.standard_normal(
      (BATCH, config.text_len, config.text_dim), np.float32))
  timestep = np.full((BATCH,), TIMESTEP, np.float32)
  return latents, timestep, context


class Ours:
  """The jitted forward of our WanDiT for one graphdef (config)."""

  def __init__(self, graphdef, state):
    self.state = state

    def forward(state, latents, timestep, context):
      return nnx.merge(graphdef, state)(latents, timestep, context)

    self._jitted = jax.jit(forward)

  def compile(self, inputs):
    """Compiles for `inputs`; returns (executable, seconds)."""
    t0 = time.perf_counter()
    compiled = self._jitted.lower(self.state, *inputs).compile()
    return compiled, time.perf_counter() - t0


def executable_bytes(compiled) -> int | None:
  """Device bytes one call of a compiled executable holds at its peak:
  arguments (parameters, inputs) + outputs + temporaries - aliased."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             + m.temp_size_in_bytes - m.alias_size_in_bytes)


def jax_process_peak() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def gib(x):
  return None if x is None else x / 2**30


# Where the time goes ----------------------------------------------------------

KERNEL_KINDS = (  # first match wins; matched on kernel name + HLO op name
    ("attention", ("attention", "mosaic", "pallas", "flash", "fmha",
                   "cudnn")),
    ("matmul", ("gemm", "matmul", "cublas", "nvjet", "xmma", "cutlass",
                "dot", "triton_gemm")),
    # Other custom calls: here the Pallas attention kernels, whose CUDA
    # kernel names need not say "attention".
    ("custom_call", ("custom-call", "custom_call")),
    ("copy_transpose", ("copy", "memcpy", "transpose", "memset")),
    ("reduction_fusion", ("reduce", "reduction")),
    ("elementwise_fusion", ("fusion", "loop", "convert", "add",
                            "multiply")),
)


def kernel_kind(name: str) -> str:
  low = name.lower()
  for kind, keys in KERNEL_KINDS:
    if any(k in low for k in keys):
      return kind
  return "other"


def profile_summary(trace_dir, top: int = 20) -> dict:
  """Device time by kernel kind and the top kernels of one traced call.

  GPU: the kernels on the device plane's stream lines. CPU (--small): the
  XLA ops (events with an `hlo_op` stat) on the host's threads.
  """
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  files = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"),
                 key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
  data = ProfileData.from_file(str(files[-1]))
  kernels = {}
  lines_used = []
  for plane in data.planes:
    gpu = plane.name.startswith("/device:GPU")
    lines = list(plane.lines)
    if gpu:  # kernels sit on the stream lines; derived lines repeat them
      streams = [l for l in lines if "stream" in l.name.lower()]
      lines = streams or [l for l in lines if l.name == "XLA Ops"]
    for line in lines:
      events = list(line.events)
      if gpu:
        lines_used.append(f"{plane.name} {line.name}: {len(events)}")
      for event in events:
        stats = dict(event.stats)
        if not gpu and "hlo_op" not in stats:
          continue
        name = event.name
        key = f"{name} [{stats['hlo_op']}]" if "hlo_op" in stats else name
        entry = kernels.setdefault(key, [0.0, 0, {
            k: str(v)[:120] for k, v in list(stats.items())[:8]}])
        entry[0] += event.duration_ns / 1e6
        entry[1] += 1
  by_kind = {}
  for key, (ms, count, _) in kernels.items():
    kind = kernel_kind(key)
    agg = by_kind.setdefault(kind, {"ms": 0.0, "kernels": 0})
    agg["ms"] += ms
    agg["kernels"] += count
  total = sum(v["ms"] for v in by_kind.values())
  for v in by_kind.values():
    v["fraction"] = v["ms"] / total if total else None
  ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
  return {"device_busy_ms": total, "by_kind": by_kind,
          "top_kernels": [{"kernel": k[:200], "ms": ms, "calls": n,
                           "stats": st} for k, (ms, n, st) in ranked],
          "lines": lines_used[:20]}


# The run ---------------------------------------------------------------------


class Run:
  """Rows, settings and the clock of one run; writes the JSON."""

  def __init__(self, args):
    self.args = args
    self.start = time.perf_counter()
    self.reserve_s = 0.0
    self.rows = []
    self.numerics = {}  # model -> errors at the numerics shape
    self.settings = {}
    self.previous_rows = []
    if args.merge and pathlib.Path(args.out).exists():
      doc = json.loads(pathlib.Path(args.out).read_text())
      self.previous_rows = doc.get("rows", [])
      self.numerics = doc.get("settings", {}).get("numerics", {})

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def fits(self, estimate_s: float) -> bool:
    """Whether a stage of `estimate_s` seconds, and the essential stages
    of the models still to come (`reserve_s`), end within the budget."""
    return self.elapsed() + estimate_s + self.reserve_s <= self.args.budget_s

  def skip(self, shape, model, method, reason):
    print(f"skip {method} at {shape}: {reason}", flush=True)
    self.rows.append({"shape": shape, "model": model, "method": method,
                      "skipped": reason})

  def add(self, row):
    print(json.dumps({k: v for k, v in row.items() if k != "ms_runs"}),
          flush=True)
    self.rows.append(row)

  def all_rows(self):
    mine = {r["shape"] for r in self.rows}
    return [r for r in self.previous_rows if r["shape"] not in mine] + (
        self.rows)

  def save(self):
    rows = self.all_rows()
    settings = dict(self.settings, numerics=self.numerics,
                    elapsed_s=self.elapsed())
    common.write_results(self.args.out, "dense_wan", settings, rows,
                         targets_from(rows, self.numerics))


def numerics_bound(numerics: dict, model: str) -> tuple[float, str]:
  """The largest ours-vs-diffusers bf16 relative error that counts as
  bf16 noise at the full shapes of `model`, and why.

  At the numerics shape both bf16 outputs were compared with diffusers in
  float32: errors e_ours and e_diffusers. By the triangle inequality the
  two bf16 outputs differ by at most e_ours + e_diffusers (relative to
  the reference's norm); the bound doubles that for the longer sequences
  of the full shapes (softmax sums over 10-20x more keys). Without a
  numerics run of this model (e.g. skipped for time), the 1.3B one
  stands in; without any, 0.05 (bf16 keeps 8 significand bits, 2^-8 =
  0.4% per rounding, over ~10 roundings per block of 30-40 blocks).
  """
  for m in (model, "1.3b", *numerics):
    n = numerics.get(m)
    if n and "ours_bf16_vs_fp32" in n and "diffusers_bf16_vs_fp32" in n:
      bound = 2 * (n["ours_bf16_vs_fp32"] + n["diffusers_bf16_vs_fp32"])
      return bound, f"2 x (e_ours + e_diffusers) at the {m} numerics shape"
  return 0.05, "fixed: no bf16-vs-fp32 errors of both at a numerics shape"


def targets_from(rows, numerics: dict) -> list:
  """The issue's targets, recomputed from the rows."""
  targets = []
  by_shape = {}
  for r in rows:
    if "ms" in r:
      by_shape.setdefault(r["shape"], {})[r["method"]] = r
  for shape, methods in by_shape.items():
    ours = methods.get("ours")
    torch_rows = [methods[m] for m in ("diffusers_eager",
                                       "diffusers_compiled") if m in methods]
    if not ours:
      continue
    model = ours["model_key"]
    if torch_rows:
      fastest = min(torch_rows, key=lambda r: r["ms"])
      targets.append({"name": f"ours_time_over_fastest_diffusers[{shape}]",
                      "value": ours["ms"] / fastest["ms"], "op": "<=",
                      "target": 0.9, "fastest": fastest["method"],
                      "compared": [r["method"] for r in torch_rows]})
      peaks = [r["peak_gib"] for r in torch_rows if r.get("peak_gib")]
      if ours.get("peak_gib") and peaks:
        targets.append({"name": f"peak_memory_ours_over_diffusers[{shape}]",
                        "value": ours["peak_gib"] / min(peaks), "op": "<=",
                        "target": 1.0,
                        "note": "vs the smaller diffusers peak"})
    if model == "1.3b":
      targets.append({"name": f"ours_compile_s[{shape}]",
                      "value": ours["compile_s"], "op": "<=",
                      "target": 60.0})
    bound, why = numerics_bound(numerics, model)
    for r in torch_rows:
      if "rel_err_ours" in r:
        targets.append({"name": f"bf16_rel_err_ours_vs_{r['method']}"
                                f"[{shape}]",
                        "value": r["rel_err_ours"], "op": "<=",
                        "target": bound, "bound": why})
  for model, n in numerics.items():
    if n.get("diffusers_bf16_vs_fp32"):
      targets.append({"name": f"bf16_error_ours_over_diffusers[{model}]",
                      "value": n["ours_bf16_vs_fp32"]
                      / n["diffusers_bf16_vs_fp32"], "op": "<=",
                      "target": 1.0, "note": "errors against diffusers "
                      "float32 at the numerics shape: ours no noisier"})
    if "ours_fp32_vs_fp32" in n:
      targets.append({"name": f"fp32_rel_err_converted_weights[{model}]",
                      "value": n["ours_fp32_vs_fp32"], "op": "<=",
                      "target": n["fp32_bound"], "bound": n["fp32_bound_why"]})
  return targets


class Torch:
  """diffusers calls with device synchronisation and memory peaks."""

  def __init__(self, device, dtype: str):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.device = device
    self.dtype = getattr(torch, dtype)
    self.cuda = device == "cuda"

  def sync(self, _=None):
    if self.cuda:
      self.torch.cuda.synchronize()

  def reset_peak(self):
    if self.cuda:
      self.torch.cuda.reset_peak_memory_stats()

  def peak(self):
    return self.torch.cuda.max_memory_allocated() if self.cuda else None

  def tensors(self, inputs, dtype=None):
    """Torch copies of (latents, timestep, context) in `dtype` (default
    the model's; the timestep stays float32)."""
    dtype = dtype or self.dtype
    latents, timestep, context = (np.array(x) for x in inputs)  # writable
    t = self.torch
    return (t.from_numpy(latents).to(self.device, dtype),
            t.from_numpy(timestep).to(self.device),
            t.from_numpy(context).to(self.device, dtype))

  def forward(self, model, tensors, eager: bool):
    t = self.torch
    latents, timestep, context = tensors
    stance = t.compiler.set_stance("force_eager" if eager else "default")
    with t.inference_mode(), stance:
      return model(hidden_states=latents, timestep=timestep,
                   encoder_hidden_states=context, return_dict=False)[0]


def setup_model(run: Run, key: str, torch_api):
  """(config, graphdef, state, diffusers model or None) for one preset.

  With diffusers: its model is built with random weights and OUR converter
  turns its state dict into our parameters. --ours-only: random weights
  drawn directly in JAX (no torch).
  """
  args = run.args
  name, preset = MODELS[key]
  config = preset(dtype=args.dtype, param_dtype=args.dtype)
  info = {"name": name, "config": config.to_dict()}
  if args.ours_only:
    from astraea_jax import testing  # pylint: disable=g-import-not-at-top
    graphdef, state = testing.random_wan(config, seed=args.seed)
    run.settings.setdefault("models", {})[key] = info
    return config, graphdef, state, None
  t0 = time.perf_counter()
  model = build_diffusers(config, device=torch_api.device,
                          dtype=torch_api.dtype, seed=args.seed)
  torch_api.sync()
  info["diffusers_build_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  converted, params = convert(model, dtype=args.dtype,
                              progress=not args.small)
  # diffusers leaves the text length to the pipeline; the rest must agree.
  if dataclasses.replace(converted, text_len=config.text_len) != config:
    raise RuntimeError(f"converter config {converted} differs from {config}")
  graphdef, state = to_device_state(config, params)
  del params
  gc.collect()
  jax.block_until_ready(state)
  info["convert_and_device_put_s"] = time.perf_counter() - t0
  info["parameters"] = int(sum(p.numel() for p in model.parameters()))
  run.settings.setdefault("models", {})[key] = info
  print(f"{name}: {json.dumps(info['parameters'])} parameters, built in "
        f"{info['diffusers_build_s']:.1f} s, converted + on device in "
        f"{info['convert_and_device_put_s']:.1f} s", flush=True)
  return config, graphdef, state, model


def bench_model(run: Run, key: str, shapes, torch_api):
  """Every method at every shape of one model, then its numerics."""
  args = run.args
  config, graphdef, state, model = setup_model(run, key, torch_api)
  name = MODELS[key][0]
  ours = Ours(graphdef, state)
  compiled_torch = False
  outer_reserve = run.reserve_s
  for i, shape in enumerate(shapes):
    run.reserve_s = outer_reserve + sum(ESSENTIAL_S.get(s.name, 5.0)
                                        for s in shapes[i + 1:])
    tokens = shape.tokens(config)
    flops = forward_flops(config, BATCH, tokens, config.text_len)
    inputs = tuple(jnp.asarray(x) for x in make_inputs(config, shape.latent,
                                                       args.seed + i))
    common_row = {"shape": shape.name, "model": name, "model_key": key,
                  "latent": [BATCH, *shape.latent], "tokens": tokens,
                  "flops": flops}

    # Ours (the library default: blocks under lax.scan).
    exe, compile_s = ours.compile(inputs)
    times, out = time_runs(functools.partial(exe, state, *inputs),
                           jax.block_until_ready, repeats=args.repeats,
                           warmup=args.warmup)
    ours_out = np.asarray(out)
    ms = 1e3 * statistics.median(times)
    run.add({**common_row, "method": "ours", "ms": ms,
             "ms_runs": [1e3 * t for t in times],
             "tflops": flops / (ms / 1e3) / 1e12, "compile_s": compile_s,
             "peak_gib": gib(executable_bytes(exe)),
             "process_peak_gib": gib(jax_process_peak()),
             "scan_unroll": config.scan_unroll,
             "xla_flags": os.environ.get("XLA_FLAGS", "")})
    if i == 0 and args.profile:
      profile_ours(run, exe, state, inputs, common_row, ms)
    del exe, out
    if i == 0 and key in args.unroll_models.split(","):
      bench_unrolled(run, config, state, inputs, common_row, ms)
    if model is not None:
      compiled_torch |= bench_diffusers(run, model, inputs, ours_out,
                                        common_row, torch_api,
                                        compile_now=not compiled_torch)
    run.save()
  run.reserve_s = outer_reserve

  if model is None or not args.numerics:
    pass
  elif not run.fits(NUMERICS_ESTIMATE_S.get(key, 10.0)):
    run.numerics[key] = {"skipped": f"time budget ({run.elapsed():.0f} s "
                                    "spent)"}
  else:
    try:
      numerics(run, key, config, graphdef, state, model, torch_api)
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
      traceback.print_exc()
      run.numerics[key] = {"failed": repr(e)[:1000]}
  run.save()
  del model, state, ours
  if compiled_torch:
    torch_api.torch._dynamo.reset()  # pylint: disable=protected-access
  gc.collect()
  if torch_api is not None and torch_api.cuda:
    torch_api.torch.cuda.empty_cache()


def bench_diffusers(run: Run, model, inputs, ours_out, common_row, torch_api,
                    *, compile_now: bool) -> bool:
  """diffusers eager, then compiled; returns whether it is compiled now."""
  args = run.args
  shape, name, flops = (common_row["shape"], common_row["model"],
                        common_row["flops"])
  tensors = torch_api.tensors([np.asarray(x) for x in inputs])
  torch_api.reset_peak()
  times, out = time_runs(lambda: torch_api.forward(model, tensors, True),
                         torch_api.sync, repeats=args.repeats,
                         warmup=args.warmup)
  eager_ms = 1e3 * statistics.median(times)
  eager_out = out.float().cpu().numpy()
  del out
  run.add({**common_row, "method": "diffusers_eager", "ms": eager_ms,
           "ms_runs": [1e3 * t for t in times],
           "tflops": flops / (eager_ms / 1e3) / 1e12,
           "peak_gib": gib(torch_api.peak()),
           "rel_err_ours": rel_err(ours_out, eager_out)})

  estimate = (TORCH_COMPILE_ESTIMATE_S if compile_now else 30.0) + (
      args.repeats + 1) * eager_ms / 1e3
  if args.torch_compile == "none" or (
      common_row["model_key"] not in args.torch_compile_models.split(",")):
    run.skip(shape, name, "diffusers_compiled",
             "not requested (--torch-compile / --torch-compile-models)")
    return not compile_now
  if not run.fits(estimate):
    run.skip(shape, name, "diffusers_compiled",
             f"time budget: {run.elapsed():.0f} s spent, ~{estimate:.0f} s "
             f"needed, --budget-s {args.budget_s:.0f}")
    return not compile_now
  compiled = not compile_now
  try:
    if compile_now:
      compile_torch(model, args.torch_compile)
      compiled = True
    torch_api.reset_peak()
    t0 = time.perf_counter()
    torch_api.sync(torch_api.forward(model, tensors, False))
    first_s = time.perf_counter() - t0
    times, out = time_runs(lambda: torch_api.forward(model, tensors, False),
                           torch_api.sync, repeats=args.repeats, warmup=0)
    c_ms = 1e3 * statistics.median(times)
    c_out = out.float().cpu().numpy()
    del out
    run.add({**common_row, "method": "diffusers_compiled", "ms": c_ms,
             "ms_runs": [1e3 * t for t in times],
             "tflops": flops / (c_ms / 1e3) / 1e12,
             "compile_s": first_s - eager_ms / 1e3, "first_call_s": first_s,
             "mode": args.torch_compile, "peak_gib": gib(torch_api.peak()),
             "rel_err_ours": rel_err(ours_out, c_out),
             "rel_err_vs_eager": rel_err(c_out, eager_out)})
  except Exception as e:  # noqa: BLE001 - recorded, the run goes on
    traceback.print_exc()
    run.skip(shape, name, "diffusers_compiled", f"failed: {e!r}"[:1000])
  return compiled


def bench_xla_variants(run: Run):
  """Ours at the first shape in child processes, one per XLA_FLAGS value.

  XLA reads its flags once per process, so each variant is a fresh
  `--ours-only` run of this script (random weights, same shape); its rows
  come back labelled `ours[xla:NAME]`.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  args = run.args
  shape = args.shapes.split(",")[0]
  for spec in filter(None, args.xla_variants.split(";")):
    label, _, flags = spec.partition("=")
    if not run.fits(XLA_VARIANT_ESTIMATE_S):
      run.skip(shape, None, f"ours[xla:{label}]",
               f"time budget: {run.elapsed():.0f} s spent")
      continue
    out = pathlib.Path(tempfile.mkdtemp(prefix="dense_wan_xla_")) / "r.json"
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " "
                                      + flags).strip())
    cmd = [sys.executable, __file__, "--ours-only", "--shapes", shape,
           "--no-profile", "--unroll-models", "none", "--budget-s", "1e9",
           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--dtype", args.dtype, "--out", str(out)] + (
               ["--small"] if args.small else [])
    print(f"xla variant {label}: XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0 or not out.exists():
      run.skip(shape, None, f"ours[xla:{label}]",
               f"failed (rc {proc.returncode}): {proc.stderr[-800:]}")
      continue
    default = next((r["ms"] for r in run.rows if r["shape"] == shape
                    and r["method"] == "ours" and "ms" in r), None)
    for row in json.loads(out.read_text())["rows"]:
      if row.get("method") == "ours":
        run.add({**row, "method": f"ours[xla:{label}]",
                 "over_default": row["ms"] / default if default else None})
  run.save()


def compile_torch(model, mode: str):
  if mode == "regional":
    model.compile_repeated_blocks(fullgraph=True, dynamic=False)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    model.forward = torch.compile(model.forward, dynamic=False)


def profile_ours(run: Run, exe, state, inputs, common_row, ms):
  trace_dir = run.args.profile_dir or tempfile.mkdtemp(prefix="dense_wan_")
  try:
    with jax.profiler.trace(trace_dir):
      jax.block_until_ready(exe(state, *inputs))
    summary = profile_summary(trace_dir)
    summary["timed_ms"] = ms
    summary["trace_dir"] = str(trace_dir)
    run.add({**common_row, "method": "ours_profile", **summary})
  except Exception as e:  # noqa: BLE001 - recorded, the run goes on
    traceback.print_exc()
    run.skip(common_row["shape"], common_row["model"], "ours_profile",
             f"failed: {e!r}"[:1000])


def bench_unrolled(run: Run, config, state, inputs, common_row, scan_ms):
  """Ours with every block unrolled (scan_unroll=True) at the same shape."""
  args = run.args
  estimate = UNROLLED_COMPILE_ESTIMATE_S + (args.repeats + 1) * scan_ms / 1e3
  if not run.fits(estimate):
    run.skip(common_row["shape"], common_row["model"], "ours_unrolled",
             f"time budget: {run.elapsed():.0f} s spent")
    return
  unrolled = config.replace(scan_unroll=True)
  graphdef, _ = nnx.split(wan.abstract_model(unrolled))
  exe, compile_s = Ours(graphdef, state).compile(inputs)
  times, _ = time_runs(functools.partial(exe, state, *inputs),
                       jax.block_until_ready, repeats=args.repeats,
                       warmup=args.warmup)
  ms = 1e3 * statistics.median(times)
  run.add({**common_row, "method": "ours_unrolled", "ms": ms,
           "ms_runs": [1e3 * t for t in times],
           "tflops": common_row["flops"] / (ms / 1e3) / 1e12,
           "compile_s": compile_s, "peak_gib": gib(executable_bytes(exe)),
           "over_scan": ms / scan_ms, "scan_unroll": True})


def numerics(run: Run, key, config, graphdef, state, model, torch_api):
  """Ours bf16, diffusers bf16 and ours fp32 vs diffusers fp32, small shape.

  Runs last for a model: it turns the diffusers model to float32 in place.
  """
  args = run.args
  torch = torch_api.torch
  latent = SMALL_NUMERICS_LATENT if args.small else NUMERICS_LATENT
  shape = Shape("numerics", key, latent)
  inputs = tuple(jnp.asarray(x) for x in make_inputs(config, latent,
                                                     args.seed + 100))
  host_inputs = [np.asarray(x) for x in inputs]
  exe, _ = Ours(graphdef, state).compile(inputs)
  ours_bf16 = np.asarray(exe(state, *inputs))
  del exe
  result = {"latent": [BATCH, *latent], "tokens": shape.tokens(config)}
  low = torch_api.forward(model, torch_api.tensors(host_inputs),
                          True).float().cpu().numpy()

  # The float32 reference: diffusers with TF32 off (matmuls and the conv).
  tf32 = (torch.backends.cuda.matmul.allow_tf32,
          torch.backends.cudnn.allow_tf32)
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  try:
    model.float()
    ref = torch_api.forward(model, torch_api.tensors(host_inputs,
                                                     torch.float32),
                            True).float().cpu().numpy()
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (
        tf32)
  result["ours_bf16_vs_fp32"] = rel_err(ours_bf16, ref)
  if torch_api.dtype != torch.float32:
    result["diffusers_bf16_vs_fp32"] = rel_err(low, ref)
  result["ours_bf16_vs_diffusers_bf16"] = rel_err(ours_bf16, low)

  gparams = sum(x.size for x in jax.tree.leaves(state)) / 1e9
  if gparams <= args.fp32_check_max_gparams:
    config32 = config.replace(dtype="float32", param_dtype="float32")
    graphdef32, _ = nnx.split(wan.abstract_model(config32))
    state32 = jax.tree.map(lambda x: x.astype(jnp.float32), state)
    with jax.default_matmul_precision("highest"):
      exe, _ = Ours(graphdef32, state32).compile(inputs)
      ours32 = np.asarray(exe(state32, *inputs))
    del exe, state32
    result["ours_fp32_vs_fp32"] = rel_err(ours32, ref)
    # float32 rounding (2^-24) through every block, and the float32
    # timestep angle t * w in diffusers (up to ~6e-5 rad at t = 1000; ours
    # forms it to ~1e-7, the original's float64): 1e-4 leaves room for
    # those; a wrong weight or layout errs by O(1).
    result["fp32_bound"] = 1e-4
    result["fp32_bound_why"] = ("float32 rounding over all blocks plus "
                                "diffusers' float32 timestep angles; a "
                                "conversion error is O(1)")
  else:
    result["ours_fp32_skipped"] = (f"{gparams:.1f}B parameters in float32 "
                                   "would not fit beside the rest")
  run.numerics[key] = result
  print(f"numerics {key}: {json.dumps(result)}", flush=True)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default=None,
                      help=f"comma-separated, of {sorted(SHAPES)}; default "
                           f"{','.join(FULL_SHAPES)} (--small: "
                           f"{','.join(SMALL_SHAPES)})")
  parser.add_argument("--small", action="store_true",
                      help="tiny models on the CPU, diffusers in float32")
  parser.add_argument("--out", default=None)
  parser.add_argument("--merge", action="store_true",
                      help="keep rows of other shapes from an existing --out")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", default="bfloat16",
                      choices=["bfloat16", "float32"], help="ours")
  parser.add_argument("--torch-dtype", default=None,
                      choices=["bfloat16", "float32"],
                      help="diffusers; default bfloat16 (--small: float32)")
  parser.add_argument("--torch-compile", default=None,
                      choices=["regional", "full", "none"],
                      help="default regional (--small: none)")
  parser.add_argument("--torch-compile-models", default="1.3b,tiny",
                      help="models timed with torch.compile too (14B: add "
                           "it when the budget allows, ~90 s)")
  parser.add_argument("--unroll-models", default="1.3b,tiny",
                      help="models whose first shape also times ours with "
                           "every block unrolled")
  parser.add_argument("--no-numerics", dest="numerics", action="store_false")
  parser.add_argument("--no-profile", dest="profile", action="store_false")
  parser.add_argument("--profile-dir", default=None)
  parser.add_argument("--fp32-check-max-gparams", type=float, default=3.0,
                      help="ours in float32 at the numerics shape only for "
                           "models up to this many billion parameters")
  parser.add_argument("--budget-s", type=float, default=420.0,
                      help="skip optional stages that would end past this")
  parser.add_argument("--ours-only", action="store_true",
                      help="ours alone, random weights drawn in JAX, no "
                           "torch (what --xla-variants children run)")
  parser.add_argument("--xla-variants", default="",
                      help="';'-separated NAME=XLA_FLAGS: ours at the first "
                           "shape again in a child process per variant, "
                           "e.g. 'cublaslt=--xla_gpu_enable_cublaslt=true'")
  args = parser.parse_args(argv)
  if args.shapes is None:
    args.shapes = ",".join(SMALL_SHAPES if args.small else FULL_SHAPES)
  unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
  if unknown:
    parser.error(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
  if args.torch_dtype is None:
    args.torch_dtype = "float32" if args.small else "bfloat16"
  if args.torch_compile is None:
    args.torch_compile = "none" if args.small else "regional"
  if args.out is None:
    args.out = (pathlib.Path(tempfile.gettempdir()) / "dense_wan_small.json"
                if args.small else DEFAULT_OUT)
  if args.ours_only:
    args.numerics = False
  return args


def main(argv=None):
  args = parse_args(argv)
  device = "cpu" if args.small else "cuda"
  run = Run(args)
  run.settings.update({
      "batch": BATCH, "timestep": TIMESTEP, "text_len": 512,
      "ours_dtype": args.dtype, "repeats": args.repeats,
      "warmup": args.warmup, "budget_s": args.budget_s,
      "timing": "median of repeats after warm-up; clock stops when the "
                "device finished (block_until_ready / cuda.synchronize)",
      "flops": "analytic matmul count, benchmarks/dense_wan.py "
               "forward_flops",
      "peak_memory": "ours: executable arguments + outputs + temporaries "
                     "(memory_analysis); diffusers: "
                     "torch.cuda.max_memory_allocated since a reset; both "
                     "include the weights and inputs",
      "inputs": "random N(0,1) latents and text embeddings rounded to "
                "bf16, timestep 700 for both CFG halves",
      "cfg": "one batch-2 forward for both frameworks (WanPipeline itself "
             "calls the transformer twice with batch 1)",
      "xla_flags": os.environ.get("XLA_FLAGS", "")})
  torch_api = None
  if not args.ours_only:
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    if device == "cuda" and not torch.cuda.is_available():
      raise SystemExit("no CUDA device for torch: use --small on a CPU")
    torch_api = Torch(device, args.torch_dtype)
    run.settings.update({
        "diffusers_dtype": args.torch_dtype, "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_device": (torch.cuda.get_device_name() if device == "cuda"
                         else "cpu"),
        "torch_compile": args.torch_compile,
        "sdpa_backends_enabled": {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled()}})
  shapes = [SHAPES[s] for s in args.shapes.split(",")]
  models = list(dict.fromkeys(s.model for s in shapes))
  for i, key in enumerate(models):
    mine = [s for s in shapes if s.model == key]
    later = [s for s in shapes if s.model in models[i + 1:]]
    run.reserve_s = essential_s(later)
    if i and not run.fits(essential_s(mine)):
      for s in mine:
        run.skip(s.name, MODELS[key][0], "all",
                 f"time budget: {run.elapsed():.0f} s spent")
      continue
    bench_model(run, key, mine, torch_api)
  run.reserve_s = 0.0
  if args.xla_variants:
    bench_xla_variants(run)
  run.save()
  for t in targets_from(run.all_rows(), run.numerics):
    print(f"target {t['name']}: {t['value']:.4g} {t['op']} {t['target']}")


def essential_s(shapes) -> float:
  """Estimated seconds of the essential stages of `shapes` (see above)."""
  models = {s.model for s in shapes}
  return (sum(MODEL_SETUP_S.get(m, 5.0) for m in models)
          + sum(ESSENTIAL_S.get(s.name, 5.0) for s in shapes))


if __name__ == "__main__":
  main()

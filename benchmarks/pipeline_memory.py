"""Device memory of the whole Wan2.1 pipeline, per stage and end to end
(issue #26), each configuration in its own process (JAX's peak is
cumulative).

  PYTHONPATH=. python benchmarks/pipeline_memory.py --out DIR     # GPU
  PYTHONPATH=. python benchmarks/pipeline_memory.py --small --out /tmp/x

What `astraea generate` runs, with random weights in the published sizes
(umT5-XXL encoder bfloat16, Wan2.1-T2V-1.3B DiT bfloat16, Wan2.1 VAE
float32), 480p x 81 (latent 16 x 21 x 60 x 104), UniPC 50 steps, CFG 5:
the components offloaded as `WanPipeline.from_pretrained` leaves them
(`placement`), two 512-token prompts encoded (`encode_prompt`'s stage),
then `Pipeline.generate` (denoising, then the decode streamed to the
host), dense or Astraea at mean budget 0.4. Rows:

  whole_dense / whole_astraea   the run as a user's first video in a
      fresh process (compiles included), its wall time and peak;
  *_cap<N>                     the same with JAX's device pool limited to
      N GiB (XLA_PYTHON_CLIENT_MEM_FRACTION): does it run on an N GiB GPU;
  decode_base / decode_new     the VAE decode alone (vae_memory.py's rows)
      on the tree before this issue (.base937) and on this one;
  diffusers_whole_dense        diffusers' WanPipeline end to end, random
      weights of the same sizes, same video and sampler, in a process of
      its own (torch's allocator peak); whole_dense's second video against
      its second video is the end-to-end time ratio (carry diffusers'
      wheel: it is not on the GPU machine).

Peaks are `memory_stats()["peak_bytes_in_use"]` of the device allocator,
read after each stage (cumulative: each is the peak so far).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

GIB = 2 ** 30
HERE = pathlib.Path(__file__).resolve().parent


def _peak():
  s = jax.devices()[0].memory_stats() or {}
  return s.get("peak_bytes_in_use", 0) / GIB


def _limit():
  s = jax.devices()[0].memory_stats() or {}
  return s.get("bytes_limit", 0) / GIB


def host_random(abstract_module, seed: int):
  """The module with random NumPy parameters in host memory, as loading
  an offloaded checkpoint leaves it (never on the device, so the device's
  peak is the stages' alone): one 2^20-value normal block per module,
  repeated over each leaf from a random offset and scaled per leaf as
  `testing.random_params` scales its draws (values matter for neither
  memory nor time; drawing 5.7 billion would take minutes)."""
  from astraea_jax import testing
  rng = np.random.default_rng(seed)
  block = rng.standard_normal(1 << 21).astype(np.float32)
  graphdef, state = nnx.split(abstract_module)

  def leaf(path, a):
    start = int(rng.integers(0, 1 << 20))
    piece = testing.scaled_like_init(jax.tree_util.keystr(path),
                                     block[start:start + (1 << 20)],
                                     a.shape)
    return np.resize(np.asarray(piece, np.float32).astype(a.dtype), a.shape)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(leaf, state))


def build(small: bool):
  """(offloaded WanPipeline with random weights, (height, width, frames))."""
  from astraea_jax import pipelines, placement
  from astraea_jax.configs import WanConfig
  from astraea_jax.models.text import umt5
  from astraea_jax.models.text.umt5 import UMT5Config
  from astraea_jax.vae import wan_vae
  if small:
    config = WanConfig.tiny(num_layers=2)
    text_config = UMT5Config.tiny(d_model=config.text_dim)
    vae_config = wan_vae.WanVAEConfig.tiny()
    size = (64, 96, 17)
  else:
    config = WanConfig.wan21_t2v_1_3b(dtype="bfloat16",
                                      param_dtype="bfloat16")
    text_config = UMT5Config.umt5_xxl(dtype="bfloat16",
                                      param_dtype="bfloat16")
    vae_config = wan_vae.WanVAEConfig.wan21()
    size = (480, 832, 81)
  from astraea_jax.models import wan
  transformer = host_random(wan.abstract_model(config), 0)
  text_encoder = host_random(umt5.abstract_model(text_config), 1)
  vae = host_random(wan_vae.abstract_model(vae_config), 2)
  assert all(placement.is_on_host(m) for m in (transformer, text_encoder,
                                                 vae))
  pipe = pipelines.WanPipeline(transformer, vae, text_encoder,
                               text_len=config.text_len)
  return pipe, size


def encode(pipe):
  """`encode_prompt`'s stage on random 120-token prompts (no tokenizer)."""
  from astraea_jax import placement
  from astraea_jax.pipelines import wan_pipeline
  with placement.placed(pipe.text_encoder):
    graphdef, state = nnx.split(pipe.text_encoder)
    n = pipe.text_len
    mask = (jnp.arange(n) < min(120, n))[None].astype(jnp.int32)
    rows = [wan_pipeline._encode_jit(                      # pylint: disable=protected-access
        graphdef, state, jax.random.randint(
            jax.random.key(3 + i), (1, n), 3,
            pipe.text_encoder.config.vocab_size), mask, n)
            for i in range(2)]
    return jax.block_until_ready(tuple(rows))


def run_whole(small: bool, budget: float | None, steps: int,
              runs: int = 1) -> dict:
  """`runs` whole videos in this process (the first compiles; the later
  ones are a user's next videos): each one's wall time, text encoding
  included; peaks after the first run's stages."""
  from astraea_jax.pipelines.base import GenerateConfig
  t0 = time.perf_counter()
  pipe, (height, width, frames) = build(small)
  row = {"build_s": time.perf_counter() - t0, "after_build_gib": _peak()}
  jax.clear_caches()
  config = GenerateConfig(height=height, width=width, frames=frames,
                          steps=3 if small else steps, budget=budget)
  row["runs_s"] = []
  for run in range(runs):
    t0 = time.perf_counter()
    conditioning = encode(pipe)
    text_s = time.perf_counter() - t0
    if run == 0:
      row["text_s"], row["after_text_gib"] = text_s, _peak()
    t1 = time.perf_counter()
    _, videos, report = pipe.generate(conditioning, config, fps=16.0)
    row["runs_s"].append(time.perf_counter() - t0)
    if run == 0:
      row["generate_s"] = time.perf_counter() - t1
      row["wall_s"] = row["runs_s"][0]
      row["after_generate_gib"] = _peak()
  row["cold_s"], row["warm_s"] = row["runs_s"][0], row["runs_s"][-1]
  row["report"] = {k: v for k, v in report.items() if k != "latent_shape"}
  row["steps"] = config.steps
  row["video_shape"] = list(next(iter(videos.values())).shape)
  return row


def run_diffusers_whole(small: bool, steps: int, runs: int) -> dict:
  """diffusers' `WanPipeline` end to end as its users run it (every
  component on the GPU, `pipe(...)` with the prompt embeddings, output
  "np"), random weights of the published sizes (pipeline_wan.py's
  builders), the same video, steps, CFG 5 and UniPC shift 3 as ours;
  `runs` videos, each timed with the wall clock (text encoding of the
  prompt and the negative prompt included). Peaks:
  `torch.cuda.max_memory_allocated` after the text stage, after the last
  denoising step (a step-end callback) and at the end (decode)."""
  # pylint: disable=import-outside-toplevel
  import diffusers
  import torch
  import transformers

  sys.path.insert(0, str(HERE))
  import dense_wan
  import pipeline_wan
  from astraea_jax.configs import WanConfig
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  dtype = torch.bfloat16 if not small else torch.float32
  if small:
    config = WanConfig.tiny(num_layers=2)
    height, width, frames, length = 64, 96, 17, 16
  else:
    config = WanConfig.wan21_t2v_1_3b(dtype="bfloat16",
                                      param_dtype="bfloat16")
    height, width, frames, length = 480, 832, 81, 512
  text_config, vae_kwargs = pipeline_wan.diffusers_configs(small,
                                                           config.text_dim)
  gib = (lambda: torch.cuda.max_memory_allocated() / GIB) if cuda else (
      lambda: None)
  t0 = time.perf_counter()
  torch.manual_seed(0)
  with torch.device(device):
    encoder = transformers.UMT5EncoderModel(text_config).to(dtype).eval()
    vae = diffusers.AutoencoderKLWan(**vae_kwargs).to(torch.float32).eval()
  dit = dense_wan.build_diffusers(config, device=device, dtype=dtype, seed=0)
  scheduler = diffusers.UniPCMultistepScheduler(
      prediction_type="flow_prediction", use_flow_sigmas=True,
      num_train_timesteps=1000, flow_shift=pipeline_wan.SHIFT)
  pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=encoder,
                               transformer=dit, vae=vae, scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)
  row = {"build_s": time.perf_counter() - t0, "runs_s": []}
  real = min(pipeline_wan.PROMPT_TOKENS, length)

  def embed(seed):
    """`WanPipeline._get_t5_prompt_embeds` past its tokenizer: the
    encoder on the ids, the real tokens kept, zeros after them."""
    g = torch.Generator(device).manual_seed(seed)
    ids = torch.randint(3, text_config.vocab_size, (1, length),
                        device=device, generator=g)
    mask = (torch.arange(length, device=device) < real).to(torch.int64)
    out = encoder(ids, mask[None]).last_hidden_state
    return torch.where(mask[None, :, None].bool(), out, 0).to(dtype)

  peaks = {}

  def at_step_end(_, i, t, kwargs):
    del t
    if i == steps - 1 and "denoise_gib" not in peaks:
      peaks["denoise_gib"] = gib()
    return kwargs

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  for _ in range(runs):
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
      positive, negative = embed(3), embed(4)
      sync()
      peaks.setdefault("text_gib", gib())
      video = pipe(prompt_embeds=positive, negative_prompt_embeds=negative,
                   height=height, width=width, num_frames=frames,
                   num_inference_steps=steps, guidance_scale=5.0,
                   output_type="np", callback_on_step_end=at_step_end,
                   generator=torch.Generator(device).manual_seed(0)).frames
    sync()
    row["runs_s"].append(time.perf_counter() - t0)
    peaks.setdefault("decode_gib", gib())
  row.update(peaks)
  row["cold_s"], row["warm_s"] = row["runs_s"][0], row["runs_s"][-1]
  row["peak_gib"] = gib()
  row["steps"] = steps
  row["video_shape"] = list(np.shape(video))
  row["diffusers"] = diffusers.__version__
  row["torch"] = torch.__version__
  return row


# (name, what, tree on PYTHONPATH, extra env)
ROWS = [
    ("decode_base", [str(HERE / "vae_memory.py"), "--one", "chunked"],
     ".base937", {}),
    ("decode_new", [str(HERE / "vae_memory.py"), "--one", "chunked"], ".",
     {}),
    ("decode_new_cap8", [str(HERE / "vae_memory.py"), "--one", "chunked"],
     ".", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "CAP8"}),
    ("decode_new_autotune0", [str(HERE / "vae_memory.py"), "--one",
                              "chunked"], ".",
     {"XLA_FLAGS": "--xla_gpu_autotune_level=0"}),
    # Levels 1-3 autotune without (1) or with fewer (2-3) of level 4's
    # correctness checks (reference outputs and redzones, allocated beside
    # each candidate): is the compile-time peak theirs?
    ("decode_new_autotune1", [str(HERE / "vae_memory.py"), "--one",
                              "chunked"], ".",
     {"XLA_FLAGS": "--xla_gpu_autotune_level=1"}),
    ("decode_new_autotune3", [str(HERE / "vae_memory.py"), "--one",
                              "chunked"], ".",
     {"XLA_FLAGS": "--xla_gpu_autotune_level=3"}),
    ("whole_dense_cap12", ["--whole", "--steps", "10"], ".",
     {"XLA_PYTHON_CLIENT_MEM_FRACTION": "CAP12"}),
    ("whole_astraea04_cap16", ["--whole", "--budget", "0.4"], ".",
     {"XLA_PYTHON_CLIENT_MEM_FRACTION": "CAP16"}),
    ("whole_dense", ["--whole", "--runs", "2"], ".", {}),
    # diffusers' WanPipeline, whole runs in a process of its own (torch's
    # allocator; JAX not on the GPU there).
    ("diffusers_whole_dense", ["--diffusers-whole", "--runs", "2"], ".",
     {"JAX_PLATFORMS": "cpu"}),
]


# (target name, row, figure, op, target): the targets.
TARGETS = [
    ("decode_480p_peak_gib", "decode_new", "peak", "<=", 8.0),
    ("decode_480p_peak_gib_in_an_8gib_pool", "decode_new_cap8", "peak",
     "<=", 8.0),
    ("time_ratio_decode_480p_vs_base", ("decode_new", "decode_base"),
     "second_run_s", "<=", 1.10),
    ("time_ratio_decode_480p_8gib_pool_vs_base",
     ("decode_new_cap8", "decode_base"), "second_run_s", "<=", 1.10),
    ("whole_dense_480p_peak_gib_in_a_12gib_pool", "whole_dense_cap12",
     "peak", "<=", 12.0),
    ("whole_astraea04_480p_peak_gib_in_a_16gib_pool",
     "whole_astraea04_cap16", "peak", "<=", 16.0),
    ("whole_dense_480p_peak_gib", "whole_dense", "peak", "<=", 12.0),
    # The "end-to-end time no worse than today" (H200: ours 50.1 s
    # vs diffusers 63.0 s, composed from stages): whole runs, ours over
    # diffusers', each a user's second video in its process.
    ("whole_dense_warm_s_over_diffusers", ("whole_dense",
                                           "diffusers_whole_dense"),
     "warm_s", "<=", 1.0),
    ("whole_dense_cold_s_over_diffusers", ("whole_dense",
                                           "diffusers_whole_dense"),
     "cold_s", "<=", 1.0),
]


def _row_peak(row):
  for key in ("peak_gib", "after_generate_gib", "after_second_run",
              "after_first_run"):
    if key in row:
      v = row[key]
      return v["peak_gib"] if isinstance(v, dict) else v
  return None


def targets_of(rows) -> list[dict]:
  by_name = {r["name"]: r for r in rows if "error" not in r}
  out = []
  for name, which, figure, op, target in TARGETS:
    names = which if isinstance(which, tuple) else (which,)
    if not all(n in by_name for n in names):
      continue
    if figure == "peak":
      value = _row_peak(by_name[names[0]])
    else:
      value = by_name[names[0]][figure] / by_name[names[1]][figure]
    out.append({"name": name, "rows": list(names), "value": value, "op": op,
                "target": target,
                "met": value <= target if op == "<=" else value >= target})
  return out


def record(rows_path, out, note):
  """benchmarks/results/pipeline_memory_<gpu>.json from a device call's
  rows file (run here: the provenance is this checkout's; `note` says
  which code ran there)."""
  sys.path.insert(0, str(HERE))
  import common  # pylint: disable=import-outside-toplevel
  rows = json.loads(pathlib.Path(rows_path).read_text())
  device = next((r["device"] for r in rows if "device" in r), "unknown")
  settings = {"device": device, "jax_on_device": next(
      (r["jax"] for r in rows if "jax" in r), "0.11.2 (the machine's)"),
              "video": "Wan2.1 480p x 81 (latent 16 x 21 x 60 x 104)",
              "source_note": note,
              "not_run": [name for name, *_ in ROWS
                          if name not in {r["name"] for r in rows}]}
  common.write_results(out, "pipeline_memory", settings, rows,
                       targets_of(rows))


def total_gib() -> float:
  out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                        "--format=csv,noheader,nounits"],
                       capture_output=True, text=True, check=True).stdout
  return float(out.split()[0]) / 1024  # MiB -> GiB


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--whole", action="store_true")
  parser.add_argument("--budget", type=float, default=None)
  parser.add_argument("--steps", type=int, default=50,
                      help="sampling steps of --whole (the peak does not "
                           "depend on it; the time does)")
  parser.add_argument("--runs", type=int, default=1,
                      help="videos per --whole / --diffusers-whole process")
  parser.add_argument("--diffusers-whole", action="store_true")
  parser.add_argument("--small", action="store_true")
  parser.add_argument("--only", nargs="*", default=None)
  parser.add_argument("--row-timeout", type=float, default=None,
                      help="seconds a row's process may run (then it is "
                           "killed and the row records the timeout)")
  parser.add_argument("--out", type=pathlib.Path)
  parser.add_argument("--record", nargs=2, metavar=("ROWS_JSON", "NOTE"),
                      help="write the results file --out from a device "
                           "call's rows")
  args = parser.parse_args()
  if args.record:
    return record(args.record[0], args.out, args.record[1])
  if args.diffusers_whole:
    print(json.dumps(run_diffusers_whole(args.small, 3 if args.small
                                         else args.steps, args.runs)))
    return
  if args.whole:
    row = run_whole(args.small, args.budget, args.steps, args.runs)
    row.update(device=jax.devices()[0].device_kind, pool_gib=_limit(),
               jax=jax.__version__)
    print(json.dumps(row))
    return
  total = None if args.small else total_gib()
  rows = []
  for name, what, tree, env in ROWS:
    if args.only is not None and name not in args.only:
      continue
    # The row's tree first; then what the caller's path holds (carried
    # wheels, e.g. diffusers').
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [tree] + os.environ.get("PYTHONPATH", "").split(os.pathsep)), **env)
    for k, v in env.items():
      if v.startswith("CAP"):  # a pool of N GiB on this GPU
        if total is None:
          env.pop(k)
          break
        env[k] = f"{int(v[3:]) / total:.4f}"
        break
    cmd = [sys.executable, *what] if what[0].endswith(".py") else [
        sys.executable, __file__, *what]
    if args.small:
      cmd += (["--small"] if {"--whole", "--diffusers-whole"} & set(what)
              else ["--size", "small"])
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                            timeout=args.row_timeout)
    except subprocess.TimeoutExpired as e:  # the child is killed
      proc = subprocess.CompletedProcess(cmd, -9, "", f"timed out: {e}")
    row = {"name": name, "tree": tree,
           "mem_fraction": env.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
           "process_s": time.perf_counter() - t0}
    if proc.returncode:
      row["error"] = proc.stderr[-2500:]
    else:
      row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows.append(row)
    print(json.dumps(row)[:1500], flush=True)
    if args.out:
      args.out.mkdir(parents=True, exist_ok=True)
      (args.out / "pipeline_memory_rows.json").write_text(
          json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()

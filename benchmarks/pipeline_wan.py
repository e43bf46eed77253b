"""The whole Wan2.1 pipeline per stage: text encoding, denoising, decoding.

  PYTHONPATH=. python benchmarks/pipeline_wan.py            # H200, ~6 min
  PYTHONPATH=. python benchmarks/pipeline_wan.py --small    # CPU smoke run

Full mode: `astraea_jax.pipelines.WanPipeline` with random weights in the
published sizes: umT5-XXL text encoder (bfloat16), Wan2.1-T2V-1.3B DiT
(bfloat16), Wan2.1 VAE (float32, as Wan runs it); 480p x 81 frames
(latent 16 x 21 x 60 x 104, 32,760 tokens), CFG batch 2, UniPC, 50 steps.

Stages, each timed as a median of `--repeats` runs after a first (compile)
run, whose time is recorded apart:
  1. text: the encoder on one 512-token prompt (120 real tokens), twice per
     video (prompt and negative prompt, as `encode_prompt` runs them);
  2. denoise, dense: the jitted CFG step `--time-steps` times; 50 steps
     extrapolated as 50 x the median step (stated in the JSON);
     denoise, Astraea mean budget 0.4: the default schedule's distinct
     token counts K each timed (median step after its compile), the
     schedule's time = the sum of its steps' times (as astraea_wan.py);
  3. decode: the VAE on the final latents (`WanPipeline.decode`, jitted).
End to end = text + denoise + decode (steady state, compiles excluded);
compile times are listed per stage. Peak device memory is read after each
stage (JAX's peak is cumulative: each value is the peak so far).

`--diffusers`: the same stages of diffusers' `WanPipeline` in the same
process, on the same GPU, after ours (JAX allocates on demand: run with
XLA_PYTHON_CLIENT_PREALLOCATE=false): transformers' `UMT5EncoderModel`
(bfloat16) on the same 512-token input, the CFG step as `WanPipeline`
runs it (`WanTransformer3DModel` bfloat16 cond + uncond forwards, the
guidance mix, `UniPCMultistepScheduler.step`), `AutoencoderKLWan.decode`
(float32, as `WanPipeline` loads it) with its latent de-normalisation.
Random weights of the same sizes (not the same values: timing only);
diffusers must be importable (the GPU machine has no diffusers: carry its
wheel). Writes benchmarks/results/pipeline_wan_h200.json only after
every measurement succeeded; `--small` writes to a temporary file (or
`--out`), never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import common
from astraea_jax import pipelines
from astraea_jax import testing
from astraea_jax.astraea import wan_tokenwise as astraea
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.configs import WanConfig
from astraea_jax.models.text import umt5
from astraea_jax.models.text.umt5 import UMT5Config
from astraea_jax.sampling import sampler as dense
from astraea_jax.vae import wan_vae
from astraea_jax.vae.wan_vae import WanVAEConfig

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "pipeline_wan_h200.json"
STEPS, GUIDANCE, SHIFT, BUDGET = 50, 5.0, 3.0, 0.4
PROMPT_TOKENS = 120  # a long Wan prompt; the rest of the 512 is padding


def random_module(abstract_module, seed):
  """The module with every parameter random (`testing.random_params`)."""
  graphdef, state = nnx.split(abstract_module)
  return nnx.merge(graphdef, testing.random_params(state,
                                                   jax.random.key(seed)))


def param_bytes(module) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(module)))


def gib(n):
  return None if n is None else n / 2**30


def build(small: bool):
  if small:
    config = WanConfig.tiny(num_layers=2)
    text_config = UMT5Config.tiny(d_model=config.text_dim)
    vae_config = WanVAEConfig.tiny()
    height, width, frames = 64, 96, 17
  else:
    config = WanConfig.wan21_t2v_1_3b(dtype="bfloat16",
                                      param_dtype="bfloat16")
    text_config = UMT5Config.umt5_xxl(dtype="bfloat16",
                                      param_dtype="bfloat16")
    vae_config = WanVAEConfig.wan21()
    height, width, frames = 480, 832, 81
  graphdef, params = testing.random_wan(config, seed=0)
  transformer = nnx.merge(graphdef, params)
  text_encoder = random_module(umt5.abstract_model(text_config), 1)
  # Eager init draws the VAE's kernels with numpy (fast); one jitted draw
  # of its ~200 separate leaves compiles for minutes.
  vae = wan_vae.WanVAE(vae_config, rngs=nnx.Rngs(2))
  pipe = pipelines.WanPipeline(transformer, vae, text_encoder,
                                  text_len=config.text_len)
  return pipe, (height, width, frames)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="tiny configs (CPU smoke run)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--time-steps", type=int, default=5,
                      help="dense steps timed (after the compile step)")
  parser.add_argument("--out", type=pathlib.Path)
  parser.add_argument("--diffusers", action="store_true",
                      help="also time diffusers' WanPipeline stages")
  args = parser.parse_args(argv)
  out = args.out or (pathlib.Path(tempfile.gettempdir())
                     / "pipeline_wan_small.json" if args.small
                     else DEFAULT_OUT)
  if args.small and out.resolve().is_relative_to(DEFAULT_OUT.parent):
    parser.error("--small never writes into benchmarks/results")

  pipe, (height, width, frames) = build(args.small)
  config = pipe.transformer.config
  shape = pipe.latent_shape(height, width, frames)
  tokens = common.num_tokens(config, shape)
  rows, peaks = [], {}
  print(f"{height}x{width}x{frames}: latent {shape}, {tokens} tokens; "
        f"params GiB: transformer {gib(param_bytes(pipe.transformer)):.2f}, "
        f"text encoder {gib(param_bytes(pipe.text_encoder)):.2f}, VAE "
        f"{gib(param_bytes(pipe.vae)):.3f}")

  # 1. Text: one prompt per call, as encode_prompt runs it. Each stage
  # jits over its own component's parameters only.
  egraph, estate = nnx.split(pipe.text_encoder)
  length = pipe.text_len
  encode = jax.jit(lambda s, i, m: nnx.merge(egraph, s).encode_for_wan(
      i, m, text_len=length))
  ids = jax.random.randint(jax.random.key(3), (1, length), 3,
                           pipe.text_encoder.config.vocab_size)
  mask = (jnp.arange(length) < min(PROMPT_TOKENS, length))[None].astype(
      jnp.int32)
  compile_text, t_text = common.timed(lambda: encode(estate, ids, mask),
                                      args.repeats)
  context = encode(estate, ids, mask)
  negative = encode(estate, ids[:, ::-1], mask)
  peaks["text"] = common.peak_memory_bytes()
  rows.append({"stage": "text_encoding", "prompts": 2, "tokens": length,
               "s": 2 * t_text, "s_per_prompt": t_text,
               "compile_s": compile_text})
  print(f"text: {t_text:.3f} s per prompt (compile {compile_text:.1f} s)")

  # 2a. Dense denoising: the jitted CFG step.
  tgraph, params = nnx.split(pipe.transformer)
  context_2b = dense.cfg_context(context, negative)
  scheduler = dense.make_scheduler("unipc", STEPS, shift=SHIFT)
  guidance = jnp.float32(GUIDANCE)
  noise = dense.draw_noise(jax.random.key(0), shape)
  run = common.Stepper(scheduler, guidance, noise)
  compile_dense, t_dense = run.time(
      dense.wan_model_fn(tgraph, params, context_2b), args.time_steps)
  latents = run.lat
  peaks["denoise_dense"] = common.peak_memory_bytes()
  rows.append({"stage": "denoise", "method": "dense", "steps": STEPS,
               "tokens": tokens, "s_per_step": t_dense,
               "s": STEPS * t_dense, "extrapolated_from_steps":
               args.time_steps, "compile_s": compile_dense})
  print(f"dense: {t_dense * 1e3:.1f} ms/step -> {STEPS * t_dense:.1f} s "
        f"(compile {compile_dense:.1f} s)")

  # 2b. Astraea: every distinct K of the mean-0.4 schedule.
  sel = selection.SelectionConfig()
  sched = schedule_lib.default_schedule(BUDGET, STEPS)
  cache = selection.init_cache(config.num_layers, 2, tokens, config.dim, sel)
  a = common.Stepper(scheduler, guidance, noise, cache)
  astraea_fn = astraea.model_fn(tgraph, params, context_2b)

  per_budget = {}
  for theta in sorted({float(b) for b in sched}, reverse=True):  # 1.0 first
    k = schedule_lib.num_selected(theta, tokens)
    compile_k, t_k = a.time(astraea_fn, args.repeats,
                            plan=astraea.Plan(k, sel))
    per_budget[theta] = t_k
    rows.append({"stage": "denoise_astraea_step", "budget": theta,
                 "tokens_selected": k, "s_per_step": t_k,
                 "fraction_of_dense": t_k / t_dense, "compile_s": compile_k})
    print(f"  budget {theta:.1f} (K={k}): {t_k * 1e3:.1f} ms/step")
  t_astraea = float(sum(per_budget[float(b)] for b in sched))
  compile_astraea = sum(r["compile_s"] for r in rows
                        if r["stage"] == "denoise_astraea_step")
  peaks["denoise_astraea"] = common.peak_memory_bytes()
  rows.append({"stage": "denoise", "method": "astraea", "mean_budget":
               float(np.mean(sched)), "schedule": [float(b) for b in sched],
               "steps": STEPS, "s": t_astraea, "extrapolated": "sum of the "
               "per-K step medians over the schedule",
               "compile_s": compile_astraea})
  print(f"astraea {BUDGET}: {t_astraea:.1f} s "
        f"({STEPS * t_dense / t_astraea:.2f}x the dense denoising)")

  # 3. Decode the dense run's latents.
  vgraph, vstate = nnx.split(pipe.vae)
  decode = jax.jit(lambda s, z: nnx.merge(vgraph, s).decode(z, clamp=True))
  compile_vae, t_vae = common.timed(lambda: decode(vstate, latents),
                                    args.repeats)
  video = decode(vstate, latents)
  assert video.shape == (1, 3, frames, height, width), video.shape
  peaks["decode"] = common.peak_memory_bytes()
  rows.append({"stage": "vae_decode", "latent_frames": shape[2],
               "video": [frames, height, width], "dtype":
               pipe.vae.config.dtype, "s": t_vae, "compile_s": compile_vae})
  print(f"decode: {t_vae:.2f} s (compile {compile_vae:.1f} s)")

  total_dense = 2 * t_text + STEPS * t_dense + t_vae
  total_astraea = 2 * t_text + t_astraea + t_vae
  rows.append({"stage": "end_to_end", "method": "dense", "s": total_dense})
  rows.append({"stage": "end_to_end", "method": "astraea",
               "mean_budget": BUDGET, "s": total_astraea,
               "speedup": total_dense / total_astraea})
  if all(v is not None for v in peaks.values()):
    rows.append({"stage": "peak_memory", **{
        f"{k}_gib": gib(v) for k, v in peaks.items()},
        "params_gib": {"transformer": gib(param_bytes(pipe.transformer)),
                       "text_encoder": gib(param_bytes(pipe.text_encoder)),
                       "vae": gib(param_bytes(pipe.vae))}})
  print(f"end to end: dense {total_dense:.1f} s, Astraea {BUDGET} "
        f"{total_astraea:.1f} s ({total_dense / total_astraea:.2f}x)")

  targets = [{"name": "denoise_speedup_budget_0.4",
              "value": STEPS * t_dense / t_astraea, "op": ">=",
              "target": 2.29}]  # Astraea paper, Wan at mean budget 0.4
  text_dtype = pipe.text_encoder.config.param_dtype
  vae_dtype = pipe.vae.config.dtype
  if args.diffusers:
    del pipe, estate, params, vstate, video, context_2b, cache, a, run
    torch_rows = diffusers_stages(args.small, config,
                                  (height, width, frames), shape, args)
    rows.extend(torch_rows)
    theirs = {r["stage"]: r["s"] for r in torch_rows if "s" in r}
    total_theirs = theirs["text_encoding"] + theirs["denoise"] + theirs[
        "vae_decode"]
    rows.append({"stage": "end_to_end", "method": "diffusers_dense",
                 "s": total_theirs})
    targets.append({"name": "end_to_end_dense_vs_diffusers",
                    "value": total_dense / total_theirs, "op": "<=",
                    "target": 1.0})
    print(f"diffusers end to end: {total_theirs:.1f} s (ours dense "
          f"{total_dense:.1f} s: {total_theirs / total_dense:.2f}x faster)")
  settings = {
      "model": "wan2.1-t2v-1.3b architecture, random weights"
               if not args.small else "tiny configs (smoke run)",
      "text_encoder": f"umt5 {text_dtype}",
      "transformer_dtype": config.dtype, "vae_dtype": vae_dtype,
      "video": [frames, height, width], "latent_shape": list(shape),
      "tokens": tokens, "cfg_batch": 2, "steps": STEPS,
      "scheduler": f"unipc shift {SHIFT}", "guidance": GUIDANCE,
      "repeats": args.repeats, "dense_steps_timed": args.time_steps,
      "extrapolation": "dense: 50 x median step; Astraea: sum over the "
                       "schedule of the per-K median step",
      "peak_memory": "cumulative peak after each stage, in stage order",
      "diffusers": ("stages of diffusers' WanPipeline timed in this "
                    "process after ours (random weights, same sizes; "
                    "text bf16, transformer bf16, VAE fp32)"
                    if args.diffusers else "not run (--diffusers not given)")}
  common.write_results(out, "pipeline_wan", settings, rows, targets)


def torch_timed(fn, repeats):
  """(first-call seconds, median of `repeats` more), CUDA-synchronised."""
  import torch  # pylint: disable=import-outside-toplevel
  sync = torch.cuda.synchronize if torch.cuda.is_available() else (
      lambda: None)
  times = []
  for _ in range(repeats + 1):
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
      fn()
    sync()
    times.append(time.perf_counter() - t0)
  return times[0], float(np.median(times[1:]))


def diffusers_configs(small: bool, text_dim: int):
  """(transformers' config of the text encoder, `AutoencoderKLWan`
  kwargs): Wan2.1's umT5-XXL and VAE (published configs), or tiny ones for
  smoke runs (text width text_dim, the DiT's)."""
  import transformers  # pylint: disable=import-outside-toplevel
  if small:
    return transformers.UMT5Config(
        vocab_size=256, d_model=text_dim, d_kv=8, d_ff=64, num_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu"), dict(base_dim=8,
                                                            z_dim=16)
  return transformers.UMT5Config(
      vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
      num_heads=64, relative_attention_num_buckets=32,
      relative_attention_max_distance=128, feed_forward_proj="gated-gelu"), {}


def diffusers_stages(small, config, video, shape, args):
  """Rows timing diffusers' WanPipeline stages (module docstring)."""
  # pylint: disable=import-outside-toplevel
  import diffusers
  import torch
  import transformers

  import dense_wan
  device = "cuda" if torch.cuda.is_available() else "cpu"
  bf16 = torch.bfloat16 if not small else torch.float32
  height, width, frames = video
  torch.manual_seed(0)
  text_config, vae_kwargs = diffusers_configs(small, config.text_dim)
  rows = []
  # Build on the GPU directly (random init there takes seconds).
  with torch.device(device):
    encoder = transformers.UMT5EncoderModel(text_config).to(bf16).eval()
  length = 512 if not small else 16
  ids = torch.randint(3, text_config.vocab_size, (1, length), device=device)
  mask = (torch.arange(length, device=device) < min(PROMPT_TOKENS, length)
          ).to(torch.int64)[None]
  first, t_text = torch_timed(lambda: encoder(ids, mask).last_hidden_state,
                              args.repeats)
  rows.append({"stage": "text_encoding", "method": "diffusers",
               "prompts": 2, "s": 2 * t_text, "s_per_prompt": t_text,
               "first_call_s": first})
  print(f"diffusers text: {t_text:.3f} s per prompt")
  del encoder
  peak_text = torch.cuda.max_memory_allocated() if device == "cuda" else None

  # Our transformer's architecture, built as dense_wan.py builds it.
  dit = dense_wan.build_diffusers(config, device=device, dtype=bf16, seed=0)
  scheduler = diffusers.UniPCMultistepScheduler(
      prediction_type="flow_prediction", use_flow_sigmas=True,
      num_train_timesteps=1000, flow_shift=SHIFT)
  scheduler.set_timesteps(STEPS, device=device)
  text_dim = config.text_dim
  cond = torch.randn(1, length, text_dim, device=device, dtype=bf16)
  uncond = torch.randn(1, length, text_dim, device=device, dtype=bf16)
  state = {"lat": torch.randn(*shape, device=device), "i": 0}

  def step():  # one CFG step as WanPipeline runs it
    t = scheduler.timesteps[state["i"] % STEPS]
    x = state["lat"].to(bf16)
    tt = t.expand(x.shape[0])
    pos = dit(x, tt, cond, return_dict=False)[0]
    neg = dit(x, tt, uncond, return_dict=False)[0]
    pred = neg + GUIDANCE * (pos - neg)
    state["lat"] = scheduler.step(pred, t, state["lat"],
                                  return_dict=False)[0]
    state["i"] += 1

  first, t_step = torch_timed(step, args.time_steps)
  rows.append({"stage": "denoise", "method": "diffusers", "steps": STEPS,
               "s_per_step": t_step, "s": STEPS * t_step,
               "extrapolated_from_steps": args.time_steps,
               "first_call_s": first})
  print(f"diffusers dense: {t_step * 1e3:.1f} ms/step")
  del dit
  peak_dit = torch.cuda.max_memory_allocated() if device == "cuda" else None

  with torch.device(device):
    vae = diffusers.AutoencoderKLWan(**vae_kwargs).to(torch.float32).eval()
  z = state["lat"].float()
  mean = torch.tensor(vae.config.latents_mean, device=device).view(
      1, -1, 1, 1, 1)
  std = torch.tensor(vae.config.latents_std, device=device).view(
      1, -1, 1, 1, 1)
  first, t_vae = torch_timed(
      lambda: vae.decode(z * std + mean, return_dict=False)[0],
      max(1, args.repeats - 1))
  rows.append({"stage": "vae_decode", "method": "diffusers", "s": t_vae,
               "video": [frames, height, width], "first_call_s": first})
  print(f"diffusers decode: {t_vae:.2f} s")
  if device == "cuda":
    rows.append({"stage": "peak_memory", "method": "diffusers",
                 "text_gib": gib(peak_text), "denoise_gib": gib(peak_dit),
                 "decode_gib": gib(torch.cuda.max_memory_allocated())})
  return rows


if __name__ == "__main__":
  main()

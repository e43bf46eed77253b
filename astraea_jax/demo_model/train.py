"""Training the demo model: flow matching on procedurally rendered clips.

  astraea train-demo --workdir work --minutes 7.5 --export-to weights_out
  astraea train-demo --workdir work --minutes 5 --resume     # continue
  astraea train-demo --workdir work --small --steps 30       # CPU smoke run

Objective (rectified flow as Wan trains it): a clean clip x0 in [-1, 1],
noise eps ~ N(0, I) and a noise level sigma in (0, 1) give
x_sigma = (1 - sigma) x0 + sigma eps; the DiT at timestep 1000 sigma
predicts the velocity v = eps - x0 under a mean squared error. sigma is
drawn as u ~ logit-normal(0, 1) (SD3, Esser et al. 2024, arXiv 2403.03206,
eq. 19: more weight on the middle noise levels, where the velocity is
hardest to predict), then shifted with the sampler's flow shift,
sigma = s u / (1 + (s - 1) u): the same map that places the sampler's
steps, so training sees noise levels in the proportions sampling visits
them.

Each step draws its batch ON the device inside the jitted step, from the
key fold_in(run_key, step): `data.sample_scenes` -> `data.render` ->
`data.caption_tokens`, with captions dropped to the empty caption with
probability `caption_dropout` (classifier-free guidance's unconditional
model). The DiT computes in bfloat16 with float32 parameters (the config's
dtype), the text encoder in float32; AdamW with global-norm clipping,
linear warm-up then constant (or cosine when the step count is known), and
an exponential moving average of the weights, which is what is exported.

Checkpoints (orbax) hold the parameters, EMA, optimizer state, step and run
key: `--resume` continues exactly where the last one stopped, step for
step as if never interrupted (tests/test_demo_model.py checks this).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from astraea_jax import outputs, provenance
from astraea_jax.demo_model import data
from astraea_jax.demo_model import model as model_lib
from astraea_jax.models import layers
from astraea_jax.sampling import schedulers

F32 = jnp.float32
CHECKPOINT_DIR = "checkpoints"
RUN_FILE = "run.json"
LOSS_FILE = "loss.json"
LOSS_PLOT = "loss.png"
KEEP_CHECKPOINTS = 2
ATTENTION_CHOICES = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings of one training run."""

  batch: int = 128
  # 1e-3 rather than 3e-4: at the demo's width (192) it trained stably and
  # reached a 13% lower loss in 500 steps (MODEL_CARD.md, "Training").
  learning_rate: float = 1e-3
  weight_decay: float = 0.01
  warmup_steps: int = 500
  # Adam's second-moment decay: 0.99 rather than 0.999 adapts faster in a
  # run of a few thousand steps.
  beta2: float = 0.99
  grad_clip: float = 1.0
  ema_decay: float = 0.999
  caption_dropout: float = 0.1
  # Cosine decay to `final_lr_fraction` over `decay_steps` steps after the
  # warm-up; None keeps the rate constant (time-limited runs).
  decay_steps: int | None = None
  final_lr_fraction: float = 0.1
  seed: int = 0
  # The flow shift of the training noise levels; None = the config's
  # sampling shift. 1.0 trains low noise levels (fine detail) as often as
  # high ones, which a pixel-space model at 48 px needs.
  sigma_shift: float | None = None
  # A weights folder (`export`) whose parameters start the run (params and
  # EMA); None = random initialisation.
  init_from: str | None = None

  def __post_init__(self):
    if self.batch < 1 or self.warmup_steps < 0:
      raise ValueError(f"{self.batch=} must be >= 1, {self.warmup_steps=} "
                       ">= 0")
    if not 0 <= self.caption_dropout < 1 or not 0 <= self.ema_decay < 1:
      raise ValueError(f"{self.caption_dropout=} and {self.ema_decay=} must "
                       "lie in [0, 1)")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# The objective ---------------------------------------------------------------


def learning_rate(step, tc: TrainConfig):
  """Linear warm-up to the peak, then constant or cosine decay."""
  step = jnp.asarray(step, F32)
  warm = jnp.minimum(1.0, (step + 1) / max(tc.warmup_steps, 1))
  if tc.decay_steps is None:
    return tc.learning_rate * warm
  progress = jnp.clip((step - tc.warmup_steps) / max(tc.decay_steps, 1),
                      0.0, 1.0)
  cosine = 0.5 * (1 + jnp.cos(jnp.pi * progress))
  floor = tc.final_lr_fraction
  return tc.learning_rate * warm * (floor + (1 - floor) * cosine)


def sample_sigmas(key, batch: int, shift: float):
  """Noise levels: u ~ logit-normal(0, 1), shifted as the sampler shifts."""
  u = jax.nn.sigmoid(jax.random.normal(key, (batch,), F32))
  return schedulers.shift_sigmas(u, shift)


def make_batch(key, config: model_lib.DemoConfig, batch: int,
               caption_dropout: float):
  """(x0 (B, 3, F, H, W) in [-1, 1], tokens (B, L) int32) drawn on device."""
  k_scene, k_drop = jax.random.split(key)
  spec = config.video_spec
  scenes = data.sample_scenes(k_scene, batch, spec=spec)
  video = data.render(scenes, spec)  # (B, F, H, W, 3) in [0, 1]
  x0 = jnp.transpose(video * 2.0 - 1.0, (0, 4, 1, 2, 3))
  tokens = data.caption_tokens(scenes)
  dropped = jax.random.bernoulli(k_drop, caption_dropout, (batch,))
  return x0, jnp.where(dropped[:, None], 0, tokens)


def loss_fn(params, graphdefs, key, config: model_lib.DemoConfig,
            tc: TrainConfig):
  """Flow-matching MSE of one freshly drawn batch (see the module doc)."""
  k_batch, k_sigma, k_noise = jax.random.split(key, 3)
  x0, tokens = make_batch(k_batch, config, tc.batch, tc.caption_dropout)
  sigma = sample_sigmas(k_sigma, tc.batch, config.shift
                        if tc.sigma_shift is None else tc.sigma_shift)
  eps = jax.random.normal(k_noise, x0.shape, F32)
  s = sigma[:, None, None, None, None]
  x_t = (1 - s) * x0 + s * eps
  m = model_lib.merge(config, graphdefs, params)
  velocity = m.dit(x_t, 1000.0 * sigma, m.text(tokens))
  return jnp.mean(jnp.square(velocity - (eps - x0)))


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """AdamW without its learning rate (applied in `train_step`, so the rate
  is a function of the step alone). Decay only on matrices (ndim >= 2)."""
  return optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.scale_by_adam(b1=0.9, b2=tc.beta2, eps=1e-8),
      optax.add_decayed_weights(
          tc.weight_decay, mask=lambda p: jax.tree.map(
              lambda x: x.ndim >= 2, p)))


def ema_decay(step, tc: TrainConfig):
  """min(decay, (1 + step) / (10 + step)): early averages forget the
  random initialisation quickly (the usual EMA warm-up)."""
  step = jnp.asarray(step, F32)
  return jnp.minimum(tc.ema_decay, (1 + step) / (10 + step))


def train_step(state, graphdefs, config, tc, optimizer):
  """One optimisation step on the batch of key fold_in(run_key, step)."""
  step = state["step"]
  key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), step)
  loss, grads = jax.value_and_grad(loss_fn)(state["params"], graphdefs, key,
                                            config, tc)
  updates, opt_state = optimizer.update(grads, state["opt_state"],
                                        state["params"])
  lr = learning_rate(step, tc)
  params = jax.tree.map(lambda p, u: p - lr * u, state["params"], updates)
  decay = ema_decay(step, tc)
  ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"],
                     params)
  new_state = {"params": params, "ema": ema, "opt_state": opt_state,
               "step": step + 1, "key": state["key"]}
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g))
                           for g in jax.tree.leaves(grads)))
  return new_state, {"loss": loss, "lr": lr, "grad_norm": grad_norm}


def init_state(config: model_lib.DemoConfig, tc: TrainConfig, optimizer):
  """(graphdefs, state) of a fresh run."""
  graphdefs, params = model_lib.split(model_lib.init(config, tc.seed))
  if tc.init_from is not None:
    start = model_lib.load(tc.init_from, dtype=config.wan.dtype)
    if start.config != config:
      raise ValueError(f"--init-from {tc.init_from}: its model config "
                       f"{start.config} differs from this run's {config}")
    _, params = model_lib.split(start)
  params = jax.tree.map(jnp.asarray, params)
  state = {"params": params, "ema": jax.tree.map(jnp.copy, params),
           "opt_state": optimizer.init(params),
           "step": jnp.zeros((), jnp.int32),
           "key": jax.random.key_data(jax.random.key(tc.seed + 1))}
  return graphdefs, state


# Attention during training ----------------------------------------------------


@contextlib.contextmanager
def trainable_attention(implementation: str):
  """Routes the models' attention through `jax.nn.dot_product_attention`.

  The Pallas kernels behind `layers.attention` have no backward pass, so
  the training step is traced with this differentiable attention in their
  place (same math: softmax(q k^T / sqrt(D)) v over all keys). It returns
  no LSE (zeros; training never reads it). Only dense, unmasked attention
  (all that WanDiT uses) is accepted. Restored on exit.
  """
  original = layers.attention

  def attention(q, k, v, *, q_index=None, scale=None, kv_mask=None):
    if q_index is not None or kv_mask is not None:
      raise NotImplementedError("training attention is dense and unmasked")
    out = jax.nn.dot_product_attention(q, k, v, scale=scale,
                                       implementation=implementation)
    b, lq, h, _ = q.shape
    return out.astype(q.dtype), jnp.zeros((b, h, lq), F32)

  layers.attention = attention
  try:
    yield
  finally:
    layers.attention = original


# Compiled steps by (config, train config, attention): tests and resumed
# runs in one process compile once.
_COMPILED = {}


def compile_step(state, graphdefs, config, tc, optimizer, attention: str,
                 compiler_options: dict | None = None):
  """(compiled step, implementation used): AOT-compiled, state donated.

  attention "auto": cuDNN flash attention on a GPU when it compiles, else
  XLA's attention. compiler_options: XLA options for this compilation
  (the CPU tests pass {"xla_backend_optimization_level": 0}: 3x faster to
  compile, results equal to float32 rounding).
  """
  options = dict(compiler_options or {})
  cache_key = (config, tc, attention, jax.devices()[0].platform,
               tuple(sorted(options.items())))
  if cache_key not in _COMPILED:
    _COMPILED[cache_key] = _compile_step(state, graphdefs, config, tc,
                                         optimizer, attention, options)
  return _COMPILED[cache_key]


def _compile_step(state, graphdefs, config, tc, optimizer, attention: str,
                  options: dict):
  if attention not in ATTENTION_CHOICES:
    raise ValueError(f"{attention=} must be one of {ATTENTION_CHOICES}")
  if attention == "auto":
    on_gpu = jax.devices()[0].platform == "gpu"
    candidates = ("cudnn", "xla") if on_gpu else ("xla",)
  else:
    candidates = (attention,)
  jitted = jax.jit(
      lambda s: train_step(s, graphdefs, config, tc, optimizer),
      donate_argnums=0)
  errors = []
  for implementation in candidates:
    try:
      with trainable_attention(implementation):
        lowered = jitted.lower(state)
        compiled = (lowered.compile(compiler_options=options) if options
                    else lowered.compile())
        return compiled, implementation
    except Exception as e:
      if implementation == candidates[-1]:
        raise
      errors.append(f"{implementation}: {type(e).__name__}: {e}")
      print(f"train-demo: {implementation} attention unavailable "
            f"({errors[-1][:300]}); trying the next")
  raise AssertionError("unreachable")


# Checkpoints -----------------------------------------------------------------


def _to_saveable(state):
  """The state with the optimizer state as a flat {"i": leaf} dict."""
  leaves = jax.tree.leaves(state["opt_state"])
  return {**state, "opt_state": {str(i): x for i, x in enumerate(leaves)}}


def _from_saveable(saved, template):
  treedef = jax.tree.structure(template["opt_state"])
  leaves = [saved["opt_state"][str(i)] for i in range(treedef.num_leaves)]
  return {**saved, "opt_state": jax.tree.unflatten(treedef, leaves)}


def checkpoint_steps(workdir) -> list[int]:
  """Steps of the complete checkpoints in workdir, ascending."""
  root = pathlib.Path(workdir) / CHECKPOINT_DIR
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir()
                if p.is_dir() and p.name.isdigit())


def save_checkpoint(workdir, state, history: list[dict]):
  """Writes checkpoints/<step>/ (orbax, atomic) and the loss history;
  keeps the last KEEP_CHECKPOINTS."""
  root = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
  root.mkdir(parents=True, exist_ok=True)
  step = int(state["step"])
  dst = root / f"{step:08d}"
  if dst.exists():
    return dst
  # orbax writes to a temporary name and renames when complete; the digit-only
  # name is what marks a finished checkpoint.
  tmp = root / f".{step:08d}.partial"
  if tmp.exists():
    shutil.rmtree(tmp)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp / "state", _to_saveable(state))
  checkpointer.wait_until_finished()
  outputs.write_json(tmp / LOSS_FILE, history, indent=1)
  os.rename(tmp, dst)
  for old in checkpoint_steps(workdir)[:-KEEP_CHECKPOINTS]:
    shutil.rmtree(root / f"{old:08d}")
  return dst


def restore_checkpoint(workdir, template, step: int | None = None):
  """(state, history) of the latest (or given) checkpoint; template: a
  state of the same config (its shapes and optimizer structure)."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {workdir}/{CHECKPOINT_DIR}")
  step = steps[-1] if step is None else step
  path = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR / f"{step:08d}"
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
      _to_saveable(template))
  saved = ocp.StandardCheckpointer().restore(path / "state", abstract)
  history = json.loads((path / LOSS_FILE).read_text())
  return _from_saveable(saved, template), history


def _run_doc(config, tc):
  return {"demo_config": config.to_dict(), "train_config": tc.to_dict()}


def _check_run(workdir, config, tc, resume: bool):
  """The workdir's run.json must match (resume) or be absent (new run)."""
  path = pathlib.Path(workdir) / RUN_FILE
  if not resume:
    if checkpoint_steps(workdir):
      raise ValueError(
          f"{workdir} already holds checkpoints {checkpoint_steps(workdir)};"
          " pass --resume to continue that run, or use another --workdir")
    return
  if not path.exists() or not checkpoint_steps(workdir):
    raise FileNotFoundError(f"--resume: no run to resume in {workdir} (no "
                            f"{RUN_FILE} or no checkpoint)")
  saved = json.loads(path.read_text())
  new = json.loads(json.dumps(_run_doc(config, tc)))
  if saved != new:
    diffs = [f"{part}.{k}: saved {saved[part].get(k)!r}, now {v!r}"
             for part in new for k, v in new[part].items()
             if saved.get(part, {}).get(k) != v]
    raise ValueError(f"--resume with a different configuration than the run"
                     f" in {workdir}: {'; '.join(diffs)}")


# Loss history and plot -------------------------------------------------------


def plot_loss(history: list[dict], path) -> bool:
  """loss.png (log scale) if matplotlib is importable; False if not."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  steps = [h["step"] for h in history]
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(steps, [h["loss"] for h in history], lw=1)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("flow-matching loss (mean over the logging window)")
  ax.set_title("demo model training")
  ax.grid(alpha=0.3)
  outputs.write_figure(path, fig, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return True


# The loop --------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
  state: dict
  history: list[dict]
  steps_this_run: int
  seconds: float
  compile_seconds: float
  loop_seconds: float  # the training loop alone (checkpoints included)
  attention: str
  stopped_by: str


def train(workdir, config: model_lib.DemoConfig, tc: TrainConfig, *,
          minutes: float | None = None, max_steps: int | None = None,
          resume: bool = False, checkpoint_minutes: float = 2.0,
          log_every: int = 25, attention: str = "auto",
          compiler_options: dict | None = None,
          progress: bool = True) -> TrainResult:
  """Trains until `minutes` of wall time (compilation included) or step
  `max_steps` (whichever first), checkpointing every `checkpoint_minutes`
  and at the end; writes loss.json (+ loss.png) in workdir.

  At least one limit must be given. The step count is global: a resumed
  run stops at max_steps counted from the first run's start.
  """
  if minutes is None and max_steps is None:
    raise ValueError("give a time limit (minutes) or a step limit "
                     "(max_steps)")
  t_start = time.perf_counter()
  deadline = math.inf if minutes is None else t_start + 60.0 * minutes
  workdir = pathlib.Path(workdir)
  _check_run(workdir, config, tc, resume)
  outputs.mark_folder(workdir, command="train-demo")
  outputs.write_json(workdir / RUN_FILE, _run_doc(config, tc), indent=1)
  optimizer = make_optimizer(tc)
  graphdefs, state = init_state(config, tc, optimizer)
  history = []
  if resume:
    state, history = restore_checkpoint(workdir, state)
  t0 = time.perf_counter()
  step_fn, implementation = compile_step(state, graphdefs, config, tc,
                                         optimizer, attention,
                                         compiler_options)
  if attention == "auto" and implementation != "xla":
    # A trial step on a copy (the step donates its input): an attention
    # implementation that compiles but fails to run falls back to XLA.
    try:
      jax.block_until_ready(step_fn(jax.tree.map(jnp.copy, state)))
    except Exception as e:  # noqa: BLE001 - any failure: use XLA's attention
      print(f"train-demo: {implementation} attention failed to run "
            f"({type(e).__name__}: {str(e)[:300]}); using XLA's")
      step_fn, implementation = compile_step(
          state, graphdefs, config, tc, optimizer, "xla", compiler_options)
  compile_seconds = time.perf_counter() - t0
  first_step = int(state["step"])
  stop_at = math.inf if max_steps is None else max_steps
  bar = tqdm.tqdm(initial=first_step,
                  total=None if max_steps is None else max_steps,
                  disable=not progress, desc="train-demo", unit="step",
                  mininterval=2.0)
  last_save = loop_start = time.perf_counter()
  window, stopped_by, step = [], "steps", first_step
  try:
    while step < stop_at:
      if time.perf_counter() >= deadline:
        stopped_by = "time"
        break
      state, metrics = step_fn(state)
      step += 1
      window.append(metrics)
      bar.update(1)
      if len(window) == log_every or step == stop_at:
        # Waits for the device, so the time check above stays honest.
        losses = [float(m["loss"]) for m in window]
        history.append({"step": step, "loss": float(np.mean(losses)),
                        "lr": float(window[-1]["lr"]),
                        "grad_norm": float(window[-1]["grad_norm"]),
                        "seconds": time.perf_counter() - t_start})
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}",
                        lr=f"{history[-1]['lr']:.2e}")
        if not np.isfinite(history[-1]["loss"]):
          raise FloatingPointError(f"loss is {history[-1]['loss']} at step "
                                   f"{step}; stopping (no checkpoint)")
        window = []
        if time.perf_counter() - last_save >= 60.0 * checkpoint_minutes:
          save_checkpoint(workdir, state, history)
          last_save = time.perf_counter()
  except KeyboardInterrupt:
    stopped_by = "interrupt"
  finally:
    bar.close()
  jax.block_until_ready(state)
  loop_seconds = time.perf_counter() - loop_start
  if window:
    history.append({"step": step,
                    "loss": float(np.mean([float(m["loss"])
                                           for m in window])),
                    "lr": float(window[-1]["lr"]),
                    "grad_norm": float(window[-1]["grad_norm"]),
                    "seconds": time.perf_counter() - t_start})
  save_checkpoint(workdir, state, history)
  outputs.write_json(workdir / LOSS_FILE, history, indent=1)
  if not plot_loss(history, workdir / LOSS_PLOT):
    print("train-demo: matplotlib is not installed; no loss.png (the "
          "history is in loss.json)")
  return TrainResult(state=state, history=history,
                     steps_this_run=step - first_step,
                     seconds=time.perf_counter() - t_start,
                     compile_seconds=compile_seconds,
                     loop_seconds=loop_seconds, attention=implementation,
                     stopped_by=stopped_by)


def load_run(workdir) -> tuple[model_lib.DemoConfig, TrainConfig]:
  """The configs of the run in workdir (its run.json)."""
  path = pathlib.Path(workdir) / RUN_FILE
  if not path.exists():
    raise FileNotFoundError(f"{workdir}: no training run here (no {RUN_FILE})")
  doc = json.loads(path.read_text())
  return (model_lib.DemoConfig.from_dict(doc["demo_config"]),
          TrainConfig(**doc["train_config"]))


def export_from_workdir(workdir, folder, *, extra: dict | None = None):
  """Exports the EMA weights of the workdir's latest checkpoint to
  `folder` (demo.safetensors + config.json)."""
  config, tc = load_run(workdir)
  optimizer = make_optimizer(tc)
  _, template = init_state(config, tc, optimizer)
  state, history = restore_checkpoint(workdir, template)
  tail = history[-10:]
  metadata = {
      "steps": int(state["step"]),
      "final_loss": (float(np.mean([h["loss"] for h in tail]))
                     if tail else None),
      "final_loss_window_steps": (tail[-1]["step"] - tail[0]["step"]
                                  if len(tail) > 1 else 0),
      "train_config": tc.to_dict(),
      **(extra or {}),
  }
  return model_lib.export(folder, config, state["ema"], metadata=metadata)


def environment() -> dict:
  """`provenance.environment()` plus the platform (cpu / gpu)."""
  return {**provenance.environment(), "platform": jax.devices()[0].platform}


# `astraea train-demo` --------------------------------------------------------


def run_cli(args) -> int:
  """The `astraea train-demo` command (arguments: see astraea_jax/commands/demo.py)."""
  config = (model_lib.DemoConfig.small() if args.small
            else model_lib.DemoConfig.default())
  if args.lr_schedule == "cosine" and args.steps is None:
    raise ValueError("--lr-schedule cosine needs --steps (the decay length)")
  decay = (None if args.lr_schedule == "constant"
           else max(1, args.steps - args.warmup))
  tc = TrainConfig(batch=args.batch, learning_rate=args.lr,
                   weight_decay=args.weight_decay, warmup_steps=args.warmup,
                   ema_decay=args.ema_decay, decay_steps=decay,
                   seed=args.seed, sigma_shift=args.sigma_shift,
                   init_from=args.init_from)
  export_to = args.export_to
  if args.export:
    if export_to is not None:
      raise ValueError("give --export or --export-to DIR, not both")
    export_to = model_lib.WEIGHTS_DIR
  summary = {}
  if args.export_only:
    if export_to is None:
      raise ValueError("--export-only needs --export or --export-to DIR")
  else:
    if args.minutes is None and args.steps is None:
      raise ValueError("give --minutes M (wall time, compilation included) "
                       "and/or --steps N")
    result = train(args.workdir, config, tc, minutes=args.minutes,
                   max_steps=args.steps, resume=args.resume,
                   checkpoint_minutes=args.checkpoint_minutes,
                   log_every=args.log_every, attention=args.attention,
                   progress=not args.quiet)
    run_seconds = result.loop_seconds
    summary = {
        **environment(), "steps": int(result.state["step"]),
        "steps_this_run": result.steps_this_run,
        "seconds": result.seconds, "compile_seconds": result.compile_seconds,
        "steps_per_second": (result.steps_this_run / run_seconds
                             if run_seconds > 0 else None),
        "batch": tc.batch, "attention": result.attention,
        "stopped_by": result.stopped_by,
        "final_loss": result.history[-1]["loss"] if result.history else None,
    }
    outputs.write_json(pathlib.Path(args.workdir) / "summary.json", summary,
                       indent=1)
    print(f"train-demo: step {summary['steps']} ({result.steps_this_run} this"
          f" run, {summary['steps_per_second'] or 0:.2f} steps/s, compile "
          f"{result.compile_seconds:.0f} s, {result.attention} attention, "
          f"stopped by {result.stopped_by}); loss {summary['final_loss']}; "
          f"wrote {args.workdir}/{LOSS_FILE}")
  if export_to is not None:
    extra = {k: summary[k] for k in ("device", "jax", "seconds",
                                     "steps_per_second", "attention")
             if k in summary}
    folder = export_from_workdir(args.workdir, export_to, extra=extra)
    print(f"train-demo: exported the EMA weights to {folder}/"
          f"{model_lib.WEIGHTS_FILE} and {model_lib.CONFIG_FILE}")
  return 0

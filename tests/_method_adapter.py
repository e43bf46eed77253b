"""The ONE place where the method references touch the library.

tests/reference_*.py import nothing from astraea_jax; tests/test_reference_*
import the library only through this module. Issue #21 is redesigning the
token-wise engine landed (astraea/wan_tokenwise.py, stdit3_tokenwise.py,
step_plans.py, parallel/sequence_parallel.py): only this file followed it.

Everything returned is NumPy. Caches are dicts {update, input, lse, stale}
of (L, B, N, ...) arrays, as the references keep them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax import testing
from astraea_jax.astraea import policies
from astraea_jax.astraea import wan_tokenwise as astraea_sampler
from astraea_jax.astraea import search as search_lib
from astraea_jax.astraea import selection
from astraea_jax.astraea import step_reuse
from astraea_jax.astraea import stdit3_tokenwise as astraea_stdit3
from astraea_jax.configs import STDiT3Config, WanConfig
from astraea_jax.models import stdit3 as stdit3_lib
from astraea_jax.sampling import opensora as opensora_sampling

SELECTION = selection.EXACT  # w_alpha 1, w_beta 0.5, the paper's state


def flat_params(state) -> dict[str, np.ndarray]:
  """Parameter extraction: {"a.b.c": array} of an nnx.State."""
  out = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = np.asarray(v, np.float64)

  walk(nnx.to_pure_dict(state), "")
  return out


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


# Wan ---------------------------------------------------------------------------


def wan_model(seed=0, **overrides):
  """(split model, reference kwargs) of a tiny random WanDiT."""
  config = WanConfig.tiny(**overrides)
  split = testing.random_wan(config, seed=seed)
  ref_kwargs = {"num_heads": config.num_heads,
                "patch_size": config.patch_size, "text_len": config.text_len,
                "freq_dim": config.freq_dim, "eps": config.eps,
                "rope_theta": config.rope_theta}
  return split, ref_kwargs


def wan_init_cache(split, batch, num_tokens):
  c = nnx.merge(*split).config
  return selection.init_cache(c.num_layers, batch, num_tokens, c.dim,
                              SELECTION)


def wan_astraea_forward(split, latents, t, context_2b, cache, k):
  """`astraea.sampler.forward` (sparse path): (velocity, cache, jax cache)."""
  model = nnx.merge(*split)
  v, cache = jax.jit(
      lambda la, tt, cx, ca: astraea_sampler.forward(
          model, la, tt, cx, ca, num_selected=k, config=SELECTION))(
              jnp.asarray(latents, jnp.float32),
              jnp.asarray(t, jnp.float32),
              jnp.asarray(context_2b, jnp.float32), cache)
  return np.asarray(v), to_numpy(cache), cache


# Policies (ToCa, PAB, step caching) on the Wan sampler ------------------------


def policy_sample(split, noise, context, negative, policy, *, steps, shift,
                  guidance):
  """`policies.sample` with the Euler scheduler: (latents, carry, stats)."""
  latents, stats, carry = policies.sample(
      *split, jnp.asarray(noise, jnp.float32),
      jnp.asarray(context, jnp.float32), jnp.asarray(negative, jnp.float32),
      policy=policy, scheduler="euler", steps=steps, shift=shift,
      guidance_scale=guidance, progress=False, return_stats=True,
      return_carry=True)
  return np.asarray(latents), to_numpy(carry), stats


def toca(interval, ratio):
  return policies.ToCa(interval=interval, ratio=ratio, selection=SELECTION)


def pab(self_range, cross_range, window):
  return policies.PAB(self_range=self_range, cross_range=cross_range,
                      window=window)


def pab_plans(policy, timesteps):
  """[(reuse_self, reuse_cross)] per step."""
  return [(p.reuse_self, p.reuse_cross)
          for p in policy.plans(np.asarray(timesteps), 1)]


def step_cache(threshold):
  return policies.StepCache(threshold=threshold)


def easycache(tau, warmup):
  return policies.EasyCache(tau=tau, warmup=warmup)


def magcache(thresh, max_skip, retention, ratios=()):
  return policies.MagCache(thresh=thresh, max_skip=max_skip,
                           retention=retention, ratios=tuple(ratios))


def magcache_calibrate(split, noise, context, negative, policy, *, steps,
                       shift, guidance):
  """`MagCache.calibrate` with the Euler scheduler: the ratio curve."""
  calibrated = policy.calibrate(
      *split, jnp.asarray(noise, jnp.float32),
      jnp.asarray(context, jnp.float32), jnp.asarray(negative, jnp.float32),
      scheduler="euler", steps=steps, shift=shift, guidance_scale=guidance,
      progress=False)
  return np.asarray(calibrated.ratios), calibrated


def magcache_decisions(ratios, thresh, max_skip, retention):
  """The library's computed-step flags from a ratio curve."""
  policy = magcache(thresh, max_skip, retention, ratios)
  return policy.decisions(len(ratios))


def easycache_decisions(estimates, tau, warmup_steps):
  """The library's EasyCache rule on recorded estimates (computed flags)."""
  return step_reuse.easycache_decisions(estimates, tau, warmup_steps)


def easycache_drive(inputs, outputs, tau, warmup):
  """EasyCache's plans run eagerly on given per-step CFG-batch inputs
  (S, 2B, ...) with a stand-in model whose output at step i is outputs[i]:
  (velocities, computed flags, estimates)."""
  steps = len(inputs)
  policy = easycache(tau, warmup)
  table = jnp.asarray(outputs, jnp.float32)
  carry = policy.init_carry(None, inputs.shape[1], 0, inputs.shape[1:],
                            steps)

  def step(plan, table, x, t, carry):
    def model(latents, timestep, context):
      del latents, context
      return table[timestep[0].astype(jnp.int32)]
    v, carry = plan.forward(model, x, t, None, carry)
    return v, {**carry, "step": carry["step"] + 1}

  step = jax.jit(step, static_argnums=0)
  velocities = []
  for i, plan in enumerate(policy.plans(np.zeros(steps), 0)):
    v, carry = step(plan, table, jnp.asarray(inputs[i], jnp.float32),
                    jnp.full((inputs.shape[1],), i, jnp.float32), carry)
    velocities.append(np.asarray(v))
  return (np.asarray(velocities), [bool(c) for c in carry["computed"]],
          np.asarray(carry["estimates"]))


def euler_timesteps(steps, shift):
  """The library's Euler timesteps (checked against the reference's)."""
  from astraea_jax.sampling import sampler as dense_sampler
  s = dense_sampler.make_scheduler("euler", steps, shift=shift)
  return np.asarray(s.timesteps), np.asarray(s.dt)


# Search --------------------------------------------------------------------------


def tree_fitness(split, noise, contexts, negatives, *, steps, shift,
                 guidance):
  """The search's fitness function (masked simulation over a prefix tree)."""
  return search_lib.TreeFitness(
      *split, jnp.asarray(noise, jnp.float32),
      jnp.asarray(contexts, jnp.float32),
      jnp.asarray(negatives, jnp.float32), steps=steps,
      config=search_lib.EvalConfig(scheduler="euler", shift=shift,
                                   guidance_scale=guidance,
                                   selection=SELECTION))


def run_search(fitness_fn, *, steps, target_budget, population, children,
               generations, seed=0):
  """(best genome in tenths, its fitness, budget band in tenths, the
  initial population as a set of tuples)."""
  config = search_lib.SearchConfig(
      target_budget=target_budget, steps=steps, population=population,
      children=children, generations=generations, seed=seed)
  # The search draws its initial population from the second half of the
  # seed's key split (search_lib.search).
  _, k_init = jax.random.split(jax.random.key(seed))
  initial = {tuple(g) for g in np.asarray(search_lib.initial_population(
      k_init, config=config)).tolist()}
  result = search_lib.search(fitness_fn, config, progress=False)
  return (np.asarray(result.genome), result.fitness, config.budget_band(),
          initial)


# STDiT3 --------------------------------------------------------------------------


def stdit3_model(seed=0, **overrides):
  """(split model, config facts for the reference) of a tiny STDiT3."""
  config = STDiT3Config.tiny(**overrides)
  graphdef, abstract = nnx.split(stdit3_lib.abstract_model(config))
  split = (graphdef, testing.random_params(abstract, jax.random.key(seed)))
  facts = {"num_heads": config.num_heads, "patch_size": config.patch_size,
           "eps": config.eps, "freq_dim": config.freq_dim,
           "input_sq_size": config.input_sq_size,
           "rope_theta": config.rope_theta,
           "out_channels": config.out_channels}
  return split, facts


def stdit3_init_cache(split, batch, num_tokens):
  c = nnx.merge(*split).config
  return astraea_stdit3.init_cache(c, batch, num_tokens, SELECTION)


def stdit3_astraea_forward(split, latents_2b, t_2b, y, y_mask, fps, height,
                           width, cache, tokens_per_frame,
                           temporal_sparse="scatter_queries"):
  """`astraea.stdit3.forward` on the CFG batch: (out, cache, jax cache).

  y (B, 1, L, C) caption; the null caption is the model's (CFG batch
  [y; null] as the library builds it).
  """
  model = nnx.merge(*split)
  cond = opensora_sampling.cfg_conditions(
      model, jnp.asarray(y, jnp.float32),
      None if y_mask is None else jnp.asarray(y_mask), fps=fps,
      height=height, width=width)
  out, cache = jax.jit(
      lambda la, tt, ca: astraea_stdit3.forward(
          model, la, tt, cond, ca, tokens_per_frame=tokens_per_frame,
          config=SELECTION, temporal_sparse=temporal_sparse))(
              jnp.asarray(latents_2b, jnp.float32),
              jnp.asarray(t_2b, jnp.float32), cache)
  return np.asarray(out), to_numpy(cache), cache


# Sequence parallelism (run inside a process with fake CPU devices) -------------


def parallel_astraea_forwards(split, latents, timesteps, context_2b, ks,
                              num_devices):
  """`parallel.astraea_forward` over a (1, num_devices) mesh, one call per
  entry of ks: [(velocity, cache rows of the real tokens)]."""
  from astraea_jax import parallel
  from astraea_jax.parallel import sequence_parallel as sp_wan
  from astraea_jax.parallel.layout import TokenLayout
  model = nnx.merge(*split)
  c = model.config
  mesh = parallel.make_mesh(num_devices, seq=num_devices)
  sp = sp_wan.SequenceParallel(mesh)
  grid = model.grid(latents[0].shape)
  n = int(np.prod(grid))
  layout = TokenLayout(n, sp.plan(c.num_heads).num_shards)
  cache = sp_wan.init_cache(c, latents[0].shape[0], n, sp, SELECTION)
  out = []
  for la, t, k in zip(latents, timesteps, ks):
    fn = jax.jit(lambda la, tt, cx, ca, k=k: sp_wan.astraea_forward(
        model, la, tt, cx, ca, sp=sp, num_selected=k, config=SELECTION))
    v, cache = fn(jnp.asarray(la, jnp.float32), jnp.asarray(t, jnp.float32),
                  jnp.asarray(context_2b, jnp.float32), cache)
    rows = layout.token_slots()
    out.append((np.asarray(v), {name: np.asarray(a)[:, :, rows]
                                for name, a in cache.items()}))
  return out


# The tiny Wan and inputs of the policy references (test_reference_policies,
# test_reference_step_reuse).
POLICY_WAN = dict(num_layers=2, dim=64, ffn_dim=96, num_heads=2,
                  text_dim=24, text_len=8, freq_dim=16)


def rel(a, b):
  """max |a - b| / max |b| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def policy_case():
  """(split model, its NumPy reference, noise (32 tokens), context,
  negative context, both stacked) of the policy reference tests."""
  import reference_wan  # pylint: disable=import-outside-toplevel
  split, kw = wan_model(seed=7, **POLICY_WAN)
  ref = reference_wan.WanRef(flat_params(split[1]), **kw)
  rng = np.random.default_rng(2)
  noise = rng.standard_normal((1, 16, 2, 8, 8))  # N = 32 tokens
  ctx = rng.standard_normal((1, 6, POLICY_WAN["text_dim"]))
  neg = rng.standard_normal((1, 6, POLICY_WAN["text_dim"]))
  return split, ref, noise, ctx, neg, np.concatenate([ctx, neg])

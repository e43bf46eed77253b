"""Every path runs the one block forward of its model (issue 21).

Dense, Astraea sparse and masked, every baseline policy (on Wan) and
Astraea on STDiT3 must call `WanBlock.__call__` / `STDiT3Block.__call__`,
the one block forward per model, and nothing else that copies it. Each
path is traced (`jax.make_jaxpr`, so no compile cache hides a call) with
the block's `__call__` wrapped by a recorder of how it was called. The
2-device sequence-parallel path is checked the same way in
tests/_parallel_cases.py (`test_sequence_parallel_runs_the_one_block`),
which needs fake CPU devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax import testing
from astraea_jax.astraea import policies as P
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.astraea import stdit3_tokenwise
from astraea_jax.astraea import wan_tokenwise
from astraea_jax.configs import STDiT3Config, WanConfig
from astraea_jax.models import stdit3, wan
from astraea_jax.sampling import opensora as opensora_sampling
from astraea_jax.sampling import sampler as dense

CONFIG = WanConfig.tiny(num_layers=2, dim=64, ffn_dim=96, num_heads=2,
                        text_dim=24, text_len=8, freq_dim=16)
SHAPE = (1, 16, 2, 8, 8)  # 2 x 4 x 4 = 32 tokens
N = 32
STEPS = 3


def record_calls(monkeypatch, cls):
  """Wraps cls.__call__; returns the list of recorded calls (a dict each:
  sparse = a token index was given, plus the hook keywords used)."""
  calls = []
  call = cls.__call__

  def recorded(self, *args, **kwargs):
    token_index = kwargs.get("token_index", args[4] if len(args) > 4 else
                             None)
    calls.append({"sparse": token_index is not None,
                  **{k: v is not None and v is not False
                     for k, v in kwargs.items() if k != "token_index"}})
    return call(self, *args, **kwargs)

  monkeypatch.setattr(cls, "__call__", recorded)
  return calls


@pytest.fixture(scope="module")
def model():
  return nnx.merge(*testing.random_wan(CONFIG, seed=3))


@pytest.fixture(scope="module")
def batch():
  latents = jnp.concatenate([dense.draw_noise(jax.random.key(0), SHAPE)] * 2)
  timestep = jnp.full((2,), 800.0)
  context = jax.random.normal(jax.random.key(1), (2, 5, CONFIG.text_dim))
  return latents, timestep, context


def _cache():
  return selection.init_cache(CONFIG.num_layers, 2, N, CONFIG.dim,
                              selection.EXACT)


def test_dense_model_runs_the_block(monkeypatch, model, batch):
  calls = record_calls(monkeypatch, wan.WanBlock)
  jax.make_jaxpr(lambda *a: model(*a))(*batch)
  # One trace of the scanned block body.
  assert calls and not any(c["sparse"] for c in calls)


def test_dense_sampler_runs_the_block(monkeypatch, model, batch):
  calls = record_calls(monkeypatch, wan.WanBlock)
  graphdef, params = nnx.split(model)
  model_fn = dense.wan_model_fn(graphdef, params, batch[2])
  scheduler = dense.make_scheduler("unipc", STEPS, shift=3.0)
  latents = batch[0][:1]
  jax.make_jaxpr(lambda x: dense.guided_step(
      model_fn, scheduler, 5.0, x, scheduler.init(x), ()))(latents)
  assert calls and not any(c["sparse"] for c in calls)


@pytest.mark.parametrize("k,sparse", [(N, False), (N // 2, True)])
def test_astraea_sparse_runs_the_block(monkeypatch, model, batch, k, sparse):
  calls = record_calls(monkeypatch, wan.WanBlock)
  jax.make_jaxpr(lambda *a: wan_tokenwise.forward(
      model, *a, _cache(), num_selected=k,
      config=selection.EXACT))(*batch)
  assert calls and all(c["sparse"] == sparse for c in calls)


def test_astraea_masked_runs_the_block(monkeypatch, model, batch):
  calls = record_calls(monkeypatch, wan.WanBlock)
  jax.make_jaxpr(lambda *a: wan_tokenwise.forward_masked(
      model, *a, _cache(), N // 2,
      config=selection.EXACT))(*batch)
  assert calls and not any(c["sparse"] for c in calls)


POLICIES = {
    "dense": P.Dense(),
    "astraea": P.Astraea(budget=0.5),
    "astraea_random": P.Astraea(budget=0.5, selector="random"),
    "astraea_fixed": P.Astraea(budget=0.5, selector="fixed"),
    "astraea_step_level": P.Astraea(budget=0.5, schedule_kind="step_level"),
    "toca": P.ToCa(interval=2, ratio=0.5),
    "toca_lse": P.ToCa(interval=2, ratio=0.5, importance="lse"),
    "pab": P.PAB(self_range=2, cross_range=3, window=(0.0, 1000.0)),
    "step_cache": P.StepCache(threshold=0.1),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_step_runs_the_block(monkeypatch, model, batch, name):
  """Each distinct plan of the policy calls the one block (with its
  hooks); the plans that select tokens call it sparsely."""
  policy = POLICIES[name]
  timesteps = np.linspace(999.0, 300.0, 6)
  plans = policy.plans(timesteps, N)
  carry = policy.init_carry(CONFIG, 2, N, batch[0].shape, len(plans))
  calls = record_calls(monkeypatch, wan.WanBlock)
  for plan in dict.fromkeys(plans):
    calls.clear()
    jax.make_jaxpr(lambda *a, plan=plan: plan.forward(model, *a, carry))(
        *batch)
    k = getattr(plan, "num_selected", N)
    if k == 0:  # every token reuses its cached update: no block runs
      assert not calls, plan
      continue
    assert calls, plan
    assert all(c["sparse"] == (0 < k < N) for c in calls), plan
    if name.startswith("toca") and k > 0:
      assert all(c.get("cross_entropy") == (name == "toca") for c in calls)
    if isinstance(plan, P.PABPlan):
      assert all(c["keep_attention_outputs"] for c in calls)
      reused = plan.reuse_self or plan.reuse_cross
      assert any(c.get("self_attn_out") or c.get("cross_attn_out")
                 for c in calls) == reused


def test_policy_sampler_runs_the_block(monkeypatch, model):
  """The policies' host loop end to end (fresh caches: every step traced)."""
  graphdef, params = nnx.split(model)
  noise = dense.draw_noise(jax.random.key(0), SHAPE)
  ctx = jax.random.normal(jax.random.key(1), (1, 5, CONFIG.text_dim))
  jax.clear_caches()
  calls = record_calls(monkeypatch, wan.WanBlock)
  P.sample(graphdef, params, noise, ctx, jnp.zeros_like(ctx),
           policy=P.Astraea(schedule=(1.0, 0.5, 0.0)), steps=STEPS,
           shift=3.0, progress=False)
  assert [c["sparse"] for c in calls] == [False, True]


# STDiT3 ----------------------------------------------------------------------

STDIT = STDiT3Config.tiny(hidden_size=32, depth=2, num_heads=2,
                          caption_channels=16, model_max_length=6)
STDIT_SHAPE = (1, 4, 3, 8, 8)  # 3 frames x 4 x 4 = 16 tokens per frame


@pytest.fixture(scope="module")
def stdit_model():
  return stdit3.STDiT3(STDIT, rngs=nnx.Rngs(0))


def _stdit_batch(module):
  latents = jnp.concatenate(
      [dense.draw_noise(jax.random.key(0), STDIT_SHAPE)] * 2)
  y = jax.random.normal(jax.random.key(1), (1, 1, 6, STDIT.caption_channels))
  conditions = opensora_sampling.cfg_conditions(
      module, y, None, fps=24, height=64, width=64)
  cache = stdit3_tokenwise.init_cache(STDIT, 2, 48,
                                      selection.EXACT)
  return latents, jnp.full((2,), 700.0), conditions, cache


@pytest.mark.parametrize("k_f,form", [(16, "sparse"), (8, "sparse"),
                                      (8, "masked")])
def test_stdit3_paths_run_the_block(monkeypatch, stdit_model, k_f, form):
  latents, t, conditions, cache = _stdit_batch(stdit_model)
  calls = record_calls(monkeypatch, stdit3.STDiT3Block)
  config = selection.EXACT
  if form == "sparse":
    fn = lambda x, t: stdit3_tokenwise.forward(
        stdit_model, x, t, conditions, cache, tokens_per_frame=k_f,
        config=config)
  else:
    fn = lambda x, t: stdit3_tokenwise.forward_masked(
        stdit_model, x, t, conditions, cache, k_f, config=config)
  jax.make_jaxpr(fn)(latents, t)
  # Spatial and temporal block, each traced once in the scanned body.
  assert len(calls) == 2
  assert all(c["sparse"] == (form == "sparse" and k_f < 16) for c in calls)
  assert schedule_lib.num_selected(0.5, 16) == 8

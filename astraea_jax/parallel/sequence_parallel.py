"""WanDiT with one video's tokens split over devices (sequence parallel).

`forward` computes `model(latents, timestep, context)` and
`astraea_forward` computes `astraea.wan_tokenwise.forward` with the tokens
sharded over the mesh's "seq" axis and the batch over "data", inside one
`shard_map`:
  1. (global) patchify (the latents and any `condition` channels, as
     `WanDiT.embed`), split the tokens, the RoPE table and per-token
     timesteps (Wan2.2 TI2V: the image's tokens at t = 0) into the shards
     of `TokenLayout`; each device gets rows [start_i, start_i + count_i);
  2. (per device) patch/time/text embeddings of its rows; every block (the
     model's own `WanBlock`) runs its rows with `sequence_parallel_attention`
     as its self-attention function (Ulysses all-to-all, ring or both);
     cross-attention to the text needs no communication (the 512 text
     tokens are on every device); the head;
  3. (global) drop pad rows, unpatchify.
Astraea: before each block every device scores ITS rows and keeps its own
top-K/P (a select hook of the one layer loop: static shapes, equal load
on every device); the queries of the selected rows attend over the
keys/values of all N tokens; LSEs and caches never leave their shard. Per-shard selection differs from the global top-K
of one device: `select_tokens_per_shard` reproduces it on one device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from astraea_jax.astraea import layer_loop, selection, wan_tokenwise
from astraea_jax.models import layers, wan
from astraea_jax.parallel import attention as sp_attention
from astraea_jax.parallel import mesh as mesh_lib
from astraea_jax.parallel.layout import TokenLayout

F32 = jnp.float32
DATA = mesh_lib.DATA
SEQ = sp_attention.SEQ_AXES  # the mesh's "seq" axis as (ring, ulysses)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SequenceParallel:
  """A ("data", "seq") mesh and how self-attention crosses the seq axis.

  strategy: "auto" | "ulysses" | "ring" | "hybrid" (see
  `attention.plan_attention`); ulysses: the hybrid's Ulysses group size.
  Hashable and a static pytree node, so it can ride in jit arguments.
  """

  mesh: Mesh
  strategy: str = "auto"
  ulysses: int | None = None

  def __post_init__(self):
    if tuple(self.mesh.axis_names) != (DATA, mesh_lib.SEQ):
      raise ValueError(
          f"mesh axes must be ('data', 'seq') (parallel.make_mesh); got "
          f"{self.mesh.axis_names}")
    if self.strategy not in sp_attention.STRATEGIES:
      raise ValueError(f"unknown strategy {self.strategy!r}; choose from "
                       f"{sp_attention.STRATEGIES}")

  @property
  def data_size(self) -> int:
    return self.mesh.shape[DATA]

  @property
  def seq_size(self) -> int:
    return self.mesh.shape[mesh_lib.SEQ]

  def plan(self, num_heads: int) -> sp_attention.AttentionPlan:
    return sp_attention.plan_attention(self.strategy, num_heads,
                                       self.seq_size, ulysses=self.ulysses)

  def inner_mesh(self, plan: sp_attention.AttentionPlan) -> Mesh:
    """The same devices as ("data", "seq_ring", "seq_ulysses")."""
    devices = self.mesh.devices.reshape(self.data_size, plan.ring,
                                        plan.ulysses)
    return Mesh(devices, (DATA, *SEQ))

  def program_mesh(self, num_heads: int) -> Mesh:
    """The mesh every sharding of a parallel program is built on.

    jax >= 0.11 requires one mesh per program, so inputs, outputs and
    caches are placed on the ("data", "seq_ring", "seq_ulysses") view the
    shard_map runs on, not on the ("data", "seq") mesh the user gave.
    """
    return self.inner_mesh(self.plan(num_heads))


# Per-device pieces (inside shard_map) ----------------------------------------


def _attention(plan, layout):
  """The blocks' self-attention across the shards (Ulysses / ring)."""
  return functools.partial(sp_attention.sequence_parallel_attention,
                           plan=plan, layout=layout)


def _embed_local(model: wan.WanDiT, tokens, timestep, context):
  """`WanDiT.embed` of this device's rows: tokens (b, slots, patch_dim);
  timestep (b,), or per token (b, slots) for these rows."""
  return (model.embed_tokens(tokens),
          *model.embed_conditions(timestep, context))


def _dense_local(graphdef, params, tokens, timestep, context, rope, *, plan,
                 layout):
  model = nnx.merge(graphdef, params)
  x, e, e0, ctx = _embed_local(model, tokens, timestep, context)
  x, aux = model.run_blocks(x, e0, ctx, rope,
                            attention=_attention(plan, layout))
  return model.head(x, e), aux["lse"]


def _astraea_local(graphdef, params, tokens, timestep, context, rope, cache,
                   *, plan, layout, num_selected, config):
  """`astraea.wan_tokenwise.forward` on this device's rows and cache shard:
  the one layer loop, each device choosing its own top-K/P."""
  model = nnx.merge(graphdef, params)
  x, e, e0, ctx = _embed_local(model, tokens, timestep, context)
  k_local = local_num_selected(num_selected, layout)
  valid = layout.local_valid(sp_attention.shard_index(plan))

  def select(x, layer_cache, layer, state):
    del layer
    scores = selection.token_scores(x, layer_cache, config)
    scores = jnp.where(valid, scores, -jnp.inf)  # never a pad row
    return selection.select_tokens(scores, k_local), state

  x, cache, _ = wan_tokenwise.run_blocks(
      model, x, e0, ctx, rope, cache,
      mode=layer_loop.mode_for(num_selected, layout.num_tokens),
      config=config, select=select, attention=_attention(plan, layout))
  return model.head(x, e), cache


# Global view ----------------------------------------------------------------


def local_num_selected(num_selected: int, layout: TokenLayout) -> int:
  """Rows each shard computes for a global budget of K tokens.

  K = 0 or N: 0 or every row. Otherwise round(K / P), at least 1 and at
  most the shortest shard's count, so shapes agree on every device; the
  run computes P * round(K / P) tokens in all (stats report it).
  """
  n, p = layout.num_tokens, layout.num_shards
  if not 0 <= num_selected <= n:
    raise ValueError(f"{num_selected=} must lie in [0, {n}]")
  if num_selected in (0, n):
    return 0 if num_selected == 0 else layout.slots
  return int(min(max(1, np.floor(num_selected / p + 0.5)), layout.base))


def select_tokens_per_shard(scores, k_local: int, layout: TokenLayout):
  """Single-device reference of the sharded selection.

  scores (B, N) -> (B, P * k_local) sorted token indices: the top
  `k_local` of every shard's tokens (ties to lower indices, as
  `jax.lax.top_k` and hence the sharded path).
  """
  b = scores.shape[0]
  rows = layout.shard(scores, axis=1).reshape(b, layout.num_shards,
                                              layout.slots)
  valid = layout.slot_valid().reshape(layout.num_shards, layout.slots)
  rows = jnp.where(valid, rows, -jnp.inf)
  _, local = jax.lax.top_k(rows, k_local)                  # (B, P, k)
  starts = jnp.asarray(layout.starts(), jnp.int32)[None, :, None]
  return jnp.sort((starts + local).reshape(b, -1), axis=-1).astype(jnp.int32)


def _prepare(model, latents, timestep, context, sp: SequenceParallel,
             condition=None):
  """Checks, then (plan, layout, tokens, timestep, its spec, context,
  rope) in shard-row order; per-token timesteps (B, N) are sharded like
  the tokens (a pad row repeats its shard's last token's timestep)."""
  model.check_inputs(latents, timestep, context, condition)
  c = model.config
  batch = latents.shape[0]
  if batch % sp.data_size:
    raise ValueError(
        f"batch {batch} (with CFG: 2 x prompts) must be divisible by the "
        f"mesh's data axis ({sp.data_size})")
  grid = model.grid(latents.shape)
  plan = sp.plan(c.num_heads)
  layout = TokenLayout(int(np.prod(grid)), plan.num_shards)
  if condition is not None:
    latents = jnp.concatenate([latents, condition.astype(latents.dtype)],
                              axis=1)
  tokens = layout.shard(wan.patchify(latents, c.patch_size))
  rope = tuple(layout.shard(t, axis=0)
               for t in layers.rope_table(grid, c.head_dim, c.rope_theta))
  if timestep.ndim == 2:
    timestep, timestep_spec = layout.shard(timestep, axis=1), P(DATA, SEQ)
  else:
    timestep_spec = P(DATA)
  return plan, layout, tokens, timestep, timestep_spec, context, rope


def forward(model: wan.WanDiT, latents, timestep, context, *,
            sp: SequenceParallel, return_aux: bool = False, condition=None):
  """`model(latents, timestep, context, condition=condition)` with the
  tokens over `sp.mesh`.

  Same arguments and result as `WanDiT.__call__` (global arrays; call it
  inside jit; timestep (B,) or per token (B, N)). aux["lse"]:
  (num_layers, B, H, N) self-attention LSE.
  """
  plan, layout, tokens, timestep, t_spec, ctx, rope = _prepare(
      model, latents, timestep, context, sp, condition)
  graphdef, params = nnx.split(model)
  rows = P(DATA, SEQ)
  body = functools.partial(_dense_local, graphdef, plan=plan, layout=layout)
  out, lse = mesh_lib.shard_map(
      body, mesh=sp.inner_mesh(plan),
      in_specs=(P(), rows, t_spec, P(DATA), P(SEQ)),
      out_specs=(rows, P(None, DATA, None, SEQ)),
  )(params, tokens, timestep, ctx, rope)
  c = model.config
  out = wan.unpatchify(layout.unshard(out), model.grid(latents.shape),
                       c.patch_size, c.out_dim)
  return (out, {"lse": layout.unshard(lse, axis=3)}) if return_aux else out


def cache_sharding(sp: SequenceParallel, num_heads: int) -> NamedSharding:
  """Astraea caches (L, B, rows, ...): batch over data, rows over seq.

  On the ("data", "seq") mesh; the same device tiling as the shard_map's
  (data, (seq_ring, seq_ulysses)) view of it, so no data moves between.
  """
  return NamedSharding(sp.program_mesh(num_heads), P(None, DATA, SEQ))


def init_cache(config, batch: int, num_tokens: int, sp: SequenceParallel,
               selection_config: selection.SelectionConfig):
  """`selection.init_cache` in the sharded row layout, created in place.

  (L, B, P * slots, dim) arrays, each device holding its (B/data, slots)
  block: 720p x 81 caches of the 1.3B model (55 GB in float32) never sit
  on one device.
  """
  layout = TokenLayout(num_tokens, sp.plan(config.num_heads).num_shards)

  def make():
    return selection.init_cache(config.num_layers, batch,
                                layout.num_shards * layout.slots, config.dim,
                                selection_config)

  return jax.jit(make, out_shardings=cache_sharding(sp, config.num_heads))()


def astraea_forward(model: wan.WanDiT, latents, timestep, context, cache, *,
                    sp: SequenceParallel, num_selected: int,
                    config: selection.SelectionConfig, condition=None):
  """`astraea.wan_tokenwise.forward` with the tokens over `sp.mesh`.

  timestep (B,) or per token (B, N); condition: the model's extra input
  channels (`forward`); cache from `init_cache` (sharded rows).
  num_selected: static global K;
  0 < K < N computes round(K / P) rows per shard (local top-K/P); K = N
  runs the dense blocks, K = 0 reuses every cached update.
  Returns (velocity (B, C, F, H, W) float32, cache).
  """
  plan, layout, tokens, timestep, t_spec, ctx, rope = _prepare(
      model, latents, timestep, context, sp, condition)
  local_num_selected(num_selected, layout)  # range check
  c = model.config
  expected = (c.num_layers, latents.shape[0],
              layout.num_shards * layout.slots, c.dim)
  if cache["update"].shape != expected:
    raise ValueError(
        f"cache update {cache['update'].shape} does not match {expected} "
        "(num_layers, batch, shards x rows, dim); build it with "
        "parallel.init_cache for this mesh and video size")
  graphdef, params = nnx.split(model)
  rows = P(DATA, SEQ)
  cache_spec = P(None, DATA, SEQ)
  body = functools.partial(_astraea_local, graphdef, plan=plan,
                           layout=layout, num_selected=num_selected,
                           config=config)
  out, cache = mesh_lib.shard_map(
      body, mesh=sp.inner_mesh(plan),
      in_specs=(P(), rows, t_spec, P(DATA), P(SEQ), cache_spec),
      out_specs=(rows, cache_spec),
  )(params, tokens, timestep, ctx, rope, cache)
  out = wan.unpatchify(layout.unshard(out), model.grid(latents.shape),
                       c.patch_size, c.out_dim)
  return out, cache

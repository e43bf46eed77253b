"""The one layer loop of the token-wise engine.

Every token-wise method runs its blocks through `run`: Astraea on Wan and
on STDiT3 (sparse and masked forms), the baselines' token selectors
(random, fixed, ToCa) and Astraea under sequence parallelism. Before each
block the loop asks a `select` hook which tokens to compute; the block
runs those (queries of the selected rows against keys/values of all rows);
computed tokens refresh their cache (`selection.write_*`), the others add
their cached residual update. What differs between the methods is a hook:

  apply(block, x, token_index) -> (x_out, aux)
      runs one block (the model's one block forward with the method's
      attention function and arguments); token_index None = every token.
  select(x, layer_cache, layer, state) -> (token_index (B, K), state)
      the sparse form's choice, each row's indices sorted and unique, K
      static (score top-K, per frame, per shard, random, fixed, ToCa);
      `state` is the hook's own pytree carried through the loop (the fixed
      ranking), None if it keeps none. layer_cache: the block's entries
      (`selection.LayerView`).
  select(x, layer_cache, layer, state) -> (keep (B, N) bool, state)
      the masked form's choice: every token computed, the kept ones take
      their new value (K may be traced: the budget search vmaps budgets).

The mode says what a step does in every block: "reuse" (budget 0: every
token adds its cached update), "all" (budget 1: every token computed, the
cache refreshed), "select" (sparse form) or "masked" (masked form).
"""

from __future__ import annotations

import jax
from flax import nnx

from astraea_jax.astraea import selection

MODES = ("reuse", "all", "select", "masked")


def mode_for(num_selected: int, num_tokens: int) -> str:
  """"reuse" for K = 0, "all" for K = N, else "select"."""
  if not 0 <= num_selected <= num_tokens:
    raise ValueError(f"{num_selected=} must lie in [0, {num_tokens}]")
  if num_selected == 0:
    return "reuse"
  return "all" if num_selected == num_tokens else "select"


def run(stacks, x, caches, *, apply, mode: str, config, select=None,
        state=None, statistic: str = "lse", unroll=1):
  """All blocks with token selection; returns (x, caches, state).

  stacks: tuple of stacked block modules (parameters on a leading depth
    axis), run in turn at every depth (Wan: (blocks,); STDiT3: (spatial,
    temporal)); caches: tuple of stacked caches (`selection.init_cache`),
    one per stack; apply(kind, block, x, token_index): block `block` of
    stack `kind`; statistic: the aux entry stored in the cache's "lse" slot
    (ToCa stores the cross-attention entropy); config: SelectionConfig.
  """
  if mode not in MODES:
    raise ValueError(f"{mode=} must be one of {MODES}")
  graphdefs, params = zip(*(nnx.split(s) for s in stacks))

  def layer(kind, block_params, x, cache, i, state):
    if mode == "reuse":
      x, cache = selection.reuse_all(cache, i, x)
      return x, cache, state
    block = nnx.merge(graphdefs[kind], block_params)
    if mode == "all":
      x_out, aux = apply(kind, block, x, None)
      x, cache = selection.write_all(cache, i, x, x_out, aux[statistic],
                                     config)
      return x, cache, state
    view = selection.layer_view(cache, i)
    chosen, state = select(x, view, i, state)
    if mode == "masked":
      x_out, aux = apply(kind, block, x, None)
      x, cache = selection.write_masked(cache, i, x, x_out, aux[statistic],
                                        chosen, config,
                                        view.made_input(x, config))
      return x, cache, state
    x_sel, aux = apply(kind, block, x, chosen)
    x, cache = selection.write_selected(cache, i, x, chosen, x_sel,
                                        aux[statistic], config,
                                        view.made_input(x, config))
    return x, cache, state

  def body(carry, layer_params):
    x, caches, state, i = carry
    caches = list(caches)
    for kind, block_params in enumerate(layer_params):
      x, caches[kind], state = layer(kind, block_params, x, caches[kind], i,
                                     state)
    return (x, tuple(caches), state, i + 1), None

  (x, caches, state, _), _ = jax.lax.scan(
      body, (x, tuple(caches), state, 0), tuple(params), unroll=unroll)
  return x, caches, state


def score_top_k(k: int, config):
  """Astraea's sparse select hook: the k best `selection.token_scores`."""

  def select(x, layer_cache, layer, state):
    del layer
    scores = selection.token_scores(x, layer_cache, config)
    return selection.select_tokens(scores, k), state

  return select


def score_keep(k, config):
  """Astraea's masked select hook: keep the k best scores (k traced)."""

  def select(x, layer_cache, layer, state):
    del layer
    return selection.keep_top(selection.token_scores(x, layer_cache, config),
                              k), state

  return select


"""Fitness: the masked (or sparse) simulation of candidate schedules over
a prefix tree, sharing the trajectory of common genome prefixes."""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import hashlib
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.astraea import wan_tokenwise as astraea_sampler
from astraea_jax.sampling import sampler as dense_sampler
from astraea_jax.astraea.search.genetic import (
    FULL,
)

F32 = jnp.float32


# Fitness: masked simulation over a prefix tree -------------------------------

EVALUATORS = ("masked", "sparse")
TIMESTEPS = ("diffusers", "wan")  # `sampler.make_scheduler`'s schedules


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How `TreeFitness` runs the candidates.

  Only `scheduler`, `timesteps`, `guidance_scale`, `shift`, `selection`
  and `refresh_experts` change the numbers; the rest trades memory for
  time.
  """

  scheduler: str = "unipc"
  # UniPC's timesteps: "diffusers" (Wan2.1's sampler) or "wan" (wan22's
  # original schedule, as the Wan2.2 pipelines sample).
  timesteps: str = "diffusers"
  # One CFG scale, or (low-noise, high-noise) experts' (Wan2.2 A14B).
  guidance_scale: float | tuple[float, float] = 5.0
  shift: float | None = None        # None: by video size, as `sample`
  selection: selection.SelectionConfig = dataclasses.field(
      default_factory=selection.SelectionConfig)
  # "masked": `forward_masked`, every budget in one compiled step (the
  # paper's setting; a step costs a dense step). "sparse": the sampler's own
  # sparse `forward`, nodes grouped by budget (one compile per budget, a
  # step costs ~ its budget; same numbers up to float rounding, see
  # tests/test_search.py).
  evaluator: str = "masked"
  # The four sizes below trade memory for time; None = chosen from the
  # device's memory (`resolve_sizes`; on devices that report none: all
  # samples in one pass, 4 nodes per call, no bound on lanes, 4096 memo
  # nodes).
  # Samples per pass. Passes run one after the other, each over its own
  # tree: a smaller node state, the same numbers.
  samples_per_pass: int | None = None
  # Tree nodes (candidate prefixes) per vmapped call; a node is one row per
  # sample of its pass. The call's shape is fixed (short batches are padded)
  # so a row's numbers never depend on what else is in the batch.
  batch_nodes: int | None = None
  # Genomes walked down the tree together; the live states are at most
  # 2 x lanes nodes.
  lanes: int | None = None
  # Prefix states memoised across generations, in nodes (split evenly over
  # the passes).
  memo_nodes: int | None = None
  # Share the trajectories of common prefixes (False: every genome from
  # scratch, the naive evaluation; for tests and counts).
  share_prefixes: bool = True
  # Two experts: the first step of the low-noise expert computes every
  # token, whatever its gene (`wan_tokenwise.sample`'s refresh_experts).
  refresh_experts: bool = astraea_sampler.REFRESH_EXPERTS

  def __post_init__(self):
    if self.evaluator not in EVALUATORS:
      raise ValueError(f"{self.evaluator=} must be one of {EVALUATORS}")
    if self.timesteps not in TIMESTEPS:
      raise ValueError(f"{self.timesteps=} must be one of {TIMESTEPS}")
    for name in ("samples_per_pass", "batch_nodes", "lanes"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name}={value} must be >= 1 or None")
    if self.memo_nodes is not None and self.memo_nodes < 0:
      raise ValueError(f"{self.memo_nodes=} must be >= 0 or None")


# Share of device memory for each use of states under automatic sizing:
# the rows of one call (inputs + outputs), the live tree nodes, the memo.
# The remaining 40% is for parameters and activations.
STATE_MEMORY_SHARE = 0.2
MAX_ROWS_PER_CALL = 64


def resolve_sizes(config: EvalConfig, num_samples: int, row_bytes: int,
                  memory_bytes: int | None):
  """(samples_per_pass, batch_nodes, lanes, memo_nodes) for `config`.

  row_bytes: one sample's state (latents, scheduler, per-block cache).
  memory_bytes: the device's memory, or None when it reports none.
  Unset sizes: with memory M, a call's rows (in + out) get 0.2 M, the live
  nodes (2 x lanes) 0.2 M and the memo 0.2 M (at least one row per call
  and one lane; Wan2.1-1.3B at 480p with a float32 cache has 24 GB rows:
  one row per call on an H200).
  """
  budget = None if memory_bytes is None else STATE_MEMORY_SHARE * memory_bytes
  rows = MAX_ROWS_PER_CALL
  if budget is not None:
    rows = int(min(rows, max(1, budget // (2 * row_bytes))))
  per_pass = config.samples_per_pass or min(num_samples, rows)
  batch_nodes = config.batch_nodes or (
      4 if budget is None else max(1, rows // per_pass))
  node_bytes = per_pass * row_bytes
  lanes = config.lanes
  if lanes is None and budget is not None:
    lanes = max(1, int(budget // (2 * node_bytes)))
  memo_nodes = config.memo_nodes
  if memo_nodes is None:
    memo_nodes = 4096 if budget is None else int(budget // node_bytes)
  return min(per_pass, num_samples), batch_nodes, lanes, memo_nodes


def _velocity(graphdef, params, inputs, num_selected, config, masked,
              cache, latents_2, timesteps_2):
  model = nnx.merge(graphdef, params)
  timesteps_2 = inputs.timesteps(timesteps_2)
  if masked:
    return astraea_sampler.forward_masked(
        model, latents_2, timesteps_2, inputs.context, cache, num_selected,
        config=config, condition=inputs.condition)
  return astraea_sampler.forward(model, latents_2, timesteps_2,
                                 inputs.context, cache,
                                 num_selected=num_selected, config=config,
                                 condition=inputs.condition)


def _row_step(graphdef, params, scheduler, guidance_scale, contexts, hooks,
              num_selected, selection_config, masked, expert, sample, state):
  """One CFG step of one row (candidate prefix, sample) on `expert`'s
  params. hooks: (token mask or None, post-step with per-sample leaves or
  None, per-sample CFG conditions (S, 2, C', F, H, W) or None)."""
  latents, sched_state, cache = state
  token_mask, post_steps, conditions = hooks
  post_step = (None if post_steps is None
               else jax.tree.map(lambda x: x[sample], post_steps))
  condition = None if conditions is None else conditions[sample]
  model_fn = functools.partial(
      _velocity, graphdef, dense_sampler.pick_expert(params, expert),
      dense_sampler.WanInputs(contexts[sample], token_mask, condition),
      num_selected, selection_config, masked)
  return dense_sampler.guided_step(model_fn, scheduler, guidance_scale,
                                   latents, sched_state, cache, post_step)


def _map_rows(step, *rows):
  """jax.vmap over the leading (row) axis; one row runs unbatched, so the
  model and its kernels see exactly the sampler's shapes."""
  if jax.tree.leaves(rows)[0].shape[0] == 1:
    out = step(*jax.tree.map(lambda x: x[0], rows))
    return jax.tree.map(lambda x: x[None], out)
  return jax.vmap(step)(*rows)


@functools.partial(jax.jit, static_argnames=("selection_config", "expert"))
def _masked_rows_step(graphdef, params, scheduler, guidance_scale, contexts,
                      hooks, k_table, samples, genes, states, *,
                      selection_config, expert):
  """`_row_step` vmapped over rows, each with its own (traced) budget."""

  def step(sample, gene, state):
    return _row_step(graphdef, params, scheduler, guidance_scale, contexts,
                     hooks, k_table[gene], selection_config, True, expert,
                     sample, state)

  return _map_rows(step, samples, genes, states)


@functools.partial(jax.jit, static_argnames=("num_selected",
                                             "selection_config", "expert"))
def _sparse_rows_step(graphdef, params, scheduler, guidance_scale, contexts,
                      hooks, samples, states, *, num_selected,
                      selection_config, expert):
  """`_row_step` vmapped over rows that share one static K."""
  step = functools.partial(_row_step, graphdef, params, scheduler,
                           guidance_scale, contexts, hooks, num_selected,
                           selection_config, False, expert)
  return _map_rows(step, samples, states)


@jax.jit
def _sample_mse(latents, reference):
  """Per-sample MSE (S,) between final latents (S, 1, C, F, H, W)."""
  return jnp.mean(jnp.square(latents - reference),
                  axis=tuple(range(1, latents.ndim)))


def _nbytes(tree):
  return sum(x.size * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _concat(trees):
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


def _slice(tree, start, stop):
  return jax.tree.map(lambda x: x[start:stop], tree)


def _passes(num_samples, samples_per_pass):
  per_pass = samples_per_pass or num_samples
  return [np.arange(i, min(i + per_pass, num_samples))
          for i in range(0, num_samples, per_pass)]


def _nodes_per_call(batch_nodes, passes, num_devices):
  """batch_nodes rounded up so every pass's rows split evenly over devices
  (padding stays whole nodes)."""
  while any((batch_nodes * len(p)) % num_devices for p in passes):
    batch_nodes += 1
  return batch_nodes


class PrefixTree:
  """Which tree nodes a generation computes: the planner of `TreeFitness`.

  Genomes are walked down their prefix tree one level (denoising step) at a
  time; each distinct (pass, prefix) node is computed once from its parent,
  starting from the deepest prefix found in the memo. Subclasses say how a
  batch of nodes is stepped (`step_nodes`); `TreeCounter` only counts, so
  the cost of other settings can be replayed without the model.
  """

  def _init_tree(self, *, steps, num_samples, config, num_devices,
                 row_bytes=0, memory_bytes=None):
    self.steps, self.num_samples, self.config = steps, num_samples, config
    self.num_devices = num_devices
    per_pass, batch_nodes, self.lanes, self.memo_nodes = resolve_sizes(
        config, num_samples, row_bytes, memory_bytes)
    self.passes = _passes(num_samples, per_pass)
    self.batch_nodes = _nodes_per_call(batch_nodes, self.passes, num_devices)
    self.memos = [collections.OrderedDict() for _ in self.passes]
    self._uses, self._chunk = {}, 0
    # calls, node_steps, row_steps (a row = one candidate prefix and one
    # sample: one CFG model call), padded_row_steps (wasted on padding).
    self.counts = collections.Counter()
    self.row_steps_by_gene = np.zeros(FULL + 1, np.int64)

  def retain(self, population):
    """Forget memoised prefixes that no member of `population` starts with
    (every later child is bred from these members)."""
    keep = {tuple(g[:d]) for g in np.asarray(population).tolist()
            for d in range(1, self.steps)}
    for memo in self.memos:
      for prefix in [p for p in memo if p not in keep]:
        del memo[prefix]

  def _next_use(self, prefix):
    """The next chunk of the running call that needs `prefix` (inf: none)."""
    uses = self._uses.get(prefix, ())
    i = bisect.bisect_right(uses, self._chunk)
    return uses[i] if i < len(uses) else math.inf

  def _memo_put(self, memo, prefix, state):
    quota = self.memo_nodes // len(self.passes)
    if quota == 0:
      return
    memo[prefix] = state
    memo.move_to_end(prefix)
    if len(memo) > quota:
      # Belady's rule within the call: drop the state needed furthest in
      # the future (chunks are known in advance), the shallowest of equals
      # (a deeper state saves more steps); then least recently used.
      order = {p: i for i, p in enumerate(memo)}
      victim = max(memo, key=lambda p: (self._next_use(p), -len(p),
                                        -order[p]))
      del memo[victim]

  def _run(self, genomes):
    """{genome: [final state of each pass]} for the distinct genomes."""
    genomes = sorted(dict.fromkeys(genomes))
    lanes = self.lanes or max(len(genomes), 1)
    chunks = [genomes[i:i + lanes] for i in range(0, len(genomes), lanes)]
    # prefix -> ascending chunk indices with a genome starting with it.
    self._uses = collections.defaultdict(list)
    for c, chunk in enumerate(chunks):
      for prefix in {g[:d] for g in chunk for d in range(1, self.steps)}:
        self._uses[prefix].append(c)
    finals = {g: [] for g in genomes}
    for p in range(len(self.passes)):
      for self._chunk, chunk in enumerate(chunks):
        for g, state in self._run_chunk(p, chunk).items():
          finals[g].append(state)
    self._uses, self._chunk = {}, 0
    return finals

  def _run_chunk(self, p, genomes):
    """Walks `genomes` down their prefix tree in pass p, one level per step.

    A node is (owner, prefix): owner -1 when prefixes are shared, else the
    genome's position (the naive evaluation shares nothing).
    """
    steps, share, memo = self.steps, self.config.share_prefixes, self.memos[p]
    live, start, root = {}, [], None
    for j, g in enumerate(genomes):
      depth = next((d for d in range(steps - 1, 0, -1) if g[:d] in memo),
                   0) if share else 0
      if depth:
        memo.move_to_end(g[:depth])
        state = memo[g[:depth]]
      else:
        root = self._root(p) if root is None else root
        state = root
      start.append(depth)
      live[(-1 if share else j, g[:depth])] = state
    for depth in range(1, steps + 1):
      level = {}
      for j, g in enumerate(genomes):
        if start[j] < depth:
          owner = -1 if share else j
          level.setdefault((owner, g[:depth]),
                           ((owner, g[:depth - 1]), g[depth - 1]))
      items = sorted(level.items())
      for batch in self._batches(items):
        outs = self.step_nodes(p, [live[parent] for _, (parent, _) in batch],
                                [gene for _, (_, gene) in batch], depth - 1)
        for (node, _), state in zip(batch, outs):
          live[node] = state
          if share and depth < steps:
            self._memo_put(memo, node[1], state)
      for parent in {parent for _, (parent, _) in items}:
        del live[parent]
    return {g: live[(-1 if share else j, g)] for j, g in enumerate(genomes)}

  def _batches(self, items):
    """Calls of at most batch_nodes nodes; one budget per call if sparse."""
    if self.config.evaluator == "masked":
      groups = [items]
    else:
      groups = [list(g) for _, g in itertools.groupby(
          sorted(items, key=lambda item: item[1][1]),
          key=lambda item: item[1][1])]
    return [group[i:i + self.batch_nodes] for group in groups
            for i in range(0, len(group), self.batch_nodes)]

  def _count(self, p, genes):
    s, n = len(self.passes[p]), len(genes)
    self.counts["calls"] += 1
    self.counts["node_steps"] += n
    self.counts["row_steps"] += n * s
    self.counts["padded_row_steps"] += (self.batch_nodes - n) * s
    np.add.at(self.row_steps_by_gene, genes, s)

  def _root(self, p):
    raise NotImplementedError

  def step_nodes(self, p, states, genes, step):
    """The children of `states` (pass p) after denoising step `step` with
    `genes` (one a node)."""
    raise NotImplementedError


class TreeCounter(PrefixTree):
  """A `PrefixTree` that runs no model: counts the steps `TreeFitness` with
  `config` would compute for the same calls (see `replay`)."""

  def __init__(self, *, steps: int, num_samples: int, config: EvalConfig,
               num_devices: int = 1):
    self._init_tree(steps=steps, num_samples=num_samples, config=config,
                    num_devices=num_devices)
    self._run([(FULL,) * steps])                     # the full model

  def __call__(self, genomes):
    self._run([tuple(g) for g in np.asarray(genomes).tolist()])
    return np.zeros(len(genomes))

  def replay(self, events):
    """Replays `RecordingFitness.events`; returns `self.counts`."""
    for kind, genomes in events:
      (self if kind == "evaluate" else self.retain)(genomes)
    return self.counts

  def _root(self, p):
    return None

  def step_nodes(self, p, states, genes, step):
    del step
    self._count(p, genes)
    return [None] * len(states)


class RecordingFitness:
  """Wraps a fitness; records its calls (`events`) for `TreeCounter.replay`."""

  def __init__(self, inner):
    self.inner, self.events = inner, []
    self.fingerprint = getattr(inner, "fingerprint", None)

  def __call__(self, genomes):
    self.events.append(("evaluate", np.asarray(genomes)))
    return self.inner(genomes)

  def retain(self, population):
    self.events.append(("retain", np.asarray(population)))
    if hasattr(self.inner, "retain"):
      self.inner.retain(population)


class TreeFitness(PrefixTree):
  """Fitness of budget genomes on one model and a fixed set of samples.

  fitness(genome) = mean over samples s of
      mean((x_T(genome, s) - x_T(full, s))^2)
  with x_T the final latents of the CFG sampler from the sample's noise and
  prompt; the accelerated sampler is simulated by `forward_masked` (or run
  by the sparse `forward`, `EvalConfig.evaluator`), the full model is the
  all-10 genome of the same tree.

  A truncated trajectory (`run_steps` M < steps, a cheap proxy): only the
  first M steps of the steps-step sampler run, and the final latents are
  replaced by the x0 estimate of step M-1 (the scheduler's data
  prediction) on both sides: genes M.. do not enter.

  Args:
    graphdef, params: `nnx.split(wan_dit)`; or params the experts' pair
      (high noise, low noise) with `boundary_ratio` (Wan2.2 A14B): each
      step runs its expert with its guidance scale (`sampler.expert_plan`,
      `expert_guidance`) and, with `config.refresh_experts`, the first
      low-noise step computes every token whatever its gene
      (`wan_tokenwise.refresh_at_switch`), as `wan_tokenwise.sample`.
    noise: (S, C, F, H, W) initial latents, one per sample.
    contexts: (S, L, text_dim) text embeddings; negative_contexts (S or 1,
      L', text_dim).
    steps: denoising steps (= genome length).
    run_steps: None (= steps) or the steps run of a truncated trajectory
      (the scheduler's `data_prediction` read after them).
    config: `EvalConfig`.
    devices: devices to shard the rows of a call over (default: all); one
      code path for 1..N devices.
    token_mask: None or (L,) per-token timestep factors for every sample
      (Wan2.2 TI2V image-to-video: 0 on the image's tokens;
      `sampling.sample`).
    post_steps: None or a pytree function latents -> latents after every
      step (`sampling.sample`'s post_step) whose array leaves have one
      entry per sample on a leading axis (TI2V: `wan22_pipeline.
      first_frame_post_step` of the (S, 1, C, 1, h, w) image latents, with
      `noise` starting from them as the pipeline's does).
    conditions: None or (S, C', F, H, W) extra input channels of each
      sample (I2V-A14B: mask and image latents; `sampling.sample`'s
      condition), the same for both CFG branches.

  Attributes: `counts` and `row_steps_by_gene` (what was computed),
  `reference` (the full model's final latents), `fingerprint`,
  `node_state_bytes`.
  """

  def __init__(self, graphdef, params, noise, contexts, negative_contexts, *,
               steps: int, run_steps: int | None = None,
               config: EvalConfig = EvalConfig(), devices=None,
               token_mask=None, post_steps=None, boundary_ratio=None,
               conditions=None):
    noise = jnp.asarray(noise, F32)
    if noise.ndim != 5 or noise.shape[0] < 1:
      raise ValueError(f"noise must be (S >= 1, C, F, H, W); got "
                       f"{noise.shape}")
    num_samples = noise.shape[0]
    if contexts.shape[0] != num_samples:
      raise ValueError(f"{contexts.shape[0]} contexts for {num_samples} "
                       "noise samples")
    if steps < 1:
      raise ValueError(f"{steps=} must be >= 1")
    run_steps = steps if run_steps is None else run_steps
    if not 1 <= run_steps <= steps:
      raise ValueError(f"{run_steps=} must be in [1, {steps=}]")
    dense_sampler.check_experts(params, boundary_ratio)
    if conditions is not None and np.shape(conditions)[0] != num_samples:
      raise ValueError(f"conditions {np.shape(conditions)} must have one "
                       f"entry per sample ({num_samples}) first")
    devices = list(devices if devices is not None else jax.devices())
    self.scheduler = dense_sampler.resolve_scheduler(
        config.scheduler, steps, config.shift, noise.shape,
        schedule=config.timesteps)
    if run_steps < steps and not hasattr(self.scheduler, "data_prediction"):
      raise ValueError(
          f"a truncated trajectory ({run_steps=} < {steps=}) reads the "
          f"scheduler's x0 estimate; scheduler={config.scheduler!r} keeps "
          "none (use unipc)")
    self.genome_steps, self.run_steps = steps, run_steps
    self.boundary_ratio = boundary_ratio
    self.experts = dense_sampler.expert_plan(self.scheduler.timesteps,
                                             boundary_ratio)
    model_config = nnx.merge(graphdef,
                             dense_sampler.pick_expert(params, 0)).config
    grid = [s // p for s, p in zip(noise.shape[2:], model_config.patch_size)]
    self.num_tokens = int(np.prod(grid))
    self.k_of_gene = [schedule_lib.num_selected(g / FULL, self.num_tokens)
                      for g in range(FULL + 1)]
    self.k_table = jnp.asarray(self.k_of_gene, jnp.int32)
    mesh = Mesh(np.asarray(devices), ("data",))
    self._rows = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    self.graphdef = graphdef
    self.params = jax.device_put(params, replicated)
    negative_contexts = jnp.broadcast_to(
        negative_contexts, (num_samples,) + negative_contexts.shape[1:])
    contexts_2 = jnp.stack([
        dense_sampler.cfg_context(c[None], n[None])
        for c, n in zip(contexts, negative_contexts)])      # (S, 2, L, D)
    self.contexts = jax.device_put(contexts_2, replicated)
    if token_mask is not None and np.shape(token_mask) != (self.num_tokens,):
      raise ValueError(f"token_mask {np.shape(token_mask)} must be "
                       f"({self.num_tokens},), one factor per token")
    for leaf in jax.tree.leaves(post_steps):
      if np.shape(leaf)[:1] != (num_samples,):
        raise ValueError(f"post_steps leaf {np.shape(leaf)} must have one "
                         f"entry per sample ({num_samples}) first")
    self.hooks = jax.device_put(
        (None if token_mask is None else jnp.asarray(token_mask, F32),
         post_steps, None if conditions is None else jax.vmap(
             lambda c: dense_sampler.cfg_condition(c[None]))(
                 jnp.asarray(conditions, F32))), replicated)
    self.guidance_scale = jnp.asarray(dense_sampler.expert_guidance(
        self.experts, config.guidance_scale), F32)
    self._cache_shape = (model_config.num_layers, 2, self.num_tokens,
                         model_config.dim)
    self._selection = config.selection
    self._noise = noise
    self._noise_and_contexts = (noise, contexts_2)
    row_bytes = _nbytes(jax.eval_shape(self._initial_state, noise[:1]))
    memory = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    self._init_tree(steps=run_steps, num_samples=num_samples, config=config,
                    num_devices=len(devices), row_bytes=row_bytes,
                    memory_bytes=None if None in memory else min(memory))
    self.node_state_bytes = row_bytes * len(self.passes[0])
    self._reference = None

  @property
  def reference(self):
    """The full model's final latents (S, 1, C, F, H, W) (truncated: its
    x0 estimate after run_steps), computed once."""
    if self._reference is None:
      full = (FULL,) * self.steps
      self._reference = self._finals([full])[full]
    return self._reference

  @property
  def fingerprint(self) -> str:
    """Identifies the problem (checked when a search resumes)."""
    return self._fingerprint(*self._noise_and_contexts)

  def root_state(self, p):
    """The state before step 0 of pass p's samples: (latents (s, 1, C, F,
    H, W), scheduler state, empty cache), made on demand."""
    return self._initial_state(self._noise[self.passes[p]])

  def _initial_state(self, noise):
    latents = noise[:, None]
    cache = selection.init_cache(*self._cache_shape, self._selection)
    n = latents.shape[0]
    return (latents, jax.vmap(self.scheduler.init)(latents),
            jax.tree.map(lambda c: jnp.broadcast_to(c, (n,) + c.shape),
                         cache))

  def __call__(self, genomes) -> np.ndarray:
    """(n, steps) int tenths -> (n,) float64 fitness (lower is better)."""
    return self.per_sample(genomes).mean(axis=1)

  def per_sample(self, genomes) -> np.ndarray:
    """(n, steps) int tenths -> (n, S) float64 MSE of each sample (computed
    in float32 on device); the fitness is their mean."""
    genomes = np.asarray(genomes)
    if genomes.ndim != 2 or genomes.shape[1] != self.genome_steps:
      raise ValueError(f"genomes must be (n, {self.genome_steps}); got "
                       f"{genomes.shape}")
    if ((genomes < 0) | (genomes > FULL)).any() or (
        genomes[:, 0] != FULL).any():
      raise ValueError("genes must be tenths in [0, 10], the first 10")
    reference = self.reference      # the full model's trajectory first
    keys = [g[:self.steps] for g in self._run_genomes(genomes)]
    finals = self._finals(keys)
    out = np.empty((len(keys), self.num_samples), np.float64)
    for i, k in enumerate(keys):
      out[i] = np.asarray(_sample_mse(finals[k], reference))
    return out

  def _readout(self, state):
    """A tree node's output: its latents, or when truncated the x0
    estimate of its last step."""
    if self.run_steps == self.genome_steps:
      return state[0]
    return self.scheduler.data_prediction(state[1])

  def _run_genomes(self, genomes):
    """The genomes as they run: with two experts and
    `config.refresh_experts`, the switch step's gene is 10."""
    genomes = [list(g) for g in np.asarray(genomes).tolist()]
    if self.boundary_ratio is not None and self.config.refresh_experts:
      genomes = [astraea_sampler.refresh_at_switch(g, self.experts, FULL)
                 for g in genomes]
    return [tuple(g) for g in genomes]

  def retain(self, population):
    super().retain(self._run_genomes(population))

  def _finals(self, genomes):
    """{genome prefix of run_steps: final latents (S, 1, C, F, H, W)}."""
    return {g: jnp.concatenate([self._readout(state) for state in states])
            for g, states in self._run(genomes).items()}

  def _fingerprint(self, noise, contexts_2):
    h = hashlib.sha256()
    for x in (noise, contexts_2, self.reference, self.k_table,
              self.scheduler.timesteps, *jax.tree.leaves(self.hooks)):
      h.update(np.asarray(x).tobytes())
    # The batch shape and device count enter too: they fix each row's float
    # rounding, so a resumed run needs them to match the interrupted one.
    h.update(repr((self.config.scheduler, self.config.guidance_scale,
                   self.config.evaluator, self.config.selection,
                   self.batch_nodes, [len(p) for p in self.passes],
                   self.num_devices)).encode())
    if self.boundary_ratio is not None:  # (one model: as before)
      h.update(repr((self.boundary_ratio, self.experts,
                     self.config.refresh_experts)).encode())
    if self.run_steps < self.genome_steps:      # (old fingerprints kept)
      h.update(f"run_steps={self.run_steps}".encode())
    return h.hexdigest()[:16]

  def _root(self, p):
    return self.root_state(p)

  def step_nodes(self, p, states, genes, step):
    """Denoising step `step` of up to batch_nodes nodes of pass p (padded
    to batch_nodes) on its expert: states of the parents, genes of the
    step; returns the children's states."""
    sample_ids = self.passes[p]
    s, n = len(sample_ids), len(states)
    pad = self.batch_nodes - n
    batch = states[0] if self.batch_nodes == 1 else _concat(
        states + [states[0]] * pad)
    samples = np.tile(sample_ids.astype(np.int32), self.batch_nodes)
    row_genes = np.repeat(np.asarray(genes + [genes[0]] * pad, np.int32), s)
    batch, samples, row_genes = jax.device_put((batch, samples, row_genes),
                                               self._rows)
    common = (self.graphdef, self.params, self.scheduler, self.guidance_scale,
              self.contexts, self.hooks)
    if self.config.evaluator == "masked":
      out = _masked_rows_step(*common, self.k_table, samples, row_genes, batch,
                              selection_config=self.config.selection,
                              expert=self.experts[step])
    else:
      out = _sparse_rows_step(*common, samples, batch,
                              num_selected=self.k_of_gene[genes[0]],
                              selection_config=self.config.selection,
                              expert=self.experts[step])
    self._count(p, genes)
    if self.batch_nodes == 1:
      return [out]
    return [_slice(out, i * s, (i + 1) * s) for i in range(n)]

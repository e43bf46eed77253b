"""Evolutionary search of the per-step token budget (Astraea, sec. 3.3).

  astraea search --model wan-1.3b/ --target-budget 0.4 \
      --text-embeddings p0.safetensors p1.safetensors ... --out search/

Genome: one budget per denoising step on `schedule.GRID` = {0, 0.1, ..., 1},
stored as int32 tenths (0..10). The first gene is always 10: the sampler
caches nothing before step 0. A genome is feasible when its mean budget
lies in [0.9, 1.1] x the target (`SearchConfig.band`), i.e. its sum of
tenths lies in `budget_band()`.

One generation (all operators are pure functions of explicit PRNG keys,
vmapped over the children, so one seed gives one result):
  1. parents: tournament selection on the fitness (lower is better);
  2. crossover: uniform (each gene from either parent) or block (one
     contiguous run of genes from the second parent);
  3. mutation: each gene after the first is redrawn with probability p_g,
     decaying geometrically from 0.1 (first generation) to 0.01 (last);
  4. repair: the first gene back to 10 and the sum of tenths moved into the
     band by adding/removing single tenths at random;
  5. fitness of the new children; elitist survival: the `population` best
     distinct genomes of parents + children.

Fitness (`TreeFitness`): the MSE between the final latents of the
accelerated sampler and of the full model, averaged over a few samples
(prompt, noise). Candidates run through `wan_tokenwise.forward_masked` (the
masked dense simulation of the sparse path: one compile for any budget)
inside the CFG step `guided_step`, as one vmapped batch of rows
(candidate x sample), sharded over a "data" mesh axis of all devices (one
code path for 1..N devices). `EvalConfig(evaluator="sparse")` runs the
sampler's own sparse path instead (a step costs ~ its budget, not a full
step; one compile per budget; equal to the masked numbers up to float
rounding). Wan2.2 TI2V image-to-video problems pass the sampler's hooks:
`TreeFitness(token_mask=, post_steps=)` (per-token timesteps, the image
frame of each sample put back after every step); I2V-A14B its image
channels (`conditions=`); the A14B models both experts' params with
`boundary_ratio` (each step on its expert with its guidance scale, the
switch step computed in full with `EvalConfig.refresh_experts`, as the
sampler). `SearchModel` says which (the Wan2.2 pipelines make theirs,
`Wan22Pipeline.search_model`); `problem_fitness` builds the fitness.

Cheaper than evaluating every candidate from scratch, without changing any
number (each row's result depends only on its own inputs: the batch shape
is fixed and rows never mix):
  * identical genomes are evaluated once (the search's fitness cache);
  * genomes sharing a prefix share its trajectory: a generation is
    evaluated as a prefix tree, level by level (step by step), each distinct
    prefix once (`PrefixTree`);
  * prefix states are memoised across generations (bounded; pruned to the
    survivors' prefixes, from which every child is bred);
  * the full model's trajectory is the all-10 genome of the same tree,
    computed once.
How much of this fits in memory is set by `EvalConfig` (sized from the
device memory by default); `TreeCounter` replays a search's calls under
other settings without the model, to count what they would compute.
Proxies (fewer frames, lower resolution, fewer samples; a truncated
trajectory, `TreeFitness(run_steps=M)`, for measurements) are a separate
`Problem` that `run_files` uses only after measuring its rank correlation
with the full fitness (`rank_correlation`). On the demo model only fewer
samples rank like the full fitness at rho >= 0.9, near the top too
(benchmarks/search_proxy.py).

Search state is checkpointed after every generation (`save_state`); a
resumed search ends with exactly the uninterrupted result.

The cheap search (`separable`, `astraea search --method dp`): a fitness
model separable over steps, c_t(b) measured by perturbing one step of the
full model's trajectory at a time, minimised exactly by dynamic
programming under the mean-budget band.

Modules: `genetic` (genomes and the genetic operators), `loop` (the search
loop and its resumable state), `fitness` (the prefix-tree fitness over the
masked or sparse simulation), `separable` (the DP search), `runner` (rank
proxies, the plot and the file runner `run_files` that `astraea search`
calls).
"""

from astraea_jax.astraea.search.genetic import (
    FULL,
    SearchConfig,
    block_crossover,
    from_schedule,
    initial_population,
    make_child,
    make_children,
    mutate,
    random_genome,
    repair,
    select_survivors,
    to_schedule,
    tournament,
    uniform_crossover,
)
from astraea_jax.astraea.search.loop import (
    STATE_FILE,
    STATE_VERSION,
    SearchResult,
    SearchState,
    load_state,
    save_state,
    search,
)
from astraea_jax.astraea.search.fitness import (
    EVALUATORS,
    EvalConfig,
    MAX_ROWS_PER_CALL,
    PrefixTree,
    RecordingFitness,
    STATE_MEMORY_SHARE,
    TreeCounter,
    TreeFitness,
    resolve_sizes,
)
from astraea_jax.astraea.search import separable
from astraea_jax.astraea.search.separable import DPConfig
from astraea_jax.astraea.search.runner import (
    Problem,
    SearchModel,
    load_samples,
    plot,
    problem_fitness,
    rank_correlation,
    run_files,
    spearman,
)

__all__ = [
    "DPConfig",
    "EVALUATORS",
    "EvalConfig",
    "FULL",
    "MAX_ROWS_PER_CALL",
    "PrefixTree",
    "Problem",
    "SearchModel",
    "RecordingFitness",
    "STATE_FILE",
    "STATE_MEMORY_SHARE",
    "STATE_VERSION",
    "SearchConfig",
    "SearchResult",
    "SearchState",
    "TreeCounter",
    "TreeFitness",
    "block_crossover",
    "from_schedule",
    "initial_population",
    "load_samples",
    "load_state",
    "make_child",
    "make_children",
    "mutate",
    "plot",
    "problem_fitness",
    "random_genome",
    "rank_correlation",
    "repair",
    "resolve_sizes",
    "run_files",
    "save_state",
    "search",
    "select_survivors",
    "separable",
    "spearman",
    "to_schedule",
    "tournament",
    "uniform_crossover",
]

"""Multi-device sampling: meshes, sequence parallelism, composed with Astraea.

  mesh = parallel.make_mesh(4)                       # ("data", "seq") = (1, 4)
  latents = parallel.sample(graphdef, params, noise, ctx, neg, mesh=mesh)
  latents = parallel.astraea_sample(graphdef, params, noise, ctx, neg,
                                    mesh=mesh, budget=0.4)
"""

from astraea_jax.parallel.attention import (
    STRATEGIES,
    AttentionPlan,
    merge_attention,
    merge_partials,
    plan_attention,
    sequence_parallel_attention,
)
from astraea_jax.parallel.layout import TokenLayout
from astraea_jax.parallel.mesh import (
    default_mesh_shape,
    initialize_distributed,
    make_mesh,
    put,
    replicate,
    shard_map,
)
from astraea_jax.parallel.mesh_sampling import (
    astraea_sample,
    sample,
    samplers,
)
from astraea_jax.parallel.sequence_parallel import (
    SequenceParallel,
    astraea_forward,
    forward,
    init_cache,
    local_num_selected,
    select_tokens_per_shard,
)

__all__ = [
    "STRATEGIES",
    "AttentionPlan",
    "SequenceParallel",
    "TokenLayout",
    "astraea_forward",
    "astraea_sample",
    "default_mesh_shape",
    "forward",
    "init_cache",
    "initialize_distributed",
    "local_num_selected",
    "make_mesh",
    "merge_attention",
    "merge_partials",
    "plan_attention",
    "put",
    "replicate",
    "sample",
    "samplers",
    "select_tokens_per_shard",
    "sequence_parallel_attention",
    "shard_map",
]

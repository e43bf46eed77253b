"""Schedulers and THE host sampling loop (`run`) that every sampler uses;
the dense Wan sampler here, the dense OpenSora one in `sampling.opensora`."""

from astraea_jax.sampling.sampler import (
    SampleStats,
    cfg_batch,
    cfg_combine,
    cfg_context,
    compiled_count,
    denoise,
    draw_noise,
    guided_step,
    make_scheduler,
    pack,
    resolve_scheduler,
    run,
    sample,
    steady_seconds,
    step_function,
    wan_latent_shape,
    wan_model_fn,
)
from astraea_jax.sampling.schedulers import (
    EulerState,
    FlowEuler,
    FlowUniPC,
    UniPCState,
    add_noise,
    flow_sigmas,
    opensora_timestep_transform,
    rflow_condition_frames,
    rflow_frame_keep,
    shift_sigmas,
    unipc_coefficients,
    wan_flow_shift,
)

__all__ = [
    "EulerState", "FlowEuler", "SampleStats", "compiled_count", "pack",
    "resolve_scheduler", "run", "steady_seconds", "step_function",
    "FlowUniPC", "UniPCState", "add_noise",
    "cfg_batch", "cfg_combine", "cfg_context", "denoise", "draw_noise",
    "flow_sigmas", "guided_step", "make_scheduler",
    "opensora_timestep_transform", "rflow_condition_frames",
    "rflow_frame_keep", "sample", "shift_sigmas", "unipc_coefficients",
    "wan_flow_shift", "wan_latent_shape", "wan_model_fn",
]

"""Schedulers and the dense CFG sampling loop."""

from astraea_jax.sampling.sampler import (
    cfg_batch,
    cfg_combine,
    cfg_context,
    denoise,
    draw_noise,
    guided_step,
    make_scheduler,
    sample,
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
    "EulerState", "FlowEuler", "FlowUniPC", "UniPCState", "add_noise",
    "cfg_batch", "cfg_combine", "cfg_context", "denoise", "draw_noise",
    "flow_sigmas", "guided_step", "make_scheduler",
    "opensora_timestep_transform", "rflow_condition_frames",
    "rflow_frame_keep", "sample", "shift_sigmas", "unipc_coefficients",
    "wan_flow_shift", "wan_latent_shape", "wan_model_fn",
]

"""Flow-matching schedulers as pure functions over small pytrees.

A scheduler is a frozen pytree of per-step tables, built once on the host by
its `set_timesteps` constructor (numpy, no tracing), plus a state pytree of
fixed structure that `step` threads through the loop:

    scheduler = FlowUniPC.set_timesteps(50, shift=3.0)
    state = scheduler.init(latents)
    for i in range(scheduler.num_steps):
      v = model(latents, scheduler.timesteps[i])         # velocity
      latents, state = scheduler.step(state, v, latents)

`step` reads its step index from the state, so the same traced function
serves every step (one compile) and runs under `jax.lax.scan` as well.

Conventions. Flow matching interpolates x_sigma = (1 - sigma) x0 + sigma
noise, sigma from ~1 (noise) down to 0 (data); the model's timestep is
`1000 sigma`. Wan and diffusers models predict the velocity
v = noise - x0. OpenSora's rectified flow predicts the opposite direction
(x0 - noise); its Euler table carries the sign (see `FlowEuler`).

Schedulers here:
  * `FlowUniPC`: UniPC (Zhao et al. 2023, arXiv 2302.04867), order 2, B(h)
    variant bh2, data (x0) prediction, flow sigmas with shift: Wan2.1's
    sampler. Matches diffusers `UniPCMultistepScheduler` as WanPipeline
    configures it (`schedule="diffusers"`) and the original Wan
    `FlowUniPCMultistepScheduler` (`schedule="wan"`).
  * `FlowEuler`: first-order Euler; `set_timesteps` matches diffusers
    `FlowMatchEulerDiscreteScheduler` with `shift`, `set_timesteps_rflow`
    matches OpenSora v1.2 `RFLOW` with its resolution/length-dependent
    timestep transform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

NUM_TRAIN_TIMESTEPS = 1000


# Shifted sigma schedules -----------------------------------------------------


def shift_sigmas(sigmas, shift):
  """sigma' = shift sigma / (1 + (shift - 1) sigma).

  The resolution-dependent timestep shift of SD3 (Esser et al. 2024,
  arXiv 2403.03206, section 5.3.2) that Wan calls `shift` / `flow_shift`
  and OpenSora v1.2 applies with shift = sqrt(pixels/512^2 * frames').
  shift > 1 spends more steps at high noise. Works on numpy and jax arrays
  in their dtype.
  """
  return shift * sigmas / (1 + (shift - 1) * sigmas)


def wan_flow_shift(height: int, width: int) -> float:
  """Wan2.1's recommended shift: 3.0 up to 480p (480x832), 5.0 above.

  Reference: the diffusers Wan2.1 pipeline docs and the Wan2.1 README
  (`--sample_shift`), "5.0 for 720P, 3.0 for 480P".
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"{height=} and {width=} must be positive")
  return 3.0 if height * width <= 480 * 832 else 5.0


def opensora_timestep_transform(t, *, height, width, num_frames,
                                num_timesteps=NUM_TRAIN_TIMESTEPS,
                                base_resolution=512 * 512,
                                base_num_frames=1, scale=1.0):
  """OpenSora v1.2's timestep transform (`rectified_flow.timestep_transform`).

    s = t / num_timesteps
    r = sqrt(height width / base_resolution) * sqrt(nf / base_num_frames)
        * scale,   nf = 1 if num_frames == 1 else (num_frames // 17) * 5
    t' = num_timesteps * r s / (1 + (r - 1) s)     (= shift_sigmas(s, r))

  Computed in float32 in the reference's order of operations, on the host.
  `height`, `width`, `num_frames` are scalars (pixels and video frames).
  """
  f32 = np.float32
  s = np.asarray(t, f32) / f32(num_timesteps)
  ratio_space = np.sqrt(f32(height) * f32(width) / f32(base_resolution))
  frames = f32(1) if num_frames == 1 else f32(num_frames) // f32(17) * f32(5)
  ratio_time = np.sqrt(frames / f32(base_num_frames))
  ratio = ratio_space * ratio_time * f32(scale)
  return shift_sigmas(s, ratio) * f32(num_timesteps)


def add_noise(x0, noise, t, num_timesteps=NUM_TRAIN_TIMESTEPS):
  """x_t = (1 - t/T) x0 + (t/T) noise, t (B,) broadcast per sample.

  The flow-matching forward process (OpenSora `RFlowScheduler.add_noise`,
  diffusers `FlowMatchEulerDiscreteScheduler.scale_noise` with sigma = t/T).
  """
  sigma = (jnp.asarray(t, jnp.float32) / num_timesteps).astype(x0.dtype)
  sigma = sigma.reshape(sigma.shape + (1,) * (x0.ndim - sigma.ndim))
  return (1 - sigma) * x0 + sigma * noise


def rflow_frame_keep(frame_mask, t, num_timesteps=NUM_TRAIN_TIMESTEPS):
  """OpenSora's conditioning-frame mask at timestep t: (B, T) bool.

  frame_mask (B, T) in [0, 1], 0 = conditioning frame. True where the frame
  is denoised at this step (`frame_mask * T >= t`); the model gets it as
  `x_mask`, and after the update frames with False return to the
  conditioning latent (`rflow_condition_frames`).
  """
  return frame_mask * num_timesteps >= jnp.asarray(t)[..., None]


def rflow_condition_frames(latents, cond_latents, keep):
  """where(keep, latents, cond_latents) over (B, C, T, H, W) latents."""
  return jnp.where(keep[:, None, :, None, None], latents, cond_latents)


# UniPC -----------------------------------------------------------------------


@struct.dataclass
class UniPCState:
  """Per-run state of `FlowUniPC` (fixed structure; zeros before use).

  step: int32 step index i.
  last_sample: the corrected sample of step i-1 (UniC's x_{t_{i-1}}).
  x0_prev, x0_prev2: the data predictions m_{i-1} and m_{i-2}.
  """
  step: jax.Array
  last_sample: jax.Array
  x0_prev: jax.Array
  x0_prev2: jax.Array


@struct.dataclass
class FlowUniPC:
  """UniPC-2 (bh2) for flow matching, with per-step coefficient tables.

  Every step i of the multistep predictor-corrector is linear in the
  samples and data predictions it touches, with coefficients that depend
  only on the sigma schedule; they are computed once, in float64 on the
  host, from the float32 sigmas the references use:

    m_i  = x_i - sigma_i v_i                                (data prediction)
    x^c_i = c0 x_i + c1 x^c_{i-1} + c2 m_{i-1} + c3 m_{i-2} + c4 m_i   (UniC)
    x_{i+1} = p0 x^c_i + p1 m_i + p2 m_{i-1}                           (UniP)

  At step 0 there is no corrector (c = [1, 0, 0, 0, 0]). Orders follow
  diffusers: warm-up (order 1 at step 0) and `lower_order_final` (order 1
  at the last step, which lands on sigma = 0 and returns m_{n-1}).

  timesteps: (n,) float32 model timesteps (integers, as both references
    truncate `1000 sigma` to int64).
  sigmas: (n + 1,) float32, ending at 0.
  corrector: (n, 5) and predictor: (n, 3) coefficient tables.
  """
  timesteps: jax.Array
  sigmas: jax.Array
  corrector: jax.Array
  predictor: jax.Array

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]

  @classmethod
  def set_timesteps(cls, num_steps: int, *, shift: float,
                    schedule: str = "diffusers",
                    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                    dtype=jnp.float32) -> FlowUniPC:
    """The scheduler for `num_steps` steps with flow shift `shift`.

    schedule: "diffusers" = diffusers `UniPCMultistepScheduler(
      prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=
      shift)` (WanPipeline): sigmas linspace(1, 1/T, n+1)[:-1], shifted,
      the first lowered by 1e-6 to keep log(1 - sigma) finite.
      "wan" = the original Wan `FlowUniPCMultistepScheduler(shift=1)` +
      `set_timesteps(n, shift=shift)`: linspace(sigma_max, 0, n+1)[:-1] with
      sigma_max = 0.999 (the training schedule's largest sigma), shifted.
    dtype: of the coefficient tables (float64 needs jax x64 enabled).
    """
    sigmas = flow_sigmas(num_steps, shift=shift, schedule=schedule,
                         num_train_timesteps=num_train_timesteps)
    timesteps = (sigmas * num_train_timesteps).astype(np.int64)
    sigmas32 = np.append(sigmas, 0.0).astype(np.float32)
    corrector, predictor = unipc_coefficients(sigmas32.astype(np.float64))
    return cls(timesteps=jnp.asarray(timesteps, jnp.float32),
               sigmas=jnp.asarray(sigmas32, jnp.float32),
               corrector=jnp.asarray(corrector, dtype),
               predictor=jnp.asarray(predictor, dtype))

  def init(self, sample) -> UniPCState:
    # Three distinct buffers: the loop donates the state.
    last_sample, x0_prev, x0_prev2 = (jnp.zeros(sample.shape, sample.dtype)
                                      for _ in range(3))
    return UniPCState(step=jnp.zeros((), jnp.int32), last_sample=last_sample,
                      x0_prev=x0_prev, x0_prev2=x0_prev2)

  @staticmethod
  def data_prediction(state: UniPCState):
    """The x0 estimate m_{i-1} = x_{i-1} - sigma_{i-1} v_{i-1} of the last
    step taken (after the last step: the returned sample itself)."""
    return state.x0_prev

  def step(self, state: UniPCState, model_output, sample):
    """One UniPC step: (velocity v_i, sample x_i) -> (x_{i+1}, state)."""
    i = state.step
    dtype = sample.dtype
    x0 = sample - self.sigmas[i].astype(dtype) * model_output.astype(dtype)
    c = self.corrector[i].astype(dtype)
    corrected = (c[0] * sample + c[1] * state.last_sample
                 + c[2] * state.x0_prev + c[3] * state.x0_prev2 + c[4] * x0)
    p = self.predictor[i].astype(dtype)
    prev_sample = p[0] * corrected + p[1] * x0 + p[2] * state.x0_prev
    state = UniPCState(step=i + 1, last_sample=corrected, x0_prev=x0,
                       x0_prev2=state.x0_prev)
    return prev_sample, state


def flow_sigmas(num_steps: int, *, shift: float, schedule: str = "diffusers",
                num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
  """The n shifted float64 sigmas of Wan's UniPC (without the final 0)."""
  if num_steps < 1:
    raise ValueError(f"{num_steps=} must be >= 1")
  if shift <= 0:
    raise ValueError(f"{shift=} must be positive")
  if schedule == "diffusers":
    sigmas = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)[:-1]
    sigmas = shift_sigmas(sigmas, shift)
    if abs(sigmas[0] - 1) < 1e-6:  # log(alpha = 1 - sigma) must stay finite
      sigmas[0] -= 1e-6
  elif schedule == "wan":
    # The training schedule sigmas = 1 - linspace(1, 1/T, T)[::-1], stored
    # in float32; its first entry is sigma_max.
    sigma_max = float(np.float32(1 - 1 / num_train_timesteps))
    sigmas = np.linspace(sigma_max, 0, num_steps + 1)[:-1]
    sigmas = shift_sigmas(sigmas, shift)
  else:
    raise ValueError(f"{schedule=} must be 'diffusers' or 'wan'")
  return sigmas


def _lambda(sigma):
  """Half log-SNR: log(alpha) - log(sigma), alpha = 1 - sigma (flow)."""
  with np.errstate(divide="ignore"):
    return np.log1p(-sigma) - np.log(sigma)


def unipc_coefficients(sigmas: np.ndarray, order: int = 2):
  """(corrector (n, 5), predictor (n, 3)) tables of UniPC-bh2, data pred.

  sigmas: (n + 1,) float64, decreasing, ending at 0. With h = lambda_t -
  lambda_s, B(h) = expm1(-h) (bh2) and phi_1 = expm1(-h), UniP-p / UniC-p
  (UniPC paper, Algorithms 2-3, data-prediction form) read

    x_t = (sigma_t / sigma_s) x_s - alpha_t phi_1 m_s
          - alpha_t B(h) sum_k rho_k D_k,         D_k = (m_k - m_s) / r_k,

  r_k = (lambda_k - lambda_s) / h. UniP-2 uses rho = 1/2; UniC-1 uses
  rho = 1/2; UniC-2 solves R rho = b with R = [[1, 1], [r_1, 1]] and
  b_k = k! g_k / B(h), g_1 = phi_1 / (-h) - 1, g_{k+1} = g_k / (-h) - 1/(k+1)!
  (the paper's eq. for b_i via phi functions, as diffusers evaluates it).
  """
  if order != 2:
    raise NotImplementedError(f"{order=}: only UniPC order 2 is implemented")
  n = len(sigmas) - 1
  lam = _lambda(sigmas)
  alpha = 1 - sigmas
  # Order used by the predictor at step i (warm-up + lower_order_final).
  p_order = [min(order, n - i, i + 1) for i in range(n)]
  corrector = np.zeros((n, 5))
  predictor = np.zeros((n, 3))

  for i in range(n):
    # UniP from sigma_i (s) to sigma_{i+1} (t): x^c_i, m_i, m_{i-1}.
    t, s = i + 1, i
    h = lam[t] - lam[s]
    phi_1 = np.expm1(-h)
    b_h = np.expm1(-h)  # bh2
    if sigmas[t] == 0:  # h = inf: exp(-h) = 0, the step returns m_i
      phi_1 = b_h = -1.0
    predictor[i, 0] = sigmas[t] / sigmas[s]
    predictor[i, 1] = -alpha[t] * phi_1
    if p_order[i] == 2:
      r = (lam[i - 1] - lam[s]) / h
      # - alpha_t B(h) (1/2) (m_{i-1} - m_i) / r
      predictor[i, 2] = -alpha[t] * b_h * 0.5 / r
      predictor[i, 1] += alpha[t] * b_h * 0.5 / r

  corrector[0, 0] = 1.0  # no corrector at step 0
  for i in range(1, n):
    # UniC from sigma_{i-1} (s) to sigma_i (t) with m_i (the model output
    # at the predicted x_i), order = that of the previous predictor.
    q = p_order[i - 1]
    t, s = i, i - 1
    h = lam[t] - lam[s]
    hh = -h
    phi_1 = np.expm1(hh)
    b_h = np.expm1(hh)
    if q == 1:
      rho_d, rho_t, r = 0.0, 0.5, 1.0
    else:
      r = (lam[i - 2] - lam[s]) / h
      # b_k: h_phi_k recursion (phi_{k+1}(hh) k! / B(h)).
      h_phi_k = phi_1 / hh - 1
      b1 = h_phi_k / b_h
      h_phi_k = h_phi_k / hh - 1 / 2
      b2 = h_phi_k * 2 / b_h
      rho_d, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]),
                                     np.array([b1, b2]))
    # x^c_i = (sigma_t/sigma_s) x^c_{i-1} - alpha_t phi_1 m_{i-1}
    #        - alpha_t B(h) [rho_d (m_{i-2} - m_{i-1}) / r
    #                        + rho_t (m_i - m_{i-1})]
    k = alpha[t] * b_h
    corrector[i, 1] = sigmas[t] / sigmas[s]
    corrector[i, 2] = -alpha[t] * phi_1 + k * rho_d / r + k * rho_t
    corrector[i, 3] = -k * rho_d / r
    corrector[i, 4] = -k * rho_t
  return corrector, predictor


# Euler -----------------------------------------------------------------------


@struct.dataclass
class EulerState:
  step: jax.Array  # int32 step index


@struct.dataclass
class FlowEuler:
  """Euler steps x_{i+1} = x_i + dt_i v_i over a float32 `dt` table.

  timesteps: (n,) float32 model timesteps.
  dt: (n,) float32 per-step multipliers of the model output. diffusers
    convention (v = noise - x0): dt_i = sigma_{i+1} - sigma_i < 0. OpenSora
    convention (v = x0 - noise): dt_i = (t_i - t_{i+1}) / 1000 > 0.
  """
  timesteps: jax.Array
  dt: jax.Array

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]

  @classmethod
  def set_timesteps(cls, num_steps: int, *, shift: float = 1.0,
                    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
                    ) -> FlowEuler:
    """diffusers `FlowMatchEulerDiscreteScheduler(shift=shift)` schedule.

    diffusers shifts twice: its constructor shifts the training sigmas
    k/T (float32), whose range [sigma_min, sigma_max] then bounds the
    linspace that `set_timesteps` shifts again (float64, then float32).
    """
    if num_steps < 1:
      raise ValueError(f"{num_steps=} must be >= 1")
    if shift <= 0:
      raise ValueError(f"{shift=} must be positive")
    f32 = np.float32
    train = np.array([num_train_timesteps, 1], f32) / f32(num_train_timesteps)
    sigma_max, sigma_min = (f32(shift) * train
                            / (f32(1) + f32(shift - 1) * train))
    t = np.linspace(float(sigma_max) * num_train_timesteps,
                    float(sigma_min) * num_train_timesteps, num_steps)
    sigmas = shift_sigmas(t / num_train_timesteps, shift).astype(f32)
    sigmas = np.append(sigmas, f32(0))
    return cls(timesteps=jnp.asarray(sigmas[:-1] * f32(num_train_timesteps)),
               dt=jnp.asarray(sigmas[1:] - sigmas[:-1]))

  @classmethod
  def set_timesteps_rflow(cls, num_steps: int, *, height: float,
                          width: float, num_frames: int,
                          use_timestep_transform: bool = True,
                          num_timesteps: int = NUM_TRAIN_TIMESTEPS
                          ) -> FlowEuler:
    """OpenSora v1.2 `RFLOW(num_sampling_steps, use_timestep_transform)`.

    t_i = (1 - i/n) T, optionally transformed for the video's pixel size and
    frame count (`opensora_timestep_transform`); dt_i = (t_i - t_{i+1}) / T
    with t_n = 0, all in float32 as the reference computes them.
    """
    if num_steps < 1:
      raise ValueError(f"{num_steps=} must be >= 1")
    f32 = np.float32
    t = np.array([(1.0 - i / num_steps) * num_timesteps
                  for i in range(num_steps)], f32)
    if use_timestep_transform:
      t = opensora_timestep_transform(t, height=height, width=width,
                                      num_frames=num_frames,
                                      num_timesteps=num_timesteps)
    dt = (t - np.append(t[1:], f32(0))) / f32(num_timesteps)
    return cls(timesteps=jnp.asarray(t), dt=jnp.asarray(dt))

  def init(self, sample) -> EulerState:
    del sample
    return EulerState(step=jnp.zeros((), jnp.int32))

  def step(self, state: EulerState, model_output, sample):
    i = state.step
    dtype = sample.dtype
    prev_sample = sample + self.dt[i].astype(dtype) * model_output.astype(dtype)
    return prev_sample, EulerState(step=i + 1)

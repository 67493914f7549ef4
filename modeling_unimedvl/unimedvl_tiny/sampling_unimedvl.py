"""The original UniMedVL/BAGEL rectified-flow sampler, piece by piece: argument checks, which steps are guided, the
guidance combination and renormalisation, the Euler step and where every random draw comes from. The model's
`generate_image` runs them; the diffusers pipelines check their arguments with the same functions.

Precision follows the original, which runs under CUDA bfloat16 autocast (in float32 every rule below is plain float32
arithmetic, so the float32 numbers do not change):

- velocities leave the model in its dtype and the guidance combination runs in that dtype; norms are float32 (autocast
  runs `linalg_vector_norm` in float32); a per-token renorm factor (`channel`, `text_channel`) promotes the result to
  float32, the per-image factor of `global` renorm keeps the velocity's dtype (the original's factor is a 0-dim
  tensor, which does not promote);
- the flow state stays float32 and the Euler product `v · (σ_i − σ_{i+1})` is taken in the velocity's dtype;
- the guidance interval compares the float32 sigmas with the bounds as float32 numbers.

Random draws (`generators_on`): the initial noise is drawn on the CPU in float32, one `[h·w, 64]` tensor per image,
as the original's `torch.randn`; the VAE posterior sample of a conditioning image is drawn on the VAE's device in the
VAE's dtype, as the original's `randn_like`, before the initial noise. Every draw uses the generator given for its row
when that generator lives on the draw's device, and otherwise a generator on that device seeded with the given
generator's `initial_seed()` (what `torch.manual_seed(seed)` does to the original's global RNGs); without a generator
the draws come from the global RNGs in the original's order: posterior, planning text (think mode), noise.
"""

import contextlib
import math
from dataclasses import dataclass
from numbers import Real

import torch
from diffusers.utils.torch_utils import randn_tensor


CFG_RENORM_TYPES = ("global", "channel", "text_channel")


def check_finite_number(name: str, value, low: float | None = None, high: float | None = None, open_low: bool = False):
    """Refuses `value` unless it is a finite real number within `[low, high]` (`(low, high]` with `open_low`)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    below = low is not None and (value <= low if open_low else value < low)
    if below or (high is not None and value > high):
        bounds = f"{'above' if open_low else 'at least'} {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be {bounds}, got {value!r}.")


def check_callback_latents(returned, latents: torch.Tensor, step: int) -> torch.Tensor:
    """The latents that a step callback returned in place of `latents` `[batch, h·w, 64]` at `step` (None: keep
    them): a tensor of their shape with finite values, cast to their dtype. Reads one value back to the host (only
    when a callback is given)."""
    if returned is None:
        return latents
    if not isinstance(returned, torch.Tensor) or returned.shape != latents.shape:
        got = tuple(returned.shape) if isinstance(returned, torch.Tensor) else type(returned).__name__
        raise ValueError(
            f"`callback_on_step_end` must return latents of shape {tuple(latents.shape)} (or None) at step {step}, got {got}."
        )
    if not bool(torch.isfinite(returned).all()):
        raise ValueError(f"`callback_on_step_end` returned non-finite (NaN or inf) latents at step {step}.")
    return returned.to(latents.dtype)


def check_sampler_arguments(
    num_inference_steps,
    timestep_shift,
    cfg_text_scale,
    cfg_img_scale,
    cfg_interval,
    cfg_renorm_type,
    cfg_renorm_min,
    names: dict[str, str] | None = None,
) -> None:
    """Refuses a sampler argument that is not a finite number in its range with a message naming it; `names` maps
    these argument names to the caller's (e.g. `cfg_text_scale` → `guidance_scale` in the diffusers pipelines).

    Ranges: `num_inference_steps` an integer ≥ 2 (one Euler step), `timestep_shift` > 0 (or None), the guidance scales
    any finite number (≤ 1 switches a branch off), `cfg_interval` `(low, high)` with 0 ≤ low ≤ high ≤ 1,
    `cfg_renorm_min` in [0, 1], `cfg_renorm_type` one of `CFG_RENORM_TYPES`.
    """
    names = names or {}

    def named(key: str) -> str:
        return names.get(key, key)

    steps = named("num_inference_steps")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 2:
        raise ValueError(f"`{steps}` must be an integer of at least 2 (one Euler step), got {num_inference_steps!r}.")
    if timestep_shift is not None:
        check_finite_number(named("timestep_shift"), timestep_shift, low=0.0, open_low=True)
    check_finite_number(named("cfg_text_scale"), cfg_text_scale)
    check_finite_number(named("cfg_img_scale"), cfg_img_scale)
    interval = named("cfg_interval")
    if (
        not isinstance(cfg_interval, (list, tuple))
        or len(cfg_interval) != 2
        or any(isinstance(b, bool) or not isinstance(b, Real) or not math.isfinite(b) for b in cfg_interval)
        or not 0.0 <= cfg_interval[0] <= cfg_interval[1] <= 1.0
    ):
        raise ValueError(f"`{interval}` must be (low, high) with 0 <= low <= high <= 1, got {cfg_interval!r}.")
    if cfg_renorm_type not in CFG_RENORM_TYPES:
        raise ValueError(f"`{named('cfg_renorm_type')}` must be one of {CFG_RENORM_TYPES}, got {cfg_renorm_type!r}.")
    check_finite_number(named("cfg_renorm_min"), cfg_renorm_min, 0.0, 1.0)


def guided_steps(sigmas: torch.Tensor, cfg_interval: tuple[float, float]) -> list[bool]:
    """Whether each step's sigma (`[steps]`) lies in the guidance interval, `low < σ ≤ high`, compared as the original
    compares them: float32 sigmas against the bounds rounded to float32 (so a sigma equal to float32(0.4) is not above
    a lower bound of 0.4, although it is above the double 0.4)."""
    sigmas = sigmas.detach().to("cpu", torch.float32)
    low, high = (torch.tensor(float(bound), dtype=torch.float32) for bound in cfg_interval)
    return ((sigmas > low) & (sigmas <= high)).tolist()


@dataclass(frozen=True)
class DenoisingSchedule:
    """Everything of the Euler loop that depends only on the request, computed once per generation: `sigmas`
    `[steps + 1]` (float32, on the model's device; the last is 0), the scheduler's `timesteps` `[steps]` (what the
    step callback receives) and `branches`, the guidance contexts evaluated at each step (1: the full context only;
    2: and the text-guidance context; 3: and the image-guidance context)."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    branches: tuple[int, ...]


def denoising_schedule(
    scheduler,
    num_inference_steps: int,
    cfg_interval: tuple[float, float],
    use_text: bool,
    use_image: bool,
    device: torch.device | str | None = None,
) -> DenoisingSchedule:
    """BAGEL's schedule on `scheduler` (a `FlowMatchEulerDiscreteScheduler`): `linspace(1, 0, num_inference_steps)`
    shifted by the scheduler's shift, `num_inference_steps − 1` Euler steps. A step evaluates the text-guidance
    branch when `use_text` (its scale is above 1) and its sigma lies in `cfg_interval` ([`guided_steps`]), and the
    image-guidance branch when `use_image` as well. Reads the sigmas back to the host once, here."""
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, num_inference_steps)[:-1].tolist(), device=device)
    guided = guided_steps(scheduler.sigmas[:-1], cfg_interval)
    branches = tuple(1 + int(use_text and inside) + int(use_text and use_image and inside) for inside in guided)
    return DenoisingSchedule(scheduler.sigmas, scheduler.timesteps, branches)


@dataclass(frozen=True)
class CfgGuidance:
    """The guidance settings of one generation, as [`combine_cfg_velocity`] takes them."""

    text_scale: float
    image_scale: float
    renorm_type: str
    renorm_min: float


def combine_cfg_velocity(
    v_cond: torch.Tensor,
    v_text: torch.Tensor | None,
    v_image: torch.Tensor | None,
    text_scale: float,
    image_scale: float,
    renorm_type: str,
    renorm_min: float,
) -> torch.Tensor:
    """Classifier-free guidance of BAGEL/UniMedVL over velocities `[batch, tokens, channels]`.

    `v_text` comes from the text-guidance context, `v_image` from the image-guidance context; a branch is `None` where
    its scale is inactive (≤ 1). Renorm rescales the guided velocity to at most the norm of `v_cond`: over each whole
    image (`global`), per token (`channel`), or per token of the text-guided part only before image guidance
    (`text_channel`). Dtypes as the module docstring says.
    """
    if v_text is None:
        return v_cond
    guided = v_text + text_scale * (v_cond - v_text)
    if renorm_type == "text_channel":
        guided = guided * _renorm_factor(v_cond, guided, (-1,), renorm_min)
        return v_image + image_scale * (guided - v_image) if v_image is not None else guided
    if v_image is not None:
        guided = v_image + image_scale * (guided - v_image)
    if renorm_type == "channel":
        return guided * _renorm_factor(v_cond, guided, (-1,), renorm_min)
    return (guided.float() * _renorm_factor(v_cond, guided, (-2, -1), renorm_min)).to(guided.dtype)


def _renorm_factor(reference: torch.Tensor, guided: torch.Tensor, dims: tuple[int, ...], minimum: float) -> torch.Tensor:
    """`clamp(‖reference‖ / (‖guided‖ + 1e-8), minimum, 1)` over `dims` (kept), in float32."""
    norm_ref = torch.linalg.vector_norm(reference, dim=dims, keepdim=True, dtype=torch.float32)
    norm_guided = torch.linalg.vector_norm(guided, dim=dims, keepdim=True, dtype=torch.float32)
    return (norm_ref / (norm_guided + 1e-8)).clamp(min=minimum, max=1.0)


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One step of the original sampler, `x ← x − v·(σ − σ_next)`: `latents` (float32) stay float32, the product takes
    the velocity's dtype; `sigma` and `sigma_next` are 0-dim float32 tensors."""
    return latents - velocity * (sigma - sigma_next)


def generators_on(
    generator: torch.Generator | list[torch.Generator] | None, count: int, device: torch.device | str
) -> list[torch.Generator | None]:
    """`count` generators for draws on `device`: `generator` for every item, or the list given (one per item).

    A generator on another device is replaced by one on `device` seeded with its `initial_seed()`, created once per
    distinct generator so that the items sharing it continue one stream; `None` stays `None` (the global RNG).
    """
    items = list(generator) if isinstance(generator, (list, tuple)) else [generator] * count
    if len(items) != count:
        raise ValueError(f"Got {len(items)} generators for {count} rows; give one generator, or one per row.")
    device = torch.device(device)
    on_device: dict[int, torch.Generator] = {}
    result = []
    for item in items:
        if item is not None and not _same_device(item.device, device):
            if id(item) not in on_device:
                on_device[id(item)] = torch.Generator(device).manual_seed(item.initial_seed())
            item = on_device[id(item)]
        result.append(item)
    return result


def _same_device(first: torch.device, second: torch.device) -> bool:
    """Devices equal up to an omitted index (`cuda` and `cuda:0` on the default device)."""
    if first.type != second.type:
        return False
    index = torch.cuda.current_device() if first.type == "cuda" and torch.cuda.is_available() else 0
    return (first.index if first.index is not None else index) == (second.index if second.index is not None else index)


def initial_noise(shape: tuple[int, int, int], generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """The initial noise `[batch, h·w, 64]` in float32 on the CPU: one draw per row from each row's generator when
    `generator` is a list, otherwise one draw of the whole batch (the global CPU RNG when `None`)."""
    cpu = torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        generator = generators_on(generator, shape[0], cpu)
    else:
        generator = generators_on(generator, 1, cpu)[0]
    return randn_tensor(shape, generator=generator, device=cpu, dtype=torch.float32)


def vae_precision(vae: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Runs a half-precision VAE on CUDA under autocast, as the original does (its GroupNorms then compute and return
    float32); elsewhere the VAE runs in its own dtype."""
    parameter = next(vae.parameters())
    if parameter.device.type == "cuda" and parameter.dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=parameter.dtype)
    return contextlib.nullcontext()


__all__ = [
    "CFG_RENORM_TYPES",
    "check_callback_latents",
    "check_finite_number",
    "check_sampler_arguments",
    "guided_steps",
    "CfgGuidance",
    "DenoisingSchedule",
    "denoising_schedule",
    "combine_cfg_velocity",
    "euler_step",
    "generators_on",
    "initial_noise",
    "vae_precision",
]

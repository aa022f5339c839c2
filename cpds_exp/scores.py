"""Score-distillation gradients (SPEC §2): DDS and PDS as pure functions.

Both return the per-element gradient g that the editor applies to the target latent as
d/dz_trg of ``score_scale(h, w) * w_dds * sum(z_trg * g)``. Noise-schedule coefficients are
gathered per batch element, so every image of a batch may have its own timestep.
"""
from __future__ import annotations

import weakref
from typing import Protocol

import torch

from cpds_exp.errors import CpdsError

#: The published scaling of the score term: 2000 / (latent height * latent width).
SCORE_NUMERATOR = 2000.0


class NoiseSchedule(Protocol):
    """Anything with diffusers-style ``alphas_cumprod`` (a diffusers scheduler will do)."""

    alphas_cumprod: torch.Tensor


def score_scale(height: int, width: int) -> float:
    """The factor 2000 / (h * w) by which the published code multiplies the score term."""
    return SCORE_NUMERATOR / (height * width)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) or scalar coefficient so it broadcasts over a (B, C, H, W) tensor."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


#: ᾱ tables copied to a device, by (id of the scheduler's tensor, device). Each entry keeps a weak
#: reference to its source tensor: a hit must be that very tensor (an id is reused once its
#: object is freed), and the entry goes when the tensor does.
_TABLES: dict[tuple[int, torch.device], tuple[weakref.ref, torch.Tensor]] = {}


def _forget(key: tuple[int, torch.device], source: weakref.ref) -> None:
    if key in _TABLES and _TABLES[key][0] is source:
        del _TABLES[key]


def _alpha_bar_table(scheduler: NoiseSchedule, device: torch.device) -> torch.Tensor:
    """ᾱ in float64 on ``device``, copied there once: indexing it then never waits for the GPU."""
    source = scheduler.alphas_cumprod
    key = (id(source), device)
    cached = _TABLES.get(key)
    if cached is None or cached[0]() is not source:
        reference = weakref.ref(source, lambda ref, key=key: _forget(key, ref))
        _TABLES[key] = (reference, source.to(device=device, dtype=torch.float64))
    return _TABLES[key][1]


def alpha_bar(scheduler: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t in float64 on t's device, with the convention ᾱ_t = 1 for t < 0 (before the first step)."""
    t = torch.as_tensor(t).long()
    table = _alpha_bar_table(scheduler, t.device)
    return torch.where(t >= 0, table[t.clamp(min=0)], torch.ones_like(table[0]))


def add_noise(z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler: NoiseSchedule) -> torch.Tensor:
    """Forward noising z_t = √ᾱ_t z + √(1 − ᾱ_t) ε."""
    abar = alpha_bar(scheduler, t).to(z.device)
    return _per_sample(abar.sqrt(), z) * z + _per_sample((1 - abar).sqrt(), z) * noise


#: What a UNet can be trained to predict (diffusers' ``scheduler.config.prediction_type``).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def to_epsilon(output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, scheduler: NoiseSchedule,
               prediction_type: str) -> torch.Tensor:
    """The noise ε that a UNet output implies at z_t, so guidance, DDS, PDS and CUT read ε alone.

    v-prediction (SD 2.x 768): v = √ᾱ_t ε − √(1 − ᾱ_t) z_0 and z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε give
    ε = √ᾱ_t v + √(1 − ᾱ_t) z_t; a sample (z_0) prediction gives ε = (z_t − √ᾱ_t z_0) / √(1 − ᾱ_t).
    """
    if prediction_type == "epsilon":
        return output
    abar = alpha_bar(scheduler, t).to(output.device)
    if prediction_type == "v_prediction":
        return _per_sample(abar.sqrt(), output) * output + _per_sample((1 - abar).sqrt(), output) * z_t
    if prediction_type == "sample":
        return (z_t - _per_sample(abar.sqrt(), output) * output) / _per_sample((1 - abar).sqrt(), output)
    raise CpdsError(f"the scheduler's prediction_type={prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}: "
                    "set model.prediction_type to what the UNet was trained to predict")


def guided(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ε̂ = ε(∅) + s · (ε(y) − ε(∅))."""
    return uncond + guidance_scale * (cond - uncond)


def dds_grad(eps_pred_src: torch.Tensor, eps_pred_trg: torch.Tensor) -> torch.Tensor:
    """Delta Denoising Score: g = ε̂_trg − ε̂_src (Hertz et al. 2023)."""
    return eps_pred_trg - eps_pred_src


def _posterior_terms(t: torch.Tensor, t_prev: torch.Tensor, scheduler: NoiseSchedule):
    """ᾱ_t, ᾱ_{t_prev}, c0, c1 and σ_t of the DDPM posterior q(z_{t_prev} | z_t, z_0), in float64.

    α_t and β_t are taken as ᾱ_t / ᾱ_{t_prev} and 1 − that, which equals the scheduler's own
    α_t, β_t for t_prev = t − 1 and keeps the posterior exact for any t_prev < t.
    """
    abar_t = alpha_bar(scheduler, t)
    abar_prev = alpha_bar(scheduler, t_prev)
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    c0 = abar_prev.sqrt() * beta_t / (1 - abar_t)
    c1 = alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t)
    sigma_t = ((1 - abar_prev) / (1 - abar_t) * beta_t).sqrt()
    return abar_t, abar_prev, c0, c1, sigma_t


def pds_grad(
    z_src: torch.Tensor,
    z_trg: torch.Tensor,
    noise: torch.Tensor,
    noise_prev: torch.Tensor,
    eps_pred_src: torch.Tensor,
    eps_pred_trg: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    scheduler: NoiseSchedule,
) -> torch.Tensor:
    """Posterior Distillation Sampling: g = ζ_trg − ζ_src (Koo et al. 2024, SPEC §2).

    ``z_src``/``z_trg`` are the clean latents, ``noise`` the ε that made both z_t, ``noise_prev``
    the ε′ of the posterior sample, ``eps_pred_*`` the guidance-combined predictions at z_t.
    The general form is kept (it differs from λ(t)·DDS when the noises are not shared).
    """
    abar_t, abar_prev, c0, c1, sigma_t = _posterior_terms(t, t_prev, scheduler)
    abar_t, abar_prev, c0, c1, sigma_t = (v.to(z_src.device) for v in (abar_t, abar_prev, c0, c1, sigma_t))

    def zeta(z: torch.Tensor, eps_pred: torch.Tensor) -> torch.Tensor:
        z_t = _per_sample(abar_t.sqrt(), z) * z + _per_sample((1 - abar_t).sqrt(), z) * noise
        x0_pred = (z_t - _per_sample((1 - abar_t).sqrt(), z) * eps_pred) / _per_sample(abar_t.sqrt(), z)
        mean = _per_sample(c0, z) * x0_pred + _per_sample(c1, z) * z_t
        z_prev = _per_sample(abar_prev.sqrt(), z) * z + _per_sample((1 - abar_prev).sqrt(), z) * noise_prev
        return (z_prev - mean) / _per_sample(sigma_t, z)

    return zeta(z_trg, eps_pred_trg) - zeta(z_src, eps_pred_src)


def pds_dds_ratio(t: torch.Tensor, t_prev: torch.Tensor, scheduler: NoiseSchedule) -> torch.Tensor:
    """λ(t) with g_PDS = λ(t) · g_DDS when ε and ε′ are shared (SPEC §2), in float64.

    λ(t) = √(β_t / (α_t (1 − ᾱ_{t−1}))); about 0.08–0.15 on SD's schedule.
    """
    abar_t, abar_prev, *_ = _posterior_terms(t, t_prev, scheduler)
    alpha_t = abar_t / abar_prev
    return ((1 - alpha_t) / (alpha_t * (1 - abar_prev))).sqrt()

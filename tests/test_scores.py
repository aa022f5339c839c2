"""DDS and PDS: exact values, the zero-gradient property and the PDS = λ(t)·DDS identity (SPEC §2)."""
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from cpds_exp.models import SD_SCHEDULE
from cpds_exp.scores import add_noise, dds_grad, pds_dds_ratio, pds_grad, score_scale


def float64_schedule():
    """SD's schedule computed in float64, so identities can be checked to ~1e-12."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = 1 - betas
    return SimpleNamespace(betas=betas, alphas=alphas, alphas_cumprod=torch.cumprod(alphas, 0))


def random_inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(6)]


def test_float64_schedule_matches_diffusers():
    ours = float64_schedule()
    theirs = DDPMScheduler(**SD_SCHEDULE)
    assert torch.allclose(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-5)


def test_score_scale_is_2000_over_latent_area():
    assert score_scale(64, 64) == pytest.approx(2000 / 4096)
    assert score_scale(32, 48) == pytest.approx(2000 / (32 * 48))


def test_dds_is_target_minus_source():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    assert torch.equal(dds_grad(a, b), torch.tensor([-0.5, -3.0]))


@pytest.mark.parametrize("t", [50, 400, 949])
def test_pds_is_zero_when_source_equals_target(t):
    sched = float64_schedule()
    z, _, noise, noise_prev, eps, _ = random_inputs()
    tt = torch.full((3,), t)
    g = pds_grad(z, z.clone(), noise, noise_prev, eps, eps.clone(), tt, tt - 1, sched)
    assert torch.count_nonzero(g) == 0
    assert torch.count_nonzero(dds_grad(eps, eps.clone())) == 0


def test_pds_equals_lambda_times_dds_with_shared_noise():
    sched = float64_schedule()
    z_src, z_trg, noise, noise_prev, eps_src, eps_trg = random_inputs()
    t = torch.tensor([50, 500, 949])  # a different timestep per batch row
    g_pds = pds_grad(z_src, z_trg, noise, noise_prev, eps_src, eps_trg, t, t - 1, sched)
    lam = pds_dds_ratio(t, t - 1, sched).reshape(-1, 1, 1, 1)
    assert torch.allclose(g_pds, lam * dds_grad(eps_src, eps_trg), rtol=0, atol=1e-12)
    # the identity does not hold when the rows get each other's λ: rows really are separate
    assert not torch.allclose(g_pds, lam.flip(0) * dds_grad(eps_src, eps_trg), atol=1e-3)


def test_lambda_range_on_sd_schedule():
    t = torch.arange(50, 950)
    lam = pds_dds_ratio(t, t - 1, DDPMScheduler(**SD_SCHEDULE))
    assert 0.07 < lam.min() and lam.max() < 0.16


def test_pds_exact_value_from_the_spec_formulas():
    """Transcribe SPEC §2 with the scheduler's own β_t, α_t and compare."""
    sched = float64_schedule()
    z_src, z_trg, noise, noise_prev, eps_src, eps_trg = random_inputs(batch=1, seed=3)
    t = 321
    abar, abar_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[t - 1]
    beta, alpha = sched.betas[t], sched.alphas[t]
    c0 = abar_prev.sqrt() * beta / (1 - abar)
    c1 = alpha.sqrt() * (1 - abar_prev) / (1 - abar)
    sigma = ((1 - abar_prev) / (1 - abar) * beta).sqrt()

    def zeta(z, eps_pred):
        z_t = abar.sqrt() * z + (1 - abar).sqrt() * noise
        x0 = (z_t - (1 - abar).sqrt() * eps_pred) / abar.sqrt()
        mu = c0 * x0 + c1 * z_t
        return (abar_prev.sqrt() * z + (1 - abar_prev).sqrt() * noise_prev - mu) / sigma

    expected = zeta(z_trg, eps_trg) - zeta(z_src, eps_src)
    got = pds_grad(z_src, z_trg, noise, noise_prev, eps_src, eps_trg, torch.tensor([t]), torch.tensor([t - 1]), sched)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_pds_general_form_keeps_z_terms_for_unshared_noise():
    """Feeding different posterior noises is not the DDS shortcut: the general form is computed."""
    sched = float64_schedule()
    z_src, z_trg, noise, noise_prev, eps_src, eps_trg = random_inputs(seed=5)
    t = torch.tensor([300, 300, 300])
    g1 = pds_grad(z_src, z_trg, noise, noise_prev, eps_src, eps_trg, t, t - 1, sched)
    g2 = pds_grad(z_src, z_trg, noise, noise_prev * 2, eps_src, eps_trg, t, t - 1, sched)
    assert torch.allclose(g1, g2, atol=1e-12)  # shared ε′ cancels whatever its value
    g3 = pds_grad(z_src, z_trg, noise, noise_prev, eps_src, eps_trg, t, t - 10, sched)
    lam = pds_dds_ratio(t, t - 10, sched).reshape(-1, 1, 1, 1)
    assert torch.allclose(g3, lam * (eps_trg - eps_src), atol=1e-12)  # any t_prev: still exact


def test_add_noise_matches_diffusers():
    sched = DDPMScheduler(**SD_SCHEDULE)
    z, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    assert torch.allclose(add_noise(z, noise, t, sched), sched.add_noise(z, noise, t), atol=1e-6)


def test_alpha_bar_cache_follows_the_schedule_not_a_reused_id():
    import gc

    from cpds_exp import scores

    t = torch.tensor([10, 500, 999])
    for start in (1e-4, 1e-3, 5e-3, 1e-2):  # schedules built and freed: ids are often reused
        schedule = SimpleNamespace(alphas_cumprod=torch.cumprod(1 - torch.linspace(start, 0.02, 1000), 0))
        assert torch.equal(scores.alpha_bar(schedule, t), schedule.alphas_cumprod[t].double())
        del schedule
        gc.collect()
    assert all(ref() is not None for ref, _ in scores._TABLES.values())  # no table outlives its schedule

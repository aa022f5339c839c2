"""v- and x₀-predicting models (SD 2.x 768): their outputs become ε before guidance, so every method
edits them unchanged; the conversion is exact on constructed cases, and SD 1.x is untouched."""
from types import SimpleNamespace

import pytest
import torch

from cpds_exp.app import run
from cpds_exp.errors import CpdsError
from cpds_exp.models import load_stack
from cpds_exp.scores import add_noise, alpha_bar, to_epsilon
from helpers import make_editor, make_image

METHODS = ("dds", "pds", "cds", "cpds", "cds_matched")


@pytest.fixture(scope="module")
def tiny_v():
    return load_stack(None, device="cpu", dtype="float32", prediction_type="v_prediction")


def constructed(scheduler, seed=0):
    """A clean latent z₀, a noise ε, per-row timesteps and z_t, in float64."""
    g = torch.Generator().manual_seed(seed)
    z0, eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, 8, generator=g,
                                                                                   dtype=torch.float64)
    t = torch.tensor([1, 480, 999])
    return z0, eps, t, add_noise(z0, eps, t, scheduler)


def test_v_and_sample_predictions_convert_to_the_noise_of_the_same_latent(tiny_stack):
    z0, eps, t, z_t = constructed(tiny_stack.scheduler)
    abar = alpha_bar(tiny_stack.scheduler, t).view(-1, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * z0  # the v-prediction target (Salimans & Ho 2022)
    sched = tiny_stack.scheduler
    assert torch.allclose(to_epsilon(v, z_t, t, sched, "v_prediction"), eps, atol=1e-12)
    assert torch.allclose(to_epsilon(z0, z_t, t, sched, "sample"), eps, atol=1e-9)
    assert torch.equal(to_epsilon(eps, z_t, t, sched, "epsilon"), eps)
    with pytest.raises(CpdsError, match="model.prediction_type"):
        to_epsilon(eps, z_t, t, sched, "flow")


def test_the_stack_reads_its_schedulers_prediction_type(tiny_stack, tiny_v):
    """An oracle UNet that answers the true v: the v stack's predict_noise gives back ε; the same
    answer read as ε by an ε stack does not."""
    assert tiny_stack.prediction_type == "epsilon" and tiny_v.prediction_type == "v_prediction"
    z0, eps, t, z_t = (x.float() if x.is_floating_point() else x for x in constructed(tiny_v.scheduler, 1))
    abar = alpha_bar(tiny_v.scheduler, t).view(-1, 1, 1, 1).float()
    oracle = lambda z, timesteps, **kwargs: SimpleNamespace(sample=abar.sqrt() * eps - (1 - abar).sqrt() * z0)  # noqa: E731
    cond = tiny_v.encode_prompts(["a cat"] * 3)
    assert torch.allclose(tiny_v.predict_noise(z_t, t, cond, oracle), eps, atol=1e-5)
    assert not torch.allclose(tiny_stack.predict_noise(z_t, t, cond, oracle), eps, atol=1e-2)


def test_the_real_unets_v_output_is_converted(tiny_stack, tiny_v):
    """Same weights, read as v: ε = √ᾱ·UNet + √(1−ᾱ)·z_t, computed by hand."""
    z_t, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([100, 900])
    cond = tiny_v.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        raw = tiny_stack.predict_noise(z_t, t, cond)  # the ε stack has the same seeded weights
        converted = tiny_v.predict_noise(z_t, t, cond)
    abar = tiny_v.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(converted, abar.sqrt() * raw + (1 - abar).sqrt() * z_t, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_edits_a_v_prediction_model(tiny_v, tiny_stack, method):
    editor = make_editor(tiny_v, method, iterations=3, n_patches=8, lr=0.5)
    start = editor.encode_images(make_image())
    result = editor.edit(make_image(), ["a cat"], ["a dog"]).latents
    assert torch.isfinite(result).all() and (result - start).abs().max() > 1e-3
    eps_model = make_editor(tiny_stack, method, iterations=3, n_patches=8, lr=0.5)
    assert not torch.allclose(eps_model.edit(make_image(), ["a cat"], ["a dog"]).latents, result, atol=1e-4)


@pytest.mark.parametrize("method", ["dds", "pds"])
def test_source_equals_target_gives_no_step_on_a_v_model(tiny_v, method):
    editor = make_editor(tiny_v, method, iterations=2, lr=0.5)
    start = editor.encode_images(make_image())
    assert torch.allclose(editor.edit(make_image(), ["a cat"], ["a cat"]).latents, start, atol=1e-6)


def test_model_tiny_v_runs_through_the_app(compose_config, tmp_path):
    cfg = compose_config("model=tiny_v", "metrics=random", "logger=none", "iterations=2", "progress=false",
                         "n_patches=8", "method=cpds")
    [summary] = run(cfg, tmp_path)
    assert summary["status"] == "done" and summary["model"] == "tiny_v"
    assert "prediction_type: v_prediction" in (tmp_path / "config.yaml").read_text()


def test_an_unknown_prediction_type_is_one_line(compose_config):
    with pytest.raises(CpdsError, match="prediction_type"):
        load_stack(None, device="cpu", prediction_type="flow")
    from omegaconf.errors import OmegaConfBaseException
    from hydra.errors import HydraException

    with pytest.raises((OmegaConfBaseException, HydraException), match="prediction_type"):
        compose_config("model=tiny", "model.prediction_type=flow")

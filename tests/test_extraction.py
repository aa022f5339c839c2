"""One-step extraction scores: DCS against a hand computation, ECS on constructed edges, outputs."""
from __future__ import annotations

import csv
import runpy
import sys

import pytest
import torch

from conftest import REPO
from wandb_offline import finished_run_file, read_run
from cpds_exp.errors import CpdsError
from cpds_exp.tools.extraction import (ExtractionSettings, dcs, ecs, edge_maps, noises, one_step, read_captions,
                                 score_captions, sobel_magnitude)


def test_dcs_matches_a_hand_computation(tiny_stack):
    noise = noises(tiny_stack, 2, seed=3)
    step = one_step(tiny_stack, "a photo of a cat", noise, guidance_scale=7.5)

    tok = tiny_stack.tokenizer(["", "a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        text = tiny_stack.text_encoder(tok.input_ids)[0]
        t = torch.tensor([999])
        uncond = torch.cat([tiny_stack.unet(n[None], t, encoder_hidden_states=text[:1]).sample for n in noise])
        cond = torch.cat([tiny_stack.unet(n[None], t, encoder_hidden_states=text[1:]).sample for n in noise])
    eps = uncond + 7.5 * (cond - uncond)
    expected = ((noise - eps) ** 2).mean().item()

    assert dcs(step.noise, step.eps) == pytest.approx(expected, rel=1e-4)
    alpha_bar = tiny_stack.scheduler.alphas_cumprod[999]
    x0 = (noise - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    with torch.no_grad():
        decoded = tiny_stack.vae.decode(x0 / tiny_stack.latent_scale).sample
    assert step.images.shape == (2, 3, 64, 64)
    assert torch.allclose(step.images, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-4)


def test_sobel_gives_one_on_a_unit_step_and_zero_on_flat_images():
    image = torch.zeros(1, 3, 8, 8)
    image[..., 4:] = 1.0
    magnitude = sobel_magnitude(image)[0]
    assert torch.allclose(magnitude[:, 3:5], torch.ones(8, 2), atol=1e-6)
    assert magnitude[:, :3].abs().max() == 0 and magnitude[:, 5:].abs().max() == 0
    assert sobel_magnitude(torch.full((1, 3, 8, 8), 0.7)).abs().max() < 1e-6


def _square(top: int, left: int) -> torch.Tensor:
    image = torch.zeros(1, 3, 16, 16)
    image[..., top: top + 4, left: left + 4] = 1.0
    return image


def test_identical_generations_give_maximal_consistency_and_scattered_ones_none():
    single = edge_maps(_square(2, 2), edge_threshold=0.1)
    identical = single.repeat(4, 1, 1)
    scattered = edge_maps(torch.cat([_square(0, 0), _square(0, 10), _square(10, 0), _square(10, 10)]), 0.1)

    fraction = single.sum().item() / single.numel()
    assert fraction > 0
    for gamma in (0.25, 0.5, 1.0):
        assert ecs(identical, gamma) == pytest.approx(fraction)  # every edge pixel is consistent
    assert ecs(scattered, 0.5) == 0.0  # each edge appears in one seed of four
    assert ecs(scattered, 0.25) == pytest.approx(scattered.amax(0).mean().item())


def test_captions_are_ranked_and_scores_match_the_one_step(tiny_stack):
    settings = ExtractionSettings(seeds=2, thumbnail=32)
    rows = score_captions(tiny_stack, ["a photo of a cat", "a red car"], settings)
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["dcs"] >= rows[1]["dcs"]
    step = one_step(tiny_stack, rows[1]["caption"], noises(tiny_stack, 2, 0), settings.guidance_scale)
    assert rows[1]["dcs"] == pytest.approx(dcs(step.noise, step.eps))
    assert rows[1]["ecs"] == pytest.approx(ecs(edge_maps(step.images, settings.edge_threshold), settings.gamma))
    assert len(rows[0]["images"]) == 2 and rows[0]["images"][0].size == (32, 32)
    by_ecs = score_captions(tiny_stack, ["a photo of a cat", "a red car"], ExtractionSettings(seeds=2, rank_by="ecs"))
    assert by_ecs[0]["ecs"] >= by_ecs[1]["ecs"]


def test_bad_input_is_one_line_errors(tiny_stack, tmp_path):
    with pytest.raises(CpdsError, match="--gamma"):
        score_captions(tiny_stack, ["a cat"], ExtractionSettings(gamma=0))
    with pytest.raises(CpdsError, match="--seeds"):
        score_captions(tiny_stack, ["a cat"], ExtractionSettings(seeds=0))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(CpdsError, match="no captions"):
        read_captions(tmp_path / "empty.txt")
    with pytest.raises(CpdsError, match="does not exist"):
        read_captions(tmp_path / "missing.txt")


def test_cli_writes_the_table_grid_and_an_offline_wandb_run(tmp_path, monkeypatch, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a cat\n\nthe mona lisa | a painting\na photo of a cat\n")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["extraction_scores.py", "--captions", str(captions), "--model", "tiny",
                                      "--seeds", "2", "--gamma", "0.5", "--out", str(out), "--device", "cpu",
                                      "--wandb", "--mode", "offline"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / "extraction_scores.py"), run_name="__main__")
    assert exit_.value.code == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["rank"] for r in rows] == ["1", "2"] and {r["caption"] for r in rows} == {
        "a photo of a cat", "the mona lisa | a painting"}
    assert float(rows[0]["dcs"]) >= float(rows[1]["dcs"])
    assert "the mona lisa \\| a painting" in (out / "scores.md").read_text()
    assert (out / "top_grid.png").stat().st_size > 0
    assert any("extraction/scores/_type" in row for row in read_run(finished_run_file(out))["history"])
    assert "| rank | caption | DCS | ECS |" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["tiny_v", "tiny_sdxl"])
def test_cli_scores_with_any_model_option(tmp_path, monkeypatch, model):
    """--model names a model option: the v-predicting and the SDXL-shaped tiny stacks score too."""
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a cat\nthe mona lisa\n")
    monkeypatch.setattr(sys, "argv", ["extraction_scores.py", "--captions", str(captions), "--model", model,
                                      "--seeds", "2", "--out", str(tmp_path / "out"), "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / "extraction_scores.py"), run_name="__main__")
    assert exit_.value.code == 0
    rows = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert len(rows) == 2 and all(float(r["dcs"]) > 0 for r in rows)

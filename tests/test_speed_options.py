"""Speed and memory options change how the step runs, not what it computes; the benchmark runs."""
import copy
import dataclasses
import json
import runpy
import sys

import pytest

from conftest import REPO
from helpers import make_editor, make_image

SETTINGS = dict(method="cpds", iterations=3, lr=0.5, n_patches=8)


def edit(stack, **options):
    own = dataclasses.replace(stack, unet=copy.deepcopy(stack.unet))  # the options modify the UNet
    return make_editor(own, **SETTINGS, **options).edit(make_image(), ["a cat"], ["a dog"]).latents


@pytest.mark.parametrize("options", [dict(gradient_checkpointing=True), dict(channels_last=True),
                                     dict(compile=True, compile_backend="aot_eager")])
def test_option_keeps_the_result(tiny_stack, options):
    reference = edit(tiny_stack)
    moved = (reference - make_editor(tiny_stack).encode_images(make_image())).abs().max()
    # equal up to float rounding: channels_last convolutions sum in another order (oneDNN on an AMD EPYC
    # measured 1.0e-4 of the move; a real change of the step moves it by more than 1e-2)
    assert (edit(tiny_stack, **options) - reference).abs().max() < 1e-3 * moved


def test_benchmark_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--unet", "tiny", "--resolution", "64", "--batch-sizes", "1,2",
                                      "--methods", "dds,cpds", "--iterations", "2", "--warmup", "1",
                                      "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(REPO / "scripts" / "bench.py"), run_name="__main__")
    assert info.value.code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["meta"]["unet"] == "tiny" and result["meta"]["device"].startswith("CPU")
    combos = [(r["method"], r["selector"], r["batch"]) for r in result["rows"]]
    assert combos == [("dds", "-", 1), ("cpds", "random", 1), ("cpds", "meta", 1),
                      ("dds", "-", 2), ("cpds", "random", 2), ("cpds", "meta", 2)]
    for row in result["rows"]:
        assert row["ms_per_image_iteration"] == pytest.approx(row["ms_per_iteration"] / row["batch"])
        assert row["edits_per_hour"] == pytest.approx(3600 / (0.2 * row["ms_per_image_iteration"]))
        assert row["forward_equivalents"] > 0
    assert "| cpds | meta | 2 |" in (tmp_path / "bench.md").read_text()


def run_bench(tmp_path, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["bench.py", *args, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(REPO / "scripts" / "bench.py"), run_name="__main__")
    assert info.value.code == 0
    return json.loads((tmp_path / "bench.json").read_text())


def test_benchmark_runs_an_sdxl_shaped_unet(tmp_path, monkeypatch):
    """Pooled text and time ids reach the UNet; the resolution defaults to the UNet's own (16 × 8)."""
    result = run_bench(tmp_path, monkeypatch, "--unet", "tiny_sdxl", "--batch-sizes", "2", "--methods", "cpds",
                       "--selectors", "random", "--iterations", "1", "--warmup", "0")
    meta = result["meta"]
    assert (meta["unet"], meta["resolution"], meta["prediction_type"]) == ("tiny_sdxl", 128, "epsilon")
    assert [(r["method"], r["selector"], r["batch"]) for r in result["rows"]] == [("cpds", "random", 2)]
    assert f"tiny_sdxl UNet ({meta['unet_parameters']:,} parameters), 128²" in (tmp_path / "bench.md").read_text()


# the real architectures: parameters of the diffusers models, and the self-attention layers of the
# up blocks that CUT captures by default (SD: 3 blocks × 3 attentions; SDXL: 3 × 10 + 3 × 2 transformer blocks)
REAL_UNETS = {"sd14": (859_520_964, 9, 512), "sd21": (865_910_724, 9, 768), "sdxl": (2_567_463_684, 36, 1024)}


@pytest.mark.parametrize("name", sorted(REAL_UNETS))
def test_benchmark_unet_configs_are_the_real_architectures(name):
    import torch
    from diffusers import UNet2DConditionModel

    from cpds_exp.conditioning import random_conditioning
    from cpds_exp.editing.features import DEFAULT_CUT_LAYERS, match_layers
    from cpds_exp.models import unet_config

    bench = runpy.run_path(str(REPO / "scripts" / "bench.py"))
    parameters, cut_layers, resolution = REAL_UNETS[name]
    with torch.device("meta"):  # shapes only: no memory, no time
        unet = UNet2DConditionModel.from_config(unet_config(name))
    assert sum(p.numel() for p in unet.parameters()) == parameters
    assert len(match_layers(unet, DEFAULT_CUT_LAYERS)) == cut_layers
    assert unet.config.sample_size * 8 == resolution
    condition = random_conditioning(unet.config, 2, resolution, "meta", torch.float16)
    assert condition.hidden.shape == (2, 77, unet.config.cross_attention_dim)
    if name == "sdxl":  # two text encoders' pooled width 1280, the time ids of a 1024² image
        assert condition.added["text_embeds"].shape == (2, 1280) and condition.added["time_ids"].shape == (2, 6)
    else:
        assert condition.added == {}
    prediction = bench["scheduler_for"](name).config.prediction_type
    assert prediction == ("v_prediction" if name == "sd21" else "epsilon")

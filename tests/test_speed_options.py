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

"""The GPU memory estimate (scripts/cost_estimate.py) counts what the CUT backward keeps, on the meta device."""
import runpy

import pytest
import torch

from conftest import REPO
from cpds_exp.models import tiny_unet

estimate_module = runpy.run_path(str(REPO / "scripts" / "cost_estimate.py"))


@pytest.mark.parametrize("architecture,resolution", [("sd", 64), ("sdxl", 128)])
def test_the_graph_grows_with_the_batch_and_the_dtype(architecture, resolution):
    config = dict(tiny_unet(architecture).config)
    estimate = estimate_module["estimate"]

    def graph(batch, dtype=torch.float16):
        return estimate("tiny", batch, dtype, resolution, config, weights_millions=1.0)["cut_graph_gib"]

    one = graph(1)
    assert one > 0
    assert graph(4) == pytest.approx(4 * one, rel=0.05)  # activations scale with the rows, weights do not
    assert graph(1, torch.float32) == pytest.approx(2 * one, rel=0.05)


def test_attention_is_counted_as_a_fused_kernel_keeps_it():
    """No tokens × tokens map: flash attention keeps q, k, v, the output and a log-sum-exp per row."""
    saved = []
    q = torch.empty(2, 4, 256, 8, device="meta", requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = estimate_module["fused_attention"](q, q, q)
    assert out.shape == q.shape
    assert (2, 4, 256, 256) not in saved and (2, 4, 256) in saved


def test_the_work_of_an_edit_counts_four_forwards_and_the_cut_backward():
    config = dict(tiny_unet("sd").config)
    small, large = (estimate_module["estimate"]("tiny", 1, torch.float16, resolution, config, 1.0, iterations=10)
                    for resolution in (64, 128))
    assert small["dds_edit_tflop"] == pytest.approx(10 * 4 * small["forward_tflop"])
    assert small["dds_edit_tflop"] < small["cut_edit_tflop"] < small["dds_edit_tflop"] * 1.5  # + about one pass
    assert large["forward_tflop"] >= 3.9 * small["forward_tflop"]  # four times the pixels


def test_the_script_prints_a_table_for_sd14(capsys):
    assert estimate_module["main"](["--models", "sd14"]) == 0
    table = capsys.readouterr().out
    assert "| sd14 | 512² | 1 | float16 | 2.0 |" in table

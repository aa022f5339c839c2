"""Estimate, without a GPU, what one edit costs: the GPU memory it needs (the weights in the run's
dtype plus what the CUT term's backward keeps) and its floating-point work, turned into seconds at an
assumed sustained throughput.

The UNet runs on PyTorch's meta device (shapes only: no memory, no weights, seconds per model).
Memory: every tensor saved for backward by the target-conditional pass is counted once (parameters
and views of one tensor once), with attention counted as a GPU runs it (flash or memory-efficient:
q, k, v, the output and a row log-sum-exp, never the tokens × tokens map of the meta device's math
path). Not counted: the no-grad pass over the other branches and the backward's working memory
(transient), the CUDA context and the allocator's slack. Work: torch's FlopCounterMode over one
UNet forward and, for the CUT term, the backward from the captured features to the latent; an
iteration is 4 forwards (DDS, PDS) or 4 forwards + that backward (CDS, CPDS). Measure on a GPU with
scripts/bench.py; these are estimates.

    python scripts/cost_estimate.py                  # sd14 512², sd21 768², sdxl 1024², float16, batch 1
    python scripts/cost_estimate.py --batch-sizes 1,8 --models sdxl --sustained-tflops 150
"""
from __future__ import annotations

import argparse
import sys
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from diffusers import UNet2DConditionModel

from cpds_exp.conditioning import random_conditioning
from cpds_exp.editing.features import FeatureCapture
from cpds_exp.hub import SD_FAMILIES
from cpds_exp.models import quiet_diffusers, unet_config

#: model → its SD_FAMILIES entry (all the weights an edit loads)
FAMILIES = {"sd14": "SD v1.x", "sd21": "SD 2.x", "sdxl": "SDXL"}
GIB = 2 ** 30


def meta_unet(config: dict, dtype: torch.dtype) -> UNet2DConditionModel:
    with torch.device("meta"), quiet_diffusers():
        unet = UNet2DConditionModel.from_config(config).to(dtype)
    return unet.requires_grad_(False).eval()


class FusedAttention(torch.autograd.Function):
    """Attention's shapes and what flash / memory-efficient attention saves for backward."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out


def fused_attention(query, key, value, *args, **kwargs):
    return FusedAttention.apply(query, key, value)


def graph_bytes(unet: UNet2DConditionModel, batch: int, resolution: int, dtype: torch.dtype) -> int:
    """Bytes saved for backward by one target-conditional pass with the CUT capture installed."""
    FeatureCapture(unet)
    parameters = {id(p) for p in unet.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(tensor) not in parameters and id(base) not in parameters:
            saved[id(base)] = max(saved.get(id(base), 0), base.numel() * base.element_size())
        return tensor

    latent = resolution // 8
    z = torch.empty(batch, unet.config.in_channels, latent, latent, device="meta", dtype=dtype, requires_grad=True)
    t = torch.full((batch,), 500, device="meta")
    with mock.patch.object(F, "scaled_dot_product_attention", fused_attention), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(z, t, **random_conditioning(unet.config, batch, resolution, "meta", dtype).unet_kwargs())
    return sum(saved.values())


def work_flops(unet: UNet2DConditionModel, resolution: int, dtype: torch.dtype) -> tuple[int, int]:
    """FLOPs of one UNet forward of one row, and of the CUT term's backward to the latent."""
    capture = FeatureCapture(unet)
    latent = resolution // 8
    z = torch.empty(1, unet.config.in_channels, latent, latent, device="meta", dtype=dtype, requires_grad=True)
    cond = random_conditioning(unet.config, 1, resolution, "meta", dtype)
    with FlopCounterMode(display=False) as counter:
        unet(z, torch.full((1,), 500, device="meta"), **cond.unet_kwargs())
        forward = counter.get_total_flops()
        sum(feature.float().sum() for feature in capture.features()).backward()
    return forward, counter.get_total_flops() - forward


def estimate(model: str, batch: int, dtype: torch.dtype, resolution: int | None = None, config: dict | None = None,
             weights_millions: float | None = None, iterations: int = 200) -> dict:
    config = config or unet_config(model)
    unet = meta_unet(config, dtype)
    resolution = resolution or unet.config.sample_size * 8
    weights = (weights_millions or SD_FAMILIES[FAMILIES[model]]) * 1e6 * torch.finfo(dtype).bits / 8
    graph = graph_bytes(unet, batch, resolution, dtype)
    forward, backward = work_flops(meta_unet(config, dtype), resolution, dtype)
    return {"model": model, "resolution": resolution, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
            "weights_gib": weights / GIB, "cut_graph_gib": graph / GIB, "cut_edit_gib": (weights + graph) / GIB,
            "forward_tflop": forward / 1e12, "dds_edit_tflop": iterations * 4 * forward / 1e12,
            "cut_edit_tflop": iterations * (4 * forward + backward) / 1e12}


def markdown(rows: list[dict], sustained: list[float]) -> str:
    speeds = "–".join(f"{s:g}" for s in sustained)
    lines = ["| model | resolution | batch | dtype | weights GiB | CUT graph GiB | CDS/CPDS edit GiB | "
             f"UNet fwd TFLOP/row | DDS/PDS s/edit at {speeds} TFLOP/s | CDS/CPDS s/edit at {speeds} TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = {key: "–".join(f"{r[key] / s:.0f}" for s in sorted(sustained, reverse=True))
                   for key in ("dds_edit_tflop", "cut_edit_tflop")}
        lines.append(f"| {r['model']} | {r['resolution']}² | {r['batch']} | {r['dtype']} | {r['weights_gib']:.1f} | "
                     f"{r['cut_graph_gib']:.1f} | {r['cut_edit_gib']:.1f} | {r['forward_tflop']:.2f} | "
                     f"{seconds['dds_edit_tflop']} | {seconds['cut_edit_tflop']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd14,sd21,sdxl")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--resolution", type=int, default=None, help="default: each model's own")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--sustained-tflops", default="100,300",
                        help="assumed sustained throughputs for the seconds per edit (an H100's dense float16 peak "
                             "is about 990)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = [estimate(model, int(batch), dtype, args.resolution, iterations=args.iterations)
            for model in args.models.split(",")
            for batch in args.batch_sizes.split(",")]
    print(markdown(rows, [float(s) for s in args.sustained_tflops.split(",")]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

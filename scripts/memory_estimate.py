"""Estimate, without a GPU, the GPU memory one edit needs: the weights in the run's dtype plus what
the CUT term's backward keeps (the target-conditional UNet pass with a graph).

The UNet runs on PyTorch's meta device (shapes only: no memory, no weights, a second per model) and
every tensor saved for backward is counted once (parameters and views of one tensor once).
Attention is counted as a GPU runs it (flash or memory-efficient: it keeps q, k, v, the output and a
row log-sum-exp, never the tokens × tokens map that the meta device's math path would). Not counted: the no-grad pass over the other branches and the backward's working memory
(transient), the CUDA context and the allocator's slack: measure with scripts/bench.py on a GPU.

    python scripts/memory_estimate.py                  # sd14 512², sd21 768², sdxl 1024², float16, batch 1
    python scripts/memory_estimate.py --batch-sizes 1,8 --models sdxl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from cpds_exp.conditioning import Conditioning, sdxl_time_ids
from cpds_exp.editing.features import FeatureCapture
from cpds_exp.hub import SD_FAMILIES
from cpds_exp.models import quiet_diffusers

RESOURCES = Path(__file__).resolve().parent.parent / "cpds_exp" / "resources"
#: model → (UNet config, SD_FAMILIES entry: all weights an edit loads)
MODELS = {"sd14": ("sd14_unet.json", "SD v1.x"), "sd21": ("sd21_unet.json", "SD 2.x"), "sdxl": ("sdxl_unet.json", "SDXL")}
GIB = 2 ** 30


def meta_unet(config: dict, dtype: torch.dtype) -> UNet2DConditionModel:
    with torch.device("meta"), quiet_diffusers():
        unet = UNet2DConditionModel.from_config(config).to(dtype)
    return unet.requires_grad_(False).eval()


def meta_condition(unet: UNet2DConditionModel, batch: int, resolution: int, dtype: torch.dtype) -> Conditioning:
    config, device = unet.config, torch.device("meta")
    cond = Conditioning(torch.empty(batch, 77, config.cross_attention_dim, device=device, dtype=dtype))
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        cond.added = {"text_embeds": torch.empty(batch, pooled, device=device, dtype=dtype),
                      "time_ids": sdxl_time_ids(batch, resolution, resolution, device, dtype)}
    return cond


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
        unet(z, t, **meta_condition(unet, batch, resolution, dtype).unet_kwargs())
    return sum(saved.values())


def estimate(model: str, batch: int, dtype: torch.dtype, resolution: int | None = None,
             config: dict | None = None, weights_millions: float | None = None) -> dict:
    file, family = MODELS.get(model, (None, None))
    config = config or json.loads((RESOURCES / file).read_text())
    unet = meta_unet(config, dtype)
    resolution = resolution or unet.config.sample_size * 8
    weights = (weights_millions or SD_FAMILIES[family]) * 1e6 * torch.finfo(dtype).bits / 8
    graph = graph_bytes(unet, batch, resolution, dtype)
    return {"model": model, "resolution": resolution, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
            "weights_gib": weights / GIB, "cut_graph_gib": graph / GIB, "cut_edit_gib": (weights + graph) / GIB}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | resolution | batch | dtype | weights GiB | CUT graph GiB | CDS/CPDS edit GiB (estimated) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['resolution']}² | {r['batch']} | {r['dtype']} | {r['weights_gib']:.1f} | "
              f"{r['cut_graph_gib']:.1f} | {r['cut_edit_gib']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd14,sd21,sdxl")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = [estimate(model, int(batch), dtype) for model in args.models.split(",")
            for batch in args.batch_sizes.split(",")]
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

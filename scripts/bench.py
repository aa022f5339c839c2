"""Benchmark the editing step: ms per iteration and per image-iteration, edits per hour, peak
memory, and the cost in UNet-forward equivalents, for each method, selector and batch size.

The UNet has the exact architecture of SD v1.4 (sd14), SD 2.1 (sd21, 768², v-prediction) or SDXL base
1.0 (sdxl, 1024², pooled text and time ids), built from cpds_exp/resources/<name>_unet.json (the
diffusers unet/config.json of the model) with random weights: no download, and timings are real even
if images are not. tiny and tiny_sdxl are the test suite's SD- and SDXL-shaped UNets (64² and 128²),
for smoke runs on a CPU. The conditions are random tensors of the UNet's shapes; the resolution
defaults to the UNet's own (sample_size × 8).

    python scripts/bench.py                                   # GPU: SD v1.4, 512², batches 1, 8, 32
    python scripts/bench.py --unet sdxl --batch-sizes 1,4     # GPU: SDXL, 1024²
    python scripts/bench.py --unet tiny --batch-sizes 1,4 --iterations 5                  # CPU smoke
    python scripts/bench.py --unet tiny_sdxl --batch-sizes 1 --iterations 2 --warmup 1    # CPU smoke
    python scripts/bench.py --unet sd14 --resolution 256 --batch-sizes 1 --iterations 2 --warmup 1  # CPU
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cpds_exp.cli import CONFIG_DIR
from cpds_exp.conditioning import random_conditioning
from cpds_exp.config import build_terms, has_cut
from cpds_exp.editing.editor import EditSettings, Editor
from cpds_exp.models import (SD_SCHEDULE, UNET_CONFIGS, SDStack, quiet_diffusers, resolve_device, resolve_dtype,
                             tiny_unet, unet_config)
from cpds_exp.results import write_json, write_text
from cpds_exp.editing.selector_training import SelectorTraining
from cpds_exp.editing.selectors import KNNSelector, MLPSelector, RandomForestSelector, RandomSelector, SVMSelector

#: the real architectures (cpds_exp.models.UNET_CONFIGS) and the tiny test UNets (their architecture)
TINY_UNETS = {"tiny": "sd", "tiny_sdxl": "sdxl"}
UNETS = (*UNET_CONFIGS, *TINY_UNETS)
#: what each UNet predicts (all share SD's noise schedule); SD 2.1 at 768² predicts v
PREDICTION_TYPES = {"sd21": "v_prediction"}
SELECTORS = {"random": RandomSelector, "meta": MLPSelector, "knn": KNNSelector, "svm": SVMSelector,
             "rf": RandomForestSelector}


def build_unet(name: str, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    if name in TINY_UNETS:
        torch.manual_seed(0)  # the weights of build_tiny(0, architecture)
        unet = tiny_unet(TINY_UNETS[name])
    else:
        unet = UNet2DConditionModel.from_config(unet_config(name))
    with quiet_diffusers():  # diffusers warns on every dtype cast
        unet.to(device, dtype)
    return unet.requires_grad_(False).eval()


def scheduler_for(name: str) -> DDPMScheduler:
    """SD's noise schedule with what the UNet ``name`` predicts."""
    return DDPMScheduler(**SD_SCHEDULE, prediction_type=PREDICTION_TYPES.get(name, "epsilon"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` (after the caller's warm-up), waiting for the device at the ends."""
    synchronize(device)
    start = time.perf_counter()
    for i in range(repeats):
        fn(i)
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def forward_seconds(unet, batch: int, latent: int, device, dtype, repeats: int, warmup: int) -> float:
    """The UNet's own no-grad forward time for a batch, the yardstick of the step's cost."""
    z = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    cond = random_conditioning(unet.config, batch, latent * 8, device, dtype)

    def forward(_):
        with torch.no_grad():
            unet(z, t, **cond.unet_kwargs())

    for i in range(warmup):
        forward(i)
    return timed(forward, repeats, device)


def method_config(method: str) -> DictConfig:
    """The config of ``run.py method=<method>`` (the same terms and lr as a run), other keys at their defaults."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"method={method}"])


def bench_step(unet, cfg: DictConfig, selector: str, batch: int, latent: int, device, dtype, args) -> dict:
    stack = SDStack(unet, None, None, None, scheduler_for(args.unet), device, dtype, latent * 8)
    settings = EditSettings(lr=cfg.method.lr, progress=False, compile=args.compile, compile_mode=args.compile_mode,
                            channels_last=args.channels_last, gradient_checkpointing=args.gradient_checkpointing)
    editor = Editor(stack, settings, build_terms(cfg), functools.partial(torch.optim.SGD),
                    functools.partial(SELECTORS[selector]), SelectorTraining(train_every=10))
    z = torch.randn(batch, 4, latent, latent, device=device)
    emb = {k: random_conditioning(unet.config, batch, latent * 8, device, dtype) for k in ("uncond", "src", "trg")}
    state = editor.start(z, emb, seeds=list(range(batch)))
    for i in range(args.warmup):
        editor.step(state, i + 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(lambda i: editor.step(state, args.warmup + i + 1), args.iterations, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds": seconds, "peak_gib": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=UNETS, default="sd14",
                        help="sd14, sd21, sdxl: the real architectures; tiny, tiny_sdxl: the test UNets")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels; default the UNet's own (512, 768, 1024; tiny 64, tiny_sdxl 128)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--methods", default="dds,pds,cds,cpds")
    parser.add_argument("--selectors", default="random,meta",
                        help="for CDS and CPDS: random, meta, knn, svm, rf (the scikit-learn ones run on the CPU)")
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per configuration")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: float16 on CUDA (the published setting), float32 on CPU")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    unet = build_unet(args.unet, device, dtype)
    if args.resolution is None:
        args.resolution = unet.config.sample_size * 8
    latent = args.resolution // 8
    parameters = sum(p.numel() for p in unet.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        forward = forward_seconds(unet, batch, latent, device, dtype, args.iterations, args.warmup)
        for method in args.methods.split(","):
            cfg = method_config(method)
            selectors = args.selectors.split(",") if has_cut(cfg.method) else ["-"]
            for selector in selectors:
                result = bench_step(unet, cfg, selector if selector != "-" else "random", batch, latent, device,
                                    dtype, args)
                per_image = result["seconds"] / batch
                rows.append({
                    "method": method, "selector": selector, "batch": batch,
                    "ms_per_iteration": 1000 * result["seconds"], "ms_per_image_iteration": 1000 * per_image,
                    "seconds_per_edit": 200 * result["seconds"], "seconds_per_edit_amortised": 200 * per_image,
                    "edits_per_hour": 3600 / (200 * per_image), "peak_gib": result["peak_gib"],
                    "unet_forward_ms_per_image": 1000 * forward / batch,
                    "forward_equivalents": per_image / (forward / batch),
                })
                print(json.dumps(rows[-1]), flush=True)
    meta = {"device": device_name, "dtype": str(dtype).removeprefix("torch."), "unet": args.unet,
            "unet_parameters": parameters, "prediction_type": PREDICTION_TYPES.get(args.unet, "epsilon"),
            "resolution": args.resolution, "iterations": args.iterations, "warmup": args.warmup,
            "compile": args.compile, "channels_last": args.channels_last, "torch": torch.__version__}
    write_json(args.out / "bench.json", {"meta": meta, "rows": rows})
    table = markdown(meta, rows)
    write_text(args.out / "bench.md", table)
    print(table)
    return 0


def markdown(meta: dict, rows: list[dict]) -> str:
    def fmt(value, digits=1):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [f"{meta['unet']} UNet ({meta['unet_parameters']:,} parameters), {meta['resolution']}², {meta['dtype']}, "
             f"{meta['device']}, torch {meta['torch']}"
             f"{', compiled' if meta['compile'] else ''}", "",
             "| method | selector | batch | ms/iter | ms/image-iter | s/edit (amortised) | edits/hour | peak GiB | "
             "UNet fwd ms/image | fwd-equivalents |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['selector']} | {r['batch']} | {fmt(r['ms_per_iteration'])} | "
                     f"{fmt(r['ms_per_image_iteration'])} | {fmt(r['seconds_per_edit_amortised'], 2)} | "
                     f"{fmt(r['edits_per_hour'], 0)} | {fmt(r['peak_gib'], 2)} | {fmt(r['unet_forward_ms_per_image'])} | "
                     f"{fmt(r['forward_equivalents'], 2)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

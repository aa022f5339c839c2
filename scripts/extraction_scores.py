"""Rank captions by one-step extraction scores (Webster 2023): high scores flag memorised captions.

    python scripts/extraction_scores.py --captions captions.txt --model sd14 --seeds 4 --gamma 0.5 \\
        --out outputs/extraction [--wandb]
    python scripts/extraction_scores.py --captions captions.txt --model sdxl --out outputs/extraction-xl
    python scripts/extraction_scores.py --captions captions.txt --model tiny --out /tmp/x   # offline smoke run

--model is an option of the model config group (conf/model/: sd14, sd15, sd21, sd21base, sdxl, tiny, ...)
or a hub id / diffusers folder.

Writes scores.csv, scores.md and top_grid.png; see cpds_exp/tools/extraction.py for the definitions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cpds_exp.cli import CONFIG_DIR
from cpds_exp.errors import CpdsError
from cpds_exp.schema import ModelConfig
from cpds_exp.tools.extraction import (SCORES, ExtractionSettings, log_wandb, read_captions, score_captions, top_grid,
                                 write_extraction)


def model_config(name: str) -> DictConfig:
    """The model group's option ``name`` as a run composes it, or a hub id / diffusers folder."""
    option = Path(CONFIG_DIR) / "model" / f"{name}.yaml"
    values = OmegaConf.load(option) if option.is_file() else {"name": name, "pretrained": name}
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), values)


def parse(argv: list[str] | None) -> argparse.Namespace:
    defaults = ExtractionSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=Path, required=True, help="text file, one caption a line")
    parser.add_argument("--model", default="sd14", help="a model option (sd14, sd21, sdxl, tiny, ...) or a hub id / "
                                                         "diffusers folder")
    parser.add_argument("--seeds", type=int, default=defaults.seeds, help="J: noises per caption")
    parser.add_argument("--gamma", type=float, default=defaults.gamma, help="share of seeds an edge must appear in")
    parser.add_argument("--edge-threshold", type=float, default=defaults.edge_threshold,
                        help="Sobel magnitude (unit step = 1) at which a pixel is an edge")
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="first noise seed")
    parser.add_argument("--rank-by", choices=SCORES, default=defaults.rank_by)
    parser.add_argument("--top", type=int, default=8, help="captions in the grid")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--wandb", action="store_true", help="also log a W&B table (offline without a login)")
    parser.add_argument("--project", default="cpds-exp")
    parser.add_argument("--mode", default="auto", help="W&B mode: auto, online, offline, disabled")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = ExtractionSettings(seeds=args.seeds, gamma=args.gamma, edge_threshold=args.edge_threshold,
                                  guidance_scale=args.guidance_scale, seed=args.seed, rank_by=args.rank_by)
    try:
        from cpds_exp.app import load_model
        from cpds_exp.models import resolve_device, resolve_dtype

        captions = read_captions(args.captions)
        device = resolve_device(args.device)
        resolve_dtype(args.dtype, device)  # so that what fails below is the model
        try:
            stack = load_model(model_config(args.model), device, args.dtype)
        except CpdsError as err:
            raise CpdsError(f"--model {args.model}: {err} (here: --model tiny offline, or --model /path/to/folder)"
                            ) from err
        rows = score_captions(stack, captions, settings)
        grid = top_grid(rows, args.top)
        paths = write_extraction(args.out, rows, grid)
        if args.wandb:
            print(f"W&B run files: {log_wandb(rows, grid, args.out, args.project, args.mode, settings)}")
    except CpdsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(paths["markdown"].read_text())
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

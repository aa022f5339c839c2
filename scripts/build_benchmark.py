"""Build an editing benchmark from LAION-style metadata and the images img2dataset downloaded.

    python scripts/build_benchmark.py --metadata meta.parquet --images shards/ \\
        --query "a photo of a cat" --top 250 --out data/cats
    python run.py dataset=manifest dataset.path=data/cats/manifest.csv ...

With --wandb the manifest and its images are logged as a W&B dataset artifact, named in
wandb_artifact.json beside the manifest: the runs that edit it name the artifact in their config and,
online, declare it as their input.

See cpds_exp/tools/laion_benchmark.py for the rules and the img2dataset command that downloads a subset.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpds_exp.tools.laion_benchmark import ClipEmbedder, Rules, build_benchmark
from cpds_exp.errors import CpdsError
from cpds_exp.loggers import resolve_wandb_mode
from cpds_exp.wandb_artifacts import ARTIFACT_FILE, log_dataset


def parse(argv: list[str] | None) -> argparse.Namespace:
    defaults = Rules()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True,
                        help="a folder of images named by key (or URL stem), a .tar shard, or a folder of .tar shards")
    parser.add_argument("--metadata", type=Path, help="parquet/CSV/JSONL metadata (default: the shards' JSON)")
    parser.add_argument("--query", required=True, help="what to rank by, e.g. 'a photo of a cat'")
    parser.add_argument("--top", type=int, default=250, help="how many images to keep (default 250)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (manifest.csv, images/, ...)")
    parser.add_argument("--source-prompt", help="the manifest's source prompt (default: the query)")
    parser.add_argument("--target-prompt", help="the manifest's target prompt, e.g. 'a photo of a dog' "
                                                "(default: the source prompt)")
    parser.add_argument("--min-similarity", type=float, default=defaults.min_similarity,
                        help="CLIP image-caption cosine (LAION: 0.28, 0.26 multilingual)")
    parser.add_argument("--max-nsfw", type=float, default=defaults.max_nsfw)
    parser.add_argument("--max-watermark", type=float, default=defaults.max_watermark)
    parser.add_argument("--min-size", type=int, default=defaults.min_width, help="minimum width and height")
    parser.add_argument("--dedup", type=float, default=defaults.dedup_threshold,
                        help="CLIP image cosine at or above which two images are duplicates")
    parser.add_argument("--clip", default="ViT-B-32", help="open_clip model, or 'tiny' (random weights, dry run)")
    parser.add_argument("--clip-pretrained", default="openai")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--wandb", action="store_true",
                        help="log the benchmark as a W&B dataset artifact (offline without a login: `wandb sync` "
                             "it later)")
    parser.add_argument("--project", default="cpds-exp", help="the W&B project of the artifact")
    parser.add_argument("--entity", default=None)
    parser.add_argument("--mode", default="auto", help="W&B mode: auto, online, offline, disabled")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rules = Rules(min_similarity=args.min_similarity, max_nsfw=args.max_nsfw, max_watermark=args.max_watermark,
                  min_width=args.min_size, min_height=args.min_size, dedup_threshold=args.dedup)
    try:
        mode = resolve_wandb_mode(args.mode) if args.wandb else None  # a bad mode stops before the work
        embedder = ClipEmbedder(args.clip, args.clip_pretrained, args.device)
        result = build_benchmark(args.images, args.query, args.top, args.out, args.metadata, embedder, rules,
                                 args.source_prompt, args.target_prompt)
        artifact = log_dataset(result["paths"]["manifest"], args.project, args.entity, mode) if mode else None
    except CpdsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"kept {len(result['chosen'])} of {len(result['candidates'])} rows; "
          f"manifest: {result['paths']['manifest']}")
    if artifact:
        print(f"W&B dataset artifact: {artifact['reference']} (named in {ARTIFACT_FILE} beside the manifest)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The README's example figures, made by the tool itself on the tiny model (random weights, so the
# "edits" are noise; the figures show the layout, not results). About 3 minutes on 2 CPU cores.
#   bash scripts/readme_figures.sh [OUT=docs/figures]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/figures}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python - "$work/images" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

folder = Path(sys.argv[1])
folder.mkdir(parents=True)
for i in range(3):  # smooth random colour fields stand in for photographs
    field = np.random.default_rng(i).random((4, 4, 3))
    Image.fromarray((field * 255).astype("uint8")).resize((64, 64), Image.BICUBIC).save(folder / f"cat{i}.png")
PY
common=(model=tiny metrics=random logger=none dataset=folder "dataset.path=$work/images" task=cat2pig iterations=30)
python run.py -m "${common[@]}" method=dds,cds,pds,cpds "hydra.sweep.dir=$work/methods"
python run.py -m "${common[@]}" method=cpds lr=0.2,0.4,0.8 "hydra.sweep.dir=$work/lr"
python run.py -m "${common[@]}" method=cds selector=meta,knn "hydra.sweep.dir=$work/selectors"
for sweep in methods lr selectors; do python scripts/report.py "$work/$sweep" > /dev/null; done
mkdir -p "$out"
cp "$work/methods/report/figures/grid/cat2pig.png" "$out/grid.png"
cp "$work/methods/report/figures/tradeoff/cat2pig.png" "$out/tradeoff.png"
cp "$work/lr/report/figures/lr_ablation/cat2pig.png" "$out/lr_ablation.png"
cp "$work/selectors/report/figures/selector_accuracy.png" "$out/selector_accuracy.png"
cp "$work/methods/report/table.md" "$out/table.md"
echo "figures written to $out"

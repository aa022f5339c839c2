"""Turn a sweep directory into the paper's tables, image grids and plots (SPEC §5).

A sweep directory holds one ``summary.json`` record per edit (any depth: jobs, shards and
``edits/<image>/`` folders), so merging jobs or shards is just reading them all. Every record
becomes a line of one pandas frame (:mod:`cpds_exp.evaluation.frame`); the tables are its
aggregates, rendered by :mod:`cpds_exp.evaluation.tables`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from cpds_exp.errors import CpdsError
from cpds_exp.evaluation.figures import write_figures
from cpds_exp.evaluation.gallery import write_gallery
from cpds_exp.evaluation.frame import (METRICS, aggregate, in_order, infer_rows, none_for_missing, ordered,
                                       records_frame, rounds_frame, varying)
from cpds_exp.evaluation.tables import (PROTOCOL, differences_markdown, display_frame, latex_table,
                                        markdown_table, write_csv, write_parquet)
from cpds_exp.records import load_record
from cpds_exp.results import write_text

#: The paper's Table 1 (CLIP ↑, LPIPS ↓; mean over 250 cats) and Table 2 (CDS, cat → pig, one image).
PAPER_TABLE1 = {
    ("dds", "cat2dog"): (0.24972, 0.07593), ("dds", "cat2cow"): (0.24735, 0.10394), ("dds", "cat2pig"): (0.24709, 0.11386),
    ("cds", "cat2dog"): (0.24966, 0.05371), ("cds", "cat2cow"): (0.24448, 0.09612), ("cds", "cat2pig"): (0.24652, 0.09877),
    ("pds", "cat2dog"): (0.24996, 0.05865), ("pds", "cat2cow"): (0.24544, 0.10757), ("pds", "cat2pig"): (0.24726, 0.10178),
    ("cpds", "cat2dog"): (0.24964, 0.04282), ("cpds", "cat2cow"): (0.24435, 0.05582), ("cpds", "cat2pig"): (0.24641, 0.06289),
}
PAPER_TABLE2 = {
    ("random", "cat2pig"): (0.247089, 0.0895743), ("meta", "cat2pig"): (0.246973, 0.0838054),
    ("knn", "cat2pig"): (0.246875, 0.080417),
}
PAPER = {"method": PAPER_TABLE1, "selector": PAPER_TABLE2}

#: Why the paper's numbers stand only beside records of the published protocol (SPEC §5).
PAPER_NOTE = ("The paper's numbers stand only beside cells of metrics.protocol=published: its evaluation "
              "fed CLIP near-black images (pixels in [0, 1/255]), so the paper's CLIP column (0.244-0.250 "
              "everywhere) does not measure the edits, and its LPIPS saw unscaled [0, 1] inputs.")
LEGEND = ("CLIP ↑: higher is better, LPIPS ↓: lower is better. Cells: mean ± 95% confidence interval (t) over "
          "the finished edits, no interval from a single edit; bold: the best of its column; n: finished edits.")


def scan_records(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Every edit record under ``sweep_dir`` (jobs and shards merged), with ``_dir`` set to its
    folder, and the records that cannot be read (damaged files are listed, not fatal).

    The same edit found twice (a sweep re-run with another sharding) counts once: the newest.
    """
    by_edit: dict[str, tuple[float, dict[str, Any]]] = {}
    unreadable = []
    for path in sorted(Path(sweep_dir).rglob("summary.json")):
        loaded = load_record(path)
        if loaded is None:
            unreadable.append(path)
            continue
        record = loaded.as_dict()
        record["_dir"] = str(path.parent)
        stamp = path.stat().st_mtime
        if record["fingerprint"] not in by_edit or stamp > by_edit[record["fingerprint"]][0]:
            by_edit[record["fingerprint"]] = (stamp, record)
    return [record for _, record in sorted(by_edit.values(), key=lambda pair: pair[1]["_dir"])], unreadable


def load_records(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The readable edit records under ``sweep_dir`` (see :func:`scan_records`)."""
    return scan_records(sweep_dir)[0]


def sweep_name(records: Sequence[dict[str, Any]], sweep_dir: str | Path) -> str:
    """The sweep's W&B group: its ``sweep_name``, or the sweep folder's name when it was run without one."""
    return next((r["sweep_name"] for r in records if r.get("sweep_name")), Path(sweep_dir).resolve().name)


def attach_paper(table: pd.DataFrame, rows: str, columns: str = "task") -> pd.DataFrame:
    """``table`` with the paper's numbers (Table 1 by method, Table 2 by selector) as ``paper_clip``
    and ``paper_lpips`` on the lines it reports, measured under the published protocol: no other
    protocol is comparable with them."""
    reference = PAPER.get(rows, {})
    numbers = [reference.get((row, column), (None, None)) if protocol == "published" else (None, None)
               for row, column, protocol in zip(table[rows], table[columns], table[PROTOCOL])]
    paper = pd.DataFrame(numbers, index=table.index, columns=["paper_clip", "paper_lpips"], dtype="float64")
    return table.join(paper)


def resolve_baseline(rows: str, values: Sequence[Any], requested: Any = None) -> Any:
    """The row value the others are compared with: ``requested`` (from the command line, a string
    while lr values are numbers) if given, else DDS for methods, random for selectors, else the
    first value in the table's order."""
    values = ordered(values, rows)
    if requested is not None:
        match = [v for v in values if str(v) == str(requested)]
        if not match:
            raise CpdsError(f"baseline {requested!r} is not a {rows} of the finished edits: use one of "
                            f"{', '.join(map(str, values)) or 'none (no edit finished)'}")
        return match[0]
    preferred = {"method": "dds", "selector": "random"}.get(rows)
    return preferred if preferred in values else (values[0] if values else None)


def paired_bootstrap(differences: Sequence[float], resamples: int = 10_000,
                     seed: int = 0) -> tuple[float, float | None, float | None]:
    """Mean of paired differences and its 95% percentile-bootstrap interval (resampling images);
    no interval from a single pair, whose resamples would all be that pair."""
    values = np.asarray(differences, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), None, None
    means = values[np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def paired_differences(frame: pd.DataFrame, rows: str, columns: str = "task", baseline: Any = None,
                       seed: int = 0) -> pd.DataFrame:
    """Per (row, column, protocol): the mean per-image difference of each metric against the
    ``baseline`` row on the same images, with a seeded paired-bootstrap 95% CI. The paper's gaps are
    in the third or fourth decimal: this says whether they exceed the spread over images."""
    keys = [rows, columns, PROTOCOL]
    done = none_for_missing(frame[frame["status"] == "done"], keys)
    baseline = resolve_baseline(rows, done[rows], baseline)
    per_image = none_for_missing(done.astype({m: "float64" for m in METRICS}).groupby(
        [*keys, "image"], dropna=False)[list(METRICS)].mean().reset_index(), keys)
    is_baseline = per_image[rows].map(lambda v: v == baseline).astype(bool)
    paired = per_image[~is_baseline].merge(per_image[is_baseline].drop(columns=rows), on=[*keys[1:], "image"],
                                           suffixes=("", "_baseline"))
    entries = []
    for key, group in none_for_missing(paired, keys).groupby(keys, dropna=False, sort=False):
        entry = {**dict(zip(keys, key)), "baseline": baseline, "n_pairs": len(group)}
        for metric in METRICS:
            gaps = (group[metric] - group[f"{metric}_baseline"]).dropna().sort_values()  # sorted: order-free
            stats = paired_bootstrap(gaps.to_numpy(), seed=seed) if len(gaps) else (None, None, None)
            entry.update(zip((f"{metric}_diff", f"{metric}_ci_low", f"{metric}_ci_high"), stats))
        entries.append(entry)
    columns_out = [*keys, "baseline", "n_pairs"] + [f"{m}_{s}" for m in METRICS for s in ("diff", "ci_low", "ci_high")]
    differences = pd.DataFrame(entries, columns=columns_out)
    return in_order(none_for_missing(differences, keys), [rows, columns, PROTOCOL])


# --- pictures ---------------------------------------------------------------------------------
def labelled_grid(rows: Sequence[Sequence[Image.Image | None]], column_labels: Sequence[str],
                  row_labels: Sequence[str], tile: int = 192) -> Image.Image:
    """Images in a grid with column and row labels; a missing image is a grey tile."""
    label_h, label_w = 22, 110
    grid = Image.new("RGB", (label_w + tile * len(column_labels), label_h + tile * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(column_labels):
        draw.text((label_w + c * tile + 4, 4), str(text), fill="black")
    for r, (label, images) in enumerate(zip(row_labels, rows)):
        draw.text((4, label_h + r * tile + tile // 2), str(label)[:16], fill="black")
        for c, image in enumerate(images):
            box = (label_w + c * tile, label_h + r * tile)
            if image is None:
                grid.paste((200, 200, 200), (*box, box[0] + tile, box[1] + tile))
            else:
                grid.paste(image.convert("RGB").resize((tile, tile)), box)
    return grid


def report_markdown(text: pd.DataFrame, best: pd.DataFrame, with_paper: bool, differences: str,
                    unreadable: Sequence[Path]) -> str:
    """table.md: the table, its legend, the paper's caveat when its numbers are shown, the paired
    differences and the records left out."""
    sections = [markdown_table(text, best), LEGEND]
    if with_paper:
        sections.append(PAPER_NOTE)
    if differences:
        sections.append(differences.rstrip("\n"))
    if unreadable:
        sections.append(f"{len(unreadable)} unreadable record(s) left out (re-run the sweep to recompute them): "
                        + ", ".join(map(str, unreadable)))
    return "\n\n".join(sections) + "\n"


def summary_line(report: dict[str, Any]) -> str:
    """"12 edits: 10 done, 1 diverged, 1 skipped; report in DIR" (and the unreadable records, if any)."""
    total = sum(report["counts"].values())
    counts = ", ".join(f"{report['counts'].get(status, 0)} {status}" for status in ("done", "diverged", "skipped"))
    line = f"{total} edit{'s' if total != 1 else ''}: {counts}; report in {report['out']}"
    if report["unreadable"]:
        line += f"; {len(report['unreadable'])} unreadable record(s) left out"
    return line


def build_report(sweep_dir: str | Path, rows: str | None = None, columns: str = "task", paper: bool = False,
                 out_dir: str | Path | None = None, baseline: Any = None) -> dict[str, Any]:
    """Read every edit under ``sweep_dir`` into one frame and write into ``<sweep>/report``:
    records.csv and records.parquet (one line per edit), table.csv (one line per row value,
    protocol and column value, full precision), table.md and table.tex (the display table),
    differences.csv, and the figures (``figures/``: per task a comparison grid, a CLIP–LPIPS trade-off
    and, when lr varies, the lr ablation; the selector accuracy)."""
    records, unreadable = scan_records(sweep_dir)
    if not records:
        raise CpdsError(f"no edit records (summary.json) under {sweep_dir}: run a sweep first "
                        "(python run.py -m method=dds,cpds ...) or give the folder that holds one")
    frame = records_frame(records)
    rows = rows or infer_rows(frame)
    for option, key in (("rows", rows), ("columns", columns)):
        if key not in frame.columns:
            raise CpdsError(f"{option}={key} is not a field of the records: use one of "
                            f"{', '.join(varying(frame)) or 'method, task'}")
    if rows == columns:
        raise CpdsError(f"rows and columns are both {rows}: pick two different fields")
    out = Path(out_dir or Path(sweep_dir) / "report")
    table = aggregate(frame, [rows, PROTOCOL, columns])
    if paper:
        table = attach_paper(table, rows, columns)
    differences = paired_differences(frame, rows, columns, baseline)
    text, best = display_frame(table, rows, columns)
    with_paper = paper and bool(table[["paper_clip", "paper_lpips"]].notna().any(axis=None))
    markdown = report_markdown(text, best, with_paper, differences_markdown(differences, rows, columns), unreadable)
    latex = f"% {PAPER_NOTE}\n{latex_table(text, best)}" if with_paper else latex_table(text, best)
    files = {"records.csv": write_csv(out / "records.csv", frame),
             "records.parquet": write_parquet(out / "records.parquet", frame),
             "table.csv": write_csv(out / "table.csv", table),
             "table.md": write_text(out / "table.md", markdown),
             "table.tex": write_text(out / "table.tex", latex),
             "differences.csv": write_csv(out / "differences.csv", differences)}
    rounds = rounds_frame(records)
    figures = write_figures(frame, rounds, out, rows)
    gallery = write_gallery(frame, out)  # report/index.html
    counts = {status: int(n) for status, n in frame["status"].value_counts().items()}
    return {"records": records, "frame": frame, "rounds": rounds, "rows": rows, "columns": columns,
            "table": table, "differences": differences, "markdown": markdown, "latex": latex, "figures": figures,
            "grids": {key.partition("/")[2]: paths[0] for key, paths in figures.items() if key.startswith("grid/")},
            "accuracy_plot": figures["selector_accuracy"][0] if "selector_accuracy" in figures else None,
            "counts": counts, "out": out,
            "unreadable": unreadable, "files": {**files, "index.html": gallery}, "sweep_name": sweep_name(records, sweep_dir)}

"""Turn a sweep directory into the paper's tables, image grids and plots (SPEC §5).

A sweep directory holds one ``summary.json`` record per edit (any depth: jobs, shards and
``edits/<image>/`` folders), so merging jobs or shards is just reading them all.
"""
from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image, ImageDraw

from cpds_exp.evaluation.frame import records_frame
from cpds_exp.evaluation.gallery import write_gallery
from cpds_exp.records import load_record
from cpds_exp.results import csv_text, save_image, write_text

METRICS = ("clip", "lpips")
METHOD_ORDER = ("dds", "cds", "pds", "cpds", "cds_matched")
SELECTOR_ORDER = ("random", "meta", "knn", "svm", "rf")
TASK_ORDER = ("cat2dog", "cat2cow", "cat2pig")

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


def _ordered(values: Iterable[Any], key: str) -> list[Any]:
    order = {"method": METHOD_ORDER, "selector": SELECTOR_ORDER, "task": TASK_ORDER}.get(key, ())
    return sorted(set(values), key=lambda v: (order.index(v) if v in order else len(order), str(v) if v is None
                                              else v if isinstance(v, (int, float)) else str(v)))


def infer_rows(records: Sequence[dict[str, Any]]) -> str:
    """The swept parameter that makes the table's rows: the first of method, selector, lr that varies."""
    for key in ("method", "selector", "lr"):
        if len({r.get(key) for r in records}) > 1:
            return key
    return "method"


def mean_and_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def protocol_of(record: dict[str, Any]) -> str:
    """The evaluation protocol a record's metrics were computed under (never mixed in one cell)."""
    return str(record.get("metrics_protocol") or "unrecorded")


def summarise(records: Sequence[dict[str, Any]], rows: str, columns: str = "task") -> list[dict[str, Any]]:
    """One entry per (row, column, protocol) cell: n done, n diverged, n skipped, and the mean and
    s.e. of each metric over the finished edits."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        cells[(record.get(rows), record.get(columns), protocol_of(record))].append(record)
    table = []
    for row in _ordered({k[0] for k in cells}, rows):
        for column in _ordered({k[1] for k in cells if k[0] == row}, columns):
            for protocol in sorted({k[2] for k in cells if k[:2] == (row, column)}):
                group = cells[(row, column, protocol)]
                done = [r for r in group if r.get("status") == "done"]
                entry = {rows: row, columns: column, "protocol": protocol, "n": len(done),
                         "n_diverged": sum(r.get("status") == "diverged" for r in group),
                         "n_skipped": sum(r.get("status") == "skipped" for r in group)}
                for metric in METRICS:
                    values = [r[metric] for r in done if r.get(metric) is not None]
                    entry[metric], entry[f"{metric}_sem"] = mean_and_sem(values) if values else (None, None)
                table.append(entry)
    return table


#: Why the paper's numbers stand only beside records of the published protocol (SPEC §5).
PAPER_NOTE = ("The paper's numbers stand only beside cells of metrics.protocol=published: its evaluation "
              "fed CLIP near-black images (pixels in [0, 1/255]), so the paper's CLIP column (0.244-0.250 "
              "everywhere) does not measure the edits, and its LPIPS saw unscaled [0, 1] inputs.")


def attach_paper(table: list[dict[str, Any]], rows: str, columns: str = "task") -> list[dict[str, Any]]:
    """Add the paper's numbers (Table 1 by method, Table 2 by selector) to the cells it reports,
    measured under the published protocol: no other protocol is comparable with them."""
    reference = PAPER.get(rows, {})
    for entry in table:
        paper = reference.get((entry[rows], entry[columns])) if entry.get("protocol") == "published" else None
        entry["paper_clip"], entry["paper_lpips"] = paper if paper else (None, None)
    return table


def _fmt(mean: float | None, sem: float | None = None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4f} ± {sem:.4f}" if sem is not None else f"{mean:.6g}"


def _row_keys(table: Sequence[dict[str, Any]], rows: str) -> list[tuple[Any, str]]:
    """(row value, protocol) in table order, without repeats."""
    return list(dict.fromkeys((e[rows], e["protocol"]) for e in table))


def to_markdown(table: Sequence[dict[str, Any]], rows: str, columns: str = "task") -> str:
    """A Markdown table: a line per row value (and protocol, when several), CLIP ↑ and LPIPS ↓
    (mean ± s.e.) per column value, then the done, diverged and skipped counts per column."""
    col_values = _ordered({e[columns] for e in table}, columns)
    row_keys = _row_keys(table, rows)
    several = len({protocol for _, protocol in row_keys}) > 1
    with_paper = any(e.get("paper_clip") is not None for e in table)
    header = [rows]
    for c in col_values:
        header += [f"{c} CLIP ↑", f"{c} LPIPS ↓"] + ([f"{c} paper CLIP", f"{c} paper LPIPS"] if with_paper else [])
    header += ["n", "diverged", "skipped"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, protocol in row_keys:
        cells, counts = [f"{row} ({protocol})" if several else str(row)], []
        for column in col_values:
            entry = next((e for e in table if (e[rows], e["protocol"], e[columns]) == (row, protocol, column)), None)
            if entry is None:
                cells += ["–", "–"] + (["–", "–"] if with_paper else [])
                continue
            counts.append(entry)
            cells += [_fmt(entry["clip"], entry["clip_sem"]), _fmt(entry["lpips"], entry["lpips_sem"])]
            if with_paper:
                cells += [_fmt(entry.get("paper_clip")), _fmt(entry.get("paper_lpips"))]
        cells += ["/".join(str(e[key]) for e in counts) for key in ("n", "n_diverged", "n_skipped")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + (f"\n{PAPER_NOTE}\n" if with_paper else "")


def default_baseline(rows: str, values: Iterable[Any]) -> Any:
    """DDS for methods, random for selectors, else the first value in the table's order."""
    values = _ordered(values, rows)
    preferred = {"method": "dds", "selector": "random"}.get(rows)
    return preferred if preferred in values else (values[0] if values else None)


def paired_bootstrap(differences: Sequence[float], resamples: int = 10_000,
                     seed: int = 0) -> tuple[float, float | None, float | None]:
    """Mean of paired differences and its 95% percentile-bootstrap interval (resampling images);
    no interval from a single pair, whose resamples would all be that pair."""
    import numpy as np

    values = np.asarray(differences, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), None, None
    means = values[np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def paired_differences(records: Sequence[dict[str, Any]], rows: str, columns: str = "task",
                       baseline: Any = None, seed: int = 0) -> list[dict[str, Any]]:
    """Per (row, column, protocol): the mean per-image difference of each metric against the
    ``baseline`` row on the same images, with a seeded paired-bootstrap 95% CI. The paper's gaps are
    in the third or fourth decimal: this says whether they exceed the spread over images."""
    done = [r for r in records if r.get("status") == "done"]
    values = {r.get(rows) for r in done}
    if baseline is None:
        baseline = default_baseline(rows, values)
    else:  # from the command line: a string, while lr values are numbers
        baseline = next((v for v in values if str(v) == str(baseline)), baseline)
    by_cell: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for record in done:
        by_cell[(record.get(rows), record.get(columns), protocol_of(record))][record["image"]] = record
    out = []
    for (row, column, protocol), images in sorted(by_cell.items(), key=lambda kv: str(kv[0])):
        reference = by_cell.get((baseline, column, protocol))
        if row == baseline or not reference:
            continue
        entry = {rows: row, columns: column, "protocol": protocol, "baseline": baseline}
        for metric in METRICS:
            pairs = [(images[i][metric], reference[i][metric]) for i in images.keys() & reference.keys()
                     if images[i].get(metric) is not None and reference[i].get(metric) is not None]
            entry[f"n_pairs_{metric}"] = len(pairs)
            stats = paired_bootstrap([a - b for a, b in sorted(pairs)], seed=seed) if pairs else (None, None, None)
            entry[f"{metric}_diff"], entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"] = stats
        out.append(entry)
    row_order = {v: i for i, v in enumerate(_ordered({e[rows] for e in out}, rows))}
    column_order = {v: i for i, v in enumerate(_ordered({e[columns] for e in out}, columns))}
    return sorted(out, key=lambda e: (row_order[e[rows]], column_order[e[columns]]))


def differences_markdown(differences: Sequence[dict[str, Any]], rows: str, columns: str = "task") -> str:
    """The paired differences as Markdown: Δ = row − baseline, mean [95% CI], per column."""
    if not differences:
        return ""
    baseline = differences[0]["baseline"]
    lines = [f"Paired differences against {rows}={baseline} on the same images (mean [95% bootstrap CI]):", "",
             f"| {rows} | {columns} | protocol | Δ CLIP ↑ | Δ LPIPS ↓ | pairs |", "|---|---|---|---|---|---|"]

    def interval(entry: dict[str, Any], metric: str) -> str:
        if entry[f"{metric}_diff"] is None:
            return "–"
        if entry[f"{metric}_ci_low"] is None:
            return f"{entry[f'{metric}_diff']:+.4f} [one image: no interval]"
        return f"{entry[f'{metric}_diff']:+.4f} [{entry[f'{metric}_ci_low']:+.4f}, {entry[f'{metric}_ci_high']:+.4f}]"

    for e in differences:
        lines.append(f"| {e[rows]} | {e[columns]} | {e['protocol']} | {interval(e, 'clip')} | {interval(e, 'lpips')} "
                     f"| {e['n_pairs_lpips']} |")
    return "\n".join(lines) + "\n"


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


def _image(record: dict[str, Any], name: str) -> Image.Image | None:
    path = Path(record["_dir"]) / f"{name}.png"
    return Image.open(path) if path.is_file() else None


def comparison_grids(records: Sequence[dict[str, Any]], by: str = "method",
                     max_images: int = 8) -> dict[str, Image.Image]:
    """Per task: rows of images, columns source then each ``by`` value (e.g. DDS, CDS, PDS, CPDS)."""
    done = [r for r in records if r.get("status") == "done"]
    grids = {}
    for task in _ordered({r.get("task") for r in done}, "task"):
        in_task = [r for r in done if r.get("task") == task]
        values = _ordered({r.get(by) for r in in_task}, by)
        images = sorted({r["image"] for r in in_task})[:max_images]
        rows = []
        for image in images:
            mine = {r.get(by): r for r in in_task if r["image"] == image}
            first = next(iter(mine.values()))
            rows.append([_image(first, "source")] + [_image(mine[v], "result") if v in mine else None for v in values])
        grids[str(task)] = labelled_grid(rows, ["source", *[f"{by}={v}" for v in values]], images)
    return grids


def accuracy_plot(records: Sequence[dict[str, Any]], path: str | Path) -> bool:
    """Selector accuracy and balanced accuracy per training round (mean over edits); False if no rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[int, list[tuple[float, float | None, float | None]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for r in record.get("selector_rounds") or []:
            if r.get("accuracy") is not None:
                curves[record.get("selector")][r["round"]].append((r["accuracy"], r.get("balanced_accuracy"),
                                                                    r.get("positive_rate")))
    if not curves:
        return False
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for selector in _ordered(curves, "selector"):
        rounds = sorted(curves[selector])
        accuracy = [sum(v[0] for v in curves[selector][k]) / len(curves[selector][k]) for k in rounds]
        balanced = [sum(v[1] for v in curves[selector][k]) / len(curves[selector][k]) for k in rounds]
        line, = axis.plot(rounds, accuracy, marker="o", label=f"{selector} accuracy")
        axis.plot(rounds, balanced, linestyle="--", color=line.get_color(), label=f"{selector} balanced")
    rates = [v[2] for c in curves.values() for vs in c.values() for v in vs if v[2] is not None]
    if rates:
        axis.axhline(max(sum(rates) / len(rates), 1 - sum(rates) / len(rates)), color="grey", linestyle=":",
                     label="majority class")
    axis.set_xlabel("training round (measured before training on that round's data)")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    save_image(path, Image.open(buffer))
    return True


def build_report(sweep_dir: str | Path, rows: str | None = None, columns: str = "task", paper: bool = False,
                 out_dir: str | Path | None = None, baseline: Any = None) -> dict[str, Any]:
    """Write table.md, table.csv, differences.csv, comparison grids and the accuracy plot into
    ``<sweep>/report``."""
    records, unreadable = scan_records(sweep_dir)
    if not records:
        raise FileNotFoundError(f"no edit records (summary.json) under {sweep_dir}")
    rows = rows or infer_rows(records)
    out = Path(out_dir or Path(sweep_dir) / "report")
    table = summarise(records, rows, columns)
    if paper:
        attach_paper(table, rows, columns)
    differences = paired_differences(records, rows, columns, baseline)
    markdown = to_markdown(table, rows, columns)
    if differences:
        markdown += "\n" + differences_markdown(differences, rows, columns)
        write_text(out / "differences.csv", csv_text(differences))
    write_text(out / "table.md", markdown)
    write_text(out / "table.csv", csv_text(table))
    grids = comparison_grids(records, by=rows)
    for task, grid in grids.items():
        save_image(out / "grids" / f"{task}.png", grid)
    has_accuracy = accuracy_plot(records, out / "accuracy.png")
    counts = defaultdict(int)
    for record in records:
        counts[record.get("status", "unknown")] += 1
    write_gallery(records_frame(records), out)  # report/index.html
    return {"records": records, "rows": rows, "table": table, "differences": differences, "markdown": markdown,
            "grids": grids,
            "accuracy_plot": out / "accuracy.png" if has_accuracy else None, "counts": dict(counts), "out": out,
            "unreadable": unreadable}

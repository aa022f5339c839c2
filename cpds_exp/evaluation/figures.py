"""A sweep's figures as they go into a paper or a lab meeting: per task a comparison grid and a
CLIP–LPIPS trade-off, the lr ablation when lr varies, and the selectors' accuracy over training
rounds; each saved as PNG and vector PDF under ``<report>/figures/``.

Figures are plain :class:`matplotlib.figure.Figure` objects, never pyplot's: no global backend, no
figure manager to close, nothing left behind when a figure is dropped (PNGs are drawn by Agg).
Every figure is built and saved inside :data:`STYLE`, sized for a two-column paper: no text under
7 pt at its printed width.
"""
from __future__ import annotations

import functools
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator
from PIL import Image

from cpds_exp.errors import CpdsError
from cpds_exp.evaluation.frame import (METRIC_LABELS, METRICS, aggregate, ci95, display_name, metric_text,
                                       none_for_missing, ordered, splitting, varying)
from cpds_exp.naming import safe_name
from cpds_exp.results import write_atomically

#: a two-column paper's text width, and one column of it (inches)
FULL_WIDTH = 7.0
COLUMN_WIDTH = 3.4
DPI = 200
#: images per grid: five rows of five columns fill a page at full text width
MAX_IMAGES = 5
#: a tile's longest side in pixels: sharp at print size (~290 dpi on a 5-column grid), PDFs stay small
TILE_PIXELS = 384
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "legend.fontsize": 7, "figure.titlesize": 9, "pdf.fonttype": 42}
MIN_FONT_PT = 7
FORMATS = {"png": lambda dpi: {"dpi": dpi}, "pdf": lambda dpi: {"metadata": {"CreationDate": None}}}
NOTE_COLOUR = "0.35"


def styled(build: Callable[..., Figure | None]) -> Callable[..., Figure | None]:
    """Build a figure inside :data:`STYLE` and lay it out there, so that every text object (tick
    labels too, which matplotlib makes lazily) has the style's size before anyone reads or saves it."""
    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Figure | None:
        with matplotlib.rc_context(STYLE):
            figure = build(*args, **kwargs)
            if figure is not None:
                figure.draw_without_rendering()
        return figure
    return wrapper


def save_figure(figure: Figure, stem: Path, dpi: int = DPI) -> list[Path]:
    """``stem.png`` and ``stem.pdf``, each written atomically; the PDF carries no date, so the same
    figure gives the same bytes."""
    with matplotlib.rc_context(STYLE):
        return [write_atomically(stem.with_name(f"{stem.name}.{fmt}"),
                                 lambda tmp, fmt=fmt: figure.savefig(tmp, format=fmt, **options(dpi)))
                for fmt, options in FORMATS.items()]


# --- shared pieces ------------------------------------------------------------------------------
def groups(frame: pd.DataFrame, key: str) -> Iterator[tuple[Any, pd.DataFrame]]:
    """(value, rows) per distinct value of ``key`` in the paper's order (a missing value is None)."""
    frame = none_for_missing(frame, [key])
    for value in ordered(frame[key], key):
        yield value, frame[frame[key].map(lambda v: v is None) if value is None else frame[key] == value]


def task_groups(frame: pd.DataFrame) -> list[tuple[str, str | None, pd.DataFrame]]:
    """(file name, title, rows) per task; a sweep without tasks is one group named "all"."""
    if "task" not in frame.columns or frame["task"].isna().all():
        return [("all", None, frame)]
    return [("all" if task is None else safe_name(str(task)), None if task is None else display_name("task", task),
             rows) for task, rows in groups(frame, "task")]


def palette(frame: pd.DataFrame, by: str) -> dict[Any, Any]:
    """One colour per value of ``by``, the same in every figure of the sweep."""
    colours = matplotlib.colormaps["tab10"]
    return {value: colours(i % 10) for i, (value, _) in enumerate(groups(frame, by))}


def count_label(name: str, counts: Iterable[int], diverged: int = 0) -> str:
    """A legend entry with its n (a range when groups differ) and the diverged edits left out."""
    low, high = int(min(counts)), int(max(counts))
    n = f"n = {low}" if low == high else f"n = {low}–{high}"
    return f"{name} ({n}" + (f", {diverged} diverged excluded)" if diverged else ")")


def legend_below(figure: Figure, handles: list[Any], columns: int = 2) -> None:
    """One legend for the figure, in the order given, under its axes: it never hides a point or a band."""
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), columns), frameon=False)


def has_metrics(frame: pd.DataFrame) -> bool:
    done = frame[frame["status"] == "done"]
    return any(metric in done.columns and done[metric].notna().any() for metric in METRICS)


# --- 1. comparison grid -------------------------------------------------------------------------
def picture(path: Any) -> np.ndarray | None:
    """An image file as a tile-sized array, or None when it is missing or unreadable."""
    if path is None or pd.isna(path):
        return None
    try:
        with Image.open(path) as image:
            tile = image.convert("RGB")
    except (OSError, ValueError):
        return None
    tile.thumbnail((TILE_PIXELS, TILE_PIXELS))
    return np.asarray(tile)


def blank_tile(axis: Any, text: str) -> None:
    """A grey square saying why there is no image."""
    axis.set_facecolor("0.85")
    axis.set_box_aspect(1)
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes, color=NOTE_COLOUR)


def edit_tile(axis: Any, edit: dict[str, Any] | None) -> None:
    """An edit's result captioned with its CLIP and LPIPS, or a grey tile naming what went wrong."""
    if edit is None:
        return blank_tile(axis, "not run")
    if edit["status"] != "done":
        at = edit.get("diverged_at")
        return blank_tile(axis, edit["status"] + (f"\nat iteration {int(at)}" if at is not None and pd.notna(at)
                                                  else ""))
    result = picture(edit.get("result_path"))
    if result is None:
        return blank_tile(axis, "result missing")
    axis.imshow(result)
    axis.set_xlabel(f"CLIP {metric_text(edit.get('clip'))}\nLPIPS {metric_text(edit.get('lpips'))}")


def prompt_text(source: str, target: str) -> str:
    return f"'{source}' → '{target}'"


def grid_rows(frame: pd.DataFrame, by: str, max_images: int, per_row_prompts: bool) -> list[tuple[str, dict]]:
    """(row label, edit per value of ``by``) for the first ``max_images`` images by name. A row is an
    image and the other fields that tell its edits apart (seed; lr when a method ran at several), so no
    edit hides behind another;
    of the same edit run twice the finished one, else the first by folder, stands."""
    keys = ["image", *splitting(frame, [by, "image"], (k for k in varying(frame) if k not in (by, "task")))]
    for key in (by, *keys):
        frame = none_for_missing(frame, [key])
    position = {k: {v: i for i, v in enumerate(ordered(frame[k], k))} for k in keys}
    images = set(list(position["image"])[:max_images])
    rows: dict[tuple, dict[Any, dict[str, Any]]] = {}
    for edit in frame.assign(_undone=frame["status"] != "done").sort_values(["_undone", "dir"]).to_dict("records"):
        if edit["image"] in images:
            rows.setdefault(tuple(edit[k] for k in keys), {}).setdefault(edit[by], edit)
    labelled = []
    for row in sorted(rows, key=lambda r: tuple(position[k][v] for k, v in zip(keys, r))):
        first = next(iter(rows[row].values()))
        label = ", ".join([row[0], *(display_name(k, v) for k, v in zip(keys[1:], row[1:]))])
        if per_row_prompts:
            label += f": {prompt_text(first['source_prompt'], first['target_prompt'])}"
        labelled.append((label, rows[row]))
    return labelled


@styled
def comparison_grid(frame: pd.DataFrame, by: str, title: str | None = None, max_images: int = MAX_IMAGES,
                    width: float = FULL_WIDTH) -> Figure:
    """Rows of images (the first ``max_images`` by name), columns "Source" then each value of ``by``
    (DDS, CDS, PDS, CPDS). The title names the task and its prompts; when prompts differ between
    images (a manifest), each row names its own."""
    values = ordered(none_for_missing(frame, [by])[by], by)
    pairs = frame[["source_prompt", "target_prompt"]].drop_duplicates()
    per_row = len(pairs) > 1
    if not per_row:
        shared = prompt_text(*pairs.iloc[0])
        title = f"{title}: {shared}" if title else shared
    title = textwrap.fill(title or "All edits", 90)
    rows = grid_rows(frame, by, max_images, per_row)

    columns = len(values) + 1
    label_lines = 4 if per_row else 2
    tile = (width - 0.15 * label_lines) / columns
    height = 0.2 * (title.count("\n") + 1) + 0.25 + len(rows) * (tile + 0.32)
    figure = Figure(figsize=(width, height), layout="constrained")
    figure.suptitle(title)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    label_chars = max(12, int(tile * 72 / (MIN_FONT_PT * 0.55)))
    for tiles, (label, edits) in zip(axes, rows):
        tiles[0].set_ylabel(textwrap.fill(label, label_chars), fontsize=MIN_FONT_PT)
        source = next((p for p in (picture(e.get("source_path")) for e in edits.values()) if p is not None), None)
        if source is None:
            blank_tile(tiles[0], "source missing")
        else:
            tiles[0].imshow(source)
        for axis, value in zip(tiles[1:], values):
            edit_tile(axis, edits.get(value))
    for axis, name in zip(axes[0], ["Source", *(display_name(by, v) for v in values)]):
        axis.set_title(name)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    return figure


# --- 2. lr ablation -----------------------------------------------------------------------------
@styled
def lr_ablation(frame: pd.DataFrame, by: str, colours: dict[Any, Any], title: str | None = None) -> Figure | None:
    """CLIP and LPIPS against lr: the mean over finished edits with its 95% CI band, one line per
    value of ``by`` (one line when ``by`` is lr); None when no value of ``by`` ran at two lrs (each
    method at its own default lr is no ablation) or nothing was measured."""
    done = frame[frame["status"] == "done"]
    hue = None if by == "lr" else by
    if "lr" not in frame.columns or not splitting(done, [hue] if hue else [], ["lr"]) or not has_metrics(frame):
        return None
    table = aggregate(frame[frame["lr"].notna()], [hue, "lr"] if hue else ["lr"])
    table["lr"] = table["lr"].astype(float)
    figure = Figure(figsize=(FULL_WIDTH, 2.6), layout="constrained")
    figure.suptitle(f"{title or 'All edits'}: learning-rate ablation (mean and 95% CI over edits)")
    axes = figure.subplots(1, len(METRICS))
    handles = []
    for value, rows in groups(table, hue) if hue else [(None, table)]:
        name = display_name(hue, value) if hue else "mean"
        colour = colours.get(value, "C0") if hue else "C0"
        label = count_label(name, rows["n"], int(rows["n_diverged"].sum()))
        for axis, metric in zip(axes, METRICS):
            mean, half = rows[metric].to_numpy(float), rows[f"{metric}_ci"].to_numpy(float)
            [line] = axis.plot(rows["lr"], mean, marker="o", color=colour, label=label)
            axis.fill_between(rows["lr"], mean - half, mean + half, color=colour, alpha=0.2, linewidth=0)
        handles.append(line)
    rates = sorted(table["lr"].unique())
    for axis, metric in zip(axes, METRICS):
        axis.set_xscale("log")
        axis.set_xticks(rates, labels=[f"{r:g}" for r in rates])
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xlabel("learning rate")
        axis.set_ylabel(METRIC_LABELS[metric])
    legend_below(figure, handles)
    return figure


# --- 3. selector accuracy -----------------------------------------------------------------------
ACCURACIES = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy"}


def majority_accuracy(rounds: pd.DataFrame) -> float | None:
    """What always answering the majority class scores on the measured rounds: the mean over them
    of max(p, 1 − p), p the round's positive rate."""
    rates = rounds["positive_rate"].dropna() if "positive_rate" in rounds.columns else pd.Series(dtype=float)
    return float(np.maximum(rates, 1 - rates).mean()) if len(rates) else None


@styled
def selector_accuracy(rounds: pd.DataFrame) -> Figure | None:
    """Accuracy and balanced accuracy per training round (each measured on patches the selector has
    not been trained on yet), mean and 95% band over edits per selector, with the majority-class
    baseline on top; None when no round was measured."""
    if rounds.empty or "accuracy" not in rounds.columns or rounds["accuracy"].isna().all():
        return None
    measured = rounds[rounds["accuracy"].notna()]
    figure = Figure(figsize=(FULL_WIDTH, 2.6), layout="constrained")
    figure.suptitle("Selector accuracy on patches not yet trained on (mean and 95% CI over edits)")
    axes = figure.subplots(1, len(ACCURACIES), sharey=True)
    colours = palette(measured, "selector")
    handles = []
    for selector, rows in groups(measured, "selector"):
        label = f"{display_name('selector', selector)} (n = {rows['fingerprint'].nunique()} edits)"
        for axis, metric in zip(axes, ACCURACIES):
            stats = rows.groupby("round")[metric].agg(["mean", ci95])
            [line] = axis.plot(stats.index, stats["mean"], marker="o", color=colours[selector], label=label)
            axis.fill_between(stats.index, stats["mean"] - stats["ci95"], stats["mean"] + stats["ci95"],
                              color=colours[selector], alpha=0.2, linewidth=0)
        handles.append(line)
    majority = majority_accuracy(measured)
    for axis, (metric, name) in zip(axes, ACCURACIES.items()):
        if majority is not None:  # a majority-class guess scores max(p, 1 − p); its balanced accuracy is 0.5
            level = majority if metric == "accuracy" else 0.5
            handles.append(axis.axhline(level, color="black", linestyle=":" if metric == "accuracy" else "--",
                                        linewidth=1.2, zorder=10, label=f"majority class: {name.lower()} {level:.2f}"))
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylim(0, 1)
        axis.set_title(name)
        axis.set_xlabel("training round")
    axes[0].set_ylabel("accuracy")
    legend_below(figure, handles)
    return figure


# --- 4. CLIP–LPIPS trade-off --------------------------------------------------------------------
@styled
def tradeoff(frame: pd.DataFrame, by: str, colours: dict[Any, Any], title: str | None = None) -> Figure | None:
    """One small point per finished edit and, per value of ``by``, the mean with 95% CI bars in both
    directions: up and left is better. None when no edit has both metrics."""
    done = frame[frame["status"] == "done"].dropna(subset=[m for m in METRICS if m in frame.columns])
    if done.empty or not all(m in done.columns for m in METRICS):
        return None
    table = aggregate(frame, [by]).to_dict("records")
    # one legend line per value under a square plot: a single column's width holds no more
    figure = Figure(figsize=(COLUMN_WIDTH, COLUMN_WIDTH + 0.15 * len(table)), layout="constrained")
    axis = figure.subplots()
    for value, rows in groups(done, by):
        axis.scatter(rows["clip"], rows["lpips"], s=8, alpha=0.35, color=colours.get(value), linewidths=0)
    handles = []
    for stats in table:
        if pd.isna(stats["clip"]) or pd.isna(stats["lpips"]):
            if stats["n_diverged"]:  # nothing to plot, but the reader should know why
                note = f"{display_name(by, stats[by])}: {stats['n_diverged']} diverged, none finished"
                handles += axis.plot([], [], " ", label=note)
            continue
        error = {f"{axis_name}err": None if pd.isna(stats[f"{metric}_ci"]) else stats[f"{metric}_ci"]
                 for axis_name, metric in zip("xy", METRICS)}
        handles.append(axis.errorbar(stats["clip"], stats["lpips"], **error, fmt="o", markersize=5, capsize=2,
                      color=colours.get(stats[by]), markeredgecolor="black", markeredgewidth=0.6, zorder=5,
                      label=count_label(display_name(by, stats[by]), [stats["n"]], stats["n_diverged"])))
    axis.set_xlabel(METRIC_LABELS["clip"])
    axis.set_ylabel(METRIC_LABELS["lpips"])
    axis.set_title(f"{title or 'All edits'}: means and 95% CI")
    legend_below(figure, handles, columns=1)
    return figure


# --- all of them --------------------------------------------------------------------------------
def build_figures(frame: pd.DataFrame, rounds: pd.DataFrame, by: str,
                  max_images: int = MAX_IMAGES) -> Iterator[tuple[str, Figure]]:
    """(key, figure) for every figure the sweep's data allows, one at a time: "grid/<task>",
    "lr_ablation/<task>", "tradeoff/<task>", "selector_accuracy"."""
    if max_images < 1:
        raise CpdsError(f"max_images={max_images} shows no image: use 1 or more")
    if frame.empty:
        return
    if by not in frame.columns:
        raise CpdsError(f"the records have no field {by!r} to compare: use method, selector or lr")
    colours = palette(frame, by)
    for name, title, rows in task_groups(frame):
        yield f"grid/{name}", comparison_grid(rows, by, title, max_images)
        for kind, build in (("lr_ablation", lr_ablation), ("tradeoff", tradeoff)):
            figure = build(rows, by, colours, title)
            if figure is not None:
                yield f"{kind}/{name}", figure
    figure = selector_accuracy(rounds)
    if figure is not None:
        yield "selector_accuracy", figure


def write_figures(frame: pd.DataFrame, rounds: pd.DataFrame, out: str | Path, by: str,
                  max_images: int = MAX_IMAGES, dpi: int = DPI) -> dict[str, list[Path]]:
    """Every figure of :func:`build_figures` as ``out/figures/<key>.png`` and ``.pdf``; returns the
    paths by key."""
    return {key: save_figure(figure, Path(out) / "figures" / key, dpi)
            for key, figure in build_figures(frame, rounds, by, max_images)}

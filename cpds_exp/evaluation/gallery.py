"""A static HTML gallery of a sweep (``report/index.html``): per source image a row with the source,
its prompts, and every method's (or swept value's) result with its CLIP and LPIPS under it.

One file per sweep with inline CSS and a few lines of inline JavaScript that sort the rows by a
score: it opens offline, from a file server or a zip, and links the images relatively, so the
report folder can move together with its sweep.
"""
from __future__ import annotations

import html
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import quote

import pandas as pd

from cpds_exp.errors import CpdsError
from cpds_exp.evaluation.frame import HIGHER_IS_BETTER, IDENTITY, METRIC_LABELS, METRICS, aggregate, display_name, \
    distinct, metric_text, ordered, present, splitting
from cpds_exp.naming import safe_name, short_hash
from cpds_exp.records import EditRecord
from cpds_exp.results import write_text
from cpds_exp.schema import NON_SEMANTIC_KEYS

UNNAMED = "unnamed sweep"
#: what makes a row: one source image edited by one prompt pair
ROW_KEYS = ("task", "image", "source_prompt", "target_prompt")
#: config keys that say which images were edited (rows), never how (columns)
DATASET_PREFIXES = ("dataset.", "task.")
#: frame columns that are outputs or bookkeeping, not settings
NOT_SETTINGS = {f.name for f in fields(EditRecord)} | {"dir", "source_path", "result_path"}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ddd; padding: 4px; vertical-align: top; text-align: center; }
thead th { position: sticky; top: 0; background: #fff; }
tbody th { text-align: left; max-width: 220px; font-weight: normal; }
figure { margin: 0; }
img { width: 192px; height: auto; display: block; margin: 0 auto; }
figcaption, tfoot td { font-size: 12px; }
.diverged { color: #b00000; } .skipped, .missing { color: #777; }
button { font-size: 11px; margin: 1px; cursor: pointer; }
"""

# A click on a score's button sorts the rows by that score of its column (best first; a second
# click reverses); results without the score (diverged, skipped, missing) stay last.
SCRIPT = """
function compareCells(a, b, descending) {
  if (a === undefined) return b === undefined ? 0 : 1;
  if (b === undefined) return -1;
  const order = isNaN(a) || isNaN(b) ? a.localeCompare(b) : Number(a) - Number(b);
  return descending ? -order : order;
}
document.addEventListener("click", event => {
  const button = event.target.closest("button[data-key]");
  if (!button) return;
  const body = button.closest("table").tBodies[0];
  const column = Number(button.dataset.col), key = button.dataset.key;
  const descending = button.dataset.descending === "true";
  const value = row => row.cells[column].dataset[key];
  Array.from(body.rows).sort((a, b) => compareCells(value(a), value(b), descending))
    .forEach(row => body.appendChild(row));
  button.dataset.descending = String(!descending);
});
"""


def write_gallery(frame: pd.DataFrame, out: str | Path) -> Path:
    """Write ``out/index.html``: the gallery of the sweep in ``frame`` (:func:`records_frame`), or,
    for several sweeps, a page each (``<sweep>.html``) and an index linking them. Returns the index."""
    if frame.empty:
        raise CpdsError("no edits to show in the gallery: the sweep folder holds no summary.json; run the sweep first")
    out = Path(out)
    names = frame["sweep_name"].fillna("") if "sweep_name" in frame.columns else pd.Series("", index=frame.index)
    sweeps = sorted(set(names))
    if len(sweeps) == 1:
        return write_text(out / "index.html", sweep_page(frame, out, sweeps[0]))
    links = []
    for sweep in sweeps:
        page = write_text(out / page_name(sweep), sweep_page(frame[names == sweep], out, sweep, index="index.html"))
        links.append(f'<li><a href="{attribute(quote(page.name))}">{text(sweep or UNNAMED)}</a></li>')
    return write_text(out / "index.html", document("Sweeps", f"<h1>Sweeps</h1>\n<ul>{''.join(links)}</ul>"))


def page_name(sweep: str) -> str:
    """The page of a sweep: its name when that is a plain file name, else a safe name and a hash
    (distinct sweeps, distinct pages; none is the index)."""
    name = safe_name(sweep or "unnamed")
    return f"{name}.html" if name == sweep and sweep != "index" else f"{name}-{short_hash(sweep)}.html"


def text(value: Any) -> str:
    return html.escape(str(value), quote=False)


def attribute(value: Any) -> str:
    return html.escape(str(value), quote=True)


def document(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{text(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n<script>{SCRIPT}</script>\n</body>\n</html>\n")


def link(path: Any, out: Path) -> str | None:
    """``path`` relative to the page's folder, as a URL (None when there is no file)."""
    if not isinstance(path, str) or not path:
        return None
    return quote(Path(os.path.relpath(path, out)).as_posix())


def key_of(values: Iterable[Any]) -> tuple:
    """A group's key with every missing value as None."""
    return tuple(present(v) for v in values)


def row_keys(frame: pd.DataFrame) -> list[str]:
    """The prompt pair's fields, and the dataset settings that vary (two folders may share a name)."""
    dataset = [c for c in frame.columns if c.startswith(DATASET_PREFIXES) and distinct(frame, [c]) > 1]
    return [k for k in ROW_KEYS if k in frame.columns] + dataset


def result_keys(frame: pd.DataFrame) -> list[str]:
    """The settings that tell an image's results apart (method, selector, lr, ...): the record's fields
    first, then the jobs' other config keys, each kept only if it splits the results further."""
    settings = [c for c in frame.columns if c not in NOT_SETTINGS and not c.startswith(DATASET_PREFIXES)
                and not any(c == k or c.startswith(f"{k}.") for k in NON_SEMANTIC_KEYS)]
    candidates = [k for k in IDENTITY if k in frame.columns and k not in ROW_KEYS] + \
        sorted(settings, key=lambda c: c.count("."))
    return splitting(frame, [], candidates) or ["method"]


def sweep_page(frame: pd.DataFrame, out: Path, sweep: str, index: str | None = None) -> str:
    """The page of one sweep: a sortable table, a row per source image, a column per setting, and
    each column's means in the footer."""
    rows_by, columns_by = row_keys(frame), result_keys(frame)
    summary = aggregate(frame, columns_by)  # the columns, in the paper's order
    columns = [key_of(values) for values in summary[columns_by].itertuples(index=False)]
    cells: dict[tuple[tuple, tuple], list[pd.Series]] = {}
    for _, record in frame.iterrows():
        cells.setdefault((key_of(record[rows_by]), key_of(record[columns_by])), []).append(record)
    tasks = {task: i for i, task in enumerate(ordered(frame.get("task", pd.Series(dtype=object)), "task"))}
    rows = sorted({row for row, _ in cells}, key=lambda row: (  # tasks in the paper's order, then images by name
        tasks.get(dict(zip(rows_by, row)).get("task"), len(tasks)), tuple(map(str, row))))
    header = "".join(column_header(i + 1, columns_by, column) for i, column in enumerate(columns))
    body = "".join(
        f"<tr>{source_cell([r for c in columns for r in cells.get((row, c), [])], dict(zip(rows_by, row)), out)}"
        + "".join(result_cell(cells.get((row, column), []), out) for column in columns) + "</tr>\n"
        for row in rows)
    footer = "".join(f"<td>{column_summary(entry)}</td>" for _, entry in summary.iterrows())
    counts = frame["status"].value_counts()
    title = sweep or UNNAMED
    intro = (f"<p>{len(frame)} edits of {len(rows)} images: {int(counts.get('done', 0))} done, "
             f"{int(counts.get('diverged', 0))} diverged, {int(counts.get('skipped', 0))} skipped. "
             "Click a score to sort the images by it (again to reverse).</p>")
    back = f'<p><a href="{attribute(quote(index))}">all sweeps</a></p>\n' if index else ""
    table = (f'<table>\n<thead><tr><th>source<br><button type="button" data-col="0" data-key="image" '
             f'data-descending="false">image</button></th>{header}</tr></thead>\n<tbody>\n{body}</tbody>\n'
             f"<tfoot><tr><td>mean ± 95% CI</td>{footer}</tr></tfoot>\n</table>")
    return document(f"{title}: gallery", f"{back}<h1>{text(title)}</h1>\n{intro}\n{table}")


def column_header(index: int, keys: Sequence[str], column: tuple) -> str:
    label = " · ".join(display_name(k, v) for k, v in zip(keys, column))
    buttons = "".join(f'<button type="button" data-col="{index}" data-key="{metric}" '
                      f'data-descending="{str(HIGHER_IS_BETTER[metric]).lower()}">{text(METRIC_LABELS[metric])}</button>'
                      for metric in METRICS)
    return f"<th>{text(label)}<br>{buttons}</th>"


def source_cell(edits: Sequence[pd.Series], values: dict[str, Any], out: Path) -> str:
    """The source image (from any edit of the row that kept it), its name, task and prompts."""
    source = next((src for src in (link(r.get("source_path"), out) for r in edits) if src), None)
    image = f'<a href="{attribute(source)}"><img src="{attribute(source)}" alt="source" loading="lazy"></a>' \
        if source else '<p class="missing">no source image</p>'
    lines = [f"<b>{text(values.get('image'))}</b>"]
    if values.get("task") is not None:
        lines.append(text(display_name("task", values["task"])))
    lines.append(f"“{text(values.get('source_prompt'))}” → “{text(values.get('target_prompt'))}”")
    lines += [text(display_name(k, v)) for k, v in values.items() if k not in ROW_KEYS]
    return (f'<th data-image="{attribute(values.get("image"))}"><figure>{image}'
            f"<figcaption>{'<br>'.join(lines)}</figcaption></figure></th>")


def result_cell(records: Sequence[pd.Series], out: Path) -> str:
    """Every edit of one image under one setting (normally one): its result and scores, or why
    there is none. The cell sorts by the mean score of its finished edits."""
    if not records:
        return '<td class="missing">–</td>'
    done = [r for r in records if r.get("status") == "done"]
    sort_values = {m: pd.Series([r.get(m) for r in done], dtype="float64").mean() for m in METRICS}
    data = "".join(f' data-{m}="{v:.6g}"' for m, v in sort_values.items() if not pd.isna(v))
    return f"<td{data}>{''.join(result_figure(r, out) for r in records)}</td>"


def result_figure(record: pd.Series, out: Path) -> str:
    status = record.get("status")
    if status == "diverged":
        at = present(record.get("diverged_at"))
        where = f" at iteration {int(at)}" if at is not None else ""
        return f'<p class="diverged">diverged{where}</p>'
    if status == "skipped":
        return f'<p class="skipped">skipped: {text(present(record.get("reason")) or "unreadable image")}</p>'
    result = link(record.get("result_path"), out)
    if result is None:
        return '<p class="missing">result image missing</p>'
    scores = " · ".join(f"{name.upper()} {metric_text(record.get(name))}" for name in METRICS)
    alt = f"result: {record.get('target_prompt')}"
    return (f'<figure><a href="{attribute(result)}"><img src="{attribute(result)}" alt="{attribute(alt)}" '
            f'loading="lazy"></a><figcaption>{text(scores)}</figcaption></figure>')


def column_summary(entry: pd.Series) -> str:
    """n, then each metric's mean (± 95% CI from two edits on), and what did not finish."""
    parts = [f"n = {int(entry['n'])}"]
    for metric in METRICS:
        ci = present(entry.get(f"{metric}_ci"))
        interval = f" ± {metric_text(ci)}" if ci is not None else ""
        parts.append(f"{metric.upper()} {metric_text(entry.get(metric))}{interval}")
    failed = [f"{int(entry[k])} {k.removeprefix('n_')}" for k in ("n_diverged", "n_skipped") if entry[k]]
    return text(" · ".join(parts + failed))

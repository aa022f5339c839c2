"""A sweep's aggregated table as readers see it: one display frame (rows: the swept parameter,
columns: tasks × quantities), rendered by pandas to Markdown and to a booktabs LaTeX body.

Numbers are formatted once, here, at one precision; the best value of each metric column is
marked from the unrounded means (per protocol: protocols are never compared with each other).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cpds_exp.evaluation.frame import (DECIMALS, HIGHER_IS_BETTER, METRIC_LABELS, METRICS, MISSING, display_name,
                                       key_title, metric_text, none_for_missing, ordered, present)
from cpds_exp.results import write_atomically

#: the column of a sweep whose edits have no task (or whatever the columns field is)
ALL_EDITS = "all edits"
COUNTS = {"n": "n", "n_diverged": "diverged", "n_skipped": "skipped"}
PROTOCOL = "metrics_protocol"
#: Unicode in the display frame → LaTeX math (the rest is escaped by pandas)
LATEX_SYMBOLS = str.maketrans({"±": r"$\pm$", "→": r"$\rightarrow$", "↑": r"$\uparrow$", "↓": r"$\downarrow$",
                               "–": "--"})
BOLD_LATEX = "textbf: --rwrap;"


def metric_cell(mean: float | None, ci: float | None = None) -> str:
    """"0.2500 ± 0.0500"; without an interval (one edit, or a reference number) just "0.2500"."""
    if present(mean) is None or present(ci) is None:
        return metric_text(mean)
    return f"{metric_text(mean)} ± {metric_text(ci)}"


def difference_cell(mean: float | None, low: float | None, high: float | None) -> str:
    """A signed paired difference with its bootstrap interval: "+0.0100 [-0.0020, +0.0200]"."""
    if present(mean) is None:
        return MISSING
    if present(low) is None:
        return f"{mean:+.{DECIMALS}f} (one image: no interval)"
    return f"{mean:+.{DECIMALS}f} [{low:+.{DECIMALS}f}, {high:+.{DECIMALS}f}]"


def row_labels(table: pd.DataFrame, rows: str) -> list[str]:
    """"CPDS", or "CPDS (published)" when the table holds several metrics protocols."""
    names = [display_name(rows, value) for value in table[rows]]
    if table[PROTOCOL].astype(str).nunique() < 2:
        return names
    return [f"{name} ({protocol or 'unrecorded'})" for name, protocol in zip(names, table[PROTOCOL])]


def column_labels(values: Sequence[Any] | pd.Series, columns: str) -> list[str]:
    """"cat → dog"; edits without a value are "all edits" when no edit has one, else "no <field>"."""
    values = list(values)
    missing = [present(v) is None for v in values]
    if all(missing):
        return [ALL_EDITS] * len(values)
    return [f"no {columns}" if gap else display_name(columns, v) for v, gap in zip(values, missing)]


def latex_symbols(text: Any) -> str:
    """Text that pandas has already escaped for LaTeX, with ±, arrows and dashes as LaTeX math."""
    return str(text).translate(LATEX_SYMBOLS)


def best_marks(table: pd.DataFrame, columns: str) -> pd.DataFrame:
    """Per metric, True where the mean is the best of its column (and protocol) at the shown
    precision: ties shown alike are marked alike."""
    keyed = none_for_missing(table, [columns, PROTOCOL])
    marks = {}
    for metric in METRICS:
        shown = keyed[metric].astype("float64").round(DECIMALS)
        best = shown.groupby([keyed[columns], keyed[PROTOCOL]], dropna=False).transform(
            "max" if HIGHER_IS_BETTER[metric] else "min")
        marks[METRIC_LABELS[metric]] = shown.eq(best) & shown.notna()
    return pd.DataFrame(marks, index=table.index)


def _widen(cells: pd.DataFrame, row_order: list[str], column_order: list[str]) -> pd.DataFrame:
    """Long cells (``_row``, ``_column``, one column per quantity) → rows × (column, quantity)."""
    quantities = [c for c in cells.columns if c not in ("_row", "_column")]
    wide = cells.pivot(index="_row", columns="_column", values=quantities).swaplevel(axis=1)
    return wide.reindex(index=row_order, columns=pd.MultiIndex.from_product([column_order, quantities]))


def display_frame(table: pd.DataFrame, rows: str, columns: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The aggregated ``table`` (one line per row value, protocol and column value, as
    :func:`frame.aggregate` gives it) as text cells, and where the best values are.

    Rows keep the table's order; columns are (column value, quantity): CLIP ↑ and LPIPS ↓ as mean ±
    95% CI, the paper's numbers when the table carries any, then n, diverged and skipped."""
    labels = {"_row": row_labels(table, rows), "_column": column_labels(table[columns], columns)}
    row_order = list(dict.fromkeys(labels["_row"]))
    column_order = list(dict.fromkeys(column_labels(ordered(table[columns], columns), columns)))
    cells = {METRIC_LABELS[m]: [metric_cell(*pair) for pair in zip(table[m], table[f"{m}_ci"])] for m in METRICS}
    for metric in METRICS:
        if f"paper_{metric}" in table.columns and table[f"paper_{metric}"].notna().any():
            cells[f"paper {METRIC_LABELS[metric]}"] = [metric_cell(v) for v in table[f"paper_{metric}"]]
    cells.update({title: table[key].astype(int).astype(str).tolist() for key, title in COUNTS.items()})
    text = _widen(pd.DataFrame({**cells, **labels}, index=table.index), row_order, column_order).fillna(MISSING)
    best = _widen(best_marks(table, columns).assign(**labels), row_order, column_order)
    best = best.reindex(columns=text.columns, fill_value=False).eq(True)  # a missing cell is not the best
    text.index.name = best.index.name = key_title(rows)
    return text, best


def markdown_table(text: pd.DataFrame, best: pd.DataFrame) -> str:
    """The display frame as a Markdown table (tabulate through pandas), best values in bold."""
    shown = text.where(~best, "**" + text + "**")
    shown.columns = [f"{group}: {quantity}" for group, quantity in shown.columns]
    return shown.to_markdown(disable_numparse=True, colalign=("left", *["right"] * len(shown.columns)))


def latex_table(text: pd.DataFrame, best: pd.DataFrame) -> str:
    """The display frame as a booktabs ``tabular`` (pandas' Styler): a column group per task,
    best values in \\textbf, ± and arrows as math, everything else escaped."""
    body = text.reset_index()
    css = pd.DataFrame("", index=body.index, columns=body.columns)
    css[list(best.columns)] = np.where(best, BOLD_LATEX, "")
    styler = (body.style.hide(axis="index").apply(lambda _: css, axis=None)
              .format(latex_symbols, escape="latex").format_index(latex_symbols, escape="latex", axis=1))
    return styler.to_latex(hrules=True, multicol_align="c", column_format="l" + "r" * (len(body.columns) - 1))


def differences_table(differences: pd.DataFrame, rows: str, columns: str) -> pd.DataFrame:
    """The paired differences as text: Δ = row − baseline, mean [95% bootstrap CI], per column."""
    shown = {key_title(rows): [display_name(rows, v) for v in differences[rows]],
             key_title(columns): column_labels(differences[columns], columns)}
    if differences[PROTOCOL].astype(str).nunique() > 1:  # as in the main table: named only when several
        shown[key_title(PROTOCOL)] = [p or "unrecorded" for p in differences[PROTOCOL]]
    for metric in METRICS:
        shown[f"Δ {METRIC_LABELS[metric]}"] = [difference_cell(*values) for values in zip(
            differences[f"{metric}_diff"], differences[f"{metric}_ci_low"], differences[f"{metric}_ci_high"])]
    shown["pairs"] = differences["n_pairs"].astype(int).astype(str).tolist()
    return pd.DataFrame(shown)


def differences_markdown(differences: pd.DataFrame, rows: str, columns: str) -> str:
    """The paired differences under a sentence naming the baseline; empty without differences."""
    if differences.empty:
        return ""
    baseline = display_name(rows, differences["baseline"].iloc[0])
    shown = differences_table(differences, rows, columns)
    table = shown.to_markdown(index=False, disable_numparse=True,
                              colalign=[*["left"] * (len(shown.columns) - 1), "right"])
    return f"Paired differences against {baseline} on the same images (mean [95% bootstrap CI]):\n\n{table}\n"


def write_csv(path: str | Path, frame: pd.DataFrame) -> Path:
    """``frame`` as CSV (full precision: this is the data, not the display), atomically."""
    return write_atomically(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_parquet(path: str | Path, frame: pd.DataFrame) -> Path:
    """``frame`` as Parquet, atomically; a column mixing types (a config key that is a number in one
    job and a string in another) is stored as text, which Parquet's typed columns require."""
    mixed = [c for c in frame.columns if frame[c].dtype == object
             and frame[c].dropna().map(type).nunique() > 1]
    stored = frame.assign(**{c: frame[c].map(lambda v: None if pd.isna(v) else str(v)) for c in mixed})
    return write_atomically(path, lambda tmp: stored.to_parquet(tmp, index=False))

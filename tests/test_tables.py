"""The display table: one precision, the best values marked, LaTeX escaping, Parquet of mixed types."""
import math

import pandas as pd
import pytest

from cpds_exp.evaluation.frame import aggregate
from cpds_exp.evaluation.tables import (column_labels, difference_cell, differences_table, display_frame, latex_table,
                                        markdown_table, metric_cell, write_parquet)


def edits(**columns):
    """A per-edit frame as records_frame gives it (status done, published protocol unless given)."""
    frame = pd.DataFrame(columns)
    defaults = {"status": "done", "metrics_protocol": "published", "task": "cat2dog", "method": "cpds"}
    return frame.assign(**{k: v for k, v in defaults.items() if k not in frame.columns})


def test_cells_have_one_precision_and_no_interval_without_one():
    assert metric_cell(0.25, 0.05) == "0.2500 ± 0.0500"
    assert metric_cell(0.123456, math.nan) == metric_cell(0.123456) == "0.1235"
    assert metric_cell(None) == metric_cell(math.nan, 0.1) == "–"
    assert difference_cell(-0.01, -0.02, 0.0) == "-0.0100 [-0.0200, +0.0000]"
    assert difference_cell(0.5, None, None) == "+0.5000 (one image: no interval)"


def test_column_labels_name_missing_values_without_none():
    assert column_labels([None, None], "task") == ["all edits", "all edits"]
    assert column_labels(["cat2dog", None, math.nan], "task") == ["cat → dog", "no task", "no task"]


def test_ties_at_the_shown_precision_are_both_bold_and_markdown_keeps_trailing_zeros():
    frame = edits(method=["dds", "cds", "cpds"], clip=[0.30001, 0.30004, 0.1], lpips=[0.2, 0.1, 0.3])
    text, best = display_frame(aggregate(frame, ["method", "metrics_protocol", "task"]), "method", "task")
    assert text.index.tolist() == ["DDS", "CDS", "CPDS"] and text.index.name == "Method"
    assert best[("cat → dog", "CLIP ↑")].tolist() == [True, True, False]
    assert best[("cat → dog", "LPIPS ↓")].tolist() == [False, True, False]
    assert not best[("cat → dog", "n")].any()
    markdown = markdown_table(text, best)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()]
    assert rows[0] == ["Method", *(f"cat → dog: {q}" for q in ("CLIP ↑", "LPIPS ↓", "n", "diverged", "skipped"))]
    assert rows[2:] == [["DDS", "**0.3000**", "0.2000", "1", "0", "0"],
                        ["CDS", "**0.3000**", "**0.1000**", "1", "0", "0"],
                        ["CPDS", "0.1000", "0.3000", "1", "0", "0"]]  # tabulate did not re-parse 0.1000 as 0.1


def test_a_missing_cell_is_a_dash_and_latex_escapes_what_it_must():
    frame = edits(method=["dds", "cpds"], task=["cat2dog", "my_task"], clip=[0.2, 0.3], lpips=[0.1, 0.2])
    text, best = display_frame(aggregate(frame, ["method", "metrics_protocol", "task"]), "method", "task")
    assert text.loc["DDS", ("task my_task", "CLIP ↑")] == "–" and text.loc["DDS", ("task my_task", "n")] == "–"
    tex = latex_table(text, best)
    assert r"task my\_task" in tex and "my_task" not in tex
    assert r"DDS & \textbf{0.2000} & \textbf{0.1000} & 1 & 0 & 0 & -- & -- & -- & -- & -- \\" in tex


def test_parquet_stores_a_column_of_mixed_types_as_text(tmp_path):
    frame = pd.DataFrame({"dataset.path": pd.Series([3, "cats", None], dtype=object), "clip": [0.1, 0.2, 0.3]})
    write_parquet(tmp_path / "r.parquet", frame)
    back = pd.read_parquet(tmp_path / "r.parquet")
    assert back["dataset.path"].tolist()[:2] == ["3", "cats"] and pd.isna(back["dataset.path"].iloc[2])
    assert back["clip"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert [p.name for p in tmp_path.iterdir()] == ["r.parquet"]  # no temporary file left


def test_differences_name_the_protocol_only_when_there_are_several():
    one = pd.DataFrame({"method": ["cpds"], "task": ["cat2dog"], "metrics_protocol": ["corrected"],
                        "baseline": ["dds"], "n_pairs": [2],
                        "clip_diff": [0.01], "clip_ci_low": [0.0], "clip_ci_high": [0.02],
                        "lpips_diff": [-0.01], "lpips_ci_low": [-0.02], "lpips_ci_high": [0.0]})
    columns = differences_table(one, "method", "task").columns.tolist()
    assert columns == ["Method", "Task", "Δ CLIP ↑", "Δ LPIPS ↓", "pairs"]
    two = pd.concat([one, one.assign(metrics_protocol="published")], ignore_index=True)
    shown = differences_table(two, "method", "task")
    assert shown["Protocol"].tolist() == ["corrected", "published"]
    assert shown["Δ CLIP ↑"].tolist() == ["+0.0100 [+0.0000, +0.0200]"] * 2

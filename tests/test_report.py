"""The report tool: one frame of every edit, tables computed by pandas (checked against scipy),
Markdown and booktabs LaTeX, the paper's numbers, paired differences, W&B tables, the dashboard."""
import csv
import re
import runpy
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from scipy import stats

from cpds_exp.errors import CpdsError
from cpds_exp.records import EditRecord
from cpds_exp.evaluation.report import PAPER_NOTE, build_report, paired_bootstrap, sweep_name


#: what every fake record shares
FAKE = dict(status="done", sweep_name="fake", metrics_protocol="published", source_prompt="a cat",
            target_prompt="a dog")


def write_records(root, rows):
    """Fake sweep: one folder per record with a summary.json and source/result images."""
    for i, row in enumerate(rows):
        folder = root / f"job{i % 3}" / "edits" / f"{row['image']}-{i}"
        folder.mkdir(parents=True)
        EditRecord(**{**FAKE, "fingerprint": f"f{i}", **row}).save(folder)
        for name in ("source", "result"):
            Image.new("RGB", (16, 16), (i * 20 % 255, 0, 0)).save(folder / f"{name}.png")


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def t_interval_half_width(values):
    """The 95% t-interval of the mean, by scipy's own interval function (not the code under test)."""
    values = np.asarray(values, dtype=float)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    return (high - low) / 2


#: three methods × two tasks × three images, plus one diverged and one skipped CPDS edit on cat2dog
CLIP = {"dds": [0.20, 0.22, 0.27], "cds": [0.21, 0.25, 0.26], "cpds": [0.24, 0.26, 0.31]}
LPIPS = {"dds": [0.30, 0.20, 0.40], "cds": [0.08, 0.12, 0.13], "cpds": [0.10, 0.15, 0.20]}


def table1_rows():
    rows = [dict(image=f"cat{i}", method=m, task=task, clip=CLIP[m][i] + (task == "cat2pig") * 0.01,
                 lpips=LPIPS[m][i]) for m in CLIP for task in ("cat2dog", "cat2pig") for i in range(3)]
    return rows + [dict(image="cat3", method="cpds", task="cat2dog", status="diverged"),
                   dict(image="cat4", method="cpds", task="cat2dog", status="skipped")]


def test_records_become_one_line_per_edit_with_the_config_keys_that_vary(tmp_path):
    rows = table1_rows()
    write_records(tmp_path, rows)
    for job, tau in (("job0", 0.07), ("job1", 0.1), ("job2", 0.2)):  # tau varies by job, guidance does not
        (tmp_path / job / "config.yaml").write_text(yaml.safe_dump({"tau": tau, "guidance_scale": 7.5}))
    report = build_report(tmp_path)
    lines = read_csv(tmp_path / "report" / "records.csv")
    assert len(lines) == len(rows) == len(report["frame"]) == sum(report["counts"].values())
    assert "tau" in lines[0] and "guidance_scale" not in lines[0]
    for line in lines:
        job = line["dir"].split("/job")[1][0]
        assert float(line["tau"]) == {"0": 0.07, "1": 0.1, "2": 0.2}[job]
    assert sorted(line["status"] for line in lines).count("done") == 18
    assert {(line["method"], line["task"], line["image"]) for line in lines} == {
        (r["method"], r["task"], r["image"]) for r in rows}
    parquet = pd.read_parquet(tmp_path / "report" / "records.parquet")
    pd.testing.assert_frame_equal(parquet, report["frame"], check_dtype=False)
    assert report["counts"] == {"done": 18, "diverged": 1, "skipped": 1}
    assert set(report["files"]) == {"records.csv", "records.parquet", "table.csv", "table.md", "table.tex",
                                    "differences.csv", "index.html"} and all(p.is_file() for p in report["files"].values())


def test_table_csv_equals_an_independent_t_interval(tmp_path):
    write_records(tmp_path, table1_rows())
    report = build_report(tmp_path)
    lines = read_csv(tmp_path / "report" / "table.csv")
    assert [(line["method"], line["task"]) for line in lines] == [
        (m, task) for m in ("dds", "cds", "cpds") for task in ("cat2dog", "cat2pig")]  # the paper's order
    for line in lines:
        clip = np.array(CLIP[line["method"]]) + (line["task"] == "cat2pig") * 0.01
        lpips = LPIPS[line["method"]]
        assert float(line["clip"]) == pytest.approx(clip.mean())
        assert float(line["clip_ci"]) == pytest.approx(t_interval_half_width(clip))
        assert float(line["lpips"]) == pytest.approx(np.mean(lpips))
        assert float(line["lpips_ci"]) == pytest.approx(t_interval_half_width(lpips))
        odd = line["method"] == "cpds" and line["task"] == "cat2dog"
        assert (line["n"], line["n_diverged"], line["n_skipped"]) == ("3", "1", "1") if odd else ("3", "0", "0")
    assert report["table"]["clip"].tolist() == pytest.approx([float(line["clip"]) for line in lines])


def latex_body(tex):
    """The lines between \\midrule and \\bottomrule, split into cells."""
    lines = tex.splitlines()
    body = lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]
    return [[cell.strip() for cell in line.removesuffix(r"\\").split(" & ")] for line in body]


def test_table_tex_is_a_booktabs_body_with_the_best_value_of_each_metric_column_in_bold(tmp_path):
    write_records(tmp_path, table1_rows())
    build_report(tmp_path)
    tex = (tmp_path / "report" / "table.tex").read_text()
    lines = tex.splitlines()
    assert lines[0] == r"\begin{tabular}{l" + "r" * 10 + "}" and lines[-1] == r"\end{tabular}"
    assert [tex.count(rule) for rule in (r"\toprule", r"\midrule", r"\bottomrule")] == [1, 1, 1]
    assert r"\multicolumn{5}{c}{cat $\rightarrow$ dog}" in tex and r"LPIPS $\downarrow$" in tex
    assert "±" not in tex and tex.count("{") == tex.count("}")
    body = latex_body(tex)
    assert [row[0] for row in body] == ["DDS", "CDS", "CPDS"] and all(len(row) == 11 for row in body)
    header = lines[lines.index(r"\toprule") + 2].removesuffix(r"\\").split(" & ")
    metric_columns = [i for i, title in enumerate(header) if "CLIP" in title or "LPIPS" in title]
    assert len(metric_columns) == 4
    for column in metric_columns:
        bold = [row[0] for row in body if row[column].startswith(r"\textbf{")]
        assert bold == (["CPDS"] if "CLIP" in header[column] else ["CDS"]), (header[column], bold)
    assert sum(row[column].startswith(r"\textbf{") for row in body for column in range(11)) == 4
    dds_clip = body[0][1]
    expected = f"{np.mean(CLIP['dds']):.4f} $\\pm$ {t_interval_half_width(CLIP['dds']):.4f}"
    assert dds_clip == expected
    assert body[2][3:6] == ["3", "1", "1"]  # CPDS cat → dog: n, diverged, skipped


def test_the_best_lpips_is_the_lowest_and_the_best_clip_the_highest(tmp_path):
    write_records(tmp_path, [dict(image="a", method="dds", task="cat2dog", clip=0.30, lpips=0.05),
                             dict(image="a", method="cpds", task="cat2dog", clip=0.20, lpips=0.50)])
    tex = build_report(tmp_path)["latex"]
    dds, cpds = latex_body(tex)
    assert dds[1:3] == [r"\textbf{0.3000}", r"\textbf{0.0500}"] and cpds[1:3] == ["0.2000", "0.5000"]


def test_a_single_edit_shows_its_value_and_n_without_an_interval(tmp_path):
    write_records(tmp_path, [dict(image="a", method="cpds", task="cat2cow", clip=0.2, lpips=0.1),
                             dict(image="a", method="dds", task="cat2cow", clip=0.1, lpips=0.3),
                             dict(image="b", method="dds", task="cat2cow", clip=0.3, lpips=0.2)])
    report = build_report(tmp_path)
    cpds = next(line for line in report["markdown"].splitlines() if line.startswith("| CPDS"))
    cells = [cell.strip() for cell in cpds.strip("|").split("|")]
    assert cells == ["CPDS", "**0.2000**", "**0.1000**", "1", "0", "0"]
    assert "± 0.0000" not in report["markdown"] and "0.0000" not in report["latex"]
    [line] = [line for line in read_csv(tmp_path / "report" / "table.csv") if line["method"] == "cpds"]
    assert line["n"] == "1" and line["clip_ci"] == "" and line["lpips_ci"] == ""
    dds = next(line for line in report["markdown"].splitlines() if line.startswith("| DDS"))
    assert "0.2000 ± 1.2706" in dds and "0.2500 ± 0.6353" in dds  # two edits: t(0.975, 1) = 12.706 × s.e.


def test_a_sweep_without_tasks_has_one_column_named_all_edits(tmp_path):
    write_records(tmp_path, [dict(image=i, method=m, clip=0.2, lpips=0.1) for i in "ab" for m in ("dds", "cds")])
    report = build_report(tmp_path)
    header = report["markdown"].splitlines()[0]
    assert "all edits: CLIP ↑" in header and "all edits: n" in header
    for text in (report["markdown"], report["latex"], (tmp_path / "report" / "table.md").read_text()):
        assert not re.search(r"\b(None|nan|NaN)\b", text), text
    assert r"\multicolumn{5}{c}{all edits}" in report["latex"]
    assert "| CDS      | all edits |" in report["markdown"]  # the paired differences too


def test_protocols_are_never_averaged_together_and_the_paper_stands_only_beside_published(tmp_path):
    rows = [dict(image=i, method="cpds", task="cat2dog", clip=c, lpips=0.1, metrics_protocol=p)
            for i, c, p in (("a", 0.2, "published"), ("b", 0.4, "published"), ("a", 0.3, "corrected"))]
    write_records(tmp_path, rows)
    report = build_report(tmp_path, paper=True)
    cells = report["table"].set_index("metrics_protocol")
    assert cells.loc["published", "clip"] == pytest.approx(0.3) and cells.loc["published", "n"] == 2
    assert cells.loc["corrected", "clip"] == pytest.approx(0.3) and cells.loc["corrected", "n"] == 1
    assert cells.loc["published", "paper_clip"] == 0.24964 and np.isnan(cells.loc["corrected", "paper_clip"])
    lines = report["markdown"].splitlines()
    corrected = next(line for line in lines if line.startswith("| CPDS (corrected)"))
    published = next(line for line in lines if line.startswith("| CPDS (published)"))
    assert "0.2496" in published and "0.2496" not in corrected  # the paper's CLIP to the same 4 decimals
    assert "**" in corrected and "**" in published  # each protocol has its own best
    assert PAPER_NOTE in report["markdown"] and report["latex"].startswith(f"% {PAPER_NOTE}\n")


def test_the_papers_numbers_only_on_request(tmp_path):
    write_records(tmp_path, [dict(image="a", method=m, task="cat2dog", clip=0.2, lpips=0.1) for m in ("dds", "cds")])
    report = build_report(tmp_path)
    assert "paper" not in report["markdown"].splitlines()[0] and PAPER_NOTE not in report["markdown"]
    assert "paper_clip" not in report["table"].columns and not report["latex"].startswith("%")


def test_build_report_writes_tables_grids_and_accuracy_plot(tmp_path):
    rounds = [{"round": 1, "accuracy": None, "balanced_accuracy": None, "positive_rate": 0.8},
              {"round": 2, "accuracy": 0.7, "balanced_accuracy": 0.6, "positive_rate": 0.8}]
    rows = [dict(image=img, method="cds", selector=sel, task="cat2pig", clip=0.2, lpips=0.1, selector_rounds=rounds)
            for img in ("a", "b") for sel in ("random", "meta", "knn")]
    write_records(tmp_path, rows)
    report = build_report(tmp_path, paper=True)
    assert report["rows"] == "selector" and len(report["rounds"]) == 12
    out = tmp_path / "report"
    markdown = (out / "table.md").read_text()
    assert markdown.startswith("| Selector ")
    random = next(line for line in markdown.splitlines() if line.startswith("| Random "))
    assert [cell.strip() for cell in random.strip("|").split("|")] == [
        "Random", "**0.2000 ± 0.0000**", "**0.1000 ± 0.0000**", "0.2471", "0.0896", "2", "0", "0"]
    assert "| Meta-learner " in markdown and "| KNN " in markdown
    assert read_csv(out / "table.csv")[0]["paper_lpips"] == "0.0895743"  # the data keeps every digit
    assert sorted(report["figures"]) == ["grid/cat2pig", "selector_accuracy", "tradeoff/cat2pig"]
    assert report["grids"] == {"cat2pig": out / "figures/grid/cat2pig.png"}  # the figures' tests check content
    assert report["accuracy_plot"] == out / "figures/selector_accuracy.png" and report["accuracy_plot"].is_file()


def test_paired_differences_against_the_baseline(tmp_path):
    write_records(tmp_path, table1_rows())
    report = build_report(tmp_path)
    differences = report["differences"]
    assert [(d["method"], d["task"]) for _, d in differences.iterrows()] == [
        (m, task) for m in ("cds", "cpds") for task in ("cat2dog", "cat2pig")]
    cpds = differences.iloc[2]
    assert cpds["baseline"] == "dds" and cpds["n_pairs"] == 3  # the diverged and skipped edits have no pair
    assert cpds["lpips_diff"] == pytest.approx(-0.15)  # the mean of -0.2, -0.05, -0.2
    assert -0.2 - 1e-12 <= cpds["lpips_ci_low"] <= cpds["lpips_diff"] <= cpds["lpips_ci_high"] <= -0.05 + 1e-12
    assert cpds["clip_diff"] == pytest.approx(np.mean(np.array(CLIP["cpds"]) - CLIP["dds"]))
    pd.testing.assert_frame_equal(build_report(tmp_path)["differences"], differences)  # seeded
    assert "Paired differences against DDS on the same images" in report["markdown"]
    assert "| CPDS     | cat → dog | +0.0400 [+0.0400, +0.0400] | -0.1500 [" in report["markdown"]
    lines = read_csv(tmp_path / "report" / "differences.csv")
    assert len(lines) == 4 and float(lines[2]["lpips_diff"]) == pytest.approx(-0.15)
    assert paired_bootstrap([0.5]) == (0.5, None, None)  # one image: a mean, no interval
    assert build_report(tmp_path, baseline="cds")["differences"]["baseline"].unique().tolist() == ["cds"]
    with pytest.raises(CpdsError, match="baseline 'pds' is not a method of the finished edits: use one of dds"):
        build_report(tmp_path, baseline="pds")


def test_bad_rows_or_columns_name_the_fields_to_use(tmp_path):
    write_records(tmp_path, [dict(image="a", method=m, task="cat2dog", clip=0.2, lpips=0.1) for m in ("dds", "cds")])
    with pytest.raises(CpdsError, match="rows=methd is not a field of the records: use one of method"):
        build_report(tmp_path, rows="methd")
    with pytest.raises(CpdsError, match="rows and columns are both task"):
        build_report(tmp_path, rows="task")


def test_unreadable_records_are_listed_and_the_group_falls_back_to_the_folder(tmp_path, monkeypatch):
    sweep = tmp_path / "my_sweep"
    write_records(sweep, [dict(image="a", method="dds", task="cat2dog", clip=0.2, lpips=0.1, sweep_name=None)])
    (sweep / "broken").mkdir()
    (sweep / "broken" / "summary.json").write_text("{not json")
    report = build_report(sweep)
    assert report["unreadable"] == [sweep / "broken" / "summary.json"]
    assert f"1 unreadable record(s) left out (re-run the sweep to recompute them): {sweep}/broken/summary.json" \
        in report["markdown"]
    assert report["sweep_name"] == "my_sweep"
    monkeypatch.chdir(sweep)
    assert sweep_name(report["records"], ".") == "my_sweep"  # not "" for the current folder
    assert sweep_name([{"sweep_name": "table1"}], ".") == "table1"


def test_report_script(tmp_path, capsys, monkeypatch):
    script = str(__import__("conftest").REPO / "scripts" / "report.py")
    monkeypatch.setattr(sys, "argv", ["report.py", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(script, run_name="__main__")
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: no edit records") and err.count("\n") == 1
    write_records(tmp_path, [dict(image="a", method="cpds", task="cat2cow", clip=0.2, lpips=0.1),
                             dict(image="b", method="cpds", task="cat2cow", status="diverged"),
                             dict(image="c", method="dds", task="cat2cow", clip=0.3, lpips=0.1)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(script, run_name="__main__")
    out = capsys.readouterr().out
    assert info.value.code == 0 and "| CPDS " in out
    assert out.splitlines()[-1] == f"3 edits: 2 done, 1 diverged, 0 skipped; report in {tmp_path / 'report'}"
    monkeypatch.setattr(sys, "argv", ["report.py", str(tmp_path), "--baseline", "pds"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(script, run_name="__main__")
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: baseline 'pds' is not a method") and err.count("\n") == 1

"""The report tool: statistics by hand, the paper's numbers, W&B tables, the dashboard."""
import math
import runpy
import sys

import pytest
from PIL import Image

from cpds_exp.records import EditRecord
from cpds_exp.evaluation.report import attach_paper, build_report, infer_rows, mean_and_sem, summarise, to_markdown


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


def test_mean_and_standard_error_by_hand():
    mean, sem = mean_and_sem([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert sem == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2 / 3))
    assert mean_and_sem([0.5]) == (0.5, 0.0)


def test_summarise_groups_cells_and_ignores_unfinished(tmp_path):
    rows = [dict(image="a", method="cds", task="cat2dog", clip=0.2, lpips=0.1),
            dict(image="b", method="cds", task="cat2dog", clip=0.3, lpips=0.3),
            dict(image="a", method="dds", task="cat2dog", clip=0.25, lpips=0.2)]
    write_records(tmp_path, rows)
    EditRecord(**{**FAKE, "fingerprint": "x", "status": "skipped", "method": "cds", "task": "cat2dog",
                  "image": "c"}).save(tmp_path / "job0/edits/skipped")
    from cpds_exp.evaluation.report import load_records

    records = load_records(tmp_path)
    assert len(records) == 4 and infer_rows(records) == "method"
    table = attach_paper(summarise(records, "method"), "method")
    assert [(e["method"], e["n"], e["n_skipped"]) for e in table] == [("dds", 1, 0), ("cds", 2, 1)]  # paper's order
    cds = table[1]
    assert cds["clip"] == pytest.approx(0.25) and cds["lpips_sem"] == pytest.approx(0.1)
    assert cds["paper_clip"] == 0.24966 and cds["paper_lpips"] == 0.05371
    markdown = to_markdown(table, "method")
    assert "| cds | 0.2500 ± 0.0500 | 0.2000 ± 0.1000 | 0.24966 | 0.05371 | 2 | 0 | 1 |" in markdown
    assert "does not measure the edits" in markdown


def test_build_report_writes_tables_grids_and_accuracy_plot(tmp_path):
    rounds = [{"round": 1, "accuracy": None, "balanced_accuracy": None, "positive_rate": 0.8},
              {"round": 2, "accuracy": 0.7, "balanced_accuracy": 0.6, "positive_rate": 0.8}]
    rows = [dict(image=img, method="cds", selector=sel, task="cat2pig", clip=0.2, lpips=0.1, selector_rounds=rounds)
            for img in ("a", "b") for sel in ("random", "meta", "knn")]
    write_records(tmp_path, rows)
    report = build_report(tmp_path, paper=True)
    assert report["rows"] == "selector"
    out = tmp_path / "report"
    assert (out / "table.md").read_text().startswith("| selector |")
    assert "| random | 0.2000 ± 0.0000 | 0.1000 ± 0.0000 | 0.247089 | 0.0895743 | 2 |" in (out / "table.md").read_text()
    assert (out / "table.csv").read_text().splitlines()[0].startswith("selector,task,protocol,n,n_diverged,n_skipped,clip")
    grid = Image.open(out / "grids/cat2pig.png")
    assert grid.size == (110 + 4 * 192, 22 + 2 * 192)  # source + 3 selectors, 2 images
    assert Image.open(out / "accuracy.png").size[0] > 100


def test_protocols_are_never_averaged_together_and_the_paper_stands_only_beside_published(tmp_path):
    rows = [dict(image=i, method="cpds", task="cat2dog", clip=c, lpips=0.1, metrics_protocol=p)
            for i, c, p in (("a", 0.2, "published"), ("b", 0.4, "published"), ("a", 0.3, "corrected"))]
    write_records(tmp_path, rows)
    report = build_report(tmp_path, paper=True)
    cells = {e["protocol"]: e for e in report["table"]}
    assert cells["published"]["clip"] == pytest.approx(0.3) and cells["published"]["n"] == 2
    assert cells["corrected"]["clip"] == pytest.approx(0.3) and cells["corrected"]["n"] == 1
    assert cells["published"]["paper_clip"] == 0.24964 and cells["corrected"]["paper_clip"] is None
    assert "| cpds (corrected) |" in report["markdown"] and "| cpds (published) |" in report["markdown"]


def test_paired_differences_against_the_baseline(tmp_path):
    lpips = {"dds": [0.30, 0.20, 0.40], "cpds": [0.10, 0.15, 0.20]}  # cpds is better on every image
    rows = [dict(image=f"cat{i}", method=m, task="cat2pig", clip=0.25, lpips=v)
            for m, values in lpips.items() for i, v in enumerate(values)]
    write_records(tmp_path, rows)
    report = build_report(tmp_path)
    [diff] = report["differences"]
    assert diff["method"] == "cpds" and diff["baseline"] == "dds" and diff["n_pairs_lpips"] == 3
    assert diff["lpips_diff"] == pytest.approx(-0.15)  # the mean of -0.2, -0.05, -0.2
    assert -0.2 - 1e-12 <= diff["lpips_ci_low"] <= diff["lpips_diff"] <= diff["lpips_ci_high"] <= -0.05 + 1e-12
    assert diff["clip_diff"] == 0 and diff["clip_ci_low"] == diff["clip_ci_high"] == 0
    assert build_report(tmp_path)["differences"] == report["differences"]  # seeded
    assert "Paired differences against method=dds" in report["markdown"]
    from cpds_exp.evaluation.report import paired_bootstrap

    assert paired_bootstrap([0.5]) == (0.5, None, None)  # one image: a mean, no interval
    assert (tmp_path / "report" / "differences.csv").read_text().startswith("method,task,protocol,baseline")


def test_report_script(tmp_path, capsys, monkeypatch):
    script = str(__import__("conftest").REPO / "scripts" / "report.py")
    monkeypatch.setattr(sys, "argv", ["report.py", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(script, run_name="__main__")
    assert info.value.code == 2 and "no edit records" in capsys.readouterr().err
    write_records(tmp_path, [dict(image="a", method="cpds", task="cat2cow", clip=0.2, lpips=0.1)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(script, run_name="__main__")
    assert info.value.code == 0 and "| cpds |" in capsys.readouterr().out

"""The report on W&B: the per-edit table, the aggregated tables, captioned figures and the results
artifact in one run of the sweep's group (read back offline), and the dashboard built offline."""
from __future__ import annotations

import json

import pandas as pd
from PIL import Image

from cpds_exp.evaluation.frame import aggregate, records_frame
from cpds_exp.evaluation.report import scan_records
from cpds_exp.evaluation.wandb_report import build_dashboard, log_report, sweep_tasks
from cpds_exp.loggers import code_version
from test_report import write_records
from wandb_offline import finished_run_file, read_run


def fake_report(root):
    """The report dict of a fake sweep (four edits, one diverged) as build_report hands it over,
    with a grid (PNG and PDF), a selector-accuracy PNG and records.csv."""
    write_records(root / "sweep", [
        dict(image="a", method="dds", task="cat2dog", clip=0.20, lpips=0.10, lr=0.1),
        dict(image="b", method="dds", task="cat2dog", clip=0.22, lpips=0.12, lr=0.1),
        dict(image="a", method="cpds", task="cat2dog", clip=0.25, lpips=0.08, lr=0.8, selector="knn"),
        dict(image="b", method="cpds", task="cat2dog", status="diverged", lr=0.8, selector="knn")])
    records = scan_records(root / "sweep")[0]
    frame = records_frame(records)
    out = root / "sweep" / "report"
    figures = {"grid/cat2dog": [out / "figures/grid/cat2dog.png", out / "figures/grid/cat2dog.pdf"],
               "selector_accuracy": [out / "figures/selector_accuracy.png", out / "figures/selector_accuracy.pdf"]}
    for path in (p for paths in figures.values() for p in paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 10), (0, 90, 0)).save(path)
    frame.to_csv(out / "records.csv", index=False)
    differences = pd.DataFrame({"method": ["cpds"], "task": ["cat2dog"], "n": [1], "clip_diff": [0.05]})
    return {"records": records, "frame": frame, "rows": "method", "table": aggregate(frame, ["method", "task"]),
            "differences": differences, "figures": figures, "files": {"records.csv": out / "records.csv"},
            "counts": {"done": 3, "diverged": 1}, "out": out}


def test_the_report_run_holds_every_edit_the_tables_the_figures_and_the_results(tmp_path):
    report = fake_report(tmp_path)
    log_report(report, "fake", mode="offline", run_dir=str(tmp_path))
    logged = read_run(finished_run_file(tmp_path))  # log_report ran W&B in this process
    assert logged["run"] == {"group": "fake", "job_type": "report"}
    assert logged["config"]["sweep_name"] == "fake" and logged["config"]["code_version"] == code_version()
    [row] = logged["history"]
    assert row["edits/_type"] == row["table/_type"] == row["differences/_type"] == "table-file"
    assert row["figures/grid/cat2dog/caption"] == "Comparison grid: cat → dog"
    assert row["figures/selector_accuracy/caption"] == "Selector accuracy over training rounds"
    assert logged["summary"]["counts"] == {"done": 3, "diverged": 1}

    artifacts = {a["name"]: a for a in logged["artifacts"]}
    results = artifacts["fake-results"]
    assert results["type"] == "sweep-results"
    assert results["files"] == sorted([*(f"records/job{i % 3}/edits/{image}-{i}/summary.json"
                                         for i, image in enumerate("abab")),
                                       "report/figures/grid/cat2dog.pdf", "report/figures/grid/cat2dog.png",
                                       "report/figures/selector_accuracy.pdf", "report/figures/selector_accuracy.png",
                                       "report/records.csv"])

    [edits] = [a for a in logged["artifacts"] if "edits.table.json" in a["files"]]
    table = json.loads(open(edits["staged"]["edits.table.json"]).read())
    assert table["columns"] == ["image", "source_prompt", "target_prompt", "method", "selector", "lr", "task",
                                "source", "result", "clip", "lpips", "status"]
    rows = [dict(zip(table["columns"], values)) for values in table["data"]]
    assert [(r["image"], r["method"], r["selector"], r["lr"], r["clip"], r["status"]) for r in rows] == [
        ("a", "dds", None, 0.1, 0.20, "done"), ("b", "cpds", "knn", 0.8, None, "diverged"),  # in folder order
        ("b", "dds", None, 0.1, 0.22, "done"), ("a", "cpds", "knn", 0.8, 0.25, "done")]
    assert all(r["source"]["_type"] == r["result"]["_type"] == "image-file" for r in rows)
    assert rows[0]["target_prompt"] == "a dog"
    assert sum(name.startswith("media/images/") for name in edits["files"]) == 8  # a source and a result per edit


def test_a_sweep_that_varies_another_key_gets_it_as_a_column(tmp_path):
    write_records(tmp_path, [dict(image="a", method="cpds", w_cut=w, clip=0.2, lpips=0.1) for w in (1.0, 3.0)])
    report = {"records": scan_records(tmp_path)[0], "table": pd.DataFrame(), "differences": pd.DataFrame(),
              "figures": {}, "counts": {"done": 2}, "out": tmp_path / "report"}
    report["frame"] = records_frame(report["records"])
    log_report(report, "w-cut", mode="offline", run_dir=str(tmp_path))
    logged = read_run(finished_run_file(tmp_path))
    [edits] = [a for a in logged["artifacts"] if "edits.table.json" in a["files"]]
    table = json.loads(open(edits["staged"]["edits.table.json"]).read())
    assert table["columns"][7] == "w_cut" and [values[7] for values in table["data"]] == [1.0, 3.0]
    assert "table/_type" not in logged["history"][0]  # empty tables are left out


def test_dashboard_is_built_offline():
    import wandb_workspaces.reports.v2 as wr

    dashboard = build_dashboard("table1", project="cpds-exp", entity="someone")
    titles = [getattr(b, "text", None) for b in dashboard.blocks]
    assert "cat2pig" in titles and dashboard.title == "cpds-exp table1"
    grids = [b for b in dashboard.blocks if type(b).__name__ == "PanelGrid"]
    assert len(grids) == 4
    assert [p.title for p in grids[0].panels][:3] == ["cat2dog: CLIP score", "cat2dog: LPIPS",
                                                      "cat2dog: CLIP–LPIPS trade-off"]
    scatter = grids[0].panels[2]
    assert isinstance(scatter, wr.ScatterPlot)
    assert (scatter.x.name, scatter.y.name) == ("metrics/clip", "metrics/lpips")
    assert [getattr(p, "table_name", None) for p in grids[-1].panels][:2] == ["edits", "table"]
    assert "figures/grid/cat2dog" in grids[-1].panels[2].media_keys
    filters = str(grids[0].runsets[0].filters)
    assert "Group" in filters and "table1" in filters and "cat2dog" in filters
    # what .save() uploads (the whole report needs a login; its panels convert offline)
    models = [panel._to_model() for grid in grids for panel in grid.panels]
    assert (models[2].config.x_axis, models[2].config.y_axis) == ("summary:metrics/clip", "summary:metrics/lpips")
    assert models[3].config.x_axis == "iteration"


def test_the_dashboard_has_a_section_per_task_the_sweep_ran(tmp_path):
    """The sweep's own tasks, not the paper's three; a sweep without tasks gets one section for all edits."""
    frame = pd.DataFrame({"task": ["cat2pig", None, "cat2pig", "dog2wolf"]})
    assert sweep_tasks(frame) == ["cat2pig", "dog2wolf"]
    assert sweep_tasks(pd.DataFrame({"task": [None, None]})) == [None]
    dashboard = build_dashboard("mine", project="cpds-exp", entity="someone", tasks=[None])
    grids = [b for b in dashboard.blocks if type(b).__name__ == "PanelGrid"]
    assert "all edits" in [getattr(b, "text", None) for b in dashboard.blocks] and len(grids) == 2
    filters = str(grids[0].runsets[0].filters)
    assert "mine" in filters and "task" not in filters

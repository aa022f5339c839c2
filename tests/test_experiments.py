"""Each paper experiment as a small multirun sweep on generated images, then its report."""
import json
import signal

import pytest

from cpds_exp.evaluation.report import build_report
from test_cli import read_until, run_py, start_run_py
from test_datasets import make_photos

SMALL = ("model=tiny", "metrics=random", "logger=none", "iterations=3", "progress=false", "n_patches=8",
         "++selector.train_every=1")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("cats"), count=2)


@pytest.mark.parametrize("experiment,rows,values,columns", [
    ("table1", "method", ["dds", "cds", "pds", "cpds"], ["cat2dog", "cat2cow", "cat2pig"]),
    ("table1_published", "method", ["dds", "cds", "pds", "cpds"], ["cat2dog", "cat2cow", "cat2pig"]),
    ("table2", "selector", ["random", "meta", "knn", "svm", "rf"], ["cat2pig"]),
    ("table2_published", "selector", ["random", "meta", "knn"], ["cat2pig"]),
    ("lr_ablation", "lr", [0.1, 0.4, 0.8, 1.2], ["cat2pig"]),
    ("selector_accuracy", "selector", ["meta", "knn", "svm", "rf"], ["cat2pig"]),
    ("matched_step", "method", ["cpds", "cds_matched"], ["cat2pig"]),
])
def test_experiment_sweep_and_report(tmp_path, photos, experiment, rows, values, columns):
    sweep = tmp_path / experiment
    data = f"dataset.image={photos / 'cat0.png'}" if experiment == "table2_published" else f"dataset.path={photos}"
    images = 1 if experiment == "table2_published" else 2
    proc = run_py(f"+experiment={experiment}", *SMALL, data, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = build_report(sweep, paper=True)
    assert report["rows"] == rows
    assert report["counts"] == {"done": images * len(values) * len(columns)}
    table = report["table"].to_dict("records")
    assert [e[rows] for e in table] == [v for v in values for _ in columns]
    assert all(e["n"] == images and e["clip"] is not None and e["lpips"] is not None for e in table)
    assert all(r["sweep_name"] == experiment for r in report["records"])
    published = experiment.endswith("_published")
    assert {r["metrics_protocol"] for r in report["records"]} == {"published" if published else "corrected"}
    for task in columns:
        assert (sweep / "report" / "figures" / "grid" / f"{task}.png").is_file()
    assert (report["accuracy_plot"] is not None) == (experiment.startswith("table2") or experiment == "selector_accuracy")
    if experiment.startswith("table1"):  # the paper's DDS cat2dog CLIP, only beside the published protocol
        assert ("paper CLIP" in report["markdown"]) == published


def test_published_experiments_use_the_papers_model(compose_config):
    table1 = compose_config("+experiment=table1_published")
    table2 = compose_config("+experiment=table2_published", "dataset.image=cat1.png")
    for cfg in (table1, table2):
        assert cfg.model.name == "sd15" and cfg.metrics.protocol == "published"
    assert table1.dataset.name == "cats" and table2.dataset.name == "single"
    assert (table2.dataset.target_prompt, table2.dataset.task, table2.method.name) == ("a pig", "cat2pig", "cds")


def count_records(sweep):
    return sum(1 for p in sweep.rglob("summary.json") if json.loads(p.read_text()).get("status") == "done")


def test_interrupted_sweep_resumes_without_repeating_an_edit(tmp_path, photos):
    sweep = tmp_path / "sweep"
    args = ["+experiment=table2", *SMALL, "iterations=6", f"dataset.path={photos}", f"hydra.sweep.dir={sweep}"]
    proc = start_run_py(*args, cwd=tmp_path)
    read_until(proc, "written to", count=3)  # three edits finished: kill -9 now
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = count_records(sweep)
    assert finished_before >= 3
    again = run_py(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    redone = again.stderr.count("written to") + again.stdout.count("written to")
    assert redone == 10 - finished_before  # only the missing edits ran
    assert count_records(sweep) == 10

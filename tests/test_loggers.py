"""The W&B logger as its users expect it: the iteration as step metric with per-key summaries,
captioned images, the code version in the config, silent runs, a group for every sweep, and the
dataset artifact a run edits. Everything is read back from offline run files."""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO
from cpds_exp.errors import CpdsError
from cpds_exp.loggers import WandbLogger, code_version, git_commit, result_caption, snapshot_caption
from cpds_exp.wandb_artifacts import ARTIFACT_FILE, dataset_artifact, declare_dataset, log_dataset
from test_benchmark import QUERY, _laion
from wandb_offline import finished_run_file, read_run


def defined(logged: dict) -> dict[str, dict]:
    """The run's define_metric records by the name (or glob) they define."""
    return {m.get("name") or m["glob_name"]: m for m in logged["metrics"]}


def test_metrics_are_plotted_against_the_iteration_in_any_order_and_summarised_per_key(tmp_path):
    logger = WandbLogger(mode="offline", run_dir=str(tmp_path), run_config={"method": {"name": "cpds"}})
    layer = "cut/up_blocks.1.attn1"
    logger.log_metrics({"iteration": 2, "t": 500, "score/grad_norm": 0.5, "cut/total": 1.0, layer: 0.4})
    logger.log_metrics({"iteration": 1, "t": 700, "score/grad_norm": 0.7, "cut/total": 3.0, layer: 0.2})
    logger.log_metrics({"iteration": 1, "selector/round": 1, "selector/accuracy": 0.6, "selector/loss": 0.9})
    logger.log_metrics({"iteration": 2, "selector/round": 2, "selector/accuracy": 0.9, "selector/loss": 0.5})
    logger.log_image("snapshot", Image.new("RGB", (8, 8)), 2, snapshot_caption(2, "a cat", "a dog"))
    logger.finish()
    logged = read_run(finished_run_file(tmp_path))

    metrics = defined(logged)
    assert metrics["*"]["step_metric"] == "iteration" and "iteration" in metrics
    assert metrics["cut/total"]["summary"] == {"min": True, "last": True}
    assert metrics[layer]["summary"] == {"min": True, "last": True}
    assert metrics["selector/accuracy"]["summary"] == {"max": True, "mean": True}
    assert metrics["t"]["summary"] == {"none": True}
    assert "score/grad_norm" not in metrics  # its last value, by the glob
    assert all(m["step_metric"] == "iteration" for name, m in metrics.items() if name != "iteration")

    summary = logged["summary"]
    assert summary["cut/total"] == {"min": 1.0, "last": 3.0}  # logged out of order: last is the last logged
    assert summary["selector/accuracy"] == {"max": 0.9, "mean": pytest.approx(0.75)}
    assert summary["selector/loss"] == {"min": 0.5, "last": 0.5}
    assert summary["score/grad_norm"] == 0.7 and "t" not in summary
    rows = [row for row in logged["history"] if "score/grad_norm" in row]
    assert [row["iteration"] for row in rows] == [2, 1]
    [snapshot] = [row for row in logged["history"] if "snapshot/_type" in row]
    assert snapshot["iteration"] == 2 and snapshot["snapshot/caption"] == "iteration 2: a cat → a dog"
    assert logged["config"]["code_version"] == code_version()
    assert logged["config"]["method"] == {"name": "cpds"}


def test_result_caption_names_the_scores_it_has():
    assert result_caption({"clip": 0.25123, "lpips": 0.1}) == "source | result, CLIP 0.2512, LPIPS 0.1000"
    assert result_caption({"clip": None, "lpips": None}) == "source | result"


def test_the_code_version_is_the_commit_and_marks_a_changed_checkout(tmp_path):
    assert git_commit(tmp_path) is None  # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout
    assert git_commit(tmp_path) == head[:7]
    (tmp_path / "untracked.txt").write_text("not part of the code\n")
    assert git_commit(tmp_path) == head[:7]
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == f"{head[:7]}+dirty"
    assert code_version()["version"] == __import__("cpds_exp").__version__


@pytest.mark.parametrize("verbose", [False, True])
def test_runs_are_silent_unless_verbose(tmp_path, capfd, monkeypatch, verbose):
    import wandb

    monkeypatch.delenv("WANDB_SILENT", raising=False)
    wandb.teardown()  # W&B reads WANDB_SILENT when its service starts
    logger = WandbLogger(mode="offline", run_dir=str(tmp_path), verbose=verbose)
    logger.log_metrics({"iteration": 1, "t": 3})
    logger.finish()
    finished_run_file(tmp_path)
    printed = "".join(capfd.readouterr())
    assert ("wandb: Run summary" in printed) == verbose
    assert ("wandb:" in printed) == verbose


def built_benchmark(tmp_path: Path) -> Path:
    """A two-image benchmark (the builder's fake embedder): its manifest."""
    from cpds_exp.tools.laion_benchmark import build_benchmark

    metadata, images, embedder = _laion(tmp_path)
    build_benchmark(images, QUERY, 2, tmp_path / "bench", metadata, embedder, target_prompt="a photo of a dog")
    return tmp_path / "bench" / "manifest.csv"


def test_the_benchmark_script_logs_a_dataset_artifact_and_names_it_beside_the_manifest(tmp_path, monkeypatch,
                                                                                        capsys):
    metadata, images, embedder = _laion(tmp_path)
    monkeypatch.setattr("cpds_exp.tools.laion_benchmark.ClipEmbedder", lambda *args: embedder)
    out = tmp_path / "bench"
    monkeypatch.setattr(sys, "argv", ["build_benchmark.py", "--images", str(images), "--metadata", str(metadata),
                                      "--query", QUERY, "--top", "2", "--out", str(out),
                                      "--wandb", "--mode", "offline"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / "build_benchmark.py"), run_name="__main__")
    assert exit_.value.code == 0, capsys.readouterr().err
    named = json.loads((out / ARTIFACT_FILE).read_text())
    assert named["reference"] in capsys.readouterr().out
    logged = read_run(finished_run_file(out))
    [artifact] = logged["artifacts"]
    assert artifact["type"] == "dataset" and artifact["name"] == named["name"] == "dataset-bench"
    assert artifact["files"] == ["0001_good_best.png", "0002_good_second.png", "manifest.csv", "selection.csv"]
    assert artifact["digest"] == named["digest"] and artifact["aliases"] == sorted(["latest", named["alias"]])
    assert named["reference"] == f"cpds-exp/dataset-bench:digest-{named['digest']}"
    assert logged["run"]["job_type"] == "dataset"


def test_a_bad_wandb_mode_stops_the_benchmark_script_before_any_work(tmp_path, monkeypatch, capsys):
    metadata, images, _ = _laion(tmp_path)
    monkeypatch.setattr(sys, "argv", ["build_benchmark.py", "--images", str(images), "--metadata", str(metadata),
                                      "--query", QUERY, "--out", str(tmp_path / "bench"), "--wandb", "--mode", "later"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "scripts" / "build_benchmark.py"), run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: logger.mode='later' is unknown: use auto, online, offline "
                                               "or disabled")
    assert not (tmp_path / "bench").exists()


def test_a_runs_dataset_artifact_is_the_one_named_beside_its_manifest(tmp_path):
    manifest_path = tmp_path / "manifest.csv"
    manifest_path.write_text("image,source_prompt,target_prompt\n")
    assert dataset_artifact({"dataset": {"path": str(manifest_path)}}) is None  # nothing named
    named = {"name": "dataset-x", "manifest": "manifest.csv", "reference": "cpds-exp/dataset-x:digest-0"}
    (tmp_path / ARTIFACT_FILE).write_text(json.dumps(named))
    assert dataset_artifact({"dataset": {"path": str(manifest_path)}}) == named
    assert dataset_artifact({"dataset": {"path": str(tmp_path / "other.csv")}}) is None  # no such file
    (tmp_path / "other.csv").write_text("image,source_prompt,target_prompt\n")
    assert dataset_artifact({"dataset": {"path": str(tmp_path / "other.csv")}}) is None  # names another manifest
    assert dataset_artifact({"dataset": {"name": "sample"}}) is None
    (tmp_path / ARTIFACT_FILE).write_text("{not json")
    with pytest.raises(CpdsError, match=f"{ARTIFACT_FILE} does not name an artifact.*delete the file"):
        dataset_artifact({"dataset": {"path": str(manifest_path)}})


class StubRun:
    """What declare_dataset needs of a W&B run; records what it was asked."""

    def __init__(self, offline: bool, fails: Exception | None = None):
        self.offline, self.fails, self.used = offline, fails, []

    def use_artifact(self, reference, type):
        if self.fails:
            raise self.fails
        self.used.append((reference, type))


def test_online_runs_use_the_dataset_artifact_and_a_missing_one_is_a_warning(caplog):
    import wandb

    named = {"reference": "cpds-exp/dataset-x:digest-0"}
    online, offline = StubRun(offline=False), StubRun(offline=True)
    declare_dataset(online, named)
    declare_dataset(offline, named)
    assert online.used == [("cpds-exp/dataset-x:digest-0", "dataset")] and offline.used == []
    declare_dataset(StubRun(offline=False, fails=wandb.errors.CommError("artifact not found")), named)
    assert "cannot use the dataset artifact cpds-exp/dataset-x:digest-0 (artifact not found)" in caplog.text


def test_a_sweep_without_a_name_is_a_group_its_runs_are_silent_captioned_and_name_their_dataset(tmp_path):
    manifest_path = built_benchmark(tmp_path)
    named = log_dataset(manifest_path, mode="offline")
    finished_run_file(manifest_path.parent)  # the dataset's run is written before the sweep reads its name
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "-m", "method=cds", "model=tiny", "metrics=random",
                           "logger=wandb", "iterations=2", "snapshot_every=1", "progress=false", "dataset=manifest",
                           f"dataset.path={manifest_path}", "dataset.limit=1",
                           f"hydra.sweep.dir={tmp_path / 'my-sweep'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb:" not in proc.stdout + proc.stderr  # no banner, no per-run summary
    [run_file] = (tmp_path / "my-sweep").rglob("run-*.wandb")  # the child process has exited: it is complete
    logged = read_run(run_file)
    assert logged["run"] == {"group": "my-sweep", "job_type": "cds"}
    assert logged["config"]["dataset_artifact"]["reference"] == named["reference"]
    [snapshot] = [row for row in logged["history"] if "snapshot/_type" in row]
    assert snapshot["snapshot/caption"] == "iteration 1: a photo of a cat → a photo of a dog"
    record = json.loads(next((tmp_path / "my-sweep").rglob("summary.json")).read_text())
    [result] = [row for row in logged["history"] if "result/_type" in row]
    assert result["iteration"] == 2
    assert result["result/caption"] == f"source | result, CLIP {record['clip']:.4f}, LPIPS {record['lpips']:.4f}"

"""Sweeps over dataset shards with the joblib and submitit-local launchers; a dead job is refilled."""
import os
import shutil
from collections import Counter

import pytest
from omegaconf import OmegaConf

from cpds_exp.app import job_device, run_name
from cpds_exp.data import EditItem
from cpds_exp.evaluation.report import build_report, load_records
from test_cli import run_py
from test_datasets import make_photos

LAUNCHERS = {"joblib": ("hydra/launcher=parallel", "hydra.launcher.n_jobs=2"),
             "submitit": ("hydra/launcher=local", "hydra.launcher.gpus_per_node=0")}


def sharded_sweep(launcher, photos, sweep, cwd):
    return run_py("-m", *LAUNCHERS[launcher], "num_shards=2", "shard=range(2)", "method=dds,cds", "dataset=cats",
                  f"dataset.path={photos}", "task=cat2cow", "model=tiny", "metrics=random", "logger=none",
                  "iterations=2", "progress=false", f"hydra.sweep.dir={sweep}", cwd=cwd)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_sharded_sweep_edits_everything_once_and_merges(tmp_path, launcher):
    photos = make_photos(tmp_path / "cats", count=3)
    sweep = tmp_path / "sweep"
    proc = sharded_sweep(launcher, photos, sweep, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = load_records(sweep)
    counts = Counter((r["image"], r["task"], r["method"]) for r in records if r["status"] == "done")
    assert counts == {(f"cat{i}", "cat2cow", m): 1 for i in range(3) for m in ("dds", "cds")}
    job_dirs = {r["_dir"].split("/")[-3] for r in records}
    assert len(job_dirs) == 2 and not any("shard" in d for d in job_dirs)  # the shards of a job share its folder
    report = build_report(sweep)
    assert report["table"][["method", "n"]].values.tolist() == [["dds", 3], ["cds", 3]]

    if launcher == "joblib":  # an edit lost with its folder: the re-run fills exactly that gap
        [job] = [p for p in sweep.iterdir() if "method=cds" in p.name]
        dead = job / "edits" / "cat0"
        survivors = {p: os.stat(p).st_mtime_ns for p in sweep.rglob("result.png") if dead not in p.parents}
        shutil.rmtree(dead)
        again = sharded_sweep(launcher, photos, sweep, tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        assert all(os.stat(p).st_mtime_ns == stamp for p, stamp in survivors.items())
        assert len([r for r in load_records(sweep) if r["status"] == "done"]) == 6


def test_run_name_shows_method_selector_task_and_shard():
    cfg = OmegaConf.create({"method": {"name": "cpds", "terms": {"score": {}, "cut": {}}}, "selector": {"name": "meta"},
                            "num_shards": 8, "shard": 3})
    item = EditItem("cat7", "a cat", "a pig", task="cat2pig")
    assert run_name(cfg, item) == "cpds-meta-cat2pig-shard3of8-cat7"
    cfg.num_shards = 1
    del cfg.method.terms["cut"]
    assert run_name(cfg, item) == "cpds-cat2pig-cat7"


def test_parallel_jobs_spread_over_gpus(monkeypatch):
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    class Job:
        num = 5

    class FakeHydra:
        mode = RunMode.MULTIRUN
        job = Job

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: FakeHydra))
    assert job_device("auto") == "cuda:1"
    assert job_device("cuda:0") == "cuda:0"
    FakeHydra.mode = RunMode.RUN
    assert job_device("auto") == "auto"


def test_bad_shard_is_one_line(compose_config, tmp_path):
    from cpds_exp.app import run
    from cpds_exp.errors import CpdsError

    with pytest.raises(CpdsError, match="need 0 <= shard < num_shards"):
        run(compose_config("model=tiny", "metrics=random", "logger=none", "num_shards=2", "shard=2"), tmp_path)


def test_slurm_launcher_config_requeues_and_has_the_usual_knobs():
    from hydra import compose, initialize_config_dir

    from cpds_exp.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "+experiment=table1"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.max_num_timeout == 3
    assert {"timeout_min", "array_parallelism", "cpus_per_task", "mem_gb"} <= set(launcher)
    assert cfg.hydra.sweeper.params.method == "dds,cds,pds,cpds"

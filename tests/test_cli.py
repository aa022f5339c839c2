"""End to end, as a user runs it: `python run.py ...` in a subprocess, with W&B offline."""
import json
import os
import subprocess
import sys

import pytest

from conftest import OFFLINE_ENV, REPO
from wandb_offline import finished_run_file, read_run

METHODS = ("dds", "pds", "cds", "cpds")


def child_env() -> dict[str, str]:
    """The environment of a child process: offline, and with its own W&B service (not this
    process's), so that the child's exit means its W&B files are whole."""
    env = {**os.environ, **OFFLINE_ENV}
    env.pop("WANDB_SERVICE", None)
    return env


def run_py(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=600)


def run_with_user_config(tmp_path, group: str, name: str, yaml: str, *overrides) -> dict:
    """`python run.py <group>=<name> ...` with that option's yaml in a config folder of the user's
    (hydra.searchpath) and the tests folder importable (classes defined in test modules); the record."""
    (tmp_path / "conf" / group).mkdir(parents=True)
    (tmp_path / "conf" / group / f"{name}.yaml").write_text(yaml)
    out = tmp_path / "run"
    env = {**child_env(), "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), f"{group}={name}", "model=tiny", "metrics=random",
                           "logger=none", "progress=false", *overrides, f"hydra.run.dir={out}",
                           f"hydra.searchpath=[file://{tmp_path / 'conf'}]"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def start_run_py(*args, cwd):
    """`python run.py ...` in the background, stdout and stderr merged, read line by line."""
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=child_env())


def read_until(proc, text: str, count: int = 1) -> list[str]:
    """Lines of ``proc`` up to the ``count``-th holding ``text`` (a blocking read: an event, not a timer)."""
    lines, seen = [], 0
    for line in proc.stdout:
        lines.append(line)
        seen += text in line
        if seen == count:
            return lines
    raise AssertionError(f"the process ended before printing {text!r} {count}x:\n{''.join(lines)[-3000:]}")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One multirun over the four methods with the W&B logger (offline)."""
    root = tmp_path_factory.mktemp("sweep")
    proc = run_py("-m", f"method={','.join(METHODS)}", "model=tiny", "metrics=random", "logger=wandb", "iterations=4",
                  "snapshot_every=2", "selector=meta", "selector.train_every=2", "progress=false",
                  f"hydra.sweep.dir={root}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def job_dir(sweep, method):
    """The job folder of a method: the sweep names job folders by their overrides."""
    [folder] = [p for p in sweep.iterdir() if f"method={method}," in p.name + ","]
    return folder


@pytest.mark.parametrize("method", METHODS)
def test_every_method_writes_its_outputs(sweep, method):
    out = job_dir(sweep, method)
    for name in ("source.png", "result.png", "side_by_side.png", "summary.json", "config.yaml",
                 "snapshots/iter_0002.png"):
        assert (out / name).is_file(), f"{method}: {name}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["status"] == "done"
    assert summary["lr"] == {"dds": 0.1, "cds": 0.1, "pds": 0.8, "cpds": 0.8}[method]
    assert ("cut/total" in summary["final"]) == (method in ("cds", "cpds"))


@pytest.mark.parametrize("method", METHODS)
def test_offline_wandb_run_holds_the_logged_keys(sweep, method):
    logged = read_run(finished_run_file(job_dir(sweep, method)))
    assert logged["config"]["method"]["name"] == method
    assert logged["config"]["lr"] is None and logged["config"]["iterations"] == 4
    steps = [row for row in logged["history"] if "score/grad_norm" in row]
    assert [row["iteration"] for row in steps] == [1, 2, 3, 4]
    keys = set().union(*steps)
    assert {"t", "score/grad_norm", "time/iteration_s"} <= keys
    cut_layers = {k for k in keys if k.startswith("cut/up_blocks.")}
    selector_keys = {"selector/loss", "selector/positive_rate", "selector/train_time_s", "selector/select_time_s",
                     "selector/accuracy", "selector/balanced_accuracy"}
    every_key = set().union(*logged["history"])
    if method in ("cds", "cpds"):
        assert "cut/total" in keys and len(cut_layers) == 4
        assert selector_keys <= every_key
        assert [row["selector/round"] for row in logged["history"] if "selector/round" in row] == [1, 2]
        assert "selector_mean/accuracy" in logged["summary"]
    else:
        assert not cut_layers and not selector_keys & every_key
    assert "snapshot/_type" in every_key and "result/_type" in every_key
    assert "final/score/grad_norm" in logged["summary"]


def test_bad_image_is_one_line_on_stderr(tmp_path):
    proc = run_py("model=tiny", "metrics=random", "logger=none", "dataset=single", "dataset.image=missing.jpg",
                  "dataset.source_prompt=a cat", "dataset.target_prompt=a dog", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: image 'missing.jpg' does not exist: check dataset.image"


def test_unreachable_metric_weights_are_one_line_before_any_model_loads(tmp_path):
    proc = run_py("logger=none", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load CLIP ViT-B-16-quickgelu with 'openai' weights") and "metrics=random" in last


def test_unreachable_model_is_one_line_suggesting_tiny(tmp_path):
    proc = run_py("logger=none", "metrics=none", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load model 'CompVis/stable-diffusion-v1-4'") and "model=tiny" in last


def test_batched_edits_log_one_wandb_run_each(compose_config, tmp_path):
    from cpds_exp.app import run
    from test_datasets import make_photos

    photos = make_photos(tmp_path / "cats", count=2)
    run(compose_config("model=tiny", "metrics=random", "logger=wandb", "iterations=4", "progress=false",
                       "method=cds", "dataset=cats", f"dataset.path={photos}", "batch_size=2", "log_every=3"),
        tmp_path / "out")
    for name in ("cat0", "cat1"):
        logged = read_run(finished_run_file(tmp_path / "out/edits" / name))  # W&B ran in this process
        assert [row["iteration"] for row in logged["history"] if "cut/total" in row] == [1, 2, 3, 4]
        assert logged["summary"]["metrics/clip"] is not None


def test_a_sweep_with_failed_jobs_exits_2_after_running_the_others(tmp_path):
    proc = run_py("-m", "model=tiny", "metrics=random", "logger=none", "iterations=1", "progress=false",
                  "lr=0.1,-1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: 1 job(s) of the sweep failed" in proc.stderr.strip().splitlines()[-1]
    assert len(list((tmp_path / "sweep").rglob("result.png"))) == 1

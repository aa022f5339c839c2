"""Hyper-parameter search: the objective expression, and `+experiment=lr_search` driving Optuna
through the real CLI (two trials on the tiny model with random-weight metrics)."""
import json
import math

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import REPO
from cpds_exp.errors import CpdsError
from cpds_exp.evaluation.objective import BASIC_SWEEPER, compile_objective, job_objective, mean_scores
from cpds_exp.naming import job_folder
from test_cli import run_py

OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
#: two quick trials of the search as shipped, on the bundled photograph
TRIALS = ("+experiment=lr_search", "dataset=sample", "model=tiny", "metrics=random", "logger=none", "iterations=2",
          "progress=false", "hydra.sweeper.n_trials=2")


@pytest.mark.parametrize("expression,value", [
    ("clip - lpips", 0.5), ("clip - 2 * lpips", 0.25), ("(clip + lpips) / 4", 0.25), ("-lpips", -0.25),
    ("+clip * 2 - 1", 0.5), ("3", 3.0), ("clip / (lpips - 0.25)", math.nan)])
def test_objective_is_arithmetic_of_the_mean_scores(expression, value):
    result = compile_objective(expression)({"clip": 0.75, "lpips": 0.25})  # exact in binary
    assert result == value or (math.isnan(value) and math.isnan(result))


@pytest.mark.parametrize("expression,named", [
    ("clip - LPIPS", "'LPIPS'"), ("__import__('os').getpid()", "__import__"), ("clip.real", "clip.real"),
    ("clip ** 2", "operator Pow"), ("clip // lpips", "operator FloorDiv"), ("max(clip, lpips)", "max"), ("clip if lpips else 0", "if"), ("True", "True"),
    ("'clip'", "'clip'"), ("clip -", "not an arithmetic expression"), ("", "not an arithmetic expression")])
def test_objective_refuses_anything_but_arithmetic_of_clip_and_lpips(expression, named):
    with pytest.raises(CpdsError) as err:
        compile_objective(expression)
    message = str(err.value)
    assert message.startswith(f"objective={expression!r}") and named in message
    assert "clip and lpips" in message and "\n" not in message


def test_mean_scores_count_only_finished_edits():
    records = [{"status": "done", "clip": 0.5, "lpips": 0.25}, {"status": "done", "clip": 0.25, "lpips": 0.75},
               {"status": "diverged", "clip": None, "lpips": None}, {"status": "skipped"}]
    assert mean_scores(records) == {"clip": 0.375, "lpips": 0.5}
    assert all(math.isnan(v) for v in mean_scores(records[2:]).values())  # nothing finished


def test_job_objective_needs_metrics_only_under_an_optimising_sweeper(compose_config):
    records = [{"status": "done", "clip": 0.75, "lpips": 0.25}]
    assert job_objective(compose_config("metrics=random"), OPTUNA)(records) == 0.5
    diverged = [{"status": "diverged", "clip": None, "lpips": None}]
    assert job_objective(compose_config("metrics=random"), OPTUNA)(diverged) is None  # a failed trial, not NaN
    assert job_objective(compose_config("metrics=random", "objective=clip"), BASIC_SWEEPER)(records) == 0.75
    no_metrics = compose_config("metrics=none")
    assert job_objective(no_metrics, BASIC_SWEEPER)(records) is None  # a plain run or grid sweep: fine
    with pytest.raises(CpdsError, match=r"^objective='clip - lpips' needs CLIP and LPIPS but metrics=none"):
        job_objective(no_metrics, OPTUNA)


def test_the_objective_changes_neither_fingerprints_nor_folders():
    from cpds_exp.schema import NON_SEMANTIC_KEYS

    assert "objective" in NON_SEMANTIC_KEYS
    assert job_folder(["objective=clip", "lr=0.5"]) == "lr=0.5"


def trial_objectives(sweep):
    """Each trial's folder name → (lr, w_cut, clip - lpips recomputed from its summary.json)."""
    trials = {}
    for path in sweep.glob("*/summary.json"):
        record = json.loads(path.read_text())
        trials[path.parent.name] = (record["lr"], record["w_cut"], record["clip"] - record["lpips"])
    return trials


def search_space():
    """The intervals of conf/experiment/lr_search.yaml, parsed as Hydra parses them."""
    params = yaml.safe_load((REPO / "conf/experiment/lr_search.yaml").read_text())["hydra"]["sweeper"]["params"]
    parser = OverridesParser.create()
    return {key: parser.parse_override(f"{key}={value}").value() for key, value in params.items()}


def test_lr_search_runs_optuna_trials_and_reports_the_best(tmp_path):
    sweep = tmp_path / "search"
    proc = run_py(*TRIALS, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = trial_objectives(sweep)
    assert len(trials) == 2  # one job folder per trial, named by its lr and w_cut
    assert all("lr=" in name and "w_cut=" in name for name in trials)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = results["best_params"]
    space = search_space()
    assert set(best) == set(space) == {"lr", "w_cut"}
    for key, interval in space.items():
        assert interval.start <= best[key] <= interval.end
    assert "log" in space["lr"].tags
    best_trial = [value for lr, w_cut, value in trials.values() if (lr, w_cut) == (best["lr"], best["w_cut"])]
    assert best_trial == [pytest.approx(results["best_value"], abs=1e-9)]
    assert results["best_value"] == pytest.approx(max(value for *_, value in trials.values()), abs=1e-9)


def test_a_failed_trial_fails_the_search_after_the_other_trials(tmp_path):
    """The failed job returns None, as a job whose edits all diverged does: Optuna records a failed
    trial and goes on; the sweep's FAILED files then end it with status 2."""
    sweep = tmp_path / "search"
    proc = run_py(*TRIALS, "lr=choice(-1.0,0.5)", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(folders) == 2 and sum("lr=-1.0," in name for name in folders) == 1, folders  # seeded: both values
    assert proc.returncode == 2
    failed = next(name for name in folders if "lr=-1.0," in name)
    assert (sweep / failed / "FAILED").is_file() and not (sweep / failed / "summary.json").exists()
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: 1 job(s) of the sweep failed, e.g. {failed}: lr=-1.0")
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    [(lr, _, value)] = trial_objectives(sweep).values()
    assert results["best_params"]["lr"] == lr == 0.5 and results["best_value"] == pytest.approx(value, abs=1e-9)


def test_a_search_without_metrics_stops_before_any_edit(tmp_path):
    sweep = tmp_path / "search"
    proc = run_py(*TRIALS, "metrics=none", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: objective='clip - lpips' needs CLIP and LPIPS")
    assert not list(sweep.rglob("summary.json")) and not list(sweep.rglob("source.png"))


def test_a_search_whose_every_trial_diverges_ends_in_one_line(tmp_path):
    """Optuna records a trial without an objective as failed; with none left to call best it raised."""
    proc = run_py(*TRIALS, "hydra.sweeper.n_trials=1", "hydra.sweeper.params.lr='tag(log,interval(1e30,1e31))'",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and "NaN/Inf" in lines[0]  # the trial's own line, then the search's
    assert lines[1].startswith("error: no trial of the search has an objective value")
    assert "Traceback" not in proc.stderr
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json")]
    assert record["status"] == "diverged"

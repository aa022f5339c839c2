"""The debug group: debug=fast runs any config offline in seconds, debug=profile leaves a trace."""
import json

from cpds_exp.app import run
from test_cli import run_py


def test_debug_fast_runs_offline_from_the_command_line(tmp_path):
    proc = run_py("debug=fast", "method=cds", "selector=knn", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (record["model"], record["iterations"], record["selector"]) == ("tiny", 4, "knn")
    assert (tmp_path / "out" / "snapshots" / "iter_0002.png").is_file()


def test_debug_profile_writes_a_trace_and_a_summary(compose_config, tmp_path):
    cfg = compose_config("debug=profile", "model=tiny", "metrics=random", "logger=none", "iterations=2",
                         "progress=false", "n_patches=8")
    [record] = run(cfg, tmp_path)
    assert record["status"] == "done"
    trace = json.loads((tmp_path / "profile" / "trace.json").read_text())
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    assert "Self CPU" in (tmp_path / "profile" / "summary.txt").read_text()


def test_a_sweep_over_selectors_sets_their_training_options(tmp_path):
    """The sweep's base config (selector=random) has the training keys too: the schema gives every
    selector option them, so the override applies to each job."""
    proc = run_py("-m", "debug=fast", "method=cds", "selector=meta,knn", "selector.train_every=2",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/summary.json"))]
    assert [r["selector"] for r in records] == ["knn", "meta"]
    assert all([round["iteration"] for round in r["selector_rounds"]] == [1, 3] for r in records)

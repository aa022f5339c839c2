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

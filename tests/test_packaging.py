"""The package installs anywhere: a wheel (not an editable install) carries its configs, and its
console script runs an edit from an empty folder."""
import subprocess
import sys

from conftest import REPO
from test_cli import child_env


def test_a_wheel_carries_its_configs_and_runs_from_an_empty_folder(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("cpds_exp-*.whl")
    site = tmp_path / "site"  # the package alone, outside the checkout; its dependencies are this venv's
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    assert (site / "cpds_exp" / "conf" / "config.yaml").is_file() and not (site / "conf").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([str(site / "bin" / "cpds-exp"), "model=tiny", "metrics=random", "iterations=2",
                           "logger=none", "progress=false"], cwd=empty, capture_output=True, text=True,
                          env={**child_env(), "PYTHONPATH": str(site)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [result] = empty.glob("outputs/runs/*/*/result.png")
    assert str(site / "cpds_exp" / "conf") in (result.parent / ".hydra" / "hydra.yaml").read_text()

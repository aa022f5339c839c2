"""A patch selector defined outside the package runs through `python run.py` by config alone: one
class (below) and one selector yaml in a folder of the user's, added with hydra.searchpath."""
import json
import os
import subprocess
import sys

import torch

from conftest import REPO
from cpds_exp.editing.selectors import PatchSelector
from test_cli import child_env

SELECTOR_YAML = """\
name: corner
_target_: test_new_selector.CornerSelector
margin: 0
"""


class CornerSelector(PatchSelector):
    """Always the n positions after ``margin`` (wrapping around the grid): deterministic."""

    def __init__(self, seed: int = 0, margin: int = 0):
        super().__init__(seed)
        self.margin = margin

    def select(self, features: torch.Tensor, n: int) -> torch.Tensor:
        count = features.shape[0]  # (N, C): one row per position
        return (torch.arange(min(n, count), device=features.device) + self.margin) % count


def test_a_selector_defined_in_a_test_module_runs_from_the_cli(tmp_path):
    (tmp_path / "conf" / "selector").mkdir(parents=True)
    (tmp_path / "conf" / "selector" / "corner.yaml").write_text(SELECTOR_YAML)
    out = tmp_path / "run"
    env = {**child_env(), "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "method=cds", "selector=corner", "selector.margin=2",
                           "model=tiny", "metrics=random", "logger=none", "iterations=2", "progress=false",
                           "n_patches=4", f"hydra.run.dir={out}", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["selector"], summary["status"]) == ("corner", "done") and summary["final"]["cut/total"] > 0

"""A score term defined outside the package runs through `python run.py` by config alone: one
class (below) and one method yaml in a folder of the user's, added with hydra.searchpath."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from conftest import REPO
from cpds_exp.scores import dds_grad, score_scale
from cpds_exp.editing.step import Step
from cpds_exp.editing.terms import ScoreTerm, TermOutput
from test_cli import child_env

METHOD_YAML = """\
defaults:
  - /term@terms.score: dds
  - _self_
name: clipped_dds
lr: 0.1
terms:
  score:
    _target_: test_new_term.ClippedDDSTerm
    clip: 0.01
"""


@dataclass
class ClippedDDSTerm(ScoreTerm):
    """DDS with g clipped elementwise to ±clip; logs the share of clipped elements."""

    name: ClassVar[str] = "clipped_dds"
    clip: float = 1.0

    def gradient(self, step: Step) -> torch.Tensor:
        return dds_grad(step.pred.eps_src, step.pred.eps_trg).clamp(-self.clip, self.clip)

    def __call__(self, step: Step) -> TermOutput:
        output = super().__call__(step)
        clipped = dds_grad(step.pred.eps_src, step.pred.eps_trg).abs() > self.clip
        output.stats["clipped/fraction"] = clipped.flatten(1).float().mean(dim=1)
        return output


def test_a_score_term_defined_in_a_test_module_runs_from_the_cli(tmp_path):
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "clipped_dds.yaml").write_text(METHOD_YAML)
    out = tmp_path / "run"
    env = {**child_env(), "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "method=clipped_dds", "model=tiny", "metrics=random",
                           "logger=none", "iterations=3", "progress=false", f"hydra.run.dir={out}",
                           f"hydra.searchpath=[file://{tmp_path / 'conf'}]"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["method"], summary["score"], summary["cut"], summary["status"]) == ("clipped_dds", "clipped_dds",
                                                                                          False, "done")
    assert 0 < summary["final"]["clipped/fraction"] <= 1
    # |g| <= clip everywhere: the logged norm is bounded by scale · clip · √(elements of an 8×8×4 latent)
    assert 0 < summary["final"]["score/grad_norm"] <= score_scale(8, 8) * 0.01 * (4 * 8 * 8) ** 0.5


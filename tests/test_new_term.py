"""A score term defined outside the package runs through `python run.py` by config alone: one
class (below) and one method yaml in a folder of the user's, added with hydra.searchpath."""
from dataclasses import dataclass
from typing import ClassVar

import torch

from cpds_exp.scores import dds_grad, score_scale
from cpds_exp.editing.step import Step
from cpds_exp.editing.terms import ScoreTerm, TermOutput
from test_cli import run_with_user_config

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
    summary = run_with_user_config(tmp_path, "method", "clipped_dds", METHOD_YAML, "iterations=3")
    assert (summary["method"], summary["score"], summary["cut"], summary["status"]) == ("clipped_dds", "clipped_dds",
                                                                                          False, "done")
    assert 0 < summary["final"]["clipped/fraction"] <= 1
    # |g| <= clip everywhere: the logged norm is bounded by scale · clip · √(elements of an 8×8×4 latent)
    assert 0 < summary["final"]["score/grad_norm"] <= score_scale(8, 8) * 0.01 * (4 * 8 * 8) ** 0.5


"""A patch selector defined outside the package runs through `python run.py` by config alone: one
class (below) and one selector yaml in a folder of the user's, added with hydra.searchpath."""
import torch

from cpds_exp.editing.selectors import PatchSelector
from test_cli import run_with_user_config

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
    summary = run_with_user_config(tmp_path, "selector", "corner", SELECTOR_YAML, "method=cds", "selector.margin=2",
                                   "iterations=2", "n_patches=4")
    assert (summary["selector"], summary["status"]) == ("corner", "done") and summary["final"]["cut/total"] > 0

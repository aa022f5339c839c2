"""Small builders shared by the tests."""
from __future__ import annotations

import functools

import torch

from cpds_exp.editor import EditSettings, Editor
from cpds_exp.selectors import RandomSelector


def make_editor(stack, **settings) -> Editor:
    """An editor with the published defaults, quiet, and whatever settings a test overrides."""
    settings.setdefault("progress", False)
    seed = settings.get("seed", 0)
    return Editor(stack, EditSettings(**settings), functools.partial(RandomSelector, seed=seed),
                  functools.partial(torch.optim.SGD))


def make_image(seed: int = 0, size: int = 64) -> torch.Tensor:
    """A smooth random image in [−1, 1], (1, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear") * 2 - 1

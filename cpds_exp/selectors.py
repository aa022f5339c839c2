"""Patch selectors for the CUT loss: which n of N positions PatchNCE contrasts (SPEC §4)."""
from __future__ import annotations

import torch


class PatchSelector:
    """Chooses n distinct positions from (N, C) normalised source features."""

    def select(self, features: torch.Tensor, n: int) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, features: torch.Tensor, n: int) -> torch.Tensor:
        return self.select(features, n)


class RandomSelector(PatchSelector):
    """The published default: n positions drawn uniformly without replacement."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, features: torch.Tensor, n: int) -> torch.Tensor:
        count = features.shape[0]
        return torch.randperm(count, generator=self.generator)[: min(n, count)].to(features.device)

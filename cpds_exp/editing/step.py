"""What one iteration shares with every loss term: the row-wise random draws, the UNet's
predictions and the latents (SPEC §2, steps 1–3). Kept apart so the editor and the terms both
depend on it and not on each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from cpds_exp.scores import NoiseSchedule


class RowRandom:
    """One pair of generators per row: (t, ε) and PDS's ε′ on separate streams, so every method
    draws the same t and ε for a seed and a row never depends on its neighbours."""

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.device = device
        self.main = [torch.Generator(device).manual_seed(2 * s) for s in seeds]
        self.posterior = [torch.Generator(device).manual_seed(2 * s + 1) for s in seeds]

    def timesteps(self, low: int, high: int) -> torch.Tensor:
        return torch.cat([torch.randint(low, high, (1,), generator=g, device=self.device) for g in self.main])

    def noise(self, shape: Sequence[int], posterior: bool = False) -> torch.Tensor:
        generators = self.posterior if posterior else self.main
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=self.device) for g in generators])


@dataclass
class Prediction:
    """Guidance-combined noise predictions at z_t and the captured features of one iteration."""

    eps_src: torch.Tensor
    eps_trg: torch.Tensor
    ref_feats: list[torch.Tensor] = field(default_factory=list)
    trg_feats: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Step:
    """One iteration as the terms see it: clean latents (``z_trg`` is optimised), the ε and t that
    noised both, the predictions, the rows' random streams and the noise schedule."""

    z_src: torch.Tensor
    z_trg: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    pred: Prediction
    random: RowRandom
    scheduler: NoiseSchedule

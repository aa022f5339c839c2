"""Loss terms: a method is the sum of its terms (SPEC §2 steps 4–5), each built from a config node.

A term is a dataclass whose fields are its typed options (``conf/term/*.yaml`` sets them from the
top-level knobs). The editor evaluates the UNet once per iteration and calls every term with the
shared :class:`~cpds_exp.editing.step.Step`; a term answers with named losses (summed and backpropagated)
and per-row statistics (logged under their names), as threestudio's guidance modules do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch

from cpds_exp.errors import CpdsError
from cpds_exp.editing.features import FeatureCapture
from cpds_exp.scores import dds_grad, pds_dds_ratio, pds_grad, score_scale
from cpds_exp.editing.selector_training import SelectorTraining
from cpds_exp.editing.selectors import PatchSelector, RandomSelector
from cpds_exp.editing.step import Step
from cpds_exp.records import SCORE_GRAD_NORM


@dataclass
class TermOutput:
    """Scalar losses to add to the objective, and (B,) statistics to log, both by name."""

    losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]


@dataclass
class TermContext:
    """What an editor lends its terms once: the UNet (before compilation, so hooks can go in) and
    the run's patch selectors (the ``selector`` group), for terms that pick patches."""

    unet: torch.nn.Module
    make_selector: Callable[..., PatchSelector] = RandomSelector
    selector_training: SelectorTraining = field(default_factory=SelectorTraining)


class Term:
    """A loss term. Subclasses are dataclasses (their fields are the options) and set ``name``."""

    name: ClassVar[str] = "term"

    def check(self, t_min: int) -> None:
        """Refuse run settings the term cannot work with, in one line; called before a model loads."""

    def bind(self, context: TermContext) -> FeatureCapture | None:
        """Adopted by an editor: install what the term needs; return the capture whose features it
        reads (the editor then runs the target-conditional branch with a graph)."""
        return None

    def start(self, seeds: Sequence[int], iterations: int) -> None:
        """A fresh edit of ``len(seeds)`` rows begins."""

    def __call__(self, step: Step) -> TermOutput:
        raise NotImplementedError

    def after_iteration(self, iteration: int) -> dict[int, dict]:
        """Row → record of the work the term did after the optimiser step (selector rounds)."""
        return {}


def require_previous_timestep(t_min: int) -> None:
    """PDS's posterior and λ(t) read ᾱ_{t−1}, which t = 0 does not have."""
    if t_min < 1:
        raise CpdsError(f"t_min={t_min}: PDS and λ(t) weighting need t_min >= 1 (they use t - 1)")


@dataclass
class ScoreTerm(Term):
    """A score-distillation term: its gradient g acts on z_trg as the gradient of
    2000/(h·w) · weight · multiplier · Σ(z_trg · g), g detached (SPEC §2 step 4)."""

    weight: float = 1.0      # w_dds
    multiplier: float = 1.0  # a method's own factor on w_dds (cds_matched: 8)

    def gradient(self, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, step: Step) -> TermOutput:
        g = self.gradient(step).detach()
        scale = score_scale(*step.z_trg.shape[-2:]) * self.weight * self.multiplier
        return TermOutput({"score": scale * (step.z_trg * g).sum()},
                          {SCORE_GRAD_NORM: scale * g.flatten(1).norm(dim=1)})


@dataclass
class DDSTerm(ScoreTerm):
    """DDS; with ``lambda_weighting`` g is multiplied by PDS's λ(t) (matched-step CDS, SPEC §2)."""

    name: ClassVar[str] = "dds"
    lambda_weighting: bool = False

    def check(self, t_min: int) -> None:
        if self.lambda_weighting:
            require_previous_timestep(t_min)

    def gradient(self, step: Step) -> torch.Tensor:
        g = dds_grad(step.pred.eps_src, step.pred.eps_trg)
        if self.lambda_weighting:
            g = g * pds_dds_ratio(step.t, step.t - 1, step.scheduler).to(g).view(-1, 1, 1, 1)
        return g


@dataclass
class PDSTerm(ScoreTerm):
    """PDS in its general form, with a second noise ε′ shared by source and target."""

    name: ClassVar[str] = "pds"

    def check(self, t_min: int) -> None:
        require_previous_timestep(t_min)

    def gradient(self, step: Step) -> torch.Tensor:
        noise_prev = step.random.noise(step.z_src.shape, posterior=True)
        return pds_grad(step.z_src, step.z_trg.detach(), step.noise, noise_prev, step.pred.eps_src,
                        step.pred.eps_trg, step.t, step.t - 1, step.scheduler)

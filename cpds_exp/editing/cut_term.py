"""The CUT (PatchNCE) term of CDS and CPDS (SPEC §3) as a loss term.

It owns everything the CUT loss needs beyond the UNet pass: the capture of the chosen layers'
features, each row's patch selectors, and the training rounds of learning selectors (SPEC §4).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from cpds_exp.cut import TAU, Select, cut_losses
from cpds_exp.editing.features import DEFAULT_CUT_LAYERS, FeatureCapture
from cpds_exp.editing.selector_training import SelectorTrainer
from cpds_exp.editing.step import Step
from cpds_exp.editing.terms import Term, TermContext, TermOutput
from cpds_exp.records import CUT_TOTAL, cut_layer


@dataclass
class RowSelection:
    """A row's patch selection: one function per CUT layer, and the trainer of learning selectors."""

    select: list[Select]
    trainer: SelectorTrainer | None


@dataclass
class CutTerm(Term):
    """w_cut · multiplier · the CUT loss, backpropagated through the UNet into z_trg (SPEC §2 step 5).
    Logs ``cut/total`` and ``cut/<layer>`` per row."""

    name: ClassVar[str] = "cut"
    weight: float = 3.0      # w_cut
    multiplier: float = 1.0  # a method's own factor on w_cut (cds_matched: 8)
    n_patches: int = 256
    patch_sizes: list[int] = field(default_factory=lambda: [1, 2])
    tau: float = TAU
    layers: list[str] = field(default_factory=lambda: list(DEFAULT_CUT_LAYERS))  # glob patterns

    def bind(self, context: TermContext) -> FeatureCapture:
        self.capture = FeatureCapture(context.unet, self.layers)
        self.context = context
        self.rows: list[RowSelection] = []
        return self.capture

    @property
    def layer_names(self) -> list[str]:
        """The attention layers the patterns matched, in forward order."""
        return self.capture.layers

    def start(self, seeds: Sequence[int], iterations: int) -> None:
        self.rows = [self._row_selection(seed, iterations) for seed in seeds]

    def _row_selection(self, seed: int, iterations: int) -> RowSelection:
        """A row's selectors (one per CUT layer, or one shared), wrapped by a trainer when they learn."""
        make, training = self.context.make_selector, self.context.selector_training
        if training.per_layer:
            selectors = [make(seed=seed) for _ in self.layer_names]
        else:
            selectors = [make(seed=seed)] * len(self.layer_names)
        if not selectors[0].learns:
            return RowSelection(list(selectors), None)
        trainer = SelectorTrainer(selectors, training, iterations)
        return RowSelection(trainer.select_functions(), trainer)

    def __call__(self, step: Step) -> TermOutput:
        per_layer = cut_losses(step.pred.ref_feats, step.pred.trg_feats, [row.select for row in self.rows],
                               self.patch_sizes, self.n_patches, self.tau, observe=self._observer())
        stats = {CUT_TOTAL: per_layer.sum(dim=1)}
        stats.update({cut_layer(name): per_layer[:, i] for i, name in enumerate(self.layer_names)})
        return TermOutput({"cut": self.weight * self.multiplier * per_layer.sum()}, stats)

    def _observer(self):
        """Hand each row's pooled features to that row's selector trainer (if any)."""
        if not any(row.trainer for row in self.rows):
            return None

        def observe(layer: int, ref: torch.Tensor, trg: torch.Tensor) -> None:
            for b, row in enumerate(self.rows):
                row.trainer.observe(layer, ref[b: b + 1], trg[b: b + 1])

        return observe

    def after_iteration(self, iteration: int) -> dict[int, dict]:
        """Run the learning selectors' training rounds due after ``iteration``; their records by row."""
        rounds = {b: row.trainer.after_iteration(iteration) for b, row in enumerate(self.rows) if row.trainer}
        return {b: record for b, record in rounds.items() if record is not None}

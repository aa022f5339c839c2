"""Training learning patch selectors during an edit (SPEC §4).

At every CUT evaluation each position's pooled, normalised source feature is kept with its
source–target distance d_i = ‖h_src,i − h_trg,i‖. A training round labels the gathered data, uses
it first to score the selector honestly (it has not seen it yet), then to train it, then drops it.
As in the published code, rounds follow iterations 1, 1 + train_every, … (a learned selector is
used from iteration 2), never the last one, and one threshold labels a selector's round data.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from cpds_exp.cut import Select
from cpds_exp.schema import Positive, SelectorTraining, ThresholdScope
from cpds_exp.editing.selectors import PatchSelector, pad_features


def distance_threshold(distances: torch.Tensor, percentile: float) -> torch.Tensor:
    """The ``percentile``-th percentile of (N,) distances (linear interpolation)."""
    return torch.quantile(distances.float(), percentile / 100.0)


def label_positions(distances: torch.Tensor, threshold: torch.Tensor, positive: Positive) -> torch.Tensor:
    """Boolean labels for distances split at ``threshold``.

    ``dissimilar`` (the published code): d >= threshold is positive, the top 20% at the 80th
    percentile; ``similar`` (the paper's text): d < threshold, the exact complement.
    """
    return distances < threshold if Positive(positive) == Positive.similar else distances >= threshold


def classification_metrics(probability: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean of the per-class recalls present) and the positive rate,
    in float64 so that 4 of 5 reads 0.8 (float32: 0.8000000119)."""
    predicted, labels = probability >= 0.5, labels.bool().to(probability.device)
    recalls = [(predicted[cls] == value).double().mean() for cls, value in ((labels, True), (~labels, False))
               if cls.any()]
    return {"accuracy": (predicted == labels).double().mean().item(),
            "balanced_accuracy": torch.stack(recalls).mean().item(),
            "positive_rate": labels.double().mean().item()}


class SelectorTrainer:
    """Gathers training data from the CUT evaluations and runs the training rounds.

    ``selectors`` has one entry per CUT layer; the same object repeated means one shared selector.
    A trainer serves one edit of ``iterations`` iterations (the editor gives each row its own).
    """

    def __init__(self, selectors: Sequence[PatchSelector], training: SelectorTraining, iterations: int):
        self.selectors = list(selectors)
        self.training = training
        self.iterations = iterations
        self._data: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.selectors]
        self._select_seconds = 0.0
        self.rounds: list[dict[str, float | None]] = []

    def timed(self, selector: PatchSelector) -> Select:
        """``selector.select`` that adds its wall time to the current round's selection time."""

        def select(features: torch.Tensor, n: int) -> torch.Tensor:
            start = time.perf_counter()
            chosen = selector.select(features, n)
            self._select_seconds += time.perf_counter() - start
            return chosen

        return select

    def select_functions(self) -> list[Select]:
        return [self.timed(selector) for selector in self.selectors]

    def observe(self, layer: int, ref: torch.Tensor, trg: torch.Tensor) -> None:
        """Keep (B, N, C) source features and their per-position distances, per image; they are
        labelled at the training round."""
        distances = (ref - trg).norm(dim=-1)
        for features, row in zip(ref, distances):
            self._data[layer].append((features.detach(), row.detach()))

    def _labels(self, distances: list[torch.Tensor]) -> torch.Tensor:
        """One selector's labels for its observations' distances, split at one threshold over all
        of them (scope ``round``: a shared selector's every layer, patch size and iteration of the
        round, as published; a per-layer selector's own layer) or at each one's own percentile."""
        percentile, positive = self.training.percentile, self.training.positive
        if ThresholdScope(self.training.threshold_scope) == ThresholdScope.observation:
            return torch.cat([label_positions(d, distance_threshold(d, percentile), positive) for d in distances])
        everything = torch.cat(distances)
        return label_positions(everything, distance_threshold(everything, percentile), positive)

    def trains_after(self, iteration: int) -> bool:
        """Whether a round follows 1-based ``iteration``: the published code trains when
        i % train_every == 0 counting i from 0, and a round after the last iteration would go unused."""
        return (iteration - 1) % self.training.train_every == 0 and iteration < self.iterations

    def _round_data(self, selector: PatchSelector, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        """The round's (features, labels), zero-padded to the widest layer. A selector with a
        ``max_train_samples`` cap gets its seeded subset *before* padding, so a round at SD scale
        never materialises every position at 1280 channels."""
        labels = self._labels([d for _, d in pairs])
        width = max(features.shape[-1] for features, _ in pairs)
        keep = selector.subsample(len(labels), getattr(selector, "max_train_samples", None))
        if keep is None:
            return torch.cat([pad_features(f, width) for f, _ in pairs]), labels
        keep = keep.sort().values
        chunks, start = [], 0
        for features, _ in pairs:
            local = keep[(keep >= start) & (keep < start + len(features))] - start
            chunks.append(pad_features(features[local.to(features.device)], width))
            start += len(features)
        return torch.cat(chunks), labels[keep.to(labels.device)]

    def after_iteration(self, iteration: int) -> dict[str, float | None] | None:
        """At a round (see :meth:`trains_after`): score, train, drop the data; returns the round's metrics."""
        if not self.trains_after(iteration):
            return None
        groups: dict[int, list[int]] = {}
        for layer, selector in enumerate(self.selectors):
            groups.setdefault(id(selector), []).append(layer)
        measured, losses, train_seconds = [], [], 0.0
        for layers in groups.values():
            selector = self.selectors[layers[0]]
            pairs = [pair for layer in layers for pair in self._data[layer]]
            if not pairs:
                continue
            features, labels = self._round_data(selector, pairs)
            if selector.fitted:
                measured.append(classification_metrics(selector.positive_probability(features), labels))
            else:
                measured.append({"positive_rate": labels.double().mean().item()})
            start = time.perf_counter()
            loss = selector.fit(features, labels)
            train_seconds += time.perf_counter() - start
            if loss is not None:
                losses.append(loss)
        self._data = [[] for _ in self.selectors]

        def mean(key: str) -> float | None:
            values = [m[key] for m in measured if key in m]
            return sum(values) / len(values) if values else None

        record = {"round": len(self.rounds) + 1, "iteration": iteration,
                  "loss": sum(losses) / len(losses) if losses else None,
                  "accuracy": mean("accuracy"), "balanced_accuracy": mean("balanced_accuracy"),
                  "positive_rate": mean("positive_rate"), "train_time_s": train_seconds,
                  "select_time_s": self._select_seconds}
        self._select_seconds = 0.0
        self.rounds.append(record)
        return record


def summarise_rounds(rounds: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Means over the training rounds of every metric (rounds where it was measured)."""
    keys = ("loss", "accuracy", "balanced_accuracy", "positive_rate", "train_time_s", "select_time_s")
    means = {}
    for key in keys:
        values = [r[key] for r in rounds if r.get(key) is not None]
        means[key] = sum(values) / len(values) if values else None
    return means

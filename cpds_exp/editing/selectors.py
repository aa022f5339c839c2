"""Patch selectors for the CUT loss: which n of N positions PatchNCE contrasts (SPEC §4).

Every selector chooses positions from (N, C) normalised source features; learning selectors
also fit (features, labels) pairs and then pick the n positions with the highest probability
of the positive class. Until a learning selector is fitted it chooses at random and says so
once. Adding a selector is one subclass here and one yaml file in conf/selector/.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import log_loss
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from cpds_exp.errors import CpdsError
from cpds_exp.schema import KNNSelectorConfig, MLPSelectorConfig, RFSelectorConfig, SVMSelectorConfig

#: The option defaults, written once in the schema (what a run uses); the classes take them too.
MLP, KNN, SVM, RF = MLPSelectorConfig(), KNNSelectorConfig(), SVMSelectorConfig(), RFSelectorConfig()

log = logging.getLogger(__name__)


def pad_features(features: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad (N, C) features to (N, width): one selector serves layers of several widths."""
    channels = features.shape[-1]
    if channels > width:
        raise ValueError(f"features have {channels} channels but the selector was fitted on {width}")
    return F.pad(features, (0, width - channels)) if channels < width else features


class PatchSelector:
    """The interface: ``select(features, n)``; learning selectors add ``fit`` and ``positive_probability``."""

    #: whether the editor should gather training data for this selector
    learns = False

    def __init__(self, seed: int = 0):
        self.name = type(self).__name__
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self._device_generator: torch.Generator | None = None
        self.input_width: int | None = None
        self._said_random = False

    @property
    def fitted(self) -> bool:
        return self.input_width is not None

    def permutation(self, count: int, device: torch.device) -> torch.Tensor:
        """A seeded random order of ``count`` positions, drawn on ``device`` itself, so choosing
        patches never waits for a host-to-device copy."""
        if device.type == "cpu":
            return torch.randperm(count, generator=self.generator)
        if self._device_generator is None or self._device_generator.device != device:
            self._device_generator = torch.Generator(device).manual_seed(self.seed)
        return torch.randperm(count, generator=self._device_generator, device=device)

    def top_positions(self, probability: torch.Tensor, n: int) -> torch.Tensor:
        """The n most probably positive positions, equal probabilities in a seeded random order:
        k-NN probabilities take only k + 1 values, and a stable top-n would return one strip of
        the grid. The order is drawn where the probabilities are (the CPU for scikit-learn)."""
        order = self.permutation(len(probability), probability.device)
        return order[torch.sort(probability[order], descending=True, stable=True).indices[:n]]

    def select(self, features: torch.Tensor, n: int) -> torch.Tensor:
        """n distinct row indices (fewer when fewer rows exist)."""
        count = features.shape[0]
        if not self.fitted:
            if self.learns and not self._said_random:
                log.info("selector %s is not fitted yet: choosing patches at random until its first training round",
                         self.name)
                self._said_random = True
            return self.permutation(count, features.device)[:n]
        return self.top_positions(self.positive_probability(features), n).to(features.device)

    def __call__(self, features: torch.Tensor, n: int) -> torch.Tensor:
        return self.select(features, n)

    def positive_probability(self, features: torch.Tensor) -> torch.Tensor:
        """P(positive) per row of (N, C) features (any C up to the fitted width)."""
        raise NotImplementedError(f"{self.name} does not learn")

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> float | None:
        """Learn from (N, C) features and (N,) boolean labels; returns the training BCE, or None
        when the data cannot be learnt from (one class only)."""
        raise NotImplementedError(f"{self.name} does not learn")

    def subsample(self, count: int, limit: int | None) -> torch.Tensor | None:
        """Row indices of a seeded random subset of at most ``limit`` rows (None: keep all)."""
        if limit is None or count <= limit:
            return None
        return torch.randperm(count, generator=self.generator)[:limit]


class RandomSelector(PatchSelector):
    """The published default: n positions drawn uniformly without replacement."""


class MLPSelector(PatchSelector):
    """The paper's meta-learner: an MLP (widest width → 64 → 32 → 1, ReLU, sigmoid), BCE, Adam.

    It keeps learning across training rounds and runs on the features' device.
    """

    learns = True

    def __init__(self, seed: int = 0, hidden_sizes: Sequence[int] = tuple(MLP.hidden_sizes), lr: float = MLP.lr,
                 epochs: int = MLP.epochs, batch_size: int = MLP.batch_size,
                 max_train_samples: int | None = MLP.max_train_samples):
        super().__init__(seed)
        if not hidden_sizes or any(h <= 0 for h in hidden_sizes):
            raise CpdsError(f"selector.hidden_sizes={list(hidden_sizes)} must be positive layer widths, e.g. [64,32]")
        if lr <= 0 or epochs <= 0 or batch_size <= 0:
            raise CpdsError(f"selector.lr={lr}, selector.epochs={epochs}, selector.batch_size={batch_size} "
                            "must all be positive")
        self.hidden_sizes, self.lr, self.epochs = list(hidden_sizes), lr, epochs
        self.batch_size, self.max_train_samples = batch_size, max_train_samples
        self.net: torch.nn.Sequential | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _build(self, width: int, device: torch.device) -> None:
        widths = [width, *self.hidden_sizes]
        layers: list[torch.nn.Module] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for w_in, w_out in zip(widths, widths[1:]):
                layers += [torch.nn.Linear(w_in, w_out), torch.nn.ReLU()]
            layers.append(torch.nn.Linear(widths[-1], 1))
        self.net = torch.nn.Sequential(*layers).to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        self.input_width = width

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(pad_features(features.float(), self.input_width)).squeeze(-1)

    @torch.no_grad()
    def positive_probability(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self._logits(features))

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> float | None:
        if self.net is None:
            self._build(features.shape[-1], features.device)
        keep = self.subsample(features.shape[0], self.max_train_samples)
        if keep is not None:
            features, labels = features[keep.to(features.device)], labels[keep.to(labels.device)]
        targets = labels.float().to(features.device)
        total, seen = torch.zeros((), device=features.device), 0
        with torch.enable_grad():
            for _ in range(self.epochs):
                total, seen = torch.zeros((), device=features.device), 0
                order = torch.randperm(features.shape[0], generator=self.generator).to(features.device)
                for start in range(0, features.shape[0], self.batch_size):
                    idx = order[start: start + self.batch_size]
                    loss = F.binary_cross_entropy_with_logits(self._logits(features[idx]), targets[idx])
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    total, seen = total + loss.detach() * len(idx), seen + len(idx)
        return (total / max(seen, 1)).item()


class SklearnSelector(PatchSelector):
    """A scikit-learn classifier on standardised features, refitted from scratch each round.

    ``max_train_samples`` caps the rows it is fitted on (a seeded random subset): kernel SVMs
    and forests on every position of every layer would take far longer than the edit.
    """

    learns = True
    classifier_class: type = type(None)

    def __init__(self, seed: int, max_train_samples: int | None, **params):
        super().__init__(seed)
        if max_train_samples is not None and max_train_samples <= 0:
            raise CpdsError(f"selector.max_train_samples={max_train_samples} must be positive or null")
        self.max_train_samples = max_train_samples
        self.params = params
        try:
            self.classifier_class(**params)._validate_params()
        except ValueError as err:  # sklearn's InvalidParameterError
            raise CpdsError(f"bad selector option for {self.classifier_class.__name__}: "
                            f"{str(err).splitlines()[0]}") from err
        self.model: Pipeline | None = None

    def make_classifier(self):
        return self.classifier_class(**self.params)

    def positive_probability(self, features: torch.Tensor) -> torch.Tensor:
        x = pad_features(features.float(), self.input_width).cpu().numpy()
        probability = self.model.predict_proba(x)[:, list(self.model.classes_).index(True)]
        return torch.from_numpy(probability.astype(np.float32))

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> float | None:
        keep = self.subsample(features.shape[0], self.max_train_samples)
        if keep is not None:
            features, labels = features[keep.to(features.device)], labels[keep.to(labels.device)]
        x, y = features.float().cpu().numpy(), labels.bool().cpu().numpy()
        if len(np.unique(y)) < 2:
            return None
        try:
            model = make_pipeline(StandardScaler(), self.make_classifier()).fit(x, y)
        except ValueError as err:  # too few rows for the classifier (neighbours, calibration folds)
            log.warning("selector %s skipped a training round: %s", self.name, str(err).splitlines()[0])
            return None
        self.model = model
        self.input_width = x.shape[1]
        probability = self.model.predict_proba(x)[:, list(self.model.classes_).index(True)]
        return float(log_loss(y, probability, labels=[False, True]))


class KNNSelector(SklearnSelector):
    """k-nearest neighbours (k = 5 in the paper)."""

    classifier_class = KNeighborsClassifier

    def __init__(self, seed: int = 0, n_neighbors: int = KNN.n_neighbors, weights: str = KNN.weights,
                 max_train_samples: int | None = KNN.max_train_samples):
        if max_train_samples is not None and max_train_samples < n_neighbors:
            raise CpdsError(f"selector.max_train_samples={max_train_samples} is below n_neighbors={n_neighbors}")
        super().__init__(seed, max_train_samples, n_neighbors=n_neighbors, weights=weights)


class SVMSelector(SklearnSelector):
    """A support-vector machine (RBF in the paper) with Platt-scaled probabilities.

    scikit-learn 1.9 deprecates ``SVC(probability=True)`` for this calibration wrapper, which
    does the same (sigmoid calibration, one final SVC fitted on all rows).
    """

    classifier_class = SVC

    def __init__(self, seed: int = 0, C: float = SVM.C, kernel: str = SVM.kernel, gamma: str | float = SVM.gamma,
                 max_train_samples: int | None = SVM.max_train_samples):
        super().__init__(seed, max_train_samples, C=C, kernel=kernel, gamma=gamma, random_state=seed)

    def make_classifier(self):
        return CalibratedClassifierCV(super().make_classifier(), method="sigmoid", ensemble=False)


class RandomForestSelector(SklearnSelector):
    """A random forest (100 trees in the paper)."""

    classifier_class = RandomForestClassifier

    def __init__(self, seed: int = 0, n_estimators: int = RF.n_estimators, max_depth: int | None = RF.max_depth,
                 n_jobs: int | None = RF.n_jobs, max_train_samples: int | None = RF.max_train_samples):
        super().__init__(seed, max_train_samples, n_estimators=n_estimators, max_depth=max_depth,
                         n_jobs=n_jobs, random_state=seed)

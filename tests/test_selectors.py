"""Patch selectors and their training during the edit (SPEC §4)."""
import logging

import pytest
import torch

from cpds_exp.errors import CpdsError
from cpds_exp.selector_training import (Positive, SelectorTrainer, SelectorTraining, classification_metrics,
                                        label_positions, summarise_rounds)
from cpds_exp.selectors import (KNNSelector, MLPSelector, RandomForestSelector, RandomSelector, SVMSelector,
                                pad_features)

LEARNERS = {
    "meta": lambda seed=0: MLPSelector(seed=seed, epochs=30, batch_size=256, lr=3e-3),
    "knn": lambda seed=0: KNNSelector(seed=seed),
    "svm": lambda seed=0: SVMSelector(seed=seed),
    "rf": lambda seed=0: RandomForestSelector(seed=seed, n_estimators=20),
}


def separable(n=600, width=12, positive_rate=0.3, seed=0):
    """Positives around +1.5 on the first two channels, negatives around −1.5, noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, generator=g) < positive_rate
    x = torch.randn(n, width, generator=g)
    x[:, :2] += torch.where(labels, 1.5, -1.5).unsqueeze(1)
    return x, labels


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_learner_beats_the_positive_rate_on_unseen_data(name):
    selector = LEARNERS[name]()
    x, y = separable(seed=0)
    assert selector.fit(x, y) is not None and selector.fitted
    x_new, y_new = separable(seed=1)
    metrics = classification_metrics(selector.positive_probability(x_new), y_new)
    majority = max(metrics["positive_rate"], 1 - metrics["positive_rate"])
    assert metrics["accuracy"] > 0.95 > majority + 0.2
    assert metrics["balanced_accuracy"] > 0.9
    # the n chosen are the most confidently positive ones, hence mostly positives
    chosen = selector.select(x_new, 50)
    assert y_new[chosen].float().mean() > 0.9


@pytest.mark.parametrize("name", ["random", *sorted(LEARNERS)])
@pytest.mark.parametrize("fit", [False, True])
def test_select_returns_n_distinct_valid_indices(name, fit):
    selector = RandomSelector(seed=0) if name == "random" else LEARNERS[name]()
    x, y = separable(n=300)
    if fit and selector.learns:
        selector.fit(x, y)
    for n in (1, 17, 300, 1000):
        idx = selector.select(x[:, :7] if fit and selector.learns else x, n)  # narrower layers are padded
        assert idx.dtype == torch.long and len(idx) == min(n, 300)
        assert len(torch.unique(idx)) == len(idx)
        assert idx.min() >= 0 and idx.max() < 300


@pytest.mark.parametrize("name", ["random", *sorted(LEARNERS)])
def test_selection_is_deterministic_under_a_seed(name):
    def run(seed):
        selector = RandomSelector(seed=seed) if name == "random" else LEARNERS[name](seed)
        x, y = separable(n=300, seed=4)
        first = selector.select(x, 20)
        if selector.learns:
            selector.fit(x, y)
        noisy = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        return torch.cat([first, selector.select(noisy, 20)])

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_unfitted_learner_chooses_at_random_and_says_so_once(caplog):
    selector = MLPSelector(seed=0)
    with caplog.at_level(logging.INFO, logger="cpds_exp.selectors"):
        a = selector.select(torch.randn(50, 8), 10)
        selector.select(torch.randn(50, 8), 10)
    assert len(a) == 10 and not selector.fitted
    assert sum("not fitted yet" in r.message for r in caplog.records) == 1


def test_one_class_data_leaves_a_scikit_learner_unfitted():
    selector = KNNSelector()
    assert selector.fit(torch.randn(20, 4), torch.ones(20, dtype=torch.bool)) is None
    assert not selector.fitted


def test_label_rules_by_meaning():
    d = torch.arange(10.0)  # 0 … 9; 80th percentile = 7.2
    similar = label_positions(d, Positive.similar, 80)
    dissimilar = label_positions(d, Positive.dissimilar, 80)
    assert similar.tolist() == [True] * 8 + [False] * 2  # the paper: below the threshold
    assert dissimilar.tolist() == [False] * 8 + [True] * 2  # the published code: the top 20%
    assert label_positions(d, "similar", 50).sum() == 5


def test_classification_metrics_by_hand():
    probability = torch.tensor([0.9, 0.2, 0.7, 0.4, 0.1])
    labels = torch.tensor([True, True, False, False, False])
    m = classification_metrics(probability, labels)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["positive_rate"] == pytest.approx(2 / 5)


class RecordingSelector(MLPSelector):
    """Records the order of scoring and fitting, and the rows of each."""

    def __init__(self):
        super().__init__(seed=0)
        self.events = []

    def positive_probability(self, features):
        self.events.append(("score", features.shape))
        return super().positive_probability(features)

    def fit(self, features, labels):
        self.events.append(("fit", features.shape))
        return super().fit(features, labels)


def test_trainer_scores_before_training_and_drops_the_data():
    selector = RecordingSelector()
    trainer = SelectorTrainer([selector, selector], SelectorTraining(train_every=2))
    ref16, trg16 = torch.randn(1, 16, 4), torch.randn(1, 16, 4)
    ref4, trg4 = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    for it in (1, 2, 3, 4):
        trainer.observe(0, ref16, trg16)
        trainer.observe(1, ref4, trg4)
        record = trainer.after_iteration(it)
        assert (record is None) == (it % 2 == 1)
    # round 1: nothing to score yet, fit on 2 iterations × (16 + 4) rows padded to 8 channels;
    # round 2: score the new rows first, then fit on them alone (round 1's data was dropped)
    assert selector.events == [("fit", (40, 8)), ("score", (40, 8)), ("fit", (40, 8))]
    first, second = trainer.rounds
    assert first["accuracy"] is None and second["accuracy"] is not None
    assert first["positive_rate"] == pytest.approx(0.75, abs=0.06)
    assert second["train_time_s"] > 0 and second["select_time_s"] == 0
    means = summarise_rounds(trainer.rounds)
    assert means["accuracy"] == second["accuracy"] and means["loss"] is not None


def test_per_layer_selectors_train_separately():
    a, b = RecordingSelector(), RecordingSelector()
    trainer = SelectorTrainer([a, b], SelectorTraining(train_every=1))
    trainer.observe(0, torch.randn(1, 16, 4), torch.randn(1, 16, 4))
    trainer.observe(1, torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    trainer.after_iteration(1)
    assert a.events == [("fit", (16, 4))] and b.events == [("fit", (4, 8))]


def test_timed_selection_is_counted():
    selector = RandomSelector()
    trainer = SelectorTrainer([selector], SelectorTraining(train_every=1))
    [select] = trainer.select_functions()
    assert len(select(torch.randn(30, 4), 5)) == 5
    assert trainer.after_iteration(1)["select_time_s"] > 0


def test_pad_features():
    x = torch.ones(3, 2)
    assert pad_features(x, 5).tolist() == [[1, 1, 0, 0, 0]] * 3
    with pytest.raises(ValueError):
        pad_features(torch.ones(3, 6), 5)


@pytest.mark.parametrize("build,message", [
    (lambda: MLPSelector(hidden_sizes=[0]), "hidden_sizes"),
    (lambda: MLPSelector(lr=-1), "must all be positive"),
    (lambda: SVMSelector(kernel="curvy"), "bad selector option for SVC"),
    (lambda: KNNSelector(n_neighbors=0), "bad selector option for KNeighborsClassifier"),
    (lambda: RandomForestSelector(max_train_samples=0), "max_train_samples"),
])
def test_bad_options_are_one_line(build, message):
    with pytest.raises(CpdsError, match=message) as info:
        build()
    assert "\n" not in str(info.value)


def test_capped_selector_gets_its_subset_before_padding():
    selector = RecordingKNN()
    trainer = SelectorTrainer([selector, selector], SelectorTraining(train_every=1))
    trainer.observe(0, torch.randn(1, 30, 4), torch.randn(1, 30, 4))
    trainer.observe(1, torch.randn(1, 20, 8), torch.randn(1, 20, 8))
    trainer.after_iteration(1)
    assert selector.fitted_shape == (25, 8)  # 50 positions capped at 25, padded to 8 channels


class RecordingKNN(KNNSelector):
    def __init__(self):
        super().__init__(seed=0, max_train_samples=25)

    def fit(self, features, labels):
        self.fitted_shape = tuple(features.shape)
        assert len(labels) == len(features)
        return super().fit(features, labels)

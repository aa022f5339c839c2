"""Patch selectors and their training during the edit (SPEC §4)."""
import logging

import pytest
import torch

from cpds_exp.errors import CpdsError
from cpds_exp.editing.selector_training import (Positive, SelectorTrainer, SelectorTraining, ThresholdScope,
                                        classification_metrics, distance_threshold, label_positions, summarise_rounds)
from cpds_exp.editing.selectors import (KNNSelector, MLPSelector, PatchSelector, RandomForestSelector, RandomSelector,
                                SVMSelector, pad_features)

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
    with caplog.at_level(logging.INFO, logger="cpds_exp.editing.selectors"):
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
    assert distance_threshold(d, 80).item() == pytest.approx(7.2)
    similar = label_positions(d, distance_threshold(d, 80), Positive.similar)
    dissimilar = label_positions(d, distance_threshold(d, 80), Positive.dissimilar)
    assert similar.tolist() == [True] * 8 + [False] * 2  # the paper: below the threshold
    assert dissimilar.tolist() == [False] * 8 + [True] * 2  # the published code: the top 20%
    assert label_positions(d, distance_threshold(d, 50), "similar").sum() == 5


def test_a_distance_at_the_threshold_is_dissimilar():
    d = torch.arange(11.0)  # 0 … 10; 80th percentile = 8 exactly
    dissimilar = label_positions(d, distance_threshold(d, 80), Positive.dissimilar)
    assert dissimilar.tolist() == [False] * 8 + [True] * 3  # d >= threshold, as published
    assert torch.equal(label_positions(d, distance_threshold(d, 80), Positive.similar), ~dissimilar)


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
        self.labels = labels.tolist()
        return super().fit(features, labels)


def test_trainer_scores_before_training_and_drops_the_data():
    selector = RecordingSelector()
    trainer = SelectorTrainer([selector, selector], SelectorTraining(train_every=2), iterations=4)
    ref16, trg16 = torch.randn(1, 16, 4), torch.randn(1, 16, 4)
    ref4, trg4 = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    for it in (1, 2, 3, 4):
        trainer.observe(0, ref16, trg16)
        trainer.observe(1, ref4, trg4)
        record = trainer.after_iteration(it)
        assert (record is None) == (it % 2 == 0)
    # round 1 (after iteration 1): nothing to score yet, fit on 16 + 4 rows padded to 8 channels;
    # round 2 (after 3): score iterations 2–3 first, then fit on them alone (round 1's data was dropped);
    # none after the last iteration, whose model would never be used
    assert selector.events == [("fit", (20, 8)), ("score", (40, 8)), ("fit", (40, 8))]
    first, second = trainer.rounds
    assert first["accuracy"] is None and second["accuracy"] is not None
    assert first["positive_rate"] == 0.8  # one threshold over the 20 distinct distances
    assert second["train_time_s"] > 0 and second["select_time_s"] == 0
    means = summarise_rounds(trainer.rounds)
    assert means["accuracy"] == second["accuracy"] and means["loss"] is not None


def observed(trainer, layer, distances, width):
    """Hand the trainer one observation whose source–target distances are exactly ``distances``."""
    ref = torch.zeros(1, len(distances), width)
    trg = ref.clone()
    trg[0, :, 0] = torch.tensor(distances, dtype=torch.float)
    trainer.observe(layer, ref, trg)


def labels_after_one_round(scope, positive, per_layer=False):
    """Labels of layer 0 at two patch sizes ([1, 2, 3], [4, 5]) and of layer 1, on another scale."""
    selectors = [RecordingSelector(), RecordingSelector()] if per_layer else [RecordingSelector()] * 2
    trainer = SelectorTrainer(selectors, SelectorTraining(positive=positive, threshold_scope=scope), iterations=2)
    observed(trainer, 0, [1, 2, 3], width=4)
    observed(trainer, 0, [4, 5], width=4)
    observed(trainer, 1, [10, 20, 30, 40, 50, 60], width=8)
    trainer.after_iteration(1)
    return [s.labels for s in selectors] if per_layer else selectors[0].labels


def test_one_threshold_per_round_over_all_layers_and_patch_sizes():
    # 11 distances: the 80th percentile is the 9th smallest, 40, and d >= 40 is dissimilar
    dissimilar = labels_after_one_round("round", "dissimilar")
    assert dissimilar == [False] * 5 + [False, False, False, True, True, True]
    assert labels_after_one_round(ThresholdScope.round, "similar") == [not v for v in dissimilar]


def test_per_layer_selectors_get_a_round_threshold_each():
    # layer 0: 80th percentile of 1 … 5 = 4.2; layer 1: 50 (a shared one would leave layer 0 all negative)
    assert labels_after_one_round("round", "dissimilar", per_layer=True) == [
        [False, False, False, False, True], [False, False, False, False, True, True]]


def test_observation_scope_splits_every_observation_at_its_own_percentile():
    # thresholds 2.6, 4.8 and 50 (exactly a distance: d >= 50 is dissimilar)
    dissimilar = labels_after_one_round("observation", "dissimilar")
    assert dissimilar == [False, False, True] + [False, True] + [False, False, False, False, True, True]
    assert labels_after_one_round("observation", "similar") == [not v for v in dissimilar]


@pytest.mark.parametrize("iterations,expected", [(25, [1, 11, 21]), (21, [1, 11])])
def test_rounds_follow_iterations_one_eleven_twentyone_but_never_the_last(iterations, expected):
    selector = RecordingSelector()
    trainer = SelectorTrainer([selector], SelectorTraining(train_every=10), iterations=iterations)
    for it in range(1, iterations + 1):
        observed(trainer, 0, [1, 2, 3, 4, 5], width=4)
        trainer.after_iteration(it)
        assert selector.fitted  # the learned selector chooses from iteration 2 on
    assert [r["iteration"] for r in trainer.rounds] == expected
    assert [r["round"] for r in trainer.rounds] == list(range(1, len(expected) + 1))


class ConstantSelector(PatchSelector):
    """A fitted selector that finds every position equally likely positive, but for a few."""

    learns = True

    def __init__(self, seed, certain=()):
        super().__init__(seed)
        self.input_width, self.certain = 4, list(certain)

    def positive_probability(self, features):
        probability = torch.full((features.shape[0],), 0.5, device=features.device)
        probability[self.certain] = 0.9
        return probability


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_equal_probabilities_are_broken_at_random_over_the_whole_grid(device):
    grid = torch.randn(16 * 16, 4, device=device)

    def chosen(seed):
        return ConstantSelector(seed, certain=[5, 200]).select(grid, 32)

    picked = chosen(0)
    rows, columns = (picked // 16).tolist(), (picked % 16).tolist()
    quadrants = {(r >= 8, c >= 8) for r, c in zip(rows, columns)}
    assert len(quadrants) == 4  # torch.topk or a stable sort would pick one strip of rows
    assert picked[:2].sort().values.tolist() == [5, 200]  # higher probabilities still come first
    assert picked.device.type == device and len(set(picked.tolist())) == 32
    assert torch.equal(picked, chosen(0)) and not torch.equal(picked, chosen(1))


def test_per_layer_selectors_train_separately():
    a, b = RecordingSelector(), RecordingSelector()
    trainer = SelectorTrainer([a, b], SelectorTraining(train_every=1), iterations=2)
    trainer.observe(0, torch.randn(1, 16, 4), torch.randn(1, 16, 4))
    trainer.observe(1, torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    trainer.after_iteration(1)
    assert a.events == [("fit", (16, 4))] and b.events == [("fit", (4, 8))]


def test_timed_selection_is_counted():
    selector = RandomSelector()
    trainer = SelectorTrainer([selector], SelectorTraining(train_every=1), iterations=2)
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
    trainer = SelectorTrainer([selector, selector], SelectorTraining(train_every=1), iterations=2)
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

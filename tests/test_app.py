"""The app in-process: outputs of one edit, lr resolution, and one-line errors for bad input."""
import json

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from cpds_exp.app import run
from cpds_exp.cli import fault_message
from cpds_exp.errors import CpdsError

FAST = ("model=tiny", "metrics=random", "logger=none", "iterations=3", "progress=false", "n_patches=16")


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "cat.png"
    Image.new("RGB", (80, 60), (200, 120, 40)).save(path)
    return path


def test_one_edit_writes_its_outputs(compose_config, tmp_path):
    cfg = compose_config(*FAST, "method=cds", "snapshot_every=2", "image_prep=center_crop")
    [summary] = run(cfg, tmp_path)
    for name in ("source.png", "result.png", "side_by_side.png", "summary.json", "config.yaml",
                 "snapshots/iter_0002.png"):
        assert (tmp_path / name).is_file(), name
    assert Image.open(tmp_path / "side_by_side.png").size == (128, 64)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["method"] == "cds" and on_disk["lr"] == 0.1 and on_disk["status"] == "done"
    assert on_disk["source_prompt"] == "a photo of an orange dahlia" and on_disk["seed"] == 0
    assert on_disk["final"]["cut/total"] > 0 and on_disk["time_s"] > 0
    resolved = (tmp_path / "config.yaml").read_text()
    assert "resolution: 64" in resolved and "${" not in resolved
    assert not list(tmp_path.glob("**/*.tmp"))


@pytest.mark.parametrize("overrides,lr", [(("method=cds",), 0.1), (("method=cpds",), 0.8),
                                          (("method=pds",), 0.8), (("method=cds", "lr=0.8"), 0.8)])
def test_lr_is_the_methods_unless_overridden(compose_config, tmp_path, overrides, lr):
    [summary] = run(compose_config(*FAST, "iterations=1", *overrides), tmp_path)
    assert summary["lr"] == lr


def test_single_image_dataset(compose_config, tmp_path, photo):
    cfg = compose_config(*FAST, "method=dds", "dataset=single", f"dataset.image={photo}",
                         "dataset.source_prompt=a cat", "dataset.target_prompt=a dog")
    [summary] = run(cfg, tmp_path)
    assert summary["image"] == "cat" and summary["target_prompt"] == "a dog"


@pytest.mark.parametrize("overrides,message", [
    (("dataset=single", "dataset.image=/nowhere/cat.png", "dataset.source_prompt=a", "dataset.target_prompt=b"),
     "does not exist"),
    (("dataset=single", "dataset.source_prompt=a", "dataset.target_prompt=b"), "missing config value(s) dataset.image"),
    (("dataset.target_prompt= ",), "target prompt is empty"),
    (("lr=-1",), "lr=-1.0 must be positive"),
    (("lr=0",), "must be positive"),
    (("iterations=0",), "iterations=0 must be positive"),
    (("lr=fast",), "invalid config"),
    (("method.terms.score.weight=heavy",), "invalid method.terms.score option"),
    (("+method.terms.cut.colour=red",), "invalid method.terms.cut option"),
    (("method.terms.score._target_=cpds_exp.editing.terms.Nowhere",), "cannot be imported"),
    (("resolution=100",), "multiple of 64"),
    (("image_prep=stretch",), "invalid config"),
    (("t_min=900", "t_max=100"), "t_min=900"),
    (("+selector.temperature=2",), "cannot build cpds_exp.editing.selectors.RandomSelector"),
    (("cut_layers=[mid_block.nothing]",), "matches no attention layer"),
    (("patch_sizes=[16]",), "patch size 16 is larger than a CUT layer's 4x4 grid"),
    (("logger=wandb", "logger.mode=sometimes"), "logger.mode='sometimes' is unknown"),
    (("selector=knn", "selector.max_train_samples=3"), "below n_neighbors=5"),
    (("method=cds_matched", "t_min=0"), "need t_min >= 1"),
    (("optimizer.momentun=0.9",), "Key 'momentun' not in 'SGDConfig'"),  # every group option has a schema
    (("dataset=folder", "dataset.path=x", "dataset.limit=some"), "could not be converted to Integer"),
])
def test_bad_input_is_one_line(compose_config, tmp_path, overrides, message):
    line = refusal(compose_config, tmp_path, *overrides)
    assert message in line and "\n" not in line


def refusal(compose_config, tmp_path, *overrides) -> str:
    """The one line the CLI prints when composition (the typed schema) or the run refuses a config."""
    try:
        run(compose_config(*FAST, *overrides), tmp_path)
    except (CpdsError, HydraException, OmegaConfBaseException) as err:
        return fault_message(err)
    pytest.fail(f"{overrides} was accepted")


def test_unreadable_image(compose_config, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(CpdsError, match="cannot be read as an image"):
        run(compose_config(*FAST, "dataset=single", f"dataset.image={broken}", "dataset.source_prompt=a",
                           "dataset.target_prompt=b"), tmp_path / "out")


def test_divergence_stops_and_records(compose_config, tmp_path):
    with pytest.raises(CpdsError, match="NaN/Inf at iteration 1 .* try a smaller lr"):
        run(compose_config(*FAST, "method=dds", "lr=3e38"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at"] == 1
    assert not (tmp_path / "result.png").exists()


@pytest.mark.parametrize("method", ["cds", "cpds"])
@pytest.mark.parametrize("selector", ["random", "meta", "knn", "svm", "rf"])
def test_every_selector_runs_and_records_its_rounds(compose_config, tmp_path, method, selector):
    extra = () if selector == "random" else ("selector.train_every=2",)
    [summary] = run(compose_config(*FAST, "iterations=4", f"method={method}", f"selector={selector}", *extra),
                    tmp_path)
    assert summary["selector"] == selector
    rounds = summary["selector_rounds"]
    if selector == "random":
        assert rounds == [] and summary["selector_means"]["accuracy"] is None
        return
    assert [r["iteration"] for r in rounds] == [1, 3]
    assert rounds[0]["accuracy"] is None  # nothing to measure before the first fit
    assert 0 <= rounds[1]["accuracy"] <= 1 and 0 <= rounds[1]["balanced_accuracy"] <= 1
    assert 0.6 < rounds[1]["positive_rate"] <= 0.8  # 'similar': below the 80th percentile
    assert all(r["train_time_s"] > 0 and r["select_time_s"] > 0 for r in rounds)
    assert summary["selector_means"]["accuracy"] == rounds[1]["accuracy"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["selector_rounds"] == json.loads(json.dumps(rounds))


def test_dissimilar_labels_and_per_layer_selectors(compose_config, tmp_path):
    [summary] = run(compose_config(*FAST, "iterations=2", "method=cds", "selector=meta", "selector.train_every=1",
                                   "selector.positive=dissimilar", "selector.per_layer=true"), tmp_path)
    assert all(r["positive_rate"] < 0.35 for r in summary["selector_rounds"])  # the top 20%


@pytest.mark.parametrize("overrides,message", [
    (("selector=meta", "selector.percentile=120"), "selector.percentile=120"),
    (("selector=meta", "selector.positive=maybe"), "Invalid value 'maybe', expected one of [similar, dissimilar]"),
    (("selector=knn", "selector.train_every=0"), "selector.train_every=0"),
    (("selector=svm", "selector.kernel=curvy"), "bad selector option for SVC"),
    (("selector=meta", "+selector.dropout=0.5"), "cannot build cpds_exp.editing.selectors.MLPSelector"),
])
def test_bad_selector_options_are_one_line(compose_config, tmp_path, overrides, message):
    line = refusal(compose_config, tmp_path, "method=cds", *overrides)
    assert message in line and "\n" not in line

"""SDXL: two text encoders, pooled embeddings and time ids reach the UNet; the CUT term reads the up
blocks' self-attention of every transformer block; every method and selector edits a tiny SDXL."""
import copy
import functools

import pytest
import torch
from PIL import Image

from cpds_exp.app import edit_fingerprint, run
from cpds_exp.data import EditItem
from cpds_exp.editing.features import FeatureCapture
from cpds_exp.editing.selector_training import SelectorTraining
from cpds_exp.editing.selectors import KNNSelector, MLPSelector, RandomForestSelector, RandomSelector, SVMSelector
from cpds_exp.errors import CpdsError
from cpds_exp.models import load_stack
from helpers import make_editor, make_image

METHODS = ("dds", "pds", "cds", "cpds", "cds_matched")
SELECTORS = {"random": RandomSelector, "meta": MLPSelector, "knn": KNNSelector, "svm": SVMSelector,
             "rf": RandomForestSelector}


@pytest.fixture(scope="module")
def tiny_xl():
    return load_stack(None, device="cpu", dtype="float32", architecture="sdxl")


def test_tiny_sdxl_has_sdxls_shape(tiny_xl):
    assert tiny_xl.architecture == "sdxl" and tiny_xl.resolution == 128
    assert tiny_xl.unet.config.addition_embed_type == "text_time"
    assert tiny_xl.unet.config.cross_attention_dim == 2 * tiny_xl.text_encoder.config.hidden_size
    assert tiny_xl.latent_scale == pytest.approx(0.13025)
    # SDXL's layout: no attention in the last up block, more transformer blocks deeper down
    unet = copy.deepcopy(tiny_xl.unet)
    capture = FeatureCapture(unet)
    assert capture.layers == [f"up_blocks.0.attentions.{a}.transformer_blocks.{b}.attn1" for a in (0, 1) for b in (0, 1)
                              ] + [f"up_blocks.1.attentions.{a}.transformer_blocks.0.attn1" for a in (0, 1)]
    cond = tiny_xl.encode_prompts(["a cat"])
    with torch.no_grad():
        unet(torch.randn(1, 4, 16, 16), torch.tensor([500]), **cond.unet_kwargs())
    assert [tuple(f.shape) for f in capture.features()] == [(1, 16, 64)] * 4 + [(1, 64, 64)] * 2


def test_prompts_give_both_encoders_states_the_pooled_embedding_and_time_ids(tiny_xl):
    prompts = ["a cat", "", "a dog"]
    cond = tiny_xl.encode_prompts(prompts, size=(192, 128))
    ids = tiny_xl.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        first = tiny_xl.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = tiny_xl.text_encoder_2(ids, output_hidden_states=True)
    kept = torch.tensor([1.0, 0.0, 1.0])  # SDXL's pipeline: zeros for the empty prompt
    assert torch.allclose(cond.hidden, torch.cat([first, second.hidden_states[-2]], -1) * kept.view(-1, 1, 1))
    assert torch.allclose(cond.added["text_embeds"], second.text_embeds * kept.view(-1, 1))
    assert cond.hidden[1].abs().max() == 0 and cond.hidden[0].abs().max() > 0
    assert cond.added["time_ids"].tolist() == [[192, 128, 0, 0, 192, 128]] * 3
    assert tiny_xl.encode_prompts(["a cat"]).added["time_ids"].tolist() == [[128, 128, 0, 0, 128, 128]]


def test_pooled_embedding_and_time_ids_change_the_prediction(tiny_xl):
    """They are not decorative: the UNet reads both (added_cond_kwargs)."""
    cond = tiny_xl.encode_prompts(["a cat"])
    z, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    base = tiny_xl.predict_noise(z, t, cond)
    for key in ("text_embeds", "time_ids"):
        changed = type(cond)(cond.hidden, {**cond.added, key: cond.added[key] + 1})
        assert not torch.allclose(tiny_xl.predict_noise(z, t, changed), base, atol=1e-5), key


def test_a_saved_sdxl_folder_loads_as_sdxl(tiny_xl, tmp_path):
    tiny_xl.save_pretrained(tmp_path / "xl")
    loaded = load_stack(str(tmp_path / "xl"), device="cpu", dtype="float32")
    assert loaded.architecture == "sdxl" and loaded.force_zeros_for_empty_prompt and loaded.resolution == 128
    cond = tiny_xl.encode_prompts(["a cat"])
    assert torch.allclose(loaded.encode_prompts(["a cat"]).hidden, cond.hidden, atol=1e-6)
    z, t = torch.randn(1, 4, 16, 16), torch.tensor([300])
    assert torch.allclose(loaded.predict_noise(z, t, cond), tiny_xl.predict_noise(z, t, cond), atol=1e-5)
    with pytest.raises(CpdsError, match="model.architecture=sd but"):
        load_stack(str(tmp_path / "xl"), device="cpu", architecture="sd")


def test_sdxls_vae_stays_float32_in_float16_unless_another_vae_replaces_it(tiny_xl, tmp_path):
    half = load_stack(None, device="cpu", dtype="float16", architecture="sdxl")
    assert half.unet.dtype == torch.float16 and half.text_encoder_2.dtype == torch.float16
    assert half.vae.dtype == torch.float32  # force_upcast, as SDXL's pipeline
    assert half.encode_images(make_image(size=128)).dtype == torch.float32
    tiny_xl.save_pretrained(tmp_path / "xl")
    options = {k: v for k, v in tiny_xl.vae.config.items() if not k.startswith("_")}
    fixed = type(tiny_xl.vae).from_config({**options, "force_upcast": False})  # as madebyollin/sdxl-vae-fp16-fix
    torch.nn.init.constant_(fixed.decoder.conv_out.bias, 0.25)
    fixed.save_pretrained(tmp_path / "fp16-vae")
    stack = load_stack(str(tmp_path / "xl"), device="cpu", dtype="float16", vae=str(tmp_path / "fp16-vae"))
    assert stack.vae.dtype == torch.float16
    assert torch.equal(stack.vae.decoder.conv_out.bias.float(), torch.full_like(stack.vae.decoder.conv_out.bias, 0.25,
                                                                                dtype=torch.float32))
    with pytest.raises(CpdsError, match="model.vae"):
        load_stack(str(tmp_path / "xl"), device="cpu", vae=str(tmp_path / "no-such-vae"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_edits_tiny_sdxl(tiny_xl, method):
    editor = make_editor(tiny_xl, method, iterations=3, n_patches=8, lr=0.5)
    image = make_image(size=128)
    start = editor.encode_images(image)
    result = editor.edit(image, ["a cat"], ["a dog"])
    assert torch.isfinite(result.latents).all() and (result.latents - start).abs().max() > 1e-3
    assert result.diverged_at == [None]


@pytest.mark.parametrize("selector", sorted(SELECTORS))
def test_every_selector_trains_and_selects_on_tiny_sdxl(tiny_xl, selector):
    make_selector = functools.partial(SELECTORS[selector], seed=0)
    editor = make_editor(tiny_xl, "cpds", make_selector=make_selector, selector_training=SelectorTraining(train_every=1),
                         iterations=3, n_patches=8, lr=0.5)
    result = editor.edit(make_image(size=128), ["a cat"], ["a dog"])
    assert torch.isfinite(result.latents).all()
    if selector != "random":
        assert result.selector_rounds[0], "a learning selector trained at least once"


def test_a_batch_of_sdxl_edits_equals_the_edits_one_by_one(tiny_xl):
    images = torch.cat([make_image(1, 128), make_image(2, 128)])
    editor = make_editor(tiny_xl, "cds", iterations=2, n_patches=8, lr=0.5)
    batched = editor.edit(images, ["a cat", "a cow"], ["a dog", "a pig"], seeds=[4, 5]).latents
    alone = [make_editor(tiny_xl, "cds", iterations=2, n_patches=8, lr=0.5).edit(
        images[i:i + 1], [s], [t], seeds=[seed]).latents for i, s, t, seed in ((0, "a cat", "a dog", 4),
                                                                                 (1, "a cow", "a pig", 5))]
    moved = (torch.cat(alone) - editor.encode_images(images)).abs().max()
    assert (batched - torch.cat(alone)).abs().max() < 2e-4 * moved  # float rounding, as tests/test_editor.py


def test_model_tiny_sdxl_runs_through_the_app(compose_config, tmp_path):
    cfg = compose_config("model=tiny_sdxl", "metrics=random", "logger=none", "iterations=2", "progress=false",
                         "n_patches=8", "method=cpds", "selector=knn")
    [summary] = run(cfg, tmp_path)
    assert summary["status"] == "done" and summary["resolution"] == 128
    assert Image.open(tmp_path / "result.png").size == (128, 128)


def test_options_added_later_leave_earlier_fingerprints_alone(compose_config):
    """Records written before model.architecture/prediction_type/vae existed still resume; setting one
    changes the fingerprint."""
    from omegaconf import OmegaConf

    item = EditItem(name="x", source_prompt="a", target_prompt="b")
    resolved = OmegaConf.to_container(compose_config("model=tiny"), resolve=True, enum_to_str=True)
    before = {**resolved, "model": {k: v for k, v in resolved["model"].items()
                                    if k not in ("architecture", "prediction_type", "vae", "variant")}}
    assert edit_fingerprint(resolved, item) == edit_fingerprint(before, item)
    for key, value in (("architecture", "sdxl"), ("prediction_type", "v_prediction"), ("vae", "some/vae")):
        changed = {**resolved, "model": {**resolved["model"], key: value}}
        assert edit_fingerprint(changed, item) != edit_fingerprint(resolved, item), key
    fp16 = {**resolved, "model": {**resolved["model"], "variant": None}}
    assert edit_fingerprint(fp16, item) == edit_fingerprint(resolved, item)  # where weights come from, not what


def test_a_sweep_over_methods_and_the_new_model_shapes_runs_from_the_cli(tmp_path):
    """As a user runs it: every method on the v-predicting and the SDXL-shaped tiny stacks, one multirun."""
    import json
    import subprocess
    import sys

    from test_cli import child_env
    from conftest import REPO

    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "-m", "method=dds,pds,cds,cpds",
                           "model=tiny_v,tiny_sdxl", "debug=fast", "iterations=2", "hydra.sweep.dir=sweep"],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json")]
    assert sorted((r["model"], r["method"]) for r in records) == sorted(
        (model, method) for model in ("tiny_v", "tiny_sdxl") for method in ("dds", "pds", "cds", "cpds"))
    assert all(r["status"] == "done" for r in records)


def test_editing_at_another_resolution_than_the_models_says_so(compose_config, tmp_path, caplog):
    cfg = compose_config("debug=fast", "model=tiny_sdxl", "resolution=64", "iterations=1")
    with caplog.at_level("WARNING", logger="cpds_exp.app"):
        [summary] = run(cfg, tmp_path)
    assert summary["status"] == "done"
    assert "tiny_sdxl was trained at 128² but images are edited at resolution=64²: set resolution=128" in caplog.text

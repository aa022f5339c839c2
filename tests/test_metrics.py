"""CLIP score and LPIPS on known cases, under both protocols, with random-weight models (offline)."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torch import nn

from cpds_exp.config import validate
from cpds_exp.errors import CpdsError
from cpds_exp.evaluation.metrics import (
    ClipScore,
    Lpips,
    MetricsConfig,
    PublishedClipScore,
    clip_architecture,
    load_metrics,
    published_clip_score,
    published_resize,
)

RANDOM = MetricsConfig(clip_model="tiny", clip_pretrained=None, hf_clip_model="tiny", lpips_pretrained=False)
PUBLISHED = replace(RANDOM, protocol="published")
OPENAI_MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def metrics():
    return load_metrics(RANDOM, "cpu")


@pytest.fixture(scope="module")
def published():
    return load_metrics(PUBLISHED, "cpu")


def images(seed, n=2, size=64):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def china():
    """A real photograph (427×640) that scikit-learn ships."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"))


def test_identical_images_have_zero_lpips(metrics):
    x = images(0)
    assert torch.allclose(metrics.lpips(x, x), torch.zeros(2), atol=1e-7)
    assert (metrics.lpips(x, images(1)) > 0).all()


def test_lpips_scales_inputs_to_minus_one_one(metrics):
    x, y = images(2), images(3)
    by_hand = metrics.lpips.model(F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True) * 2 - 1,
                                  F.interpolate(y, size=(224, 224), mode="bilinear", antialias=True) * 2 - 1)
    assert torch.allclose(metrics.lpips(x, y), by_hand.flatten(), atol=1e-6)
    unscaled = Lpips(pretrained=False, scale_inputs=False)
    unscaled.model.load_state_dict(metrics.lpips.model.state_dict())
    assert not torch.allclose(unscaled(x, y), metrics.lpips(x, y))


def test_published_lpips_is_on_unscaled_pil_resized_images(published):
    x, y = images(5, size=96), images(6, size=96)
    by_hand = published.lpips.model(published_resize(x), published_resize(y)).flatten()
    scores = published(x, y, ["a dog", "a cow"])
    assert [s["lpips"] for s in scores] == pytest.approx(by_hand.tolist(), abs=1e-6)
    assert published_resize(x).shape == (2, 3, 224, 224) and not published.lpips.scale_inputs


def test_published_resize_is_evaluate_py_transform():
    from torchvision import transforms

    photo = china()
    as_tensor = transforms.ToTensor()(photo)[None]
    theirs = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])(photo)
    assert torch.equal(published_resize(as_tensor)[0], theirs)


def test_clip_score_is_the_cosine_by_hand(metrics):
    x = images(4, size=96)
    prompts = ["a dog", "a photo of a cow"]
    clip = metrics.clip
    with torch.no_grad():
        image_features = clip.model.encode_image(clip.preprocess(x))
        text_features = clip.model.encode_text(clip.tokenizer(prompts))
    by_hand = (F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)).sum(-1)
    assert torch.allclose(clip(x, prompts), by_hand, atol=1e-6)
    assert clip.preprocess(x).shape == (2, 3, 224, 224)


def test_clip_preprocess_crops_the_centre(metrics):
    wide = torch.zeros(1, 3, 100, 300)
    wide[..., 100:200] = 1.0  # a white centre square, black sides
    out = metrics.clip.preprocess(wide) * OPENAI_STD + OPENAI_MEAN
    assert out[..., 8:-8].min() > 0.95 and out.shape[-1] == 224  # the black sides are cropped away


def test_clip_preprocess_is_open_clips_eval_transform_on_a_photograph(metrics):
    import open_clip

    photo = china()
    theirs = open_clip.image_transform(224, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
                                       interpolation="bicubic", resize_mode="shortest")(photo)
    ours = metrics.clip.preprocess(torch.from_numpy(np.asarray(photo) / 255).permute(2, 0, 1)[None])
    assert (ours[0] - theirs).abs().max() <= 1e-6


def test_default_clip_is_built_with_quick_gelu_as_openai_trained_it():
    import open_clip

    assert clip_architecture("ViT-B-16", "openai") == "ViT-B-16-quickgelu"  # plain names are fixed too
    assert clip_architecture("ViT-B-16", "laion2b_s34b_b88k") == "ViT-B-16"
    default = MetricsConfig()
    clip = ClipScore(default.clip_model, None)  # the architecture of the OpenAI weights, random weights
    kinds = {type(m) for m in clip.model.modules()}
    assert open_clip.transformer.QuickGELU in kinds and nn.GELU not in kinds
    cfg = open_clip.get_model_preprocess_cfg(clip.model)
    assert (cfg["interpolation"], cfg["resize_mode"], tuple(cfg["size"])) == ("bicubic", "shortest", (224, 224))
    assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def vision_input(model_part: nn.Module, run) -> torch.Tensor:
    """The pixel tensor that reaches ``model_part`` while ``run()`` executes."""
    seen = []
    handle = model_part.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        kwargs.get("pixel_values", args[0] if args else None)), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def test_published_clip_sees_near_black_pixels_and_corrected_does_not(metrics, published):
    x = images(7, size=224)
    processor = published.clip.processor
    pixels = vision_input(published.clip.model.vision_model, lambda: published(x, x, ["a dog", "a cow"]))
    std, mean = (torch.tensor(v).view(1, 3, 1, 1) for v in (processor.image_std, processor.image_mean))
    seen = pixels * std + mean
    assert seen.min() > -1e-6 and seen.max() <= 1 / 255 + 1e-6 and seen.max() > 0.9 / 255
    pixels = vision_input(metrics.clip.model.visual, lambda: metrics(x, x, ["a dog", "a cow"]))
    seen = pixels * OPENAI_STD + OPENAI_MEAN
    assert seen.min() < 0.02 and seen.max() > 0.98


def test_published_clip_score_is_torchmetrics_formula_over_100():
    image = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[0.6, 0.8], [-3.0, 4.0], [5.0, 0.0]])
    assert published_clip_score(image, text).tolist() == pytest.approx([0.6, 0.0, 1.0])


def test_published_clip_score_by_hand(published):
    x = images(8, size=224)
    prompts = ["a dog", "a photo of a cow"]
    clip = published.clip
    pixels = clip.processor(images=list(x), return_tensors="pt")["pixel_values"]
    tokens = clip.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.model(pixel_values=pixels, **tokens)
    cosine = F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert torch.allclose(clip(x, prompts), torch.clamp(100 * cosine, min=0) / 100, atol=1e-6)
    assert len(clip.tokenizer) == 49408


def test_describe_names_protocol_and_clip(metrics, published):
    assert metrics.describe() == {"metrics_protocol": "corrected", "clip_model": "tiny"}
    assert published.describe() == {"metrics_protocol": "published", "clip_model": "tiny"}
    assert set(published(images(9), images(10), ["a dog", "a pig"])[0]) == {"clip", "lpips"}


@pytest.mark.parametrize("overrides,protocol", [
    (("metrics=default",), "corrected"), (("metrics=published",), "published"),
    (("metrics=random", "metrics.protocol=published"), "published"),
    (("metrics=default", "metrics.protocol=published"), "published"),
])
def test_metrics_configs_compose_with_either_protocol(compose_config, overrides, protocol):
    config = MetricsConfig(**validate(compose_config("model=tiny", *overrides)).metrics)
    assert config.protocol == protocol
    assert config.clip_model in ("tiny", "ViT-B-16-quickgelu")


def test_metrics_load_once_per_process():
    assert load_metrics(RANDOM, "cpu") is load_metrics(RANDOM, "cpu")
    assert load_metrics(MetricsConfig(enabled=False), "cpu") is None


def test_unavailable_real_weights_say_so_in_one_line():
    with pytest.raises(CpdsError, match="metrics=random") as info:
        ClipScore("ViT-B-16", "openai")
    assert "\n" not in str(info.value) and "ViT-B-16-quickgelu" in str(info.value)
    with pytest.raises(CpdsError, match="metrics=random") as info:
        PublishedClipScore("openai/clip-vit-base-patch16")
    assert "\n" not in str(info.value)
    with pytest.raises(CpdsError, match="metrics.protocol") as info:
        MetricsConfig(protocol="paper")
    assert "\n" not in str(info.value)

"""CLIP score and LPIPS on known cases, with random-weight models (offline)."""
import pytest
import torch
import torch.nn.functional as F

from cpds_exp.errors import CpdsError
from cpds_exp.metrics import ClipScore, Lpips, MetricsConfig, load_metrics

RANDOM = MetricsConfig(clip_model="tiny", clip_pretrained=None, lpips_pretrained=False)


@pytest.fixture(scope="module")
def metrics():
    return load_metrics(RANDOM, "cpu")


def images(seed, n=2, size=64):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_identical_images_have_zero_lpips(metrics):
    x = images(0)
    assert torch.allclose(metrics.lpips(x, x), torch.zeros(2), atol=1e-7)
    assert (metrics.lpips(x, images(1)) > 0).all()


def test_lpips_scales_inputs_to_minus_one_one(metrics):
    x, y = images(2), images(3)
    by_hand = metrics.lpips.model(F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True) * 2 - 1,
                                  F.interpolate(y, size=(224, 224), mode="bilinear", antialias=True) * 2 - 1)
    assert torch.allclose(metrics.lpips(x, y), by_hand.flatten(), atol=1e-6)
    published = Lpips(pretrained=False, input_range="zero_one")
    published.model.load_state_dict(metrics.lpips.model.state_dict())
    assert not torch.allclose(published(x, y), metrics.lpips(x, y))


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
    out = metrics.clip.preprocess(wide) * metrics.clip.std + metrics.clip.mean
    assert out[..., 8:-8].min() > 0.95 and out.shape[-1] == 224  # the black sides are cropped away


def test_metrics_load_once_per_process():
    assert load_metrics(RANDOM, "cpu") is load_metrics(RANDOM, "cpu")
    assert load_metrics(MetricsConfig(enabled=False), "cpu") is None


def test_unavailable_real_weights_say_so_in_one_line():
    with pytest.raises(CpdsError, match="metrics=random") as info:
        ClipScore("ViT-B-16", "openai")
    assert "\n" not in str(info.value)
    with pytest.raises(CpdsError, match="metrics.lpips_input"):
        Lpips(pretrained=False, input_range="0..1")

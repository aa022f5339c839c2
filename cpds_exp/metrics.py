"""Edit quality metrics of the paper (SPEC §5): CLIP score and LPIPS.

Metric models are built once per process (``load_metrics`` is cached) and run on the edit's
device. Offline, ``clip_pretrained: null`` and ``lpips_pretrained: false`` build them with
random weights, so the whole pipeline runs and is tested without downloads.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from cpds_exp.errors import CpdsError

log = logging.getLogger(__name__)

LPIPS_INPUTS = ("minus_one_one", "zero_one")


@dataclass(unsafe_hash=True)  # hashable: it keys the per-process cache of metric models
class MetricsConfig:
    """Which metric models to use; ``enabled: false`` skips metrics altogether."""

    enabled: bool = True
    clip_model: str = "ViT-B-16"
    clip_pretrained: Optional[str] = "openai"
    lpips_net: str = "squeeze"
    lpips_pretrained: bool = True
    lpips_size: int = 224
    lpips_input: str = "minus_one_one"


def tiny_clip():
    """A few-million-parameter open_clip CLIP with random weights, for tests and dry runs."""
    import open_clip

    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=32, image_size=224),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
    )


class ClipScore:
    """Cosine similarity between an image and a prompt under CLIP (the paper's CLIPScore / 100,
    before torchmetrics' clamp at 0)."""

    def __init__(self, model_name: str = "ViT-B-16", pretrained: str | None = "openai"):
        import open_clip
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        if model_name == "tiny":
            self.model = tiny_clip()
        else:
            try:
                self.model = open_clip.create_model(model_name, pretrained=pretrained)
            except Exception as err:  # open_clip raises RuntimeError, OSError or hub errors offline
                raise CpdsError(
                    f"cannot load CLIP {model_name} with {pretrained!r} weights ({err.__class__.__name__}: "
                    f"{str(err).splitlines()[0][:120]}); connect once to cache them, or pass metrics=random "
                    "for a dry run, or metrics=none to skip metrics") from err
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer("ViT-B-16" if model_name == "tiny" else model_name)
        self.size = self.model.visual.image_size
        self.size = self.size[0] if isinstance(self.size, (tuple, list)) else self.size
        self.mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → CLIP input: shorter side resized (bicubic), centre crop, normalised."""
        height, width = images.shape[-2:]
        scale = self.size / min(height, width)
        resized = F.interpolate(images.float(), size=(max(self.size, round(height * scale)), max(self.size, round(width * scale))),
                                mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (resized.shape[-2] - self.size) // 2, (resized.shape[-1] - self.size) // 2
        cropped = resized[..., top: top + self.size, left: left + self.size]
        return (cropped - self.mean.to(images.device)) / self.std.to(images.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        image_features = self.model.encode_image(self.preprocess(images.to(device)))
        text_features = self.model.encode_text(self.tokenizer(prompts).to(device))
        return F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)


class Lpips:
    """LPIPS distance between source and edit, at ``size``×``size``.

    ``input_range``: ``minus_one_one`` scales [0, 1] images to the [−1, 1] LPIPS expects;
    ``zero_one`` passes [0, 1] unchanged, as the published evaluation did (SPEC §5).
    """

    def __init__(self, net: str = "squeeze", pretrained: bool = True, size: int = 224,
                 input_range: str = "minus_one_one"):
        import lpips

        if input_range not in LPIPS_INPUTS:
            raise CpdsError(f"metrics.lpips_input={input_range!r}: use one of {', '.join(LPIPS_INPUTS)}")
        if net not in ("alex", "squeeze", "vgg"):
            raise CpdsError(f"metrics.lpips_net={net!r}: use squeeze (the paper), alex or vgg")
        try:
            self.model = lpips.LPIPS(net=net, pnet_rand=not pretrained, verbose=False)
        except Exception as err:  # torchvision's download fails with URLError offline
            raise CpdsError(
                f"cannot load the LPIPS {net} backbone ({err.__class__.__name__}); connect once so torchvision "
                "caches it, or pass metrics=random for a dry run, or metrics=none to skip metrics") from err
        self.model.eval().requires_grad_(False)
        self.size, self.input_range = size, input_range

    @torch.no_grad()
    def __call__(self, source: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device

        def prepare(images: torch.Tensor) -> torch.Tensor:
            images = F.interpolate(images.float().to(device), size=(self.size, self.size), mode="bilinear",
                                   align_corners=False, antialias=True)
            return images * 2 - 1 if self.input_range == "minus_one_one" else images

        return self.model(prepare(source), prepare(edited)).flatten()


class Metrics:
    """Both metrics for a batch of (source, edit, target prompt)."""

    def __init__(self, config: MetricsConfig, device: torch.device):
        self.clip = ClipScore(config.clip_model, config.clip_pretrained)
        self.lpips = Lpips(config.lpips_net, config.lpips_pretrained, config.lpips_size, config.lpips_input)
        self.clip.model.to(device)
        self.lpips.model.to(device)

    def __call__(self, source: torch.Tensor, edited: torch.Tensor, target_prompts: list[str]) -> list[dict[str, float]]:
        clip = self.clip(edited, target_prompts).cpu()
        distance = self.lpips(source, edited).cpu()
        return [{"clip": c.item(), "lpips": d.item()} for c, d in zip(clip, distance)]


@functools.lru_cache(maxsize=4)
def load_metrics(config: MetricsConfig, device: str) -> Metrics | None:
    """The metric models for ``config`` on ``device``, built once per process (None when disabled)."""
    if not config.enabled:
        return None
    log.info("loading metrics: CLIP %s (%s), LPIPS %s", config.clip_model, config.clip_pretrained or "random",
             config.lpips_net)
    return Metrics(config, torch.device(device))

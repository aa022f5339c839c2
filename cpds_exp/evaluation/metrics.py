"""Edit quality metrics of the paper (SPEC §5): CLIP score and LPIPS, under one of two protocols.

``corrected`` (the default) runs CLIP as OpenAI trained it (QuickGELU, open_clip's own eval
transform) and gives LPIPS the [−1, 1] inputs it expects. ``published`` computes what the published
evaluate.py did, so that its numbers can be compared with the paper's tables: both images resized to
224×224, CLIP through transformers (whose processor rescales [0, 1] tensors by 1/255 a second time),
LPIPS on unscaled [0, 1] inputs.

Metric models are built once per process (``load_metrics`` is cached) and run on the edit's
device. Offline, ``metrics=random`` builds them with random weights, so the whole pipeline runs and
is tested without downloads; real weights that are not cached fail at once (:mod:`cpds_exp.hub`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from cpds_exp.data import to_pil
from cpds_exp.errors import CpdsError
from cpds_exp.hub import CLIP_B16_DOWNLOAD_SIZE, offline_reason, one_line, weights_unavailable
from cpds_exp.schema import MetricsConfig

log = logging.getLogger(__name__)

PUBLISHED_SIZE = 224  # evaluate.py: transforms.Resize((224, 224)) before both metrics


#: what the offline message adds to the ways forward of any missing weights
NO_METRICS = ", or metrics=none to skip metrics"


def _unavailable(what: str, err: Exception, size: str | None, offline: str | None) -> CpdsError:
    """The one-line error for metric weights that could not be loaded: offline and not cached, or refused."""
    if offline:
        return weights_unavailable(what, size, offline, NO_METRICS)
    return CpdsError(f"cannot load {what} ({err.__class__.__name__}: {one_line(err)}); connect once to cache "
                     f"them, or pass metrics=random for a dry run{NO_METRICS}")


def clip_download_size(name: str) -> str | None:
    """The download size of the default CLIP (ViT-B/16, either library's name for it); None for others."""
    return CLIP_B16_DOWNLOAD_SIZE if name.startswith("ViT-B-16") or name.endswith("clip-vit-base-patch16") else None


@contextlib.contextmanager
def _without_root_log_records():
    """open_clip logs on the root logger (a failed download as an ERROR line before ours): drop those
    while it builds a model; its failures reach the user as the one-line error."""
    def drop(record: logging.LogRecord) -> bool:  # a logger's filters see only records logged on it
        return False

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def published_resize(images: torch.Tensor) -> torch.Tensor:
    """evaluate.py's input to both metrics: PIL image → Resize((224, 224)) (bilinear) → ToTensor."""
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize((PUBLISHED_SIZE, PUBLISHED_SIZE)), transforms.ToTensor()])
    return torch.stack([transform(image) for image in to_pil(images)]).to(images.device)


def clip_architecture(model_name: str, pretrained: str | None) -> str:
    """The open_clip name that builds the activation ``pretrained`` was trained with: plain names such as
    ViT-B-16 build GELU, and open_clip only warns when OpenAI's QuickGELU weights are loaded into them."""
    import open_clip

    trained_quick = open_clip.get_pretrained_cfg(model_name, pretrained or "").get("quick_gelu", False)
    built_quick = (open_clip.get_model_config(model_name) or {}).get("quick_gelu", False)
    return f"{model_name}-quickgelu" if trained_quick and not built_quick else model_name


def tiny_clip():
    """A few-million-parameter open_clip CLIP with random weights, for tests and dry runs."""
    import open_clip

    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=32, image_size=224),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
    )


def tiny_hf_clip():
    """A transformers CLIPModel of about 2 M random weights with ViT-B/16's vocabulary and 224² input."""
    from transformers import CLIPConfig, CLIPModel

    from cpds_exp.models import CLIP_VOCAB_SIZE

    return CLIPModel(CLIPConfig(
        text_config={"vocab_size": CLIP_VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"image_size": 224, "patch_size": 32, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=32,
    ))


class ClipScore:
    """Cosine similarity between an image and a prompt under open_clip's CLIP (the corrected protocol).

    ``name`` is what was built: ``<architecture>/<weights>``, or the architecture alone for random weights.
    """

    def __init__(self, model_name: str = "ViT-B-16-quickgelu", pretrained: str | None = "openai"):
        import open_clip

        if model_name == "tiny":
            self.model, architecture = tiny_clip(), "tiny"
        else:
            architecture = clip_architecture(model_name, pretrained)
            downloads = bool(pretrained) and not os.path.isfile(pretrained)  # a tag, not a checkpoint file
            offline = offline_reason() if downloads else None
            try:
                with _without_root_log_records():
                    self.model = open_clip.create_model(architecture, pretrained=pretrained)
            except Exception as err:  # open_clip raises RuntimeError, OSError or hub errors offline
                raise _unavailable(f"CLIP {architecture} with {pretrained!r} weights", err,
                                   clip_download_size(architecture), offline) from err
        self.model.eval().requires_grad_(False)
        self.name = f"{architecture}/{pretrained}" if pretrained else architecture
        self.tokenizer = open_clip.get_tokenizer("ViT-B-16" if model_name == "tiny" else architecture)
        preprocess = open_clip.transform.PreprocessCfg(**open_clip.get_model_preprocess_cfg(self.model))
        self.transform = open_clip.transform.image_transform_v2(preprocess, is_train=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → CLIP input, through open_clip's own eval transform (bicubic resize of
        the short side, centre crop, CLIP mean/std): on 8-bit images as it was trained, via PIL."""
        return torch.stack([self.transform(image) for image in to_pil(images)])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        image_features = self.model.encode_image(self.preprocess(images).to(device))
        text_features = self.model.encode_text(self.tokenizer(prompts).to(device))
        return F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)


def published_clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """torchmetrics' CLIPScore divided by 100, as evaluate.py reported it: max(100·cos, 0) / 100 per image
    (evaluate.py scored one image per call, so torchmetrics' clamp of the batch mean is per image)."""
    cosine = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return (100 * cosine).clamp(min=0) / 100


class PublishedClipScore:
    """The published evaluation's CLIP score: transformers' CLIPModel and CLIPImageProcessor fed [0, 1]
    tensors, as torchmetrics' CLIPScore does; the processor rescales them by 1/255 again, so the model
    sees pixels in [0, 1/255] (SPEC §5). The tokenizer is the OpenAI CLIP vocabulary built offline,
    whose ids are those of every OpenAI CLIP checkpoint."""

    def __init__(self, hf_model: str = "openai/clip-vit-base-patch16"):
        from transformers import CLIPImageProcessor, CLIPModel

        from cpds_exp.models import offline_clip_tokenizer

        if hf_model == "tiny":
            self.model, self.processor = tiny_hf_clip(), CLIPImageProcessor()
        else:
            offline = None if Path(hf_model).expanduser().is_dir() else offline_reason()
            try:
                self.model = CLIPModel.from_pretrained(hf_model, local_files_only=offline is not None)
                self.processor = CLIPImageProcessor.from_pretrained(hf_model, local_files_only=offline is not None)
            except (OSError, ValueError) as err:  # out of reach: OSError; a malformed id: ValueError
                raise _unavailable(f"CLIP {hf_model} for metrics.protocol=published", err,
                                   clip_download_size(hf_model), offline) from err
        self.model.eval().requires_grad_(False)
        self.name = hf_model
        self.tokenizer = offline_clip_tokenizer()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = self.processor(images=list(images.float().cpu()), return_tensors="pt")["pixel_values"]
        text = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        output = self.model(input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device),
                            pixel_values=pixels.to(device))
        return published_clip_score(output.image_embeds, output.text_embeds)


#: lpips' backbone names and the torchvision models it builds for them
LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights", "vgg": "VGG16_Weights"}


def lpips_backbone_weights(net: str):
    """The torchvision ImageNet weights lpips downloads for ``net`` (their URL and size)."""
    from torchvision import models

    return getattr(models, LPIPS_BACKBONES[net]).IMAGENET1K_V1


def backbone_cached(weights) -> bool:
    """Whether torchvision's download of ``weights`` is already in torch's hub cache."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name).is_file()


class Lpips:
    """LPIPS distance between source and edit, at ``size``×``size``.

    ``scale_inputs`` maps [0, 1] images to the [−1, 1] LPIPS expects; the published evaluation passed
    [0, 1] unchanged (SPEC §5).
    """

    def __init__(self, net: str = "squeeze", pretrained: bool = True, size: int = 224, scale_inputs: bool = True):
        import lpips

        if net not in LPIPS_BACKBONES:
            raise CpdsError(f"metrics.lpips_net={net!r}: use squeeze (the paper), alex or vgg")
        weights = lpips_backbone_weights(net)
        download = f"{weights.meta['_file_size']:.0f} MB"
        offline = offline_reason() if pretrained and not backbone_cached(weights) else None
        if offline:  # torchvision's download has no timeout: do not start one offline
            raise weights_unavailable(f"the LPIPS {net} backbone", download, offline, NO_METRICS)
        try:
            with warnings.catch_warnings():  # lpips builds torchvision's backbone with the deprecated `pretrained`
                for deprecation in ("The parameter 'pretrained' is deprecated", "Arguments other than a weight enum"):
                    warnings.filterwarnings("ignore", message=deprecation, category=UserWarning)
                self.model = lpips.LPIPS(net=net, pnet_rand=not pretrained, verbose=False)
        except Exception as err:  # torchvision's download fails with URLError offline
            raise _unavailable(f"the LPIPS {net} backbone", err, download, None) from err
        self.model.eval().requires_grad_(False)
        self.size, self.scale_inputs = size, scale_inputs

    @torch.no_grad()
    def __call__(self, source: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device

        def prepare(images: torch.Tensor) -> torch.Tensor:
            images = F.interpolate(images.float().to(device), size=(self.size, self.size), mode="bilinear",
                                   align_corners=False, antialias=True)
            return images * 2 - 1 if self.scale_inputs else images

        return self.model(prepare(source), prepare(edited)).flatten()


class Metrics:
    """Both metrics for a batch of (source, edit, target prompt), under ``config.protocol``."""

    def __init__(self, config: MetricsConfig, device: torch.device):
        self.protocol = config.protocol
        published = config.protocol == "published"
        if published:
            self.clip = PublishedClipScore(config.hf_clip_model)
        else:
            self.clip = ClipScore(config.clip_model, config.clip_pretrained)
        size = PUBLISHED_SIZE if published else config.lpips_size
        self.lpips = Lpips(config.lpips_net, config.lpips_pretrained, size, scale_inputs=not published)
        self.clip.model.to(device)
        self.lpips.model.to(device)

    def describe(self) -> dict[str, str]:
        """What produced the scores, for every record: scores of different protocols do not compare."""
        return {"metrics_protocol": self.protocol, "clip_model": self.clip.name}

    def __call__(self, source: torch.Tensor, edited: torch.Tensor, target_prompts: list[str]) -> list[dict[str, float]]:
        if self.protocol == "published":  # evaluate.py resized both images before either metric
            source, edited = published_resize(source), published_resize(edited)
        clip = self.clip(edited, target_prompts).cpu()
        distance = self.lpips(source, edited).cpu()
        return [{"clip": c.item(), "lpips": d.item()} for c, d in zip(clip, distance)]


@functools.lru_cache(maxsize=4)
def load_metrics(config: MetricsConfig, device: str) -> Metrics | None:
    """The metric models for ``config`` on ``device``, built once per process (None when disabled)."""
    if not config.enabled:
        return None
    metrics = Metrics(config, torch.device(device))
    log.info("metrics (%s protocol): CLIP %s, LPIPS %s", config.protocol, metrics.clip.name, config.lpips_net)
    return metrics

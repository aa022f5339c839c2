"""Images and prompt pairs to edit, and their preparation for the VAE.

Every dataset (a Hydra ``dataset`` option) is a callable returning a list of :class:`EditItem`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cpds_exp.errors import CpdsError

PREP_MODES = ("resize", "center_crop")


@dataclass
class EditItem:
    """One edit: a source image and the prompt pair that describes it before and after."""

    name: str
    image: Image.Image
    source_prompt: str
    target_prompt: str


def check_prompt(prompt: str | None, which: str) -> str:
    """Refuse empty prompts, which would silently turn the edit into unconditional guidance."""
    if prompt is None or not str(prompt).strip():
        raise CpdsError(f"the {which} prompt is empty: set dataset.{which}_prompt='a photo of ...'")
    return str(prompt).strip()


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with EXIF orientation applied."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CpdsError(f"image {str(path)!r} does not exist: check dataset.image")
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise CpdsError(f"image {str(path)!r} cannot be read as an image ({err.__class__.__name__}): "
                        "pass a PNG or JPEG file") from err


def prepare_image(image: Image.Image, resolution: int, mode: str = "resize") -> torch.Tensor:
    """PIL image → (1, 3, R, R) in [−1, 1].

    ``resize`` stretches to R×R as the published code does; ``center_crop`` keeps the aspect
    ratio by cropping the longer side first.
    """
    if resolution <= 0 or resolution % 64:
        raise CpdsError(f"resolution={resolution} is not a positive multiple of 64: use 512 (or 256, 768, ...)")
    if mode == "center_crop":
        image = ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC)
    elif mode == "resize":
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    else:
        raise CpdsError(f"image_prep={mode!r} is unknown: use one of {', '.join(PREP_MODES)}")
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] → PIL images."""
    array = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
    return [Image.fromarray(a.astype(np.uint8)) for a in array]


def single(image: str, source_prompt: str, target_prompt: str) -> list[EditItem]:
    """One image file and its prompt pair."""
    return [EditItem(Path(image).stem, load_image(image), check_prompt(source_prompt, "source"),
                     check_prompt(target_prompt, "target"))]


def sample(source_prompt: str, target_prompt: str) -> list[EditItem]:
    """A real photograph that ships with scikit-learn (a dahlia), so a first run needs no files."""
    from sklearn.datasets import load_sample_image

    image = Image.fromarray(load_sample_image("flower.jpg"))
    return [EditItem("dahlia", image, check_prompt(source_prompt, "source"), check_prompt(target_prompt, "target"))]

"""Images and prompt pairs to edit, and their preparation for the VAE.

Every dataset (a Hydra ``dataset`` option) is a callable returning a list of :class:`EditItem`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cpds_exp.errors import CpdsError

PREP_MODES = ("resize", "center_crop")


@dataclass
class EditItem:
    """One edit: a source image (in memory or a file read on demand) and its prompt pair."""

    name: str
    source_prompt: str
    target_prompt: str
    task: str | None = None
    path: Path | None = None
    image: Image.Image | None = None

    def load(self) -> Image.Image:
        """The image as RGB; a file that cannot be read raises :class:`CpdsError`."""
        return self.image if self.image is not None else load_image(self.path)


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
    array = (images.detach().float().nan_to_num(0.0).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
    return [Image.fromarray(a.astype(np.uint8)) for a in array]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def single(image: str, source_prompt: str, target_prompt: str | Sequence[str]) -> list[EditItem]:
    """One image file and its prompt pair, or several target prompts (one edit each, batchable)."""
    path = Path(image)
    source = check_prompt(source_prompt, "source")
    targets = [target_prompt] if isinstance(target_prompt, str) else list(target_prompt)
    if not targets:
        raise CpdsError("dataset.target_prompt is an empty list: give one prompt or a list of them")
    picture = load_image(path)  # a single image fails at once on a bad file
    if len(targets) == 1:
        return [EditItem(path.stem, source, check_prompt(targets[0], "target"), path=path, image=picture)]
    return [EditItem(f"{path.stem}-{slug(t)}", source, check_prompt(t, "target"), path=path, image=picture)
            for t in targets]


def slug(text: str) -> str:
    """A file-name-safe version of a prompt."""
    return "_".join("".join(c if c.isalnum() else " " for c in text.lower()).split())[:60] or "prompt"


def sample(source_prompt: str, target_prompt: str) -> list[EditItem]:
    """A real photograph that ships with scikit-learn (a dahlia), so a first run needs no files."""
    from sklearn.datasets import load_sample_image

    image = Image.fromarray(load_sample_image("flower.jpg"))
    return [EditItem("dahlia", check_prompt(source_prompt, "source"), check_prompt(target_prompt, "target"),
                     image=image)]


def folder(path: str, source_prompt: str, target_prompt: str, task: str | None = None,
           limit: int | None = None) -> list[EditItem]:
    """Every image in a directory (sorted by name), all with one prompt pair."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CpdsError(f"dataset folder {str(root)!r} does not exist: set dataset.path=/path/to/images")
    files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise CpdsError(f"dataset folder {str(root)!r} has no images ({', '.join(IMAGE_SUFFIXES)}): "
                        "point dataset.path at a folder of photos")
    stems = [f.stem for f in files]
    source, target = check_prompt(source_prompt, "source"), check_prompt(target_prompt, "target")
    items = [EditItem(f.stem if stems.count(f.stem) == 1 else f.name, source, target, task, path=f) for f in files]
    return _first(items, limit)


def _first(items: list[EditItem], limit: int | None) -> list[EditItem]:
    """The first ``limit`` items (all when null)."""
    if limit is not None and limit <= 0:
        raise CpdsError(f"dataset.limit={limit} must be positive, or null for every image")
    return items[:limit] if limit else items


MANIFEST_COLUMNS = ("image", "source_prompt", "target_prompt")


def _manifest_rows(path: Path) -> list[dict]:
    import csv
    import json

    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise CpdsError(f"manifest {str(path)!r} line {number} is not JSON ({err.msg})") from err
        return rows
    raise CpdsError(f"manifest {str(path)!r} must be a .csv or .jsonl file")


def manifest(path: str, task: str | None = None, limit: int | None = None) -> list[EditItem]:
    """Rows of (image, source_prompt, target_prompt[, name]) from a CSV or JSONL file; image paths
    are relative to the manifest's folder."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CpdsError(f"manifest {str(file)!r} does not exist: set dataset.path=/path/to/manifest.csv")
    rows = _manifest_rows(file)
    if not rows:
        raise CpdsError(f"manifest {str(file)!r} has no rows")
    missing = [c for c in MANIFEST_COLUMNS if c not in rows[0]]
    if missing:
        raise CpdsError(f"manifest {str(file)!r} lacks column(s) {', '.join(missing)} "
                        f"(it has {', '.join(rows[0])}); it needs {', '.join(MANIFEST_COLUMNS)}")
    items = []
    for index, row in enumerate(rows):
        image = file.parent / str(row["image"])
        name = str(row.get("name") or f"{index:05d}_{image.stem}")
        try:
            items.append(EditItem(name, check_prompt(row["source_prompt"], "source"),
                                  check_prompt(row["target_prompt"], "target"), row.get("task", task), path=image))
        except CpdsError:
            raise CpdsError(f"manifest {str(file)!r} row {index + 1} has an empty prompt: fill in its "
                            "source_prompt and target_prompt") from None
    return _first(items, limit)

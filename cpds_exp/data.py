"""Images and prompt pairs to edit, and their preparation for the VAE.

Every dataset (a Hydra ``dataset`` option) is a callable returning a list of :class:`EditItem`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from cpds_exp.errors import CpdsError
from cpds_exp.naming import safe_name, short_hash

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
    """Open an image file as RGB, with EXIF orientation applied.

    Pillow's decoders raise many exception types on a bad file (OSError, ValueError, SyntaxError,
    struct.error, DecompressionBombError, ...): each becomes one :class:`CpdsError`, so a dataset run
    skips the image instead of dying."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CpdsError(f"image {str(path)!r} does not exist: check dataset.image")
    try:
        with Image.open(path) as img:
            return _to_8bit(ImageOps.exif_transpose(img)).convert("RGB")
    except Exception as err:  # whatever a decoder raises, the file is unreadable
        detail = " ".join(str(err).split())[:200]
        raise CpdsError(f"image {str(path)!r} cannot be read as an image ({err.__class__.__name__}: {detail}): "
                        "re-save it as an ordinary PNG or JPEG") from err


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale as 8-bit ``L``, since ``convert("RGB")`` clips them at 255.

    ``I;16*`` spans 0..65535; ``I`` too unless all its values fit 0..255 (an 8-bit image stored wide);
    ``F`` spans 0..1 unless a value exceeds 1, then 0..255. Values outside the span are clipped."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    array = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if image.mode == "F":
        top = 1.0 if array.max(initial=0) <= 1 else 255.0
    else:
        top = 255.0 if image.mode == "I" and array.max(initial=0) <= 255 else 65535.0
    return Image.fromarray((np.clip(array / top, 0, 1) * 255).round().astype(np.uint8))


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


def single(image: str, source_prompt: str, target_prompt: str | Sequence[str], task: str | None = None
           ) -> list[EditItem]:
    """One image file and its prompt pair, or several target prompts (one edit each, batchable);
    ``task`` names the prompt pair in the records (an experiment on one image of a task)."""
    path = Path(image)
    source = check_prompt(source_prompt, "source")
    targets = [target_prompt] if isinstance(target_prompt, str) else list(target_prompt)
    if not targets:
        raise CpdsError("dataset.target_prompt is an empty list: give one prompt or a list of them")
    picture = load_image(path)  # a single image fails at once on a bad file
    if len(targets) == 1:
        return [EditItem(path.stem, source, check_prompt(targets[0], "target"), task, path=path, image=picture)]
    return unique_names([EditItem(f"{path.stem}-{slug(t)}", source, check_prompt(t, "target"), task, path=path,
                                  image=picture) for t in targets])


def slug(text: str) -> str:
    """A short lower-case file name for a prompt or key (a prompt's edit folder, a benchmark image)."""
    return safe_name(text.lower(), 60)


def unique_names(items: list[EditItem]) -> list[EditItem]:
    """The items with names that no two share, even on a case-insensitive disk, since each name is
    an output folder.

    Colliding names get ``-`` and a hash of the image's file name (not its folder, so a moved
    dataset keeps its names) and prompts: the same in every run whatever the order. Unique names are
    kept, so earlier results keep their folders. Identical items (same image and prompts) are the
    same edit asked for again; each still runs, the later ones suffixed ``-2``, ``-3``, ... in
    order. Renaming an already unique list changes nothing."""
    counts = Counter(item.name.casefold() for item in items)
    repeats: Counter[str] = Counter()
    out = []
    for item in items:
        if counts[item.name.casefold()] == 1:
            out.append(item)
            continue
        digest = short_hash(item.path.name if item.path else "", item.source_prompt, item.target_prompt)
        name = f"{item.name}-{digest}"
        repeats[name.casefold()] += 1
        repeat = repeats[name.casefold()]
        out.append(replace(item, name=name if repeat == 1 else f"{name}-{repeat}"))
    return out


def task_in_use(resolved: dict) -> dict | None:
    """The task group of a resolved config if the dataset's edits carry its name, else None.

    The task group names the prompt pair of the datasets that read it (folder, cats, a single image
    with ``dataset.task=${task.name}``); for the others (the sample, a manifest) its default would
    label the run with a task its edits do not have. Written with this, config.yaml and the W&B
    config say the ``task`` that every edit's summary.json says."""
    task = resolved.get("task")
    return task if task and (resolved.get("dataset") or {}).get("task") == task.get("name") else None


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
    return _first(unique_names(items), limit)


def _first(items: list[EditItem], limit: int | None) -> list[EditItem]:
    """The first ``limit`` items (all when null)."""
    if limit is not None and limit <= 0:
        raise CpdsError(f"dataset.limit={limit} must be positive, or null for every image")
    return items[:limit] if limit else items


MANIFEST_COLUMNS = ("image", "source_prompt", "target_prompt")


def _manifest_text(path: Path) -> str:
    """The file as text: UTF-8, with or without the byte-order mark Excel's "CSV UTF-8" writes."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise CpdsError(f"manifest {str(path)!r} line {line} is not UTF-8 text: save it as UTF-8") from None


def _manifest_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number as an editor shows it, row) for every row; CSV's header is line 1."""
    import csv
    import io
    import json

    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise CpdsError(f"manifest {str(path)!r} must be a .csv or .jsonl file")
    text = _manifest_text(path)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise CpdsError(f"manifest {str(path)!r} lacks column(s) {', '.join(missing)} "
                            f"(it has {', '.join(reader.fieldnames or ())}); it needs {', '.join(MANIFEST_COLUMNS)}")
        return [(reader.line_num, row) for row in reader]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CpdsError(f"manifest {str(path)!r} line {number} is not JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise CpdsError(f"manifest {str(path)!r} line {number} is not a JSON object but "
                                f"{type(row).__name__}: write one {{\"image\": ..., ...}} object a line")
            rows.append((number, row))
    return rows


def manifest(path: str, task: str | None = None, limit: int | None = None) -> list[EditItem]:
    """Rows of (image, source_prompt, target_prompt[, name]) from a CSV or JSONL file; image paths
    are relative to the manifest's folder, names are made file-name safe and unique."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CpdsError(f"manifest {str(file)!r} does not exist: set dataset.path=/path/to/manifest.csv")
    rows = _manifest_rows(file)
    if not rows:
        raise CpdsError(f"manifest {str(file)!r} has no rows")
    items = []
    for index, (line, row) in enumerate(rows):
        missing = [c for c in MANIFEST_COLUMNS if row.get(c) is None or not str(row[c]).strip()]
        if missing:
            raise CpdsError(f"manifest {str(file)!r} line {line} has no {', '.join(missing)}: every row needs "
                            f"a non-empty {', '.join(MANIFEST_COLUMNS)}")
        image = file.parent / str(row["image"])
        given = str(row.get("name") or "").strip()
        name = safe_name(given) if given else f"{index:05d}_{image.stem}"
        items.append(EditItem(name, str(row["source_prompt"]).strip(), str(row["target_prompt"]).strip(),
                              row.get("task", task), path=image))
    return _first(unique_names(items), limit)

"""A LAION-style benchmark builder: filter, rank against a query, de-duplicate, write a manifest.

The paper's cats were drawn from LAION-5B (SPEC §6). Downloading stays with img2dataset; for
example, for a LAION metadata parquet (``url``/``caption`` plus the LAION score columns)::

    img2dataset --url_list laion_meta.parquet --input_format parquet \\
        --url_col url --caption_col caption --output_format webdataset \\
        --save_additional_columns '["similarity","punsafe","pwatermark"]' \\
        --output_folder shards --image_size 512 --resize_mode keep_ratio --processes_count 8

(``--output_format files`` writes a folder instead; both layouts are read here.) The builder
then works on what is on disk:

1. metadata rules: NSFW probability ≤ ``max_nsfw``, watermark probability ≤ ``max_watermark``,
   width and height ≥ the minimum (metadata sizes, else the image's), and the image present;
2. LAION's CLIP rule: image–caption cosine ≥ ``min_similarity`` (0.28 with ViT-B/32),
   recomputed from the image (the metadata ``similarity`` is only used for rows without one);
3. ranking by the image's CLIP cosine to the query, then greedy de-duplication: an image whose
   embedding cosine to a higher-ranked kept image is ≥ ``dedup_threshold`` is dropped;
4. the top N go to the out folder as ``0001_<key>.png``, ... with ``manifest.csv`` (read by the
   ``manifest`` dataset), ``selection.csv`` (every row: kept or dropped, and why) and
   ``preview/contact_sheet.png``. Only the chosen images are PNGs at the top level, so the
   folder also works as ``dataset=cats dataset.path=<out>`` (the ``folder`` dataset).

LAION's categorical ``NSFW`` column (UNLIKELY / UNSURE / NSFW) is read as 0, 0.5 and 1.
"""
from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from cpds_exp.data import IMAGE_SUFFIXES, slug
from cpds_exp.errors import CpdsError
from cpds_exp.evaluation.report import labelled_grid
from cpds_exp.results import csv_text, save_image, write_text

#: Accepted spellings of each metadata field, first match wins (LAION releases differ).
COLUMNS: dict[str, tuple[str, ...]] = {
    "key": ("key", "sample_id", "SAMPLE_ID", "id"),
    "url": ("url", "URL"),
    "caption": ("caption", "TEXT", "text"),
    "width": ("width", "WIDTH", "original_width"),
    "height": ("height", "HEIGHT", "original_height"),
    "similarity": ("similarity", "SIMILARITY", "clip_similarity"),
    "nsfw": ("punsafe", "NSFW", "nsfw", "pnsfw"),
    "watermark": ("pwatermark", "watermark", "WATERMARK"),
}
REQUIRED = ("caption", "nsfw", "watermark")
NSFW_LABELS = {"UNLIKELY": 0.0, "UNSURE": 0.5, "NSFW": 1.0}
SELECTION_COLUMNS = ("key", "status", "rank", "reason", "caption", "url", "width", "height", "nsfw", "watermark",
                     "metadata_similarity", "clip_similarity", "query_similarity")


@dataclass
class Rules:
    """LAION's filters; the defaults are LAION-5B's English CLIP threshold and common score cut-offs."""

    min_similarity: float = 0.28
    max_nsfw: float = 0.5
    max_watermark: float = 0.8
    min_width: int = 256
    min_height: int = 256
    dedup_threshold: float = 0.95


@dataclass
class Candidate:
    """One metadata row, its image on disk (a path or tar bytes) and what the builder found."""

    key: str
    caption: str
    url: str | None = None
    width: float | None = None
    height: float | None = None
    similarity: float | None = None
    nsfw: float | None = None
    watermark: float | None = None
    source: Path | bytes | None = None
    clip_similarity: float | None = None
    query_similarity: float | None = None
    reasons: list[str] = field(default_factory=list)
    rank: int | None = None

    def image(self) -> Image.Image:
        """The image as RGB, read on demand so that large folders are not held in memory."""
        return self._read(lambda img: img.convert("RGB"))

    def size(self) -> tuple[int, int]:
        """Width and height from the file's header, without decoding the pixels."""
        return self._read(lambda img: img.size)

    def _read(self, use: Callable[[Image.Image], Any]) -> Any:
        try:
            with Image.open(io.BytesIO(self.source) if isinstance(self.source, bytes) else self.source) as img:
                return use(img)
        except (UnidentifiedImageError, OSError) as err:
            raise CpdsError(f"image of row {self.key!r} cannot be read ({err.__class__.__name__}): "
                            "re-download it or delete it") from err


class Embedder(Protocol):
    """Unit-norm CLIP embeddings; injectable so that tests control every similarity."""

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def texts(self, texts: Sequence[str]) -> torch.Tensor: ...


class ClipEmbedder:
    """open_clip embeddings; ``model_name="tiny"`` gives random weights for dry runs and tests."""

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = "openai", device: str = "cpu"):
        from cpds_exp.evaluation.metrics import ClipScore

        try:
            self.clip = ClipScore(model_name, pretrained)
        except CpdsError as err:
            raise CpdsError(f"cannot load CLIP {model_name} with {pretrained!r} weights for the benchmark builder: "
                            "connect once to cache them, or pass --clip tiny for a dry run") from err
        self.device = torch.device(device)
        self.clip.model.to(self.device)

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = torch.cat([self.clip.preprocess(_to_tensor(img)) for img in images]).to(self.device)
        return F.normalize(self.clip.model.encode_image(batch).float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.clip.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.clip.model.encode_text(tokens).float(), dim=-1).cpu()


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL → (1, 3, H, W) in [0, 1], what ClipScore.preprocess takes."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


# --- reading metadata and images -----------------------------------------------------------
def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a parquet, CSV or JSONL metadata file as dicts."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CpdsError(f"metadata {str(path)!r} does not exist: pass --metadata /path/to/laion.parquet")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise CpdsError("reading parquet needs pyarrow: pip install pyarrow (or pass a .csv)") from err
        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    if suffix in (".jsonl", ".ndjson"):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    raise CpdsError(f"metadata {str(path)!r} must be .parquet, .csv or .jsonl")


def _column(fields: Sequence[str], name: str) -> str | None:
    return next((c for c in COLUMNS[name] if c in fields), None)


def _number(value: Any, name: str, key: str) -> float | None:
    """A metadata score as a float: empty is None, LAION's NSFW labels are mapped to 0/0.5/1."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().upper() in NSFW_LABELS:
        return NSFW_LABELS[value.strip().upper()]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CpdsError(f"metadata row {key!r} has {name}={value!r}, not a number") from None


def url_key(url: str) -> str:
    """The file stem a URL would be saved under, for folders named after URLs."""
    return Path(urlparse(url).path).stem


def candidates_from_rows(rows: Sequence[dict[str, Any]], where: str) -> list[Candidate]:
    """Normalise LAION column spellings; a row's key is its ``key`` column, else its URL's file stem."""
    if not rows:
        raise CpdsError(f"metadata {where} has no rows")
    fields = list(dict.fromkeys(f for row in rows for f in row))
    names = {name: _column(fields, name) for name in COLUMNS}
    missing = [name for name in REQUIRED if names[name] is None]
    if names["key"] is None and names["url"] is None:
        missing.append("key or url")
    if missing:
        wanted = "; ".join(f"{n}: {' or '.join(COLUMNS.get(n, ('key', 'url')))}" for n in missing)
        raise CpdsError(f"metadata {where} lacks column(s) {', '.join(missing)} (accepted: {wanted})")
    out = []
    for index, row in enumerate(rows):
        url = row.get(names["url"]) if names["url"] else None
        key = str(row.get(names["key"]) or "") if names["key"] else ""
        key = key or (url_key(url) if url else f"row{index:06d}")
        numbers = {name: _number(row.get(names[name]), name, key) if names[name] else None
                   for name in ("width", "height", "similarity", "nsfw", "watermark")}
        out.append(Candidate(key=key, caption=str(row.get(names["caption"]) or ""), url=url, **numbers))
    return out


def _key_of(member: str) -> tuple[str, str]:
    """``shard/000000012.jpg`` → (``000000012``, ``jpg``): webdataset keys end at the first dot."""
    base = member.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext.lower()


def read_shards(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """Metadata rows (each sample's JSON, caption from its .txt when absent) and image bytes by key."""
    rows: dict[str, dict[str, Any]] = {}
    images: dict[str, bytes] = {}
    for path in paths:
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _key_of(member.name)
                    data = tar.extractfile(member).read()
                    row = rows.setdefault(key, {"key": key})
                    if f".{ext}" in IMAGE_SUFFIXES:
                        images[key] = data
                    elif ext == "json":
                        row.update({k: v for k, v in json.loads(data).items() if k != "key"})
                    elif ext == "txt":
                        row.setdefault("caption", data.decode("utf-8").strip())
        except tarfile.TarError as err:
            raise CpdsError(f"shard {str(path)!r} is not a readable tar ({err}): re-run img2dataset") from err
    return list(rows.values()), images


def images_in_folder(root: Path) -> dict[str, Path]:
    """Image files under ``root`` by file stem (img2dataset's ``files`` layout names them by key)."""
    return {f.stem: f for f in sorted(root.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()}


def load_candidates(images: str | Path, metadata: str | Path | None = None) -> list[Candidate]:
    """Rows from ``metadata`` (or the shards' JSON) joined by key with images from a folder or tars."""
    root = Path(images).expanduser()
    if not root.exists():
        raise CpdsError(f"images {str(root)!r} do not exist: pass --images a folder or webdataset .tar shards")
    shards = [root] if root.suffix == ".tar" else sorted(root.glob("*.tar"))
    if shards:
        shard_rows, found = read_shards(shards)
        by_key: dict[str, Path | bytes] = dict(found)
    else:
        shard_rows, by_key = [], dict(images_in_folder(root))
    if not by_key:
        raise CpdsError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}: download them with img2dataset")
    if metadata is not None:
        rows, where = read_table(metadata), repr(str(metadata))
        extra = {row["key"]: row for row in shard_rows}
        rows = [{**extra.get(str(row.get("key", "")), {}), **row} for row in rows]
    elif shard_rows:
        rows, where = shard_rows, f"in the shards under {str(root)!r}"
    else:
        raise CpdsError("a folder of images needs --metadata (parquet/CSV with url, caption, punsafe, pwatermark, ...)")
    candidates = candidates_from_rows(rows, where)
    for candidate in candidates:
        candidate.source = by_key.get(candidate.key)
    return candidates


# --- the rules, ranking and de-duplication -------------------------------------------------
def _size(candidate: Candidate) -> tuple[float, float] | None:
    """Metadata width × height, else the image's own (read from the header only)."""
    if candidate.width is not None and candidate.height is not None:
        return candidate.width, candidate.height
    return None if candidate.source is None else candidate.size()


def metadata_reasons(candidate: Candidate, rules: Rules) -> list[str]:
    """Every metadata rule a row breaks (the CLIP rule needs the embeddings and comes later)."""
    reasons = []
    if candidate.nsfw is None or candidate.nsfw > rules.max_nsfw:
        reasons.append(f"nsfw {candidate.nsfw} > {rules.max_nsfw}")
    if candidate.watermark is None or candidate.watermark > rules.max_watermark:
        reasons.append(f"watermark {candidate.watermark} > {rules.max_watermark}")
    size = _size(candidate)
    if size is not None and (size[0] < rules.min_width or size[1] < rules.min_height):
        reasons.append(f"size {size[0]:g}x{size[1]:g} < {rules.min_width}x{rules.min_height}")
    if not candidate.caption.strip():
        reasons.append("empty caption")
    if candidate.source is None:
        if candidate.similarity is None or candidate.similarity < rules.min_similarity:
            reasons.append(f"metadata similarity {candidate.similarity} < {rules.min_similarity}")
        reasons.append("no image on disk")
    return reasons


def embed(candidates: Sequence[Candidate], embedder: Embedder, batch_size: int = 32) -> torch.Tensor:
    """(N, D) unit image embeddings, in batches so that large folders fit in memory."""
    return torch.cat([embedder.images([c.image() for c in candidates[i: i + batch_size]])
                      for i in range(0, len(candidates), batch_size)])


def dedup(order: Sequence[int], embeddings: torch.Tensor, threshold: float) -> dict[int, int]:
    """Greedy over ``order`` (best first): index → the kept index it duplicates (absent when kept)."""
    kept: list[int] = []
    duplicates = {}
    for index in order:
        if kept:
            cosines = embeddings[kept] @ embeddings[index]
            best = int(cosines.argmax())
            if cosines[best] >= threshold:
                duplicates[index] = kept[best]
                continue
        kept.append(index)
    return duplicates


def select(candidates: list[Candidate], query: str, top: int, embedder: Embedder,
           rules: Rules = Rules()) -> list[Candidate]:
    """Apply the rules, rank by query similarity, de-duplicate; returns the top kept, best first.

    Every candidate's ``reasons`` says why it was dropped (empty for the kept ones)."""
    if top < 1:
        raise CpdsError(f"--top {top} must be at least 1")
    for candidate in candidates:
        candidate.reasons = metadata_reasons(candidate, rules)
    passing = [c for c in candidates if not c.reasons]
    if not passing:
        return []
    image_emb = embed(passing, embedder)
    caption_emb = embedder.texts([c.caption for c in passing])
    query_emb = embedder.texts([query])[0]
    for candidate, image, caption in zip(passing, image_emb, caption_emb):
        candidate.clip_similarity = float(image @ caption)
        candidate.query_similarity = float(image @ query_emb)
        if candidate.clip_similarity < rules.min_similarity:
            candidate.reasons.append(f"clip similarity {candidate.clip_similarity:.3f} < {rules.min_similarity}")
    order = sorted((i for i, c in enumerate(passing) if not c.reasons), key=lambda i: -passing[i].query_similarity)
    duplicates = dedup(order, image_emb, rules.dedup_threshold)
    chosen = []
    for index in order:
        candidate = passing[index]
        if index in duplicates:
            candidate.reasons.append(f"duplicate of {passing[duplicates[index]].key}")
        elif len(chosen) >= top:
            candidate.reasons.append(f"below the top {top}")
        else:
            candidate.rank = len(chosen) + 1
            chosen.append(candidate)
    return chosen


# --- outputs ---------------------------------------------------------------------------------
def selection_rows(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
    """One row per metadata row: kept or dropped, and the rules it broke."""
    return [{"key": c.key, "status": "kept" if c.rank else "dropped", "rank": c.rank or "",
             "reason": "; ".join(c.reasons), "caption": c.caption, "url": c.url or "", "width": c.width,
             "height": c.height, "nsfw": c.nsfw, "watermark": c.watermark, "metadata_similarity": c.similarity,
             "clip_similarity": c.clip_similarity, "query_similarity": c.query_similarity} for c in candidates]


def contact_sheet(chosen: Sequence[Candidate], columns: int = 8, tile: int = 128) -> Image.Image:
    """The chosen images in rank order, ``columns`` a row, labelled by rank."""
    images = [c.image() for c in chosen]
    rows = [images[i: i + columns] for i in range(0, len(images), columns)]
    return labelled_grid(rows, [str(i + 1) for i in range(min(columns, len(images)))],
                         [f"#{i + 1}" for i in range(0, len(images), columns)], tile=tile)


def write_benchmark(out: str | Path, candidates: Sequence[Candidate], chosen: Sequence[Candidate],
                    source_prompt: str, target_prompt: str) -> dict[str, Path]:
    """The images, manifest.csv (paths relative to it), selection.csv and preview/contact_sheet.png.

    The contact sheet sits in a subfolder so that ``out`` holds no PNG but the chosen images."""
    out = Path(out).expanduser()
    manifest = []
    for candidate in chosen:
        name = f"{candidate.rank:04d}_{slug(candidate.key)}"
        save_image(out / f"{name}.png", candidate.image())
        manifest.append({"image": f"{name}.png", "source_prompt": source_prompt,
                         "target_prompt": target_prompt, "name": name, "caption": candidate.caption,
                         "query_similarity": f"{candidate.query_similarity:.4f}"})
    paths = {
        "manifest": write_text(out / "manifest.csv", csv_text(manifest, ("image", "source_prompt", "target_prompt", "name",
                                                                     "caption", "query_similarity"))),
        "selection": write_text(out / "selection.csv", csv_text(selection_rows(candidates), SELECTION_COLUMNS)),
    }
    if chosen:
        paths["contact_sheet"] = save_image(out / "preview" / "contact_sheet.png", contact_sheet(chosen))
    return paths


def build_benchmark(images: str | Path, query: str, top: int, out: str | Path, metadata: str | Path | None = None,
                    embedder: Embedder | None = None, rules: Rules = Rules(), source_prompt: str | None = None,
                    target_prompt: str | None = None,
                    embedder_factory: Callable[[], Embedder] = ClipEmbedder) -> dict[str, Any]:
    """The whole builder; the source prompt defaults to the query, the target to the source."""
    if not query.strip():
        raise CpdsError("--query is empty: pass what the benchmark is of, e.g. 'a photo of a cat'")
    candidates = load_candidates(images, metadata)
    chosen = select(candidates, query, top, embedder or embedder_factory(), rules)
    if not chosen:
        write_text(Path(out) / "selection.csv", csv_text(selection_rows(candidates), SELECTION_COLUMNS))
        raise CpdsError(f"no row of {len(candidates)} passed the rules: see {Path(out) / 'selection.csv'} for why")
    source = (source_prompt or query).strip()
    paths = write_benchmark(out, candidates, chosen, source, (target_prompt or source).strip())
    return {"paths": paths, "chosen": chosen, "candidates": candidates}

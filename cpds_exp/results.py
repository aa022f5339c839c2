"""Run outputs written atomically: a reader never sees a half-written file."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from PIL import Image


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write through ``write(tmp_path)`` next to ``path``, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """A JSON record (summary.json) as a dict, or None when it is missing or damaged in any way
    (unreadable, not UTF-8, not JSON, not an object): such an edit counts as not done."""
    try:
        record = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return record if isinstance(record, dict) else None


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as CSV text; ``columns`` picks and orders them (default: every key, first seen first)."""
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def save_image(path: str | os.PathLike, image: Image.Image) -> Path:
    """Save a PNG atomically (the format is fixed so the temporary name does not matter)."""
    return write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def side_by_side(*images: Image.Image) -> Image.Image:
    """Images of one height placed left to right (source | result)."""
    height = max(img.height for img in images)
    canvas = Image.new("RGB", (sum(img.width for img in images), height), "white")
    x = 0
    for img in images:
        canvas.paste(img, (x, 0))
        x += img.width
    return canvas

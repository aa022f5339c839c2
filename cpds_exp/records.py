"""The record of one edit (its ``summary.json``) and the names of what a run logs, each defined once.

The app writes an :class:`EditRecord`; resume and the report read it back through
:func:`load_record`, which refuses anything that does not fit the schema (a damaged file, an
older schema) so that it is recomputed or listed, never half-trusted.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cpds_exp.results import read_record, write_json

SCHEMA_VERSION = 1

# --- logged metric names (W&B history and summary, the record's ``final``, the dashboard) ------
ITERATION = "iteration"
TIMESTEP = "t"
SCORE_GRAD_NORM = "score/grad_norm"
CUT_TOTAL = "cut/total"
ITERATION_TIME = "time/iteration_s"
SELECTOR_ROUND = "selector/{}"          # a training round's value: selector/accuracy, ...
SELECTOR_MEAN = "selector_mean/{}"      # the run summary's mean over rounds
METRIC = "metrics/{}"                   # the run summary's CLIP score and LPIPS
FINAL = "final/{}"                      # the run summary's last logged values


def cut_layer(name: str) -> str:
    """The logged CUT loss of one attention layer."""
    return f"cut/{name}"


STATUSES = ("done", "skipped", "diverged")


@dataclass
class EditRecord:
    """What one edit was (the identity the report groups by) and what came of it."""

    image: str
    source_prompt: str
    target_prompt: str
    method: str
    fingerprint: str
    status: str = "pending"                # done, skipped or diverged once written
    task: str | None = None
    score: str | None = None
    cut: bool = False
    selector: str | None = None
    optimizer: str | None = None
    model: str | None = None
    seed: int | None = None
    lr: float | None = None
    w_dds: float | None = None
    w_cut: float | None = None
    iterations: int | None = None
    resolution: int | None = None
    sweep_name: str | None = None
    device: str | None = None
    dtype: str | None = None
    metrics_protocol: str | None = None
    clip_model: str | None = None
    clip: float | None = None
    lpips: float | None = None
    time_s: float | None = None
    batch_size: int | None = None
    snapshots: list[str] = field(default_factory=list)
    diverged_at: int | None = None
    reason: str | None = None              # why an image was skipped
    image_mtime: float | None = None       # a skipped image is retried once its file changes
    final: dict[str, float] = field(default_factory=dict)
    selector_accuracy: float | None = None
    selector_balanced_accuracy: float | None = None
    selector_rounds: list[dict[str, Any]] = field(default_factory=list)
    selector_means: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/summary.json`` atomically (last, so its presence marks the edit finished)."""
        return write_json(Path(folder) / "summary.json", self.as_dict())


_REQUIRED_TEXT = ("image", "source_prompt", "target_prompt", "method", "fingerprint")
_KNOWN = {f.name for f in fields(EditRecord)}


def from_dict(data: Any) -> EditRecord | None:
    """An :class:`EditRecord` from parsed JSON, or None if it does not fit this schema version."""
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        return None
    if not all(isinstance(data.get(key), str) for key in _REQUIRED_TEXT) or data.get("status") not in STATUSES:
        return None
    try:
        return EditRecord(**{k: v for k, v in data.items() if k in _KNOWN})
    except TypeError:
        return None


def load_record(path: str | os.PathLike) -> EditRecord | None:
    """The record in ``path``, or None when it is missing, damaged or of another schema."""
    return from_dict(read_record(path))

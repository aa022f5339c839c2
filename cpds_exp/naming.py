"""Names that become paths: confined to their folder, distinct for distinct inputs, short enough.

Light on purpose (no torch): Hydra resolves the sweep and job folder names through these
functions before a job starts, in the sweep's process and in every launcher's workers.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

from cpds_exp.errors import CpdsError
from cpds_exp.schema import NON_SEMANTIC_KEYS

#: Overrides that pick what runs, not how (``+experiment=table1``): not part of job folder names.
NOT_IN_JOB_FOLDER = ("experiment",)

_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\[\]-]+")
_MAX_FOLDER = 200  # file systems allow 255 bytes per name; leave room for a hash and suffixes


def short_hash(*parts: str) -> str:
    """8 hex digits of a hash of ``parts``: the same in every process and run (unlike ``hash``)."""
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:8]


def safe_name(text: str, max_length: int = 80) -> str:
    """``text`` as one readable file name that cannot leave its folder: accents dropped, runs of
    characters other than ASCII letters, digits, ``-``, ``_`` and ``.`` replaced by ``_``, no
    leading or trailing ``.``/``_``/``-``. A text cut to ``max_length`` (at least 16) or with nothing
    readable left ends in a hash of it, so distinct texts keep distinct names."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_text).strip("._-")
    if readable and len(readable) <= max_length:
        return readable
    kept = readable[: max_length - 9].rstrip("._-")
    return f"{kept}-{short_hash(text)}" if kept else short_hash(text)


def check_folder_name(value: str, key: str) -> str:
    """``value`` as one folder name, or a one-line error: it must not climb out of its parent."""
    text = str(value)
    if not text or text in (".", "..") or _UNSAFE.search(text) or len(text) > _MAX_FOLDER:
        raise CpdsError(f"{key}={text!r} is not a plain folder name: use letters, digits, '.', '-' and '_' "
                        f"(at most {_MAX_FOLDER} characters), e.g. {key}=table1")
    return text


def _override_value(value: str) -> str:
    """An override's value as it reads in a folder name: itself when safe, else a readable tail
    (a path's last part) and a hash of the whole, so distinct values stay distinct."""
    if not _UNSAFE.search(value) and value not in (".", "..") and len(value) <= 60:
        return value
    tail = _UNSAFE.sub("_", value.rstrip("/").rsplit("/", 1)[-1]).strip("._")[:40]
    return f"{tail}-{short_hash(value)}" if tail else short_hash(value)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _excluded(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in (*NON_SEMANTIC_KEYS, *NOT_IN_JOB_FOLDER))


def job_folder(overrides: list[str]) -> str:
    """A sweep job's folder name from its overrides (``method=cds,lr=0.1``), in a stable order.

    Keys that do not change results are left out, so shards, batch sizes and logging options of
    the same job share one folder (and its finished edits). Values holding paths keep a short
    readable form plus a hash; the name never contains a separator or ``..``.
    """
    parts = []
    for override in sorted(str(o) for o in overrides):
        key = _override_key(override)
        if _excluded(key):
            continue
        value = override.split("=", 1)[1] if "=" in override else ""
        parts.append(f"{key}={_override_value(value)}")
    name = ",".join(parts) or "default"
    return name if len(name) <= _MAX_FOLDER else f"{name[:_MAX_FOLDER - 9]}-{short_hash(name)}"

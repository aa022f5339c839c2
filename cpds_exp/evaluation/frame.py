"""A sweep's edits as tidy data: one pandas row per edit, the statistics every table and figure
shares, and the names readers see (DDS, not ``method=dds``).

Tables, figures, the gallery and W&B all start from :func:`records_frame`, so an edit is counted
the same way everywhere.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
import yaml

METRICS = ("clip", "lpips")
#: the direction in which each metric is better (the best value of a table column goes in bold)
HIGHER_IS_BETTER = {"clip": True, "lpips": False}
METRIC_LABELS = {"clip": "CLIP ↑", "lpips": "LPIPS ↓"}

METHOD_NAMES = {"dds": "DDS", "cds": "CDS", "pds": "PDS", "cpds": "CPDS", "cds_matched": "CDS (matched step)"}
SELECTOR_NAMES = {"random": "Random", "meta": "Meta-learner", "knn": "KNN", "svm": "SVM", "rf": "Random forest"}
ORDERS = {"method": tuple(METHOD_NAMES), "selector": tuple(SELECTOR_NAMES), "task": ("cat2dog", "cat2cow", "cat2pig")}
#: what a table's row header or an axis says for a record field
KEY_TITLES = {"method": "Method", "selector": "Selector", "lr": "Learning rate", "task": "Task",
              "metrics_protocol": "Protocol"}

#: record fields that describe an edit (the candidates for rows, columns and hues)
IDENTITY = ("method", "selector", "lr", "w_cut", "w_dds", "iterations", "optimizer", "seed", "model", "resolution",
            "task", "metrics_protocol")
#: record fields that are containers: they stay out of the tidy frame (see :func:`rounds_frame`)
NESTED = ("snapshots", "final", "selector_rounds", "selector_means", "outputs")


def display_name(key: str, value: Any) -> str:
    """What a reader sees for ``key=value``: "CPDS", "KNN", "lr 0.8", "cat → dog"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "method":
        return METHOD_NAMES.get(value, str(value))
    if key == "selector":
        return SELECTOR_NAMES.get(value, str(value))
    if key == "task" and "2" in str(value):
        source, _, target = str(value).partition("2")
        return f"{source} → {target}"
    if isinstance(value, float):
        return f"{key} {value:g}"
    return f"{key} {value}" if key not in ("image",) else str(value)


def key_title(key: str) -> str:
    """A record field as a header: "Method", "Learning rate"; unknown fields as they are."""
    return KEY_TITLES.get(key, key)


def ordered(values: Iterable[Any], key: str) -> list[Any]:
    """Distinct values in the paper's order (DDS, CDS, PDS, CPDS; tasks as in Table 1), then sorted."""
    order = ORDERS.get(key, ())
    distinct = {v for v in values if not (isinstance(v, float) and math.isnan(v))}
    return sorted(distinct, key=lambda v: (order.index(v) if v in order else len(order),
                                           v if isinstance(v, (int, float)) else math.inf, str(v)))


def job_config(record_dir: str | Path) -> dict[str, Any]:
    """The resolved config of the job an edit belongs to: the nearest ``config.yaml`` above it."""
    for folder in (Path(record_dir), *Path(record_dir).parents):
        path = folder / "config.yaml"
        if path.is_file():
            try:
                loaded = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                return {}
            return loaded if isinstance(loaded, dict) else {}
    return {}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"method": {"terms": {"cut": {"n_patches": 256}}}}`` → ``{"method.terms.cut.n_patches": 256}``."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if not isinstance(value, list) else str(value)
    return flat


def records_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per edit: every scalar field of its record, ``dir`` (its folder), ``source_path`` and
    ``result_path`` (absolute, None when missing), and every key of the jobs' configs that takes more
    than one value across the edits (dotted, e.g. ``method.terms.cut.n_patches``)."""
    rows, configs = [], []
    for record in records:
        row = {k: v for k, v in record.items() if k not in NESTED and k != "_dir"}
        folder = Path(record["_dir"])
        row["dir"] = str(folder.resolve())
        for name in ("source", "result"):
            path = folder / (record.get("outputs") or {}).get(name, f"{name}.png")
            row[f"{name}_path"] = str(path.resolve()) if path.is_file() else None
        rows.append(row)
        configs.append(flatten(job_config(folder)))
    frame = pd.DataFrame(rows)
    config_frame = pd.DataFrame(configs, index=frame.index)
    varying = [c for c in config_frame.columns if c not in frame.columns
               and config_frame[c].astype(str).nunique(dropna=False) > 1]
    return pd.concat([frame, config_frame[varying]], axis=1) if varying else frame


def rounds_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per (edit, selector training round): image, task, method, selector, round and the
    round's accuracy, balanced accuracy and positive rate."""
    rows = [{"image": r["image"], "task": r.get("task"), "method": r.get("method"), "selector": r.get("selector"),
             "fingerprint": r["fingerprint"], **round_}
            for r in records for round_ in (r.get("selector_rounds") or [])]
    return pd.DataFrame(rows)


def varying(frame: pd.DataFrame, keys: Sequence[str] = IDENTITY) -> list[str]:
    """The identity fields that take more than one value in ``frame``."""
    return [k for k in keys if k in frame.columns and frame[k].astype(str).nunique(dropna=False) > 1]


def distinct(frame: pd.DataFrame, keys: Sequence[str]) -> int:
    """How many different combinations of ``keys`` the edits have (1 for no keys)."""
    return len(frame[list(keys)].astype(str).drop_duplicates()) if keys else 1


def splitting(frame: pd.DataFrame, base: Sequence[str], candidates: Iterable[str]) -> list[str]:
    """The candidates, in order, that tell edits apart beyond ``base`` and the ones kept before them:
    lr beside methods is dropped when each method has its own lr, kept when a method ran at two."""
    keys: list[str] = []
    for key in candidates:
        if distinct(frame, [*base, *keys, key]) > distinct(frame, [*base, *keys]):
            keys.append(key)
    return keys


def infer_rows(frame: pd.DataFrame) -> str:
    """The swept parameter that makes a table's rows: the first of method, selector, lr that varies."""
    return next((k for k in ("method", "selector", "lr") if k in varying(frame, ("method", "selector", "lr"))),
                "method")


def ci95(values: Sequence[float] | pd.Series) -> float:
    """Half-width of the t-based 95% confidence interval of the mean; NaN below two values (no
    interval from one edit)."""
    from scipy import stats

    series = pd.Series(values, dtype="float64").dropna()
    if len(series) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(series) - 1) * series.std(ddof=1) / math.sqrt(len(series)))


#: decimals of every metric a reader sees (tables, figures, the gallery); the CSV files keep them all
DECIMALS = 4
MISSING = "–"


def present(value: Any) -> Any:
    """``value``, or None where pandas holds a missing value (None, NaN)."""
    return None if value is None or pd.isna(value) else value


def metric_text(value: Any) -> str:
    """A metric as every table, figure and page prints it: "0.2512", "–" when missing."""
    return MISSING if present(value) is None else f"{value:.{DECIMALS}f}"


def none_for_missing(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """``frame`` with the ``keys`` columns as objects whose missing values are None, so that groups
    and merges treat "no task" as one value that compares equal to itself."""
    return frame.assign(**{k: frame[k].astype(object).where(frame[k].notna(), None) for k in keys})


def aggregate(frame: pd.DataFrame, by: Sequence[str], metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Per group of ``by`` (e.g. method, task, metrics_protocol): ``n`` done, ``n_diverged``,
    ``n_skipped`` and, over the finished edits, ``<metric>`` (mean) and ``<metric>_ci`` (95% half-width,
    NaN when n < 2). Groups keep the paper's order."""
    by = list(by)
    keyed = none_for_missing(frame, by)
    counts = keyed.groupby(by, dropna=False)["status"].agg(
        n=lambda s: int((s == "done").sum()), n_diverged=lambda s: int((s == "diverged").sum()),
        n_skipped=lambda s: int((s == "skipped").sum()))
    done = keyed[keyed["status"] == "done"]
    present = [m for m in metrics if m in done.columns]
    stats = done.groupby(by, dropna=False)[present].agg(["mean", ci95]) if present else None
    table = counts
    if stats is not None and len(stats):
        stats.columns = [m if s == "mean" else f"{m}_ci" for m, s in stats.columns]
        table = counts.join(stats)
    table = none_for_missing(table.reset_index(), by)  # groups give NaN back for None
    for metric in metrics:
        for column in (metric, f"{metric}_ci"):
            if column not in table.columns:
                table[column] = float("nan")
    return in_order(table, by)


def in_order(table: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """``table``'s lines sorted by ``by`` in the paper's order (see :func:`ordered`), renumbered."""
    position = {k: {v: i for i, v in enumerate(ordered(table[k], k))} for k in by}
    order = sorted(range(len(table)), key=lambda i: tuple(position[k].get(table[k].iloc[i], -1) for k in by))
    return table.iloc[order].reset_index(drop=True)

"""From a composed config to edited images on disk: build the pieces, run each edit, write outputs."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from cpds_exp.config import build_terms, edit_settings, has_cut, selector_options, selector_training, validate
from cpds_exp.claims import claimed_batches
from cpds_exp.data import EditItem, prepare_image, task_in_use, to_pil, unique_names
from cpds_exp.editing.editor import EditCallbacks, Editor
from cpds_exp.errors import CpdsError
from cpds_exp.loggers import RunLogger, result_caption, snapshot_caption
from cpds_exp.evaluation.metrics import Metrics, MetricsConfig, load_metrics
from cpds_exp.models import SDStack, load_stack, resolve_device, resolve_dtype
from cpds_exp.editing.selector_training import summarise_rounds
from cpds_exp.naming import NON_SEMANTIC_KEYS
from cpds_exp.schema import FINGERPRINT_DEFAULTS
from cpds_exp.records import FINAL, ITERATION, METRIC, SELECTOR_MEAN, SELECTOR_ROUND, EditRecord, load_record
from cpds_exp.results import save_image, side_by_side, write_atomically, write_text

log = logging.getLogger(__name__)


def build(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate a group option (minus its descriptive ``name``) with runtime ``kwargs``.

    The kwargs reach the target as they are (not converted to OmegaConf containers). A
    misspelt option or a wrong type becomes one line naming the option; a :class:`CpdsError`
    raised by the target comes through as itself.
    """
    params = OmegaConf.to_container(node, resolve=True)
    params.pop("name", None)
    target = params.get("_target_")
    try:
        factory = instantiate(params, _partial_=True, _recursive_=False)
        return factory(**kwargs) if kwargs or not node.get("_partial_", False) else factory
    except InstantiationException as err:
        detail = str(err.__cause__ or err).strip().splitlines()[0]
        raise CpdsError(f"cannot build {target}: {detail}") from err
    except TypeError as err:
        raise CpdsError(f"cannot build {target}: {str(err).splitlines()[0]}") from err


def without_keys(resolved: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A copy of a nested config without ``keys`` (dotted keys name a field of a group)."""
    kept = {k: v for k, v in resolved.items() if k not in keys}
    for key in keys:
        group, _, field = key.partition(".")
        if field and isinstance(kept.get(group), dict):
            kept[group] = {k: v for k, v in kept[group].items() if k != field}
    return kept


def at_defaults(resolved: dict[str, Any]) -> tuple[str, ...]:
    """The keys of FINGERPRINT_DEFAULTS that ``resolved`` leaves at their defaults."""
    def value(key: str) -> Any:
        group, _, name = key.partition(".")
        return resolved.get(group, {}).get(name)

    return tuple(key for key, default in FINGERPRINT_DEFAULTS.items() if value(key) == default)


def edit_fingerprint(resolved: dict[str, Any], item: EditItem) -> str:
    """A hash of everything that determines one edit's result: the config and the item (options
    added since edits were first recorded count only when set, so those edits still resume)."""
    relevant = without_keys(resolved, NON_SEMANTIC_KEYS + at_defaults(resolved))
    relevant["item"] = [item.name, item.source_prompt, item.target_prompt, item.task]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def image_stamp(item: EditItem) -> float | None:
    """The modification time of an item's file (None for in-memory images or missing files)."""
    try:
        return item.path.stat().st_mtime if item.path else None
    except OSError:
        return None


@dataclass
class PlannedEdit:
    """An edit to do: its item, its output folder and the fingerprint its record will carry."""

    item: EditItem
    out: Path
    fingerprint: str


def finished_record(edit: PlannedEdit, since: float | None = None) -> EditRecord | None:
    """The record of ``edit`` if it is finished with the same fingerprint (resume), else None.

    A diverged edit is final; a skipped unreadable image counts as finished until its file
    changes; with ``since`` (a time), any record written after it counts (another process
    computed it during this run). A missing or damaged record counts as not finished.
    """
    path = edit.out / "summary.json"
    record = load_record(path)
    if record is None or record.fingerprint != edit.fingerprint:
        return None
    if since is not None:
        try:
            return record if path.stat().st_mtime >= since else None
        except OSError:
            return None
    if record.status == "done" and (edit.out / "result.png").is_file():
        return record
    if record.status == "diverged":  # final: the same config diverges again (force=true retries)
        return record
    if record.status == "skipped" and record.image_mtime == image_stamp(edit.item):
        return record
    return None


def run(cfg: DictConfig, output_dir: str | Path) -> list[dict[str, Any]]:
    """Edit every item of the configured dataset; returns one record per item (as in summary.json).

    A single edit writes into ``output_dir``; a dataset writes ``output_dir/edits/<item>/``.
    Finished edits with the same fingerprint are skipped unless ``force=true``; an unreadable
    image or a diverging edit among many is recorded and skipped, a lone one is an error.
    Processes sharing ``output_dir`` claim edits before computing them and share the work.
    """
    started = time.time()
    cfg = validate(cfg)
    output_dir = Path(output_dir)
    torch.manual_seed(cfg.seed)
    settings, training, terms = edit_settings(cfg), selector_training(cfg), build_terms(cfg)
    make_selector = functools.partial(build, selector_options(cfg), seed=cfg.seed)
    make_selector()  # fail on a bad selector option before loading a model
    optimizer = build(cfg.optimizer)
    dataset = unique_names(build(cfg.dataset))
    many = len(dataset) > 1  # a dataset's edits go in edits/<item>/, even in a shard of one
    items = dataset[cfg.shard:: cfg.num_shards]
    if not items:
        raise CpdsError(f"shard {cfg.shard} of {cfg.num_shards} is empty: the dataset has fewer items than shards")
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    resolved["task"] = task_in_use(resolved)  # null unless the dataset reads it: as every record says
    write_text(output_dir / "config.yaml", OmegaConf.to_yaml(resolved))
    device = resolve_device(job_device(cfg.device))
    dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    records, todo = split_finished(cfg, {**resolved, "dtype": dtype}, items, output_dir, many)
    if not has_cut(cfg.method) and "name" in cfg.selector and cfg.selector.name != "random":
        log.info("method %s has no CUT term: selector=%s is not used", cfg.method.name, cfg.selector.name)
    if records:
        log.info("resuming: %d of %d edits are already done (force=true recomputes them)", len(records), len(items))
    if todo:
        make_editor = functools.partial(Editor, settings=settings, terms=terms, make_optimizer=optimizer,
                                        make_selector=make_selector, selector_training=training)
        records += edit_all(cfg, resolved, todo, many, started, device, make_editor, output_dir)
    report_divergence(records, many)
    report_unreadable(records, many)
    return [record.as_dict() for record in records]


def edit_all(cfg: DictConfig, resolved: dict[str, Any], todo: list[PlannedEdit], many: bool, started: float,
             device: torch.device, make_editor: Callable[[SDStack], Editor], output_dir: Path
             ) -> list[EditRecord]:
    """Load the models and run the edits still to do, in claimed batches; their records."""
    metrics = load_metrics(MetricsConfig(**cfg.metrics), str(device))  # before SD: fail fast offline
    stack = load_model(cfg.model, device, cfg.dtype)
    if cfg.resolution != stack.resolution:
        log.warning("%s was trained at %d² but images are edited at resolution=%d²: set resolution=%d for its own size",
                    cfg.model.pretrained or cfg.model.name, stack.resolution, cfg.resolution, stack.resolution)
    editor = make_editor(stack)
    log.info("editing %d image(s) with %s on %s (pid %d)", len(todo), cfg.method.name, device, os.getpid())
    records: list[EditRecord] = []
    with profiled(cfg.profile, output_dir / "profile", device), \
            tqdm(total=len(todo), desc="images", disable=not many or not cfg.progress) as bar:
        def done_elsewhere(record: EditRecord) -> None:
            records.append(record)
            bar.update(1)

        def done_meanwhile(edit: PlannedEdit) -> EditRecord | None:
            """Checked once claimed: another process may have finished the edit since this run looked
            (with force=true, only a record written since this run started counts)."""
            return finished_record(edit, since=started if cfg.force else None)

        for batch in claimed_batches(todo, cfg.batch_size, cfg.claim_timeout_h, done_meanwhile, done_elsewhere):
            rows = []
            for edit in batch:
                record = base_record(cfg, editor, metrics, edit.item, edit.fingerprint)
                try:
                    rows.append(PendingEdit(edit.item, edit.out, record, edit.item.load()))
                except CpdsError as err:
                    if not many:
                        raise
                    log.warning("skipping %s: %s", edit.item.name, err)
                    record.status, record.reason, record.image_mtime = "skipped", str(err), image_stamp(edit.item)
                    record.save(edit.out)
                    records.append(record)
            if rows:
                records += edit_batch(editor, metrics, rows, cfg, resolved)
            bar.update(len(batch))
    return records


def load_model(model: DictConfig, device: torch.device, dtype: str) -> SDStack:
    """The configured SD stack on ``device`` (the model group's options, enums as their names)."""
    def name(value: Any) -> Any:
        return value.value if isinstance(value, Enum) else value

    stack = load_stack(model.pretrained, str(device), dtype, model.seed, model.revision,
                       architecture=name(model.architecture), prediction_type=name(model.prediction_type),
                       vae=model.vae, variant=model.variant)
    if stack.prediction_type != "epsilon":
        log.info("%s predicts %s: its outputs are converted to noise (epsilon) for guidance and the losses",
                 model.name, stack.prediction_type)
    return stack


@contextlib.contextmanager
def profiled(enabled: bool, folder: Path, device: torch.device) -> Iterator[None]:
    """The torch profiler around the edits (``profile=true``): a Chrome trace and a table of the
    most expensive ops in ``folder``."""
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as profiler:
        yield
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    write_text(folder / "summary.txt", profiler.key_averages().table(sort_by=sort_by, row_limit=40))
    write_atomically(folder / "trace.json", profiler.export_chrome_trace)
    log.info("profile written to %s (open trace.json in chrome://tracing or ui.perfetto.dev)", folder)


def split_finished(cfg: DictConfig, semantic: dict[str, Any], items: list[EditItem], output_dir: Path,
                   many: bool) -> tuple[list[EditRecord], list[PlannedEdit]]:
    """The records of edits already finished (resume) and the edits still to do; ``semantic`` is
    the resolved config with the resolved dtype (``auto`` is float16 on CUDA, float32 on CPU)."""
    records, todo = [], []
    for item in items:
        edit = PlannedEdit(item, output_dir / "edits" / item.name if many else output_dir,
                           edit_fingerprint(semantic, item))
        done = None if cfg.force else finished_record(edit)
        if done:
            records.append(done)
        else:
            todo.append(edit)
    return records, todo


def report_unreadable(records: list[EditRecord], many: bool) -> None:
    """A dataset none of whose images can be read is an error, not a run of skips."""
    if many and records and all(r.status == "skipped" for r in records):
        raise CpdsError(f"none of the {len(records)} images could be read (e.g. {records[0].image}: "
                        f"{records[0].reason}): check dataset.path")


def report_divergence(records: list[EditRecord], many: bool) -> None:
    """A lone diverged edit is an error; among many, a warning each (their records say so)."""
    for record in records:
        if record.status == "diverged":
            snapshots = record.snapshots
            kept = f"the last good snapshot is {snapshots[-1]}" if snapshots else "no snapshot was reached"
            message = (f"the latent became NaN/Inf at iteration {record.diverged_at} of the {record.image} "
                       f"edit (lr={record.lr}); {kept}; try a smaller lr")
            if not many:
                raise CpdsError(message)
            log.warning(message)


@dataclass
class PendingEdit:
    """An edit about to run: its item, output folder, record so far and loaded image."""

    item: EditItem
    out: Path
    record: EditRecord
    image: Image.Image


def run_name(cfg: DictConfig, item: EditItem) -> str:
    """method[-selector][-task][-shard k of n]-image: readable in a W&B group of thousands."""
    parts = [cfg.method.name]
    if has_cut(cfg.method):
        parts.append(str(cfg.selector.get("name")))
    if item.task:
        parts.append(item.task)
    if cfg.num_shards > 1:
        parts.append(f"shard{cfg.shard}of{cfg.num_shards}")
    return "-".join([*parts, item.name])


def job_device(device: str) -> str:
    """``auto`` in a multirun job on a multi-GPU machine: the GPU of the job number modulo the GPU
    count, so parallel jobs (joblib, submitit local) spread over the GPUs. Under SLURM each job
    sees only its own GPU, which this leaves as cuda:0."""
    if device != "auto" or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return device
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return device
    return f"cuda:{HydraConfig.get().job.num % torch.cuda.device_count()}"


def edit_seed(seed: int, name: str) -> int:
    """The seed of one edit: the run's seed and the image's name, so an edit's randomness does
    not depend on which other edits share its batch."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62


def base_record(cfg: DictConfig, editor: Editor, metrics: Metrics | None, item: EditItem,
                fingerprint: str) -> EditRecord:
    """What identifies an edit in its record (the table tool groups by these, and never averages
    records of different metric protocols together)."""
    evaluation = metrics.describe() if metrics else {"metrics_protocol": None, "clip_model": None}
    return EditRecord(
        image=item.name, task=item.task, source_prompt=item.source_prompt, target_prompt=item.target_prompt,
        method=cfg.method.name, score=_score_name(editor), cut=has_cut(cfg.method),
        selector=cfg.selector.get("name"), optimizer=cfg.optimizer.get("name"), model=cfg.model.name,
        seed=cfg.seed, lr=editor.settings.lr, w_dds=cfg.w_dds, w_cut=cfg.w_cut, iterations=cfg.iterations,
        resolution=cfg.resolution, sweep_name=cfg.sweep_name, device=str(editor.stack.device),
        dtype=str(editor.stack.dtype).removeprefix("torch."), fingerprint=fingerprint, **evaluation)


def _score_name(editor: Editor) -> str | None:
    """The name of the method's score term (``dds``, ``pds``, ...), None without one."""
    score = editor.terms.get("score")
    return score.name if score is not None else None


def edit_batch(editor: Editor, metrics: Metrics | None, rows: list[PendingEdit], cfg: DictConfig,
               resolved: dict[str, Any]) -> list[EditRecord]:
    """Edit a batch together; each edit gets its own outputs, W&B run and record."""
    images = torch.cat([prepare_image(row.image, cfg.resolution, cfg.image_prep.value) for row in rows])
    sources = to_pil((images + 1) / 2)
    loggers: list[RunLogger] = []
    snapshots: list[list[str]] = [[] for _ in rows]
    for row, source in zip(rows, sources):
        save_image(row.out / "source.png", source)
        loggers.append(build(cfg.logger, run_config=resolved, run_dir=str(row.out), run_name=run_name(cfg, row.item)))

    def on_log(b: int, values: dict[str, float]) -> None:
        loggers[b].log_metrics(values)

    def on_selector_round(b: int, round_record: dict[str, Any]) -> None:
        loggers[b].log_metrics({ITERATION: round_record[ITERATION], **{
            SELECTOR_ROUND.format(k): v for k, v in round_record.items() if v is not None and k != ITERATION}})

    def on_snapshot(b: int, iteration: int, decoded: torch.Tensor) -> None:
        snapshot = to_pil(decoded.unsqueeze(0))[0]
        path = save_image(rows[b].out / "snapshots" / f"iter_{iteration:04d}.png", snapshot)
        snapshots[b].append(str(path.relative_to(rows[b].out)))
        loggers[b].log_image("snapshot", snapshot, iteration,
                             snapshot_caption(iteration, rows[b].item.source_prompt, rows[b].item.target_prompt))

    start = time.perf_counter()
    result = editor.edit(images, [r.item.source_prompt for r in rows], [r.item.target_prompt for r in rows],
                         EditCallbacks(on_log, on_snapshot, on_selector_round),
                         seeds=[edit_seed(cfg.seed, r.item.name) for r in rows])
    seconds = (time.perf_counter() - start) / len(rows)  # the batch's time, shared by its edits
    decoded = editor.decode(result.latents)
    no_scores = {"clip": None, "lpips": None}
    scores = metrics((images + 1) / 2, decoded, [r.item.target_prompt for r in rows]) if metrics else None
    records = []
    for b, (row, source, edited) in enumerate(zip(rows, sources, to_pil(decoded))):
        record = row.record
        record.time_s, record.batch_size, record.snapshots = seconds, len(rows), snapshots[b]
        if result.diverged_at[b] is not None:
            record.status, record.diverged_at = "diverged", result.diverged_at[b]
            record.save(row.out)
            loggers[b].finish(failed=True)
            records.append(record)
            continue
        means = summarise_rounds(result.selector_rounds[b])
        row_scores = scores[b] if scores else no_scores
        record = dataclasses.replace(
            record, status="done", **row_scores, selector_accuracy=means["accuracy"],
            selector_balanced_accuracy=means["balanced_accuracy"],
            final={k: v for k, v in result.final[b].items() if k != ITERATION},
            selector_rounds=result.selector_rounds[b], selector_means=means,
            outputs={"result": "result.png", "side_by_side": "side_by_side.png", "source": "source.png"})
        comparison = side_by_side(source, edited)
        save_image(row.out / "result.png", edited)
        save_image(row.out / "side_by_side.png", comparison)
        record.save(row.out)  # last: its presence marks the edit finished
        logger = loggers[b]
        logger.log_image("result", comparison, cfg.iterations, result_caption(row_scores))
        logger.set_summary({"time_s": seconds, **{METRIC.format(k): v for k, v in row_scores.items() if v is not None},
                            **{FINAL.format(k): v for k, v in record.final.items()},
                            **{SELECTOR_MEAN.format(k): v for k, v in means.items() if v is not None}})
        logger.finish()
        log.info("%s: %r -> %r in %.1f s (CLIP %s, LPIPS %s), written to %s", row.item.name, row.item.source_prompt,
                 row.item.target_prompt, seconds, _fmt(row_scores["clip"]), _fmt(row_scores["lpips"]), row.out)
        records.append(record)
    return records


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

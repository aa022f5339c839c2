"""From a composed config to edited images on disk: build the pieces, run each edit, write outputs."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from cpds_exp.config import edit_settings, selector_options, selector_training, validate
from cpds_exp.data import EditItem, prepare_image, to_pil
from cpds_exp.editor import DivergenceError, EditCallbacks, Editor
from cpds_exp.errors import CpdsError
from cpds_exp.loggers import RunLogger
from cpds_exp.metrics import Metrics, MetricsConfig, load_metrics
from cpds_exp.models import load_stack
from cpds_exp.selector_training import summarise_rounds
from cpds_exp.results import save_image, side_by_side, write_json, write_text

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


#: Config keys that do not change an edit's outcome: a finished edit is reused across them.
NON_SEMANTIC_KEYS = ("progress", "logger", "force", "log_every", "snapshot_every", "sweep_name", "device")


def edit_fingerprint(resolved: dict[str, Any], item: EditItem) -> str:
    """A hash of everything that determines one edit's result: the config and the item."""
    relevant = {k: v for k, v in resolved.items() if k not in NON_SEMANTIC_KEYS}
    relevant["dataset"] = {k: v for k, v in relevant["dataset"].items() if k != "limit"}
    relevant["item"] = [item.name, item.source_prompt, item.target_prompt, item.task]
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_record(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The record of an edit already done with the same fingerprint (resume), else None."""
    try:
        record = json.loads((out / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    done = record.get("status") == "done" and (out / "result.png").is_file()
    return record if done and record.get("fingerprint") == fingerprint else None


def run(cfg: DictConfig, output_dir: str | Path) -> list[dict[str, Any]]:
    """Edit every item of the configured dataset; returns one record per item.

    A single edit writes into ``output_dir``; a dataset writes ``output_dir/edits/<item>/``.
    Finished edits with the same fingerprint are skipped unless ``force=true``; an unreadable
    image or a diverging edit among many is recorded and skipped, a lone one is an error.
    """
    cfg = validate(cfg)
    output_dir = Path(output_dir)
    settings = edit_settings(cfg)
    torch.manual_seed(cfg.seed)
    training = selector_training(cfg)
    make_selector = functools.partial(build, selector_options(cfg), seed=cfg.seed)
    make_selector()  # fail on a bad selector option before loading a model
    items = build(cfg.dataset)
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    write_text(output_dir / "config.yaml", OmegaConf.to_yaml(resolved))
    many = len(items) > 1
    todo = []
    records: list[dict[str, Any]] = []
    for item in items:
        out = output_dir / "edits" / item.name if many else output_dir
        fingerprint = edit_fingerprint(resolved, item)
        done = None if cfg.force else finished_record(out, fingerprint)
        if done:
            records.append(done)
        else:
            todo.append((item, out, fingerprint))
    if records:
        log.info("resuming: %d of %d edits are already done (force=true recomputes them)", len(records), len(items))
    if not todo:
        return records
    stack = load_stack(cfg.model.pretrained, cfg.device, cfg.dtype, cfg.model.seed, cfg.model.revision)
    metrics = load_metrics(MetricsConfig(**cfg.metrics), str(stack.device))
    editor = Editor(stack, settings, make_selector, build(cfg.optimizer), training)
    for item, out, fingerprint in tqdm(todo, desc="images", disable=not many or not cfg.progress):
        record = base_record(cfg, editor, item, fingerprint)
        try:
            image = item.load()
        except CpdsError as err:
            if not many:
                raise
            log.warning("skipping %s: %s", item.name, err)
            record.update(status="skipped", reason=str(err))
            write_json(out / "summary.json", record)
            records.append(record)
            continue
        logger = build(cfg.logger, run_config=resolved, run_dir=str(out), run_name=f"{cfg.method.name}-{item.name}")
        record = edit_one(editor, metrics, image, item, cfg, out, logger, record)
        if record["status"] == "diverged":
            snapshots = record["snapshots"]
            kept = f"the last good snapshot is {snapshots[-1]}" if snapshots else "no snapshot was reached"
            message = (f"the latent became NaN/Inf at iteration {record['diverged_at']} of the {item.name} edit "
                       f"(lr={record['lr']}); {kept}; try a smaller lr")
            if not many:
                raise CpdsError(message)
            log.warning(message)
        records.append(record)
    return records


def base_record(cfg: DictConfig, editor: Editor, item: EditItem, fingerprint: str) -> dict[str, Any]:
    """What identifies an edit in its record (the table tool groups by these)."""
    return {
        "image": item.name, "task": item.task, "source_prompt": item.source_prompt, "target_prompt": item.target_prompt,
        "method": cfg.method.name, "score": cfg.method.score.value, "cut": cfg.method.cut,
        "selector": cfg.selector.get("name"), "optimizer": cfg.optimizer.get("name"), "model": cfg.model.name,
        "seed": cfg.seed, "lr": editor.settings.lr, "w_dds": cfg.w_dds, "w_cut": cfg.w_cut,
        "iterations": cfg.iterations, "resolution": cfg.resolution, "sweep_name": cfg.sweep_name,
        "device": str(editor.stack.device), "dtype": str(editor.stack.dtype).removeprefix("torch."),
        "fingerprint": fingerprint,
    }


def edit_one(editor: Editor, metrics: Metrics | None, image: Image.Image, item: EditItem, cfg: DictConfig,
             out: Path, logger: RunLogger, record: dict[str, Any]) -> dict[str, Any]:
    """One edit with its outputs (source, snapshots, result, source | result) and its record."""
    out.mkdir(parents=True, exist_ok=True)
    images = prepare_image(image, cfg.resolution, cfg.image_prep.value)
    source = to_pil((images + 1) / 2)[0]
    save_image(out / "source.png", source)
    snapshots: list[str] = []

    def on_log(values: dict[str, float]) -> None:
        logger.log_metrics(values, step=int(values["iteration"]))

    def on_selector_round(round_record: dict[str, Any]) -> None:
        logger.log_metrics({f"selector/{k}": v for k, v in round_record.items() if v is not None},
                           step=int(round_record["iteration"]))

    def on_snapshot(iteration: int, decoded: torch.Tensor) -> None:
        snapshot = to_pil(decoded)[0]
        snapshots.append(str(save_image(out / "snapshots" / f"iter_{iteration:04d}.png", snapshot).relative_to(out)))
        logger.log_images({"snapshot": snapshot}, step=iteration)

    start = time.perf_counter()
    try:
        result = editor.edit(images, [item.source_prompt], [item.target_prompt],
                             EditCallbacks(on_log, on_snapshot, on_selector_round))
    except DivergenceError as err:
        record.update(status="diverged", diverged_at=err.iteration, snapshots=snapshots,
                      time_s=time.perf_counter() - start)
        write_json(out / "summary.json", record)
        logger.finish(failed=True)
        return record
    seconds = time.perf_counter() - start
    decoded = editor.decode(result.latents)
    edited = to_pil(decoded)[0]
    comparison = side_by_side(source, edited)
    scores = metrics((images + 1) / 2, decoded, [item.target_prompt])[0] if metrics else {"clip": None, "lpips": None}
    means = summarise_rounds(result.selector_rounds)
    record.update(status="done", time_s=seconds, **scores, selector_accuracy=means["accuracy"],
                  selector_balanced_accuracy=means["balanced_accuracy"], snapshots=snapshots,
                  final={k: v for k, v in result.final.items() if k != "iteration"},
                  selector_rounds=result.selector_rounds, selector_means=means,
                  outputs={"result": "result.png", "side_by_side": "side_by_side.png", "source": "source.png"})
    save_image(out / "result.png", edited)
    save_image(out / "side_by_side.png", comparison)
    write_json(out / "summary.json", record)  # last: its presence marks the edit finished
    logger.log_images({"result": comparison}, step=cfg.iterations)
    logger.set_summary({"time_s": seconds, **{f"metrics/{k}": v for k, v in scores.items() if v is not None},
                        **{f"final/{k}": v for k, v in record["final"].items()},
                        **{f"selector_mean/{k}": v for k, v in means.items() if v is not None}})
    logger.finish()
    log.info("%s: %r -> %r in %.1f s (CLIP %s, LPIPS %s), written to %s", item.name, item.source_prompt,
             item.target_prompt, seconds, _fmt(scores["clip"]), _fmt(scores["lpips"]), out)
    return record


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

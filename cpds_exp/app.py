"""From a composed config to edited images on disk: build the pieces, run each edit, write outputs."""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cpds_exp.config import edit_settings, selector_options, selector_training, validate
from cpds_exp.data import EditItem, prepare_image, to_pil
from cpds_exp.editor import DivergenceError, EditCallbacks, Editor
from cpds_exp.errors import CpdsError
from cpds_exp.loggers import RunLogger
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


def run(cfg: DictConfig, output_dir: str | Path) -> list[dict[str, Any]]:
    """Edit every item of the configured dataset; returns one summary per edit."""
    cfg = validate(cfg)
    output_dir = Path(output_dir)
    settings = edit_settings(cfg)
    torch.manual_seed(cfg.seed)
    training = selector_training(cfg)
    make_selector = functools.partial(build, selector_options(cfg), seed=cfg.seed)
    make_selector()  # fail on a bad selector option before loading a model
    items = build(cfg.dataset)
    stack = load_stack(cfg.model.pretrained, cfg.device, cfg.dtype, cfg.model.seed, cfg.model.revision)
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    write_text(output_dir / "config.yaml", OmegaConf.to_yaml(resolved))
    editor = Editor(stack, settings, make_selector, build(cfg.optimizer), training)
    summaries = []
    for item in tqdm(items, desc="images", disable=len(items) == 1 or not cfg.progress):
        item_dir = output_dir if len(items) == 1 else output_dir / item.name
        logger = build(cfg.logger, run_config=resolved, run_dir=str(item_dir), run_name=f"{cfg.method.name}-{item.name}")
        summaries.append(edit_one(editor, item, cfg, item_dir, logger))
    return summaries


def edit_one(editor: Editor, item: EditItem, cfg: DictConfig, out: Path, logger: RunLogger) -> dict[str, Any]:
    """One edit with its outputs: source, snapshots, result, source | result, summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    images = prepare_image(item.image, cfg.resolution, cfg.image_prep.value)
    source = to_pil((images + 1) / 2)[0]
    save_image(out / "source.png", source)
    snapshots: list[str] = []

    def on_log(metrics: dict[str, float]) -> None:
        logger.log_metrics(metrics, step=int(metrics["iteration"]))

    def on_selector_round(record: dict[str, Any]) -> None:
        logger.log_metrics({f"selector/{k}": v for k, v in record.items() if v is not None},
                           step=int(record["iteration"]))

    def on_snapshot(iteration: int, decoded: torch.Tensor) -> None:
        image = to_pil(decoded)[0]
        snapshots.append(str(save_image(out / "snapshots" / f"iter_{iteration:04d}.png", image).relative_to(out)))
        logger.log_images({"snapshot": image}, step=iteration)

    summary: dict[str, Any] = {
        "image": item.name, "method": cfg.method.name, "score": cfg.method.score.value, "cut": cfg.method.cut,
        "selector": cfg.selector.get("name"), "optimizer": cfg.optimizer.get("name"), "model": cfg.model.name,
        "source_prompt": item.source_prompt, "target_prompt": item.target_prompt, "seed": cfg.seed,
        "lr": editor.settings.lr, "iterations": cfg.iterations, "resolution": cfg.resolution,
        "device": str(editor.stack.device), "dtype": str(editor.stack.dtype).removeprefix("torch."),
    }
    start = time.perf_counter()
    try:
        result = editor.edit(images, [item.source_prompt], [item.target_prompt],
                             EditCallbacks(on_log, on_snapshot, on_selector_round))
    except DivergenceError as err:
        summary.update(status="diverged", diverged_at=err.iteration, snapshots=snapshots,
                       time_s=time.perf_counter() - start)
        write_json(out / "summary.json", summary)
        logger.finish(failed=True)
        kept = f"the last good snapshot is {snapshots[-1]}" if snapshots else "no snapshot was reached"
        raise CpdsError(f"{err} of the {item.name} edit (lr={editor.settings.lr}); {kept}; try a smaller lr") from None
    edited = to_pil(editor.decode(result.latents))[0]
    comparison = side_by_side(source, edited)
    save_image(out / "result.png", edited)
    save_image(out / "side_by_side.png", comparison)
    summary.update(status="done", time_s=time.perf_counter() - start, snapshots=snapshots,
                   final={k: v for k, v in result.final.items() if k != "iteration"},
                   selector_rounds=result.selector_rounds, selector_means=summarise_rounds(result.selector_rounds),
                   outputs={"result": "result.png", "side_by_side": "side_by_side.png", "source": "source.png"})
    write_json(out / "summary.json", summary)
    logger.log_images({"result": comparison}, step=cfg.iterations)
    logger.set_summary({"time_s": summary["time_s"], **{f"final/{k}": v for k, v in summary["final"].items()},
                        **{f"selector_mean/{k}": v for k, v in summary["selector_means"].items() if v is not None}})
    logger.finish()
    log.info("%s: %s -> %s in %.1f s, written to %s", item.name, item.source_prompt, item.target_prompt,
             summary["time_s"], out)
    return summary

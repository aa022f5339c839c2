"""A composed config checked (ranges, one line each) and translated into :class:`EditSettings`,
loss terms and selector options. The schema itself is :mod:`cpds_exp.schema`."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import fields

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cpds_exp.editing.editor import EditSettings
from cpds_exp.errors import CpdsError
from cpds_exp.naming import check_folder_name
from cpds_exp.schema import AppConfig, SelectorTraining
from cpds_exp.editing.terms import Term

FLOAT32_MAX = 3.4e38  # a larger lr cannot even be applied to a float32 latent


def _one_line(err: OmegaConfBaseException) -> str:
    return str(err).strip().splitlines()[0]


def validate(cfg: DictConfig) -> DictConfig:
    """Merge onto the schema and check ranges; every failure is a one-line :class:`CpdsError`."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(AppConfig), cfg)
        OmegaConf.resolve(typed)
        missing = sorted(OmegaConf.missing_keys(typed))
    except OmegaConfBaseException as err:
        raise CpdsError(f"invalid config: {_one_line(err)}") from err
    if missing:
        raise CpdsError(f"missing config value(s) {', '.join(missing)}: set them on the command line, "
                        f"e.g. {missing[0]}=...")
    lr = typed.lr if typed.lr is not None else typed.method.lr
    if typed.sweep_name is not None:
        check_folder_name(typed.sweep_name, "sweep_name")
    defaults = {f.name: f.default for f in fields(AppConfig)}
    for key in ("guidance_scale", "w_dds", "w_cut", "tau"):  # NaN/Inf would load the model, then diverge
        if not math.isfinite(typed[key]):
            raise CpdsError(f"{key}={typed[key]} must be a finite number (the default is {defaults[key]})")
    checks = [
        (0 < lr < FLOAT32_MAX, f"lr={lr} must be positive and finite (the method's default is {typed.method.lr})"),
        (typed.iterations > 0, f"iterations={typed.iterations} must be positive (the paper uses 200)"),
        (0 <= typed.t_min < typed.t_max <= 1000, f"t_min={typed.t_min}, t_max={typed.t_max}: need 0 <= t_min < t_max <= 1000"),
        (typed.resolution > 0 and typed.resolution % 64 == 0,
         f"resolution={typed.resolution} is not a positive multiple of 64: use 512 (or 256, 768, ...)"),
        (typed.n_patches > 0, f"n_patches={typed.n_patches} must be positive (the paper uses 256)"),
        (len(typed.patch_sizes) > 0 and all(p > 0 for p in typed.patch_sizes),
         f"patch_sizes={list(typed.patch_sizes)} must be a non-empty list of positive sizes, e.g. [1,2]"),
        (typed.tau > 0, f"tau={typed.tau} must be positive (the paper uses 0.07)"),
        (typed.log_every > 0, f"log_every={typed.log_every} must be positive"),
        (typed.batch_size > 0, f"batch_size={typed.batch_size} must be positive"),
        (typed.num_shards > 0 and 0 <= typed.shard < typed.num_shards,
         f"shard={typed.shard} with num_shards={typed.num_shards}: need 0 <= shard < num_shards"),
        (typed.claim_timeout_h is None or typed.claim_timeout_h > 0,
         f"claim_timeout_h={typed.claim_timeout_h} must be positive hours, or null to never take a claim over"),
        (typed.snapshot_every >= 0, f"snapshot_every={typed.snapshot_every} must be >= 0 (0 turns snapshots off)"),
    ]
    for ok, message in checks:
        if not ok:
            raise CpdsError(message)
    return typed


def edit_settings(cfg: DictConfig) -> EditSettings:
    """The editor's settings from a validated config (lr: the override, else the method's)."""
    return EditSettings(
        lr=cfg.lr if cfg.lr is not None else cfg.method.lr, iterations=cfg.iterations,
        guidance_scale=cfg.guidance_scale, t_min=cfg.t_min, t_max=cfg.t_max, seed=cfg.seed,
        snapshot_every=cfg.snapshot_every,
        log_every=cfg.log_every, progress=cfg.progress, compile=cfg.compile, compile_mode=cfg.compile_mode,
        compile_backend=cfg.compile_backend,
        channels_last=cfg.channels_last, gradient_checkpointing=cfg.gradient_checkpointing,
    )


def has_cut(method: DictConfig) -> bool:
    """Whether a method has the CUT term (the term named ``cut``), so patch selectors matter."""
    return "cut" in method.terms


def build_term(key: str, node: DictConfig) -> Term:
    """One term from its config node: the ``_target_`` dataclass with the node's options, typed."""
    params = OmegaConf.to_container(node, resolve=True)
    target = params.pop("_target_", None)
    try:
        cls = get_class(target) if target else None
    except Exception as err:  # hydra wraps import errors of every kind
        raise CpdsError(f"method.terms.{key}._target_={target} cannot be imported: give a class's full "
                        "module path, e.g. cpds_exp.editing.terms.DDSTerm") from err
    if not (isinstance(cls, type) and issubclass(cls, Term) and dataclasses.is_dataclass(cls)):
        raise CpdsError(f"method.terms.{key}._target_={target} is not a dataclass subclass of "
                        "cpds_exp.editing.terms.Term: point it at a loss term class")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), params))
    except OmegaConfBaseException as err:
        raise CpdsError(f"invalid method.terms.{key} option: {_one_line(err)}") from err


def build_terms(cfg: DictConfig) -> dict[str, Term]:
    """The method's loss terms, each checked against the run's settings (before any model loads)."""
    if not cfg.method.terms:
        raise CpdsError(f"method {cfg.method.name} has no terms: add one under method.terms, "
                        "e.g. score: {_target_: cpds_exp.editing.terms.DDSTerm}")
    terms = {key: build_term(key, node) for key, node in cfg.method.terms.items()}
    for term in terms.values():
        term.check(cfg.t_min)
    return terms


TRAINING_KEYS = tuple(f.name for f in fields(SelectorTraining))


def selector_training(cfg: DictConfig) -> SelectorTraining:
    """The training options of the ``selector`` group (train_every, positive, ...), typed and checked."""
    values = {k: v for k, v in cfg.selector.items() if k in TRAINING_KEYS}
    try:
        training = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SelectorTraining), values))
    except OmegaConfBaseException as err:
        raise CpdsError(f"invalid selector option: {_one_line(err)}") from err
    if training.train_every <= 0:
        raise CpdsError(f"selector.train_every={training.train_every} must be positive (the paper uses 10)")
    if not 0 < training.percentile < 100:
        raise CpdsError(f"selector.percentile={training.percentile} must lie strictly between 0 and 100 (paper: 80)")
    return training


def selector_options(cfg: DictConfig) -> DictConfig:
    """The ``selector`` group without its training options: what the selector class is built from."""
    return OmegaConf.create({k: v for k, v in cfg.selector.items() if k not in TRAINING_KEYS})
